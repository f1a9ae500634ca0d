//! Thumbnails of captures (`thumbs/<capture sha256>.jpg`), for the screen and reports.
//!
//! A thumbnail is not evidence (the audit log holds the capture's SHA-256), but a clinician reads
//! it as "the capture this decision was made on", so a thumbnail damaged on the card must not be
//! shown as if it were intact. Each file is one framed, checksummed record
//! ([`RecordKind::Thumbnail`], the JPEG bytes as payload), read back with the same frame check as
//! every other record ([`read_thumbnail`]). This detects damage (bit rot, a bad sector, a file cut
//! short), not a deliberate edit: whoever can rewrite the card can rewrite the checksum too; the
//! audit log's hash chain is what makes records tamper-evident. Files written before thumbnails
//! were framed (a bare JPEG) are served as they are.

use std::fs;
use std::path::{Path, PathBuf};

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
}

/// Where the thumbnail of a capture lives in the storage directory `root` (read by the screen
/// and reports without opening the store).
pub fn thumbnail_path(root: &Path, sha: &[u8; 32]) -> PathBuf {
    root.join("thumbs")
        .join(format!("{}.jpg", hex::encode(sha)))
}

/// Read and check the thumbnail of capture `sha` in the storage directory `root`.
pub fn read_thumbnail(root: &Path, sha: &[u8; 32]) -> StoredThumbnail {
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
    /// Store a small JPEG of a capture (for the UI and reports), as a checksummed record.
    pub fn save_thumbnail(&self, sha: &[u8; 32], img: &image::RgbImage) -> Result<(), StoreError> {
        let path = thumbnail_path(&self.root, sha);
        if path.exists() {
            return Ok(());
        }
        let small = image::imageops::thumbnail(
            img,
            THUMB_SIDE.min(img.width()).max(1),
            (THUMB_SIDE * img.height() / img.width().max(1)).clamp(1, THUMB_SIDE),
        );
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 80)
            .encode_image(&small)
            .map_err(|e| StoreError::Encode(format!("thumbnail: {e}")))?;
        record::write_record(
            &*self.disk,
            &path,
            RecordKind::Thumbnail,
            THUMB_VERSION,
            &jpeg,
        )
    }

    /// The stored thumbnail of a capture, checked.
    pub fn thumbnail(&self, sha: &[u8; 32]) -> StoredThumbnail {
        read_thumbnail(&self.root, sha)
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
        let jpeg = intact(store.thumbnail(&shas[0]));
        let small = image::load_from_memory(&jpeg).unwrap();
        assert_eq!(
            (small.width(), small.height()),
            (THUMB_SIDE, THUMB_SIDE * 480 / 640)
        );
        // keep the oldest (a support shot) and 3 more: the 2 oldest others go
        assert_eq!(store.prune_thumbnails(&shas[..1], 3).unwrap(), 2);
        let left: Vec<bool> = shas
            .iter()
            .map(|s| store.thumbnail(s) != StoredThumbnail::Missing)
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
        let jpeg = intact(read_thumbnail(d.path(), &sha));
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
            match read_thumbnail(d.path(), &sha) {
                StoredThumbnail::Damaged(why) => assert!(why.contains("checksum"), "{why}"),
                other => panic!("bit {at} flipped: {other:?}"),
            }
        }
        fs::write(&path, &file[..file.len() / 2]).unwrap();
        assert!(matches!(
            read_thumbnail(d.path(), &sha),
            StoredThumbnail::Damaged(_)
        ));
        fs::write(&path, b"GIF89a").unwrap();
        assert!(matches!(
            read_thumbnail(d.path(), &sha),
            StoredThumbnail::Damaged(_)
        ));
        // a thumbnail written before the trailer existed is still shown
        fs::write(&path, &jpeg).unwrap();
        assert_eq!(intact(read_thumbnail(d.path(), &sha)), jpeg);
        assert_eq!(read_thumbnail(d.path(), &[1; 32]), StoredThumbnail::Missing);
    }
}
