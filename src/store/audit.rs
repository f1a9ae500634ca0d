//! Append-only audit log: a sequence of framed records (see [`super::record`]), each with its
//! own checksum. Every append is written with one `write` call and `fdatasync`ed before it is
//! acknowledged.
//!
//! Reading never fails because of damage: a record whose frame does not check is skipped, the
//! reader resynchronises on the next magic, and the damage is reported. A torn tail (the last
//! record was being written when power went) is cut off when the log is opened for appending;
//! it was never acknowledged.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::StoreError;
use super::record::{self, FrameError, MAGIC, RecordKind};

/// Format version of audit records.
pub const AUDIT_VERSION: u16 = 1;

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
}

/// One entry of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Sequence number, strictly increasing within a log.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time_unix_ms: u64,
    pub event: AuditEvent,
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
}

/// Scan a log image; never fails.
pub fn scan(bytes: &[u8]) -> (Vec<AuditRecord>, ScanReport) {
    let mut out = Vec::new();
    let mut rep = ScanReport::default();
    let mut pos = 0usize;
    while pos < bytes.len() {
        match record::decode::<AuditRecord>(RecordKind::Audit, AUDIT_VERSION, &bytes[pos..]) {
            Ok((r, n)) => {
                out.push(r);
                rep.records += 1;
                pos += n;
            }
            Err(reason) => {
                let next = find_magic(bytes, pos + 1);
                if next.is_none() && matches!(reason, FrameError::Truncated { .. }) {
                    // incomplete last record: a torn write
                    rep.torn_tail_bytes = (bytes.len() - pos) as u64;
                    rep.valid_len = pos as u64;
                    return (out, rep);
                }
                rep.damaged.push(Damage {
                    offset: pos as u64,
                    reason,
                });
                match next {
                    Some(n) => pos = n,
                    None => pos = bytes.len(),
                }
            }
        }
    }
    rep.valid_len = bytes.len() as u64;
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

/// Read a whole log (missing file = empty log).
pub fn read_log(path: &Path) -> Result<(Vec<AuditRecord>, ScanReport), StoreError> {
    match fs::read(path) {
        Ok(b) => Ok(scan(&b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok((Vec::new(), ScanReport::default()))
        }
        Err(e) => Err(StoreError::io(path, e)),
    }
}

/// An audit log open for appending.
pub struct AuditLog {
    path: PathBuf,
    file: File,
    next_seq: u64,
}

impl AuditLog {
    /// Open (or create) the log, cut a torn tail, and report what the scan found.
    pub fn open(path: &Path) -> Result<(AuditLog, ScanReport), StoreError> {
        let existed = path.exists();
        let (records, rep) = read_log(path)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| StoreError::io(path, e))?;
        // one writer per storage directory (released by the kernel when the process dies)
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Invalid(format!(
                    "{} is in use by another sgps process; stop it (systemctl stop sgps) or use another storage directory",
                    path.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(StoreError::io(path, e)),
        }
        if rep.torn_tail_bytes > 0 {
            log::warn!(
                "audit log {}: cutting a torn last record ({} bytes, never acknowledged)",
                path.display(),
                rep.torn_tail_bytes
            );
            file.set_len(rep.valid_len)
                .map_err(|e| StoreError::io(path, e))?;
            file.sync_all().map_err(|e| StoreError::io(path, e))?;
        }
        for d in &rep.damaged {
            log::warn!(
                "audit log {}: damaged record at byte {} skipped ({})",
                path.display(),
                d.offset,
                d.reason
            );
        }
        if !existed && let Some(dir) = path.parent() {
            crate::atomic_file::sync_dir(dir).map_err(|e| StoreError::io(dir, e))?;
        }
        let next_seq = records.iter().map(|r| r.seq + 1).max().unwrap_or(0);
        Ok((
            AuditLog {
                path: path.to_owned(),
                file,
                next_seq,
            },
            rep,
        ))
    }

    /// Append one event; returns its sequence number once it is durable.
    pub fn append(&mut self, event: AuditEvent) -> Result<u64, StoreError> {
        let seq = self.next_seq;
        let rec = AuditRecord {
            seq,
            time_unix_ms: now_unix_ms(),
            event,
        };
        let bytes = record::encode(RecordKind::Audit, AUDIT_VERSION, &rec)?;
        let len_before = self.file.metadata().map(|m| m.len()).ok();
        let res = self
            .file
            .write_all(&bytes)
            .and_then(|_| self.file.sync_data());
        if let Err(e) = res {
            // do not leave a partial frame in front of the next append
            if let Some(l) = len_before {
                let _ = self.file.set_len(l);
            }
            return Err(StoreError::io(&self.path, e));
        }
        self.next_seq += 1;
        Ok(seq)
    }

    /// Sequence number the next append will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(i: u32) -> AuditEvent {
        AuditEvent::Note(format!("event {i}"))
    }

    #[test]
    fn append_reopen_continue_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.log");
        let (mut log, rep) = AuditLog::open(&p).unwrap();
        assert_eq!(rep.records, 0);
        for i in 0..5 {
            assert_eq!(log.append(note(i)).unwrap(), i as u64);
        }
        drop(log);
        let (mut log, rep) = AuditLog::open(&p).unwrap();
        assert_eq!(rep.records, 5);
        assert_eq!(log.append(note(5)).unwrap(), 5);
        let (recs, rep) = read_log(&p).unwrap();
        assert_eq!(recs.len(), 6);
        assert!(rep.damaged.is_empty());
        assert_eq!(recs[3].event, note(3));
    }

    #[test]
    fn second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.log");
        let (log, _) = AuditLog::open(&p).unwrap();
        let e = AuditLog::open(&p).err().unwrap();
        assert!(e.to_string().contains("another sgps process"), "{e}");
        drop(log);
        AuditLog::open(&p).unwrap();
    }

    #[test]
    fn damaged_record_costs_only_that_record() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.log");
        let (mut log, _) = AuditLog::open(&p).unwrap();
        let mut offsets = vec![];
        for i in 0..10 {
            offsets.push(fs::metadata(&p).unwrap().len() as usize);
            log.append(note(i)).unwrap();
        }
        drop(log);
        let mut b = fs::read(&p).unwrap();
        // damage payload of record 3, the length field of record 6 and the magic of record 8
        b[offsets[3] + 20] ^= 0xff;
        b[offsets[6] + 9] ^= 0x7f;
        b[offsets[8]] = b'X';
        fs::write(&p, &b).unwrap();
        let (recs, rep) = read_log(&p).unwrap();
        let seqs: Vec<u64> = recs.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![0, 1, 2, 4, 5, 7, 9]);
        assert_eq!(rep.damaged.len(), 3, "{rep:?}");
        // appending after damage still works and is readable
        let (mut log, _) = AuditLog::open(&p).unwrap();
        assert_eq!(log.append(note(10)).unwrap(), 10);
        let (recs, _) = read_log(&p).unwrap();
        assert_eq!(recs.last().unwrap().seq, 10);
    }

    #[test]
    fn torn_tail_is_cut_on_open_and_earlier_records_survive() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.log");
        let (mut log, _) = AuditLog::open(&p).unwrap();
        for i in 0..4 {
            log.append(note(i)).unwrap();
        }
        drop(log);
        let full = fs::read(&p).unwrap();
        let rec_len = full.len() / 4;
        for cut in 1..rec_len {
            fs::write(&p, &full[..full.len() - cut]).unwrap();
            let (recs, rep) = read_log(&p).unwrap();
            assert_eq!(recs.len(), 3, "cut {cut}");
            assert!(rep.damaged.is_empty(), "cut {cut}: {rep:?}");
            assert_eq!(rep.torn_tail_bytes as usize, rec_len - cut);
            let (mut log, _) = AuditLog::open(&p).unwrap();
            assert_eq!(log.append(note(99)).unwrap(), 3);
            let (recs, rep) = read_log(&p).unwrap();
            assert_eq!(recs.len(), 4);
            assert_eq!(
                rep,
                ScanReport {
                    records: 4,
                    valid_len: rep.valid_len,
                    ..Default::default()
                }
            );
        }
    }
}
