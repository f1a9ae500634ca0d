//! Framed, checksummed records and atomic file replacement.
//!
//! Frame layout (little-endian):
//! ```text
//! magic "SGPR" (4) | kind u8 | reserved u8 (0) | format version u16 | payload length u32 | CRC32 u32 | postcard payload
//! ```
//! The CRC32 covers kind, reserved, version, length and the payload, so a damaged header is
//! detected as well as a damaged payload.

use crate::atomic_file;
use crate::disk::Disk;
use std::fs;
use std::path::Path;

use serde::{Serialize, de::DeserializeOwned};

use super::StoreError;

/// Magic bytes at the start of every frame.
pub const MAGIC: [u8; 4] = *b"SGPR";
/// Size of the frame header.
pub const HEADER_LEN: usize = 16;
/// Largest payload accepted when reading (guards against a damaged length field).
pub const MAX_PAYLOAD: usize = 64 * 1024 * 1024;

/// What a frame holds; checked on read so that one record type is never read as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// One class of the task: name, description, support embeddings, capture metadata.
    Class = 1,
    /// Pointer to the active classifier.
    Active = 2,
    /// One audit-log entry.
    Audit = 3,
    /// The device's task as edited on the device (classes, descriptions, urgent flags).
    Task = 4,
    /// A capture's thumbnail: the JPEG bytes.
    Thumbnail = 5,
    /// Records written by tests and the crash-test helper.
    Test = 0xF0,
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic (not an sgps record)")]
    BadMagic,
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("record kind {found}, expected {expected}")]
    WrongKind { found: u8, expected: u8 },
    #[error("format version {found}, this sgps reads version {expected}")]
    Version { found: u16, expected: u16 },
    #[error("payload length {0} is implausible")]
    Length(usize),
    #[error("checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("payload does not decode: {0}")]
    Decode(String),
}

