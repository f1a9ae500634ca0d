//! Thumbnails of captures (`thumbs/<capture sha256>.jpg`), for the screen and reports.
//!
//! A thumbnail is not evidence (the audit log holds the capture's SHA-256), but a clinician reads
//! it as "the capture this decision was made on", so a thumbnail damaged or changed on the card
//! must not be shown as if it were the capture:
//! - each file is one framed, checksummed record ([`RecordKind::Thumbnail`], the JPEG bytes as
//!   payload): damage (bit rot, a bad sector, a file cut short) fails the frame check;
//! - before the file is written, the device appends an [`AuditEvent::Thumbnail`] record with
//!   the SHA-256 of the JPEG bytes to the hash-chained audit log. Whoever can rewrite the card
//!   can rewrite a checksum, but not that record without breaking the chain, so a thumbnail
//!   replaced or edited later no longer matches ([`ThumbnailIndex`], [`read_thumbnail`]), and
//!   one the device never recorded is refused once the log records thumbnails.
//!
//! Files from before either existed (a bare JPEG, or a frame with no record because the log was
//! written by format 2) are served as they are, and `sgps audit verify` counts them.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::audit::{AuditEvent, AuditRecord};
use super::record::{self, RecordKind};
use super::{Store, StoreError, THUMB_SIDE};

/// Format version of thumbnail records.
pub const THUMB_VERSION: u16 = 1;

/// What reading a stored thumbnail found.
#[derive(Debug, Clone, PartialEq)]
pub enum StoredThumbnail {
    /// None kept for this capture (never stored, or pruned: see [`super::MAX_THUMBS`]).
    Missing,
    /// The JPEG bytes, checked against their frame (or from before thumbnails were framed).
    Intact(Vec<u8>),
    /// The file is there but does not check: what is wrong, for the message.
    Damaged(String),
    /// The file checks, but it is not the thumbnail the audit log recorded for the capture
    /// (replaced or edited after it was stored, or never stored by the device): why.
    Altered(String),
}

/// What the audit log says about the thumbnail of one capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The SHA-256 of the JPEG bytes the device stored.
    Hash([u8; 32]),
    /// Nothing to check against: the capture was made before the log recorded thumbnails.
    Unchecked,
    /// The log recorded thumbnails by then, but none for this capture: any file is not the
    /// device's.
    Nothing,
}

/// The thumbnail records of an audit log, by capture.
#[derive(Debug, Clone, Default)]
pub struct ThumbnailIndex {
    hashes: HashMap<[u8; 32], [u8; 32]>,
    /// Sequence number of the first thumbnail record.
    first_seq: Option<u64>,
    /// Sequence number of the last record naming each capture.
    capture_seq: HashMap<[u8; 32], u64>,
}

impl ThumbnailIndex {
    /// Index the records of a log (oldest first).
    pub fn from_records(records: &[AuditRecord]) -> ThumbnailIndex {
        let mut ix = ThumbnailIndex::default();
        for r in records {
            let capture = match &r.event {
                AuditEvent::Thumbnail {
                    capture_sha256,
                    jpeg_sha256,
                } => {
                    ix.first_seq.get_or_insert(r.seq);
                    ix.hashes.insert(*capture_sha256, *jpeg_sha256);
                    capture_sha256
                }
                e => match e.capture() {
                    Some(c) => c,
                    None => continue,
                },
            };
            ix.capture_seq.insert(*capture, r.seq);
        }
        ix
    }

    /// True when the log names this capture at all.
    pub fn knows(&self, capture: &[u8; 32]) -> bool {
        self.capture_seq.contains_key(capture)
    }

    /// What the log says about the thumbnail of `capture`.
    pub fn recorded(&self, capture: &[u8; 32]) -> Recorded {
        if let Some(h) = self.hashes.get(capture) {
            return Recorded::Hash(*h);
        }
        match (self.first_seq, self.capture_seq.get(capture)) {
            (Some(first), Some(&seq)) if seq > first => Recorded::Nothing,
            _ => Recorded::Unchecked,
        }
    }
}

/// SHA-256 of a thumbnail's JPEG bytes, as the audit log records it.
pub fn jpeg_sha256(jpeg: &[u8]) -> [u8; 32] {
    Sha256::digest(jpeg).into()
}

