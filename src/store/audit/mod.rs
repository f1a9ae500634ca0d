//! Append-only audit log: a sequence of framed records (see [`super::record`]), each with its
//! own checksum and the SHA-256 of the record before it (a hash chain: a record changed,
//! removed, inserted or reordered anywhere but at the very end breaks it, and `sgps audit
//! verify` says where). Every append is written with one `write` call and `fsync`ed before it is
//! acknowledged.
//!
//! Reading never fails because of damage: a record whose frame does not check is skipped, the
//! reader resynchronises on the next magic, and the damage is reported. A torn tail (damage
//! after the last intact record: an append that power cut short or whose sectors did not all
//! reach the card) is cut off when the log is opened for appending; it was never acknowledged.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::record::{self, FrameError, MAGIC, RecordKind};

/// Format version of audit records (3: with [`AuditEvent::Thumbnail`]; 2, the same layout
/// without that event, and 1, unchained, are still read).
pub const AUDIT_VERSION: u16 = 3;
/// Sector size of the power-loss model: unsynced data is lost or kept in units of this.
pub const SECTOR: usize = 512;
/// Size at which `audit.log` is rotated into a segment `audit-<first>-<last>.log`.
pub const SEGMENT_BYTES: u64 = 8 * 1024 * 1024;
/// Size the log's files may take together before the oldest *exported* segments are deleted.
/// Segments never exported are never deleted: past this size the device warns instead.
pub const MAX_LOG_BYTES: u64 = 64 * 1024 * 1024;
/// Suffix of the marker `sgps audit export` leaves next to each segment it copied.
pub const EXPORTED_SUFFIX: &str = ".exported";

/// The verdict shown to the clinician.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Confident prediction of a class that is not flagged urgent (green LED).
    Benign,
    /// Not confident enough: refer to a specialist (amber LED).
    Refer,
    /// Confident prediction of a class flagged urgent in the task (red LED).
    Urgent,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Benign => "benign",
            Verdict::Refer => "refer",
            Verdict::Urgent => "urgent",
        }
    }
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AuditEvent {
    /// A screening decision.
    Decision {
        capture_sha256: [u8; 32],
        classifier_id: String,
        probabilities: Vec<f32>,
        top: u16,
        label: String,
        verdict: Verdict,
    },
    /// A capture was rejected by the quality gate.
    Rejected {
        capture_sha256: [u8; 32],
        reason: String,
    },
    /// A support shot was enrolled for a class.
    Enrolled {
        class: String,
        shot: u16,
        capture_sha256: [u8; 32],
    },
    /// A classifier was synthesized and made active.
    Synthesized {
        classifier_id: String,
        classes: Vec<String>,
        shots: Vec<u16>,
    },
    /// Free-form event (start-up, tests).
    Note(String),
    /// First record of `audit.log` after the log before it was rotated into the segment file
    /// `previous` (whose last record is `previous_last_seq`); chained to that segment's head.
    Rotated {
        previous: String,
        previous_last_seq: u64,
    },
    /// The thumbnail kept for a capture (`thumbs/<capture>.jpg`): the SHA-256 of its JPEG bytes,
    /// appended before the file is written, so that a thumbnail replaced or edited on the card
    /// no longer matches the chained record (see [`super::thumbs::ThumbnailIndex`]).
    Thumbnail {
        capture_sha256: [u8; 32],
        jpeg_sha256: [u8; 32],
    },
}

impl AuditEvent {
    /// The capture a decision, rejection or enrolled shot was made on.
    pub fn capture(&self) -> Option<&[u8; 32]> {
        match self {
            AuditEvent::Decision { capture_sha256, .. }
            | AuditEvent::Rejected { capture_sha256, .. }
            | AuditEvent::Enrolled { capture_sha256, .. } => Some(capture_sha256),
            _ => None,
        }
    }
}

/// One entry of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Sequence number, one more than the record before it.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time_unix_ms: u64,
    /// SHA-256 of the whole frame of the record before it (zeros for the first record);
    /// `None` for records of format 1, written before the chain existed.
    pub prev_sha256: Option<[u8; 32]>,
    pub event: AuditEvent,
}

/// A record of format 1 (no hash chain), still readable.
#[derive(Deserialize)]
struct AuditRecordV1 {
    seq: u64,
    time_unix_ms: u64,
    event: AuditEvent,
}

/// Where the chain of records does not link.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainBreak {
    /// Sequence number of the record that does not link to the one before it.
    pub seq: u64,
    /// Byte offset of that record.
    pub offset: u64,
    pub reason: String,
}

/// A damaged region found while reading.
#[derive(Debug, Clone, PartialEq)]
pub struct Damage {
    pub offset: u64,
    pub reason: FrameError,
}

/// What a scan found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScanReport {
    /// Intact records.
    pub records: usize,
    /// Damaged records (each skipped; the reader resynchronised after it).
    pub damaged: Vec<Damage>,
    /// Bytes of an incomplete last record (a torn write), 0 if none.
    pub torn_tail_bytes: u64,
    /// Offset where the valid content ends (start of the torn tail, or file length).
    pub valid_len: u64,
    /// SHA-256 of the last intact frame: what the next record chains to.
    pub head_sha256: Option<[u8; 32]>,
    /// Records that do not link to the record before them.
    pub chain_breaks: Vec<ChainBreak>,
    /// Records of format 1, written before the hash chain (cannot be verified).
    pub unchained: usize,
}