/// Encode `value` as one frame.
pub fn encode<T: Serialize>(
    kind: RecordKind,
    version: u16,
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    let payload = postcard::to_allocvec(value).map_err(|e| StoreError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.push(kind as u8);
    out.push(0);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let crc = crc(&out[4..12], &payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

fn crc(header: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(header);
    h.update(payload);
    h.finalize()
}

/// Check the frame at the start of `bytes`; returns (kind, version, payload range end).
/// Does not check kind/version against expectations.
pub fn check_frame(bytes: &[u8]) -> Result<(u8, u16, usize), FrameError> {
    if bytes.len() < 4 || bytes[..4] != MAGIC {
        if bytes.len() < 4 && MAGIC.starts_with(bytes) {
            return Err(FrameError::Truncated {
                need: HEADER_LEN,
                have: bytes.len(),
            });
        }
        return Err(FrameError::BadMagic);
    }
    if bytes.len() < HEADER_LEN {
        return Err(FrameError::Truncated {
            need: HEADER_LEN,
            have: bytes.len(),
        });
    }
    let kind = bytes[4];
    let version = u16::from_le_bytes([bytes[6], bytes[7]]);
    let len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    if len > MAX_PAYLOAD {
        return Err(FrameError::Length(len));
    }
    let end = HEADER_LEN + len;
    if bytes.len() < end {
        return Err(FrameError::Truncated {
            need: end,
            have: bytes.len(),
        });
    }
    let stored = u32::from_le_bytes(bytes[12..16].try_into().unwrap());
    let computed = crc(&bytes[4..12], &bytes[HEADER_LEN..end]);
    if stored != computed {
        return Err(FrameError::Checksum { stored, computed });
    }
    Ok((kind, version, end))
}

/// Decode the frame at the start of `bytes`; returns the value and the frame length.
pub fn decode<T: DeserializeOwned>(
    kind: RecordKind,
    version: u16,
    bytes: &[u8],
) -> Result<(T, usize), FrameError> {
    let (k, v, end) = check_frame(bytes)?;
    if k != kind as u8 {
        return Err(FrameError::WrongKind {
            found: k,
            expected: kind as u8,
        });
    }
    if v != version {
        return Err(FrameError::Version {
            found: v,
            expected: version,
        });
    }
    let value = postcard::from_bytes(&bytes[HEADER_LEN..end])
        .map_err(|e| FrameError::Decode(e.to_string()))?;
    Ok((value, end))
}

/// Read a single-record file written by [`write_record`].
pub fn read_record<T: DeserializeOwned>(
    path: &Path,
    kind: RecordKind,
    version: u16,
) -> Result<T, StoreError> {
    let bytes = fs::read(path).map_err(|e| StoreError::io(path, e))?;
    let (value, end) = decode(kind, version, &bytes).map_err(|reason| StoreError::Corrupt {
        path: path.to_owned(),
        reason,
    })?;
    if end != bytes.len() {
        return Err(StoreError::Corrupt {
            path: path.to_owned(),
            reason: FrameError::Length(bytes.len()),
        });
    }
    Ok(value)
}

/// Atomically replace `path` with one framed record.
pub fn write_record<T: Serialize>(
    disk: &dyn Disk,
    path: &Path,
    kind: RecordKind,
    version: u16,
    value: &T,
) -> Result<(), StoreError> {
    let bytes = encode(kind, version, value)?;
    atomic_file::write_on(disk, path, &bytes).map_err(|e| StoreError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::RealDisk;

    #[test]
    fn roundtrip_and_every_single_byte_flip_is_detected() {
        let v: (u32, String, Vec<f32>) = (7, "nevus".into(), vec![0.5, -1.0, 3.25]);
        let bytes = encode(RecordKind::Test, 3, &v).unwrap();
        let (back, n): ((u32, String, Vec<f32>), usize) =
            decode(RecordKind::Test, 3, &bytes).unwrap();
        assert_eq!(back, v);
        assert_eq!(n, bytes.len());
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(
                decode::<(u32, String, Vec<f32>)>(RecordKind::Test, 3, &b).is_err(),
                "flip at byte {i} not detected"
            );
        }
        for cut in 0..bytes.len() {
            assert!(decode::<(u32, String, Vec<f32>)>(RecordKind::Test, 3, &bytes[..cut]).is_err());
        }
    }

    #[test]
    fn wrong_kind_and_version_are_reported() {
        let bytes = encode(RecordKind::Class, 1, &5u8).unwrap();
        assert!(matches!(
            decode::<u8>(RecordKind::Active, 1, &bytes),
            Err(FrameError::WrongKind { .. })
        ));
        assert_eq!(
            decode::<u8>(RecordKind::Class, 2, &bytes).unwrap_err(),
            FrameError::Version {
                found: 1,
                expected: 2
            }
        );
    }

    #[test]
    fn failed_write_keeps_old_content_and_removes_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.rec");
        write_record(&RealDisk, &p, RecordKind::Test, 1, &"old".to_string()).unwrap();
        let new = encode(RecordKind::Test, 1, &"new content".to_string()).unwrap();
        let err = atomic_file::write_on(&crate::disk::testing::FullDisk, &p, &new)
            .map_err(|e| StoreError::io(&p, e))
            .unwrap_err();
        assert!(err.is_no_space(), "{err}");
        assert!(err.to_string().contains("full"), "{err}");
        let old: String = read_record(&p, RecordKind::Test, 1).unwrap();
        assert_eq!(old, "old");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "temporary left behind: {names:?}");
    }

    #[test]
    fn truncated_file_is_corrupt_not_panic() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.rec");
        write_record(&RealDisk, &p, RecordKind::Test, 1, &vec![1u32; 100]).unwrap();
        let b = fs::read(&p).unwrap();
        fs::write(&p, &b[..b.len() - 3]).unwrap();
        let e = read_record::<Vec<u32>>(&p, RecordKind::Test, 1).unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    }
}