/// The small JPEG kept of a capture (deterministic: the same image gives the same bytes).
pub fn encode_thumbnail(img: &image::RgbImage) -> Result<Vec<u8>, StoreError> {
    let small = image::imageops::thumbnail(
        img,
        THUMB_SIDE.min(img.width()).max(1),
        (THUMB_SIDE * img.height() / img.width().max(1)).clamp(1, THUMB_SIDE),
    );
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 80)
        .encode_image(&small)
        .map_err(|e| StoreError::Encode(format!("thumbnail: {e}")))?;
    Ok(jpeg)
}

/// Where the thumbnail of a capture lives in the storage directory `root` (read by the screen
/// and reports without opening the store).
pub fn thumbnail_path(root: &Path, sha: &[u8; 32]) -> PathBuf {
    root.join("thumbs")
        .join(format!("{}.jpg", hex::encode(sha)))
}

/// Read and check the thumbnail of capture `sha` in the storage directory `root`, against what
/// the audit log recorded for it (see [`ThumbnailIndex::recorded`]).
pub fn read_thumbnail(root: &Path, sha: &[u8; 32], recorded: Recorded) -> StoredThumbnail {
    let read = read_unchecked(root, sha);
    match (read, recorded) {
        (StoredThumbnail::Intact(jpeg), Recorded::Hash(h)) if jpeg_sha256(&jpeg) != h => {
            StoredThumbnail::Altered(format!(
                "its SHA-256 is {}, the audit log recorded {} when it was stored: it was replaced or edited since",
                hex::encode(jpeg_sha256(&jpeg)),
                hex::encode(h)
            ))
        }
        (StoredThumbnail::Intact(_), Recorded::Nothing) => StoredThumbnail::Altered(
            "the audit log has no record of it although it records every thumbnail the device stores: it was put there by something else".into(),
        ),
        (other, _) => other,
    }
}

/// The thumbnail file's frame check alone.
fn read_unchecked(root: &Path, sha: &[u8; 32]) -> StoredThumbnail {
    let path = thumbnail_path(root, sha);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return StoredThumbnail::Missing,
        Err(e) => return StoredThumbnail::Damaged(format!("cannot read {}: {e}", path.display())),
    };
    // a bare JPEG (start and end-of-image markers) was written before thumbnails were framed
    if bytes.starts_with(&[0xFF, 0xD8]) && bytes.ends_with(&[0xFF, 0xD9]) {
        return StoredThumbnail::Intact(bytes);
    }
    match record::decode::<Vec<u8>>(RecordKind::Thumbnail, THUMB_VERSION, &bytes) {
        Ok((jpeg, end)) if end == bytes.len() => StoredThumbnail::Intact(jpeg),
        Ok(_) => StoredThumbnail::Damaged("bytes after the record".into()),
        Err(e) => StoredThumbnail::Damaged(e.to_string()),
    }
}

impl Store {
    /// Store the thumbnail `jpeg` (from [`encode_thumbnail`]) of capture `sha` as a checksummed
    /// record, replacing any earlier file. The device records [`jpeg_sha256`] in the audit log
    /// first.
    pub fn write_thumbnail(&self, sha: &[u8; 32], jpeg: &[u8]) -> Result<(), StoreError> {
        record::write_record(
            &*self.disk,
            &thumbnail_path(&self.root, sha),
            RecordKind::Thumbnail,
            THUMB_VERSION,
            &jpeg,
        )
    }

    /// Keep the thumbnail of a capture as the device does: the SHA-256 of its JPEG appended to
    /// `audit` (fsynced) first, then the file written. A power cut in between leaves a record
    /// without a file ("no thumbnail kept"), never a file the log does not vouch for. Returns the
    /// record's sequence number and the JPEG's SHA-256.
    pub fn keep_thumbnail(
        &self,
        audit: &mut super::AuditLog,
        capture: &[u8; 32],
        img: &image::RgbImage,
    ) -> Result<(u64, [u8; 32]), StoreError> {
        let jpeg = encode_thumbnail(img)?;
        let jpeg_sha256 = jpeg_sha256(&jpeg);
        let seq = audit.append(AuditEvent::Thumbnail {
            capture_sha256: *capture,
            jpeg_sha256,
        })?;
        self.write_thumbnail(capture, &jpeg)?;
        Ok((seq, jpeg_sha256))
    }