impl ScanReport {
    /// True when every record is intact and linked (a torn tail, never acknowledged, is fine).
    pub fn is_intact(&self) -> bool {
        self.damaged.is_empty() && self.chain_breaks.is_empty()
    }
}

/// Decode one audit frame of either format.
fn decode_record(bytes: &[u8]) -> Result<(AuditRecord, usize), FrameError> {
    match record::decode::<AuditRecord>(RecordKind::Audit, AUDIT_VERSION, bytes) {
        // format 2 has the same layout; it only lacks the newest event
        Err(FrameError::Version { found: 2, .. }) => {
            record::decode::<AuditRecord>(RecordKind::Audit, 2, bytes)
        }
        Err(FrameError::Version { found: 1, .. }) => {
            let (r, n) = record::decode::<AuditRecordV1>(RecordKind::Audit, 1, bytes)?;
            Ok((
                AuditRecord {
                    seq: r.seq,
                    time_unix_ms: r.time_unix_ms,
                    prev_sha256: None,
                    event: r.event,
                },
                n,
            ))
        }
        other => other,
    }
}

/// Longest damaged tail (with no intact frame after it) taken for a torn append; longer
/// damage is reported and kept. Audit records are far shorter.
pub const MAX_TORN_TAIL: usize = 64 * 1024;

/// True when the damage at `pos`, with no frame after it, is what a power cut leaves after the
/// last acknowledged record. Every acknowledged append was fsynced, so damage after the last
/// intact record can only be an append that never completed: cut short, or some of its sectors
/// without their data (zeros or old bytes, in any order).
fn is_torn_tail(bytes: &[u8], pos: usize, reason: &FrameError) -> bool {
    matches!(reason, FrameError::Truncated { .. }) || bytes.len() - pos <= MAX_TORN_TAIL
}

/// Scan a log image, checking every frame and the chain; never fails.
pub fn scan(bytes: &[u8]) -> (Vec<AuditRecord>, ScanReport) {
    scan_with(bytes, |_, _| {})
}

/// [`scan`], calling `each` with every intact record and the SHA-256 of its frame.
pub fn scan_with(
    bytes: &[u8],
    mut each: impl FnMut(&AuditRecord, &[u8; 32]),
) -> (Vec<AuditRecord>, ScanReport) {
    let mut out: Vec<AuditRecord> = Vec::new();
    let mut rep = ScanReport::default();
    let mut pos = 0usize;
    // the previous intact record (its frame's hash and sequence number), and whether damage
    // was found after it
    let mut prev: Option<([u8; 32], u64)> = None;
    let mut damage_since_prev = false;
    while pos < bytes.len() {
        match decode_record(&bytes[pos..]) {
            Ok((r, n)) => {
                let frame_hash: [u8; 32] = Sha256::digest(&bytes[pos..pos + n]).into();
                let mut why = Vec::new();
                let continues_segment =
                    prev.is_none() && matches!(r.event, AuditEvent::Rotated { .. });
                match r.prev_sha256 {
                    None => rep.unchained += 1,
                    // the first record after a rotation links to the segment before it
                    // (checked by `read_all`)
                    Some(_) if continues_segment => {}
                    Some(p) if p != prev.map(|(h, _)| h).unwrap_or([0; 32]) => {
                        why.push(if prev.is_none() {
                            "the log does not start with its first record"
                        } else if damage_since_prev {
                            "the record before it is damaged"
                        } else {
                            "the record before it was changed, removed or reordered"
                        });
                    }
                    Some(_) => {}
                }
                let mut seq_why = None;
                if let Some((_, s)) = prev
                    && r.seq != s + 1
                    && !(damage_since_prev && r.seq > s)
                {
                    seq_why = Some(format!("sequence number {} follows {s}", r.seq));
                }
                if !why.is_empty() || seq_why.is_some() {
                    let mut reason: Vec<String> = why.iter().map(|w| w.to_string()).collect();
                    reason.extend(seq_why);
                    rep.chain_breaks.push(ChainBreak {
                        seq: r.seq,
                        offset: pos as u64,
                        reason: reason.join("; "),
                    });
                }
                each(&r, &frame_hash);
                prev = Some((frame_hash, r.seq));
                damage_since_prev = false;
                out.push(r);
                rep.records += 1;
                pos += n;
            }
            Err(reason) => {
                let next = find_magic(bytes, pos + 1);
                if next.is_none() && is_torn_tail(bytes, pos, &reason) {
                    // the last record was being written when power went; never acknowledged
                    rep.torn_tail_bytes = (bytes.len() - pos) as u64;
                    rep.valid_len = pos as u64;
                    rep.head_sha256 = prev.map(|(h, _)| h);
                    return (out, rep);
                }
                rep.damaged.push(Damage {
                    offset: pos as u64,
                    reason,
                });
                damage_since_prev = true;
                match next {
                    Some(n) => pos = n,
                    None => pos = bytes.len(),
                }
            }
        }
    }
    rep.valid_len = bytes.len() as u64;
    rep.head_sha256 = prev.map(|(h, _)| h);
    (out, rep)
}

fn find_magic(bytes: &[u8], from: usize) -> Option<usize> {
    if from >= bytes.len() {
        return None;
    }
    bytes[from..]
        .windows(MAGIC.len())
        .position(|w| w == MAGIC)
        .map(|i| i + from)
}

mod files;
mod writer;
pub use files::*;
pub use writer::*;

#[cfg(test)]
mod tests;