    /// Encode and store the thumbnail of a capture, returning the SHA-256 of its JPEG bytes.
    pub fn save_thumbnail(
        &self,
        sha: &[u8; 32],
        img: &image::RgbImage,
    ) -> Result<[u8; 32], StoreError> {
        let jpeg = encode_thumbnail(img)?;
        self.write_thumbnail(sha, &jpeg)?;
        Ok(jpeg_sha256(&jpeg))
    }

    /// The stored thumbnail of a capture, checked against what the audit log recorded.
    pub fn thumbnail(&self, sha: &[u8; 32], recorded: Recorded) -> StoredThumbnail {
        read_thumbnail(&self.root, sha, recorded)
    }

    /// Delete the oldest thumbnails beyond `max` (the device uses [`super::MAX_THUMBS`]), never one in
    /// `keep` (support shots). Returns how many were deleted.
    pub fn prune_thumbnails(&self, keep: &[[u8; 32]], max: usize) -> Result<usize, StoreError> {
        let dir = self.root.join("thumbs");
        let keep: std::collections::HashSet<String> = keep
            .iter()
            .map(|s| format!("{}.jpg", hex::encode(s)))
            .collect();
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = fs::read_dir(&dir)
            .map_err(|e| StoreError::io(&dir, e))?
            .flatten()
            .filter(|e| !keep.contains(&*e.file_name().to_string_lossy()))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if files.len() <= max {
            return Ok(0);
        }
        files.sort();
        let n = files.len() - max;
        for (_, p) in &files[..n] {
            self.disk.remove_file(p).map_err(|e| StoreError::io(p, e))?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intact(t: StoredThumbnail) -> Vec<u8> {
        match t {
            StoredThumbnail::Intact(b) => b,
            other => panic!("expected an intact thumbnail, got {other:?}"),
        }
    }

    #[test]
    fn thumbnails_are_small_bounded_and_keep_support_shots() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let img = image::RgbImage::from_fn(640, 480, |x, y| image::Rgb([x as u8, y as u8, 90]));
        let shas: Vec<[u8; 32]> = (0..6u8).map(|i| [i; 32]).collect();
        for (i, sha) in shas.iter().enumerate() {
            store.save_thumbnail(sha, &img).unwrap();
            // distinct modification times, oldest first
            let t =
                std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i as u64);
            std::fs::File::options()
                .write(true)
                .open(thumbnail_path(d.path(), sha))
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        let jpeg = intact(store.thumbnail(&shas[0], Recorded::Unchecked));
        let small = image::load_from_memory(&jpeg).unwrap();
        assert_eq!(
            (small.width(), small.height()),
            (THUMB_SIDE, THUMB_SIDE * 480 / 640)
        );
        // keep the oldest (a support shot) and 3 more: the 2 oldest others go
        assert_eq!(store.prune_thumbnails(&shas[..1], 3).unwrap(), 2);
        let left: Vec<bool> = shas
            .iter()
            .map(|s| store.thumbnail(s, Recorded::Unchecked) != StoredThumbnail::Missing)
            .collect();
        assert_eq!(left, [true, false, false, true, true, true]);
        assert_eq!(store.prune_thumbnails(&shas[..1], 3).unwrap(), 0);
    }

    #[test]
    fn a_damaged_thumbnail_is_never_served_as_the_capture() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let img = image::RgbImage::from_fn(300, 200, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let sha = [9u8; 32];
        store.save_thumbnail(&sha, &img).unwrap();
        let path = thumbnail_path(d.path(), &sha);
        let file = fs::read(&path).unwrap();
        let jpeg = intact(read_thumbnail(d.path(), &sha, Recorded::Unchecked));
        // what is served is exactly the JPEG, without the frame, and it decodes
        assert_eq!(
            record::encode(RecordKind::Thumbnail, THUMB_VERSION, &jpeg).unwrap(),
            file
        );
        assert!(image::load_from_memory(&jpeg).is_ok());
        // one flipped bit anywhere in the image data, or a file cut short: damaged, with a reason
        let data = record::HEADER_LEN + 2; // after the header and the payload's length
        for at in [data, file.len() / 2, file.len() - 1] {
            let mut b = file.clone();
            b[at] ^= 0x10;
            fs::write(&path, &b).unwrap();
            match read_thumbnail(d.path(), &sha, Recorded::Unchecked) {
                StoredThumbnail::Damaged(why) => assert!(why.contains("checksum"), "{why}"),
                other => panic!("bit {at} flipped: {other:?}"),
            }
        }
        fs::write(&path, &file[..file.len() / 2]).unwrap();
        assert!(matches!(
            read_thumbnail(d.path(), &sha, Recorded::Unchecked),
            StoredThumbnail::Damaged(_)
        ));
        fs::write(&path, b"GIF89a").unwrap();
        assert!(matches!(
            read_thumbnail(d.path(), &sha, Recorded::Unchecked),
            StoredThumbnail::Damaged(_)
        ));
        // a thumbnail written before the trailer existed is still shown
        fs::write(&path, &jpeg).unwrap();
        assert_eq!(
            intact(read_thumbnail(d.path(), &sha, Recorded::Unchecked)),
            jpeg
        );
        assert_eq!(
            read_thumbnail(d.path(), &[1; 32], Recorded::Unchecked),
            StoredThumbnail::Missing
        );
    }

    fn rec(seq: u64, event: AuditEvent) -> AuditRecord {
        AuditRecord {
            seq,
            time_unix_ms: 0,
            prev_sha256: Some([0; 32]),
            event,
        }
    }

    #[test]
    fn a_thumbnail_replaced_on_the_card_no_longer_matches_its_audit_record() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let img = image::RgbImage::from_fn(300, 200, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let other = image::RgbImage::from_fn(300, 200, |x, _| image::Rgb([0, x as u8, 200]));
        let (old, kept, planted) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let rejected = |capture_sha256| AuditEvent::Rejected {
            capture_sha256,
            reason: "blurred".into(),
        };
        // a capture from before thumbnails were recorded, then one whose thumbnail was recorded,
        // then one made while they were recorded but with no thumbnail record
        let jpeg = encode_thumbnail(&img).unwrap();
        assert_eq!(encode_thumbnail(&img).unwrap(), jpeg, "deterministic");
        let records = [
            rec(0, rejected(old)),
            rec(
                1,
                AuditEvent::Thumbnail {
                    capture_sha256: kept,
                    jpeg_sha256: jpeg_sha256(&jpeg),
                },
            ),
            rec(2, rejected(kept)),
            rec(3, rejected(planted)),
        ];
        let ix = ThumbnailIndex::from_records(&records);
        assert_eq!(ix.recorded(&old), Recorded::Unchecked);
        assert_eq!(ix.recorded(&kept), Recorded::Hash(jpeg_sha256(&jpeg)));
        assert_eq!(ix.recorded(&planted), Recorded::Nothing);
        assert!(ix.knows(&planted) && !ix.knows(&[9; 32]));
        for sha in [old, kept, planted] {
            assert_eq!(
                store.save_thumbnail(&sha, &img).unwrap(),
                jpeg_sha256(&jpeg)
            );
        }
        assert_eq!(intact(store.thumbnail(&old, ix.recorded(&old))), jpeg);
        assert_eq!(intact(store.thumbnail(&kept, ix.recorded(&kept))), jpeg);
        match store.thumbnail(&planted, ix.recorded(&planted)) {
            StoredThumbnail::Altered(why) => assert!(why.contains("no record"), "{why}"),
            t => panic!("a thumbnail the log never recorded was served: {t:?}"),
        }
        // another image written with a valid frame in place of the recorded one is refused
        store.save_thumbnail(&kept, &other).unwrap();
        match store.thumbnail(&kept, ix.recorded(&kept)) {
            StoredThumbnail::Altered(why) => assert!(why.contains("replaced or edited"), "{why}"),
            t => panic!("a replaced thumbnail was served: {t:?}"),
        }
        // damage is still damage, and a missing file still missing, whatever was recorded
        fs::write(thumbnail_path(d.path(), &kept), b"GIF89a").unwrap();
        assert!(matches!(
            store.thumbnail(&kept, ix.recorded(&kept)),
            StoredThumbnail::Damaged(_)
        ));
        assert_eq!(
            store.thumbnail(&[9; 32], Recorded::Hash([0; 32])),
            StoredThumbnail::Missing
        );
    }
}
