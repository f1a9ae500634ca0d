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

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::StoreError;
use super::record::{self, FrameError, MAGIC, RecordKind};
use crate::disk::{Disk, RealDisk};

/// Format version of audit records (2: with the hash chain; 1 is still read, unchained).
pub const AUDIT_VERSION: u16 = 2;
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

/// The files of the log in `dir`: rotated segments, oldest first, then `audit.log` (if any).
pub fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut segs: Vec<(u64, PathBuf)> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    let first = n.strip_prefix("audit-")?.strip_suffix(".log")?;
                    let (a, _) = first.split_once('-')?;
                    Some((a.parse().ok()?, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    segs.sort();
    let mut out: Vec<PathBuf> = segs.into_iter().map(|(_, p)| p).collect();
    let cur = dir.join("audit.log");
    if cur.exists() {
        out.push(cur);
    }
    out
}

/// The marker that says a segment was exported.
pub fn exported_marker(segment: &Path) -> PathBuf {
    let mut s = segment.as_os_str().to_owned();
    s.push(EXPORTED_SUFFIX);
    PathBuf::from(s)
}

/// What `sgps audit export` copied.
#[derive(Debug, Clone)]
pub struct Export {
    /// The copies, oldest first, with their SHA-256.
    pub files: Vec<(PathBuf, String)>,
    /// The check of the log as exported.
    pub verification: Verification,
    /// The index written next to the copies.
    pub index: PathBuf,
}

/// Copy every file of the log in the storage directory `dir` to `to` (each written and
/// fsynced before the next step), write `audit-export.txt` there (SHA-256 per file and the
/// chain's head), then mark the copied segments exported, so that the device may delete them
/// when the log reaches its size limit. The current `audit.log` is copied but never marked.
pub fn export(dir: &Path, to: &Path) -> Result<Export, StoreError> {
    let verification = verify(dir, None)?;
    crate::disk::create_dir_all(&RealDisk, to).map_err(|e| StoreError::io(to, e))?;
    let mut files = Vec::new();
    let mut index = String::new();
    for (src, _) in &verification.report.files {
        let name = src.file_name().unwrap_or_default();
        let bytes = fs::read(src).map_err(|e| StoreError::io(src, e))?;
        let dst = to.join(name);
        crate::atomic_file::write(&dst, &bytes).map_err(|e| StoreError::io(&dst, e))?;
        let sha = hex::encode(Sha256::digest(&bytes));
        index.push_str(&format!("{sha}  {}\n", name.to_string_lossy()));
        files.push((dst, sha));
    }
    index.push_str(&format!(
        "# {} records, head sha256 {}, {}\n",
        verification.records,
        hex::encode(verification.report.head_sha256().unwrap_or([0; 32])),
        if verification.is_intact() {
            "intact"
        } else {
            "NOT INTACT (see sgps audit verify)"
        }
    ));
    let index_path = to.join("audit-export.txt");
    crate::atomic_file::write(&index_path, index.as_bytes())
        .map_err(|e| StoreError::io(&index_path, e))?;
    for (src, _) in &verification.report.files {
        if src.file_name().is_some_and(|n| n != "audit.log") {
            let m = exported_marker(src);
            crate::atomic_file::write(&m, b"").map_err(|e| StoreError::io(&m, e))?;
        }
    }
    Ok(Export {
        files,
        verification,
        index: index_path,
    })
}

/// Every file of a log and what its scan found, and how the files link.
#[derive(Debug, Clone, Default)]
pub struct LogReport {
    /// Oldest first.
    pub files: Vec<(PathBuf, ScanReport)>,
    /// Files that do not continue the file before them.
    pub links: Vec<ChainBreak>,
}

impl LogReport {
    pub fn is_intact(&self) -> bool {
        self.links.is_empty() && self.files.iter().all(|(_, r)| r.is_intact())
    }

    /// SHA-256 of the last intact frame of the newest file that has one.
    pub fn head_sha256(&self) -> Option<[u8; 32]> {
        self.files.iter().rev().find_map(|(_, r)| r.head_sha256)
    }
}

/// Read a log: a storage directory (every segment and `audit.log`, checking that each file
/// continues the one before it) or one log file. `each` sees every intact record with its frame
/// hash.
pub fn read_all(
    path: &Path,
    mut each: impl FnMut(&AuditRecord, &[u8; 32]),
) -> Result<(Vec<AuditRecord>, LogReport), StoreError> {
    let files = if path.is_dir() {
        log_files(path)
    } else {
        vec![path.to_owned()]
    };
    let mut all: Vec<AuditRecord> = Vec::new();
    let mut rep = LogReport::default();
    for f in files {
        let bytes = fs::read(&f).map_err(|e| StoreError::io(&f, e))?;
        let (recs, r) = scan_with(&bytes, &mut each);
        if let Some((prev_file, prev_rep)) = rep.files.last() {
            let name = |p: &Path| {
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            };
            let last_seq = all.last().map(|r| r.seq);
            let why = match recs.first() {
                None => None,
                Some(AuditRecord {
                    event:
                        AuditEvent::Rotated {
                            previous,
                            previous_last_seq,
                        },
                    prev_sha256,
                    seq,
                    ..
                }) => {
                    if *previous != name(prev_file) {
                        Some(format!("it continues {previous}, not {}", name(prev_file)))
                    } else if *prev_sha256 != prev_rep.head_sha256
                        || Some(*previous_last_seq) != last_seq
                        || *seq != previous_last_seq + 1
                    {
                        Some(format!(
                            "it does not link to the last record of {previous} (changed, removed or reordered)"
                        ))
                    } else {
                        None
                    }
                }
                Some(_) => Some(format!(
                    "it does not start with a rotation record after {}",
                    name(prev_file)
                )),
            };
            if let Some(reason) = why {
                rep.links.push(ChainBreak {
                    seq: recs[0].seq,
                    offset: 0,
                    reason: format!("{}: {reason}", name(&f)),
                });
            }
        }
        all.extend(recs);
        rep.files.push((f, r));
    }
    Ok((all, rep))
}

/// What a check of a whole log found (`sgps audit verify`).
#[derive(Debug, Clone)]
pub struct Verification {
    pub path: PathBuf,
    pub report: LogReport,
    pub records: usize,
    /// Sequence number and time of the first and the last intact record.
    pub first: Option<(u64, u64)>,
    pub last: Option<(u64, u64)>,
    /// Intact records per kind of event, in a fixed order.
    pub counts: Vec<(&'static str, usize)>,
    /// With an expected head hash (noted at an earlier check): the sequence number of the
    /// record whose frame has that hash, `None` when no record has it (records were removed
    /// from the end, or it is another log).
    pub anchor: Option<Option<u64>>,
}

impl Verification {
    /// True when every record is intact, the chain links from the first record to the last
    /// across every file, and the expected head (if one was given) is in it.
    pub fn is_intact(&self) -> bool {
        self.report.is_intact() && !matches!(self.anchor, Some(None))
    }
}

/// Check every record of the log at `path` (a storage directory or one log file) and its hash
/// chain, and (with `expect_head`) that the record whose frame hash was noted earlier is still
/// there.
pub fn verify(path: &Path, expect_head: Option<[u8; 32]>) -> Result<Verification, StoreError> {
    let missing = || {
        StoreError::Invalid(format!(
            "no audit log at {}: give the device's storage directory (storage_dir in its board profile) or its audit.log",
            path.display()
        ))
    };
    if !path.exists() || (path.is_dir() && log_files(path).is_empty()) {
        return Err(missing());
    }
    let mut anchor = None;
    let (records, report) = read_all(path, |r, h| {
        if expect_head == Some(*h) {
            anchor = Some(r.seq);
        }
    })?;
    let mut counts = vec![
        ("decision: benign", 0),
        ("decision: refer", 0),
        ("decision: urgent", 0),
        ("capture rejected", 0),
        ("shot enrolled", 0),
        ("classifier synthesized", 0),
        ("note", 0),
        ("log rotated", 0),
    ];
    for r in &records {
        let i = match &r.event {
            AuditEvent::Decision { verdict, .. } => match verdict {
                Verdict::Benign => 0,
                Verdict::Refer => 1,
                Verdict::Urgent => 2,
            },
            AuditEvent::Rejected { .. } => 3,
            AuditEvent::Enrolled { .. } => 4,
            AuditEvent::Synthesized { .. } => 5,
            AuditEvent::Note(_) => 6,
            AuditEvent::Rotated { .. } => 7,
        };
        counts[i].1 += 1;
    }
    Ok(Verification {
        path: path.to_owned(),
        records: records.len(),
        first: records.first().map(|r| (r.seq, r.time_unix_ms)),
        last: records.last().map(|r| (r.seq, r.time_unix_ms)),
        report,
        counts,
        anchor: expect_head.map(|_| anchor),
    })
}

/// An audit log open for appending.
pub struct AuditLog {
    path: PathBuf,
    disk: Arc<dyn Disk>,
    /// Holds the lock: one writer per storage directory (released by the kernel on exit).
    _lock: File,
    next_seq: u64,
    head: [u8; 32],
    /// Rotate before an append would take `audit.log` past this size.
    segment_bytes: u64,
    /// Delete the oldest exported segments while the files take more than this.
    max_bytes: u64,
    /// Length of `audit.log` and the sequence number of its first record.
    len: u64,
    first_seq: Option<u64>,
    /// After a rotation: the segment (file name, last sequence number) that the next record,
    /// a [`AuditEvent::Rotated`], must link to.
    rotated: Option<(String, u64)>,
}

impl AuditLog {
    /// Open (or create) the log on the real disk, cut a torn tail, and report what the scan found.
    pub fn open(path: &Path) -> Result<(AuditLog, ScanReport), StoreError> {
        AuditLog::open_on(Arc::new(RealDisk), path)
    }

    /// [`AuditLog::open`] writing through `disk`.
    pub fn open_on(disk: Arc<dyn Disk>, path: &Path) -> Result<(AuditLog, ScanReport), StoreError> {
        let (records, rep) = read_log(path)?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !path.exists() {
            disk.write_file(path, b"")
                .and_then(|()| disk.sync_file(path))
                .and_then(|()| disk.sync_dir(dir))
                .map_err(|e| StoreError::io(path, e))?;
        }
        let lock = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| StoreError::io(path, e))?;
        match lock.try_lock() {
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
            disk.set_len(path, rep.valid_len)
                .and_then(|()| disk.sync_file(path))
                .map_err(|e| StoreError::io(path, e))?;
        }
        for d in &rep.damaged {
            log::warn!(
                "audit log {}: damaged record at byte {} skipped ({})",
                path.display(),
                d.offset,
                d.reason
            );
        }
        for b in &rep.chain_breaks {
            log::warn!(
                "audit log {}: record #{} at byte {} does not link: {}",
                path.display(),
                b.seq,
                b.offset,
                b.reason
            );
        }
        let mut next_seq = records.iter().map(|r| r.seq + 1).max().unwrap_or(0);
        let mut head = rep.head_sha256.unwrap_or([0; 32]);
        let mut rotated = None;
        if records.is_empty() {
            // power went between a rotation and the first record of the new file: continue
            // the newest segment's chain
            let segs: Vec<PathBuf> = log_files(dir)
                .into_iter()
                .filter(|p| p.as_path() != path)
                .collect();
            if let Some(seg) = segs.last() {
                let (recs, srep) = read_log(seg)?;
                if let (Some(last), Some(h)) = (recs.iter().map(|r| r.seq).max(), srep.head_sha256)
                {
                    next_seq = last + 1;
                    head = h;
                    let name = seg
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned();
                    rotated = Some((name, last));
                }
            }
        }
        Ok((
            AuditLog {
                path: path.to_owned(),
                disk,
                _lock: lock,
                next_seq,
                head,
                segment_bytes: SEGMENT_BYTES,
                max_bytes: MAX_LOG_BYTES,
                len: rep.valid_len,
                first_seq: records.first().map(|r| r.seq),
                rotated,
            },
            rep,
        ))
    }

    /// Rotate at `bytes` instead of [`SEGMENT_BYTES`] (tests, small cards).
    pub fn with_segment_bytes(mut self, bytes: u64) -> AuditLog {
        self.segment_bytes = bytes.max(1);
        self
    }

    /// Keep the files under `bytes` (deleting exported segments) instead of [`MAX_LOG_BYTES`].
    pub fn with_max_bytes(mut self, bytes: u64) -> AuditLog {
        self.max_bytes = bytes;
        self
    }

    /// Delete the oldest segments that were exported while the log's files take more than the
    /// limit. A segment not exported stops the deletion: records are never lost unexported.
    fn prune(&self) -> Result<(), StoreError> {
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let files = log_files(dir);
        let size = |p: &Path| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let mut total: u64 = files.iter().map(|p| size(p)).sum();
        let mut removed = false;
        for seg in files.iter().filter(|p| p.as_path() != self.path) {
            if total <= self.max_bytes {
                break;
            }
            let marker = exported_marker(seg);
            if !marker.exists() {
                log::warn!(
                    "audit log takes {:.1} MiB (limit {:.1} MiB) and {} was never exported: export the log (sgps audit export --to <USB stick>) so that old segments can be deleted",
                    total as f64 / 1048576.0,
                    self.max_bytes as f64 / 1048576.0,
                    seg.display()
                );
                break;
            }
            total -= size(seg);
            self.disk
                .remove_file(seg)
                .and_then(|()| self.disk.remove_file(&marker))
                .map_err(|e| StoreError::io(seg, e))?;
            log::info!("deleted exported audit segment {}", seg.display());
            removed = true;
        }
        if removed {
            self.disk
                .sync_dir(dir)
                .map_err(|e| StoreError::io(dir, e))?;
        }
        Ok(())
    }

    /// Move `audit.log` to `audit-<first>-<last>.log` and start a new, empty `audit.log` whose
    /// first record will link to it.
    fn rotate(&mut self) -> Result<(), StoreError> {
        let (Some(first), Some(last)) = (self.first_seq, self.next_seq.checked_sub(1)) else {
            return Ok(());
        };
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned();
        let name = format!("audit-{first:012}-{last:012}.log");
        let seg = dir.join(&name);
        self.disk
            .rename(&self.path, &seg)
            .and_then(|()| self.disk.sync_dir(&dir))
            .map_err(|e| StoreError::io(&seg, e))?;
        self.len = 0;
        self.first_seq = None;
        self.rotated = Some((name, last));
        self.create_file()?;
        log::info!("audit log rotated into {}", seg.display());
        // the rotation is done; a failed clean-up must not cost the record being appended
        if let Err(e) = self.prune() {
            log::warn!("audit log: exported segments not deleted: {e}");
        }
        Ok(())
    }

    /// Create an empty `audit.log` (durably) and take its lock.
    fn create_file(&mut self) -> Result<(), StoreError> {
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned();
        self.disk
            .write_file(&self.path, b"")
            .and_then(|()| self.disk.sync_file(&self.path))
            .and_then(|()| self.disk.sync_dir(&dir))
            .map_err(|e| StoreError::io(&self.path, e))?;
        let lock = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| StoreError::io(&self.path, e))?;
        lock.try_lock().map_err(|e| {
            StoreError::Invalid(format!("cannot lock {}: {e}", self.path.display()))
        })?;
        self._lock = lock;
        Ok(())
    }

    /// Append one event; returns its sequence number once it is durable. Rotates first when
    /// the record would take `audit.log` past the segment size.
    pub fn append(&mut self, event: AuditEvent) -> Result<u64, StoreError> {
        if !self.path.exists() {
            self.create_file()?;
        }
        if self.len > 0 && self.len + 1024 > self.segment_bytes {
            self.rotate()?;
        }
        if let Some((previous, previous_last_seq)) = self.rotated.clone() {
            self.append_record(AuditEvent::Rotated {
                previous,
                previous_last_seq,
            })?;
            self.rotated = None;
        }
        self.append_record(event)
    }

    fn append_record(&mut self, event: AuditEvent) -> Result<u64, StoreError> {
        let seq = self.next_seq;
        let rec = AuditRecord {
            seq,
            time_unix_ms: now_unix_ms(),
            prev_sha256: Some(self.head),
            event,
        };
        let bytes = record::encode(RecordKind::Audit, AUDIT_VERSION, &rec)?;
        let len_before = fs::metadata(&self.path).map(|m| m.len()).ok();
        let res = self
            .disk
            .append(&self.path, &bytes)
            .and_then(|()| self.disk.sync_file(&self.path));
        if let Err(e) = res {
            // do not leave a partial frame in front of the next append
            if let Some(l) = len_before {
                let _ = self.disk.set_len(&self.path, l);
            }
            return Err(StoreError::io(&self.path, e));
        }
        self.next_seq += 1;
        self.head = Sha256::digest(&bytes).into();
        self.len += bytes.len() as u64;
        self.first_seq.get_or_insert(seq);
        Ok(seq)
    }

    /// Sequence number the next append will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// SHA-256 of the last record's frame: the chain's head (zeros for an empty log).
    pub fn head_sha256(&self) -> [u8; 32] {
        self.head
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
            assert_eq!(rep.records, 4);
            assert_eq!(rep.torn_tail_bytes, 0);
            assert!(rep.is_intact(), "cut {cut}: {rep:?}");
        }
    }

    /// Frames of a log: (offset, length).
    fn frames(b: &[u8]) -> Vec<(usize, usize)> {
        let mut out = vec![];
        let mut pos = 0;
        while pos < b.len() {
            let (_, _, n) = record::check_frame(&b[pos..]).unwrap();
            out.push((pos, n));
            pos += n;
        }
        out
    }

    fn log_of(n: u32) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.log");
        let (mut log, _) = AuditLog::open(&p).unwrap();
        for i in 0..n {
            log.append(note(i)).unwrap();
        }
        drop(log);
        let b = fs::read(&p).unwrap();
        (dir, p, b)
    }

    #[test]
    fn records_chain_and_a_rewritten_removed_or_reordered_record_breaks_it() {
        let (_d, _p, b) = log_of(6);
        let (recs, rep) = scan(&b);
        assert!(rep.is_intact(), "{rep:?}");
        assert_eq!(rep.unchained, 0);
        assert_eq!(recs[0].prev_sha256, Some([0; 32]));
        let f = frames(&b);
        let h2: [u8; 32] = Sha256::digest(&b[f[2].0..f[2].0 + f[2].1]).into();
        assert_eq!(recs[3].prev_sha256, Some(h2));

        // a record rewritten with a valid checksum (what someone editing the log would do)
        let mut edited = recs[2].clone();
        edited.event = AuditEvent::Note("nothing happened".into());
        let frame = record::encode(RecordKind::Audit, AUDIT_VERSION, &edited).unwrap();
        let mut t = b[..f[2].0].to_vec();
        t.extend_from_slice(&frame);
        t.extend_from_slice(&b[f[2].0 + f[2].1..]);
        let (recs2, rep) = scan(&t);
        assert_eq!(recs2.len(), 6);
        assert!(rep.damaged.is_empty());
        assert_eq!(rep.chain_breaks.len(), 1, "{rep:?}");
        assert_eq!(rep.chain_breaks[0].seq, 3);
        assert!(
            rep.chain_breaks[0]
                .reason
                .contains("changed, removed or reordered")
        );

        // a record cut out of the middle
        let mut t = b[..f[2].0].to_vec();
        t.extend_from_slice(&b[f[3].0..]);
        let (_, rep) = scan(&t);
        assert_eq!(rep.chain_breaks.len(), 1, "{rep:?}");
        assert!(
            rep.chain_breaks[0]
                .reason
                .contains("sequence number 3 follows 1")
        );

        // two records swapped
        let mut t = b[..f[1].0].to_vec();
        t.extend_from_slice(&b[f[2].0..f[3].0]);
        t.extend_from_slice(&b[f[1].0..f[2].0]);
        t.extend_from_slice(&b[f[3].0..]);
        let (_, rep) = scan(&t);
        assert!(rep.chain_breaks.len() >= 2, "{rep:?}");

        // the first records removed
        let (_, rep) = scan(&b[f[2].0..]);
        assert_eq!(rep.chain_breaks.len(), 1);
        assert!(rep.chain_breaks[0].reason.contains("does not start"));
    }

    #[test]
    fn appends_after_reopen_continue_the_chain() {
        let (_d, p, _) = log_of(3);
        let (mut log, rep) = AuditLog::open(&p).unwrap();
        assert_eq!(Some(log.head_sha256()), rep.head_sha256);
        log.append(note(3)).unwrap();
        drop(log);
        let (recs, rep) = read_log(&p).unwrap();
        assert_eq!(recs.len(), 4);
        assert!(rep.is_intact(), "{rep:?}");
    }

    #[test]
    fn format_1_records_are_read_unchained_and_new_records_chain_after_them() {
        #[derive(Serialize)]
        struct V1 {
            seq: u64,
            time_unix_ms: u64,
            event: AuditEvent,
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.log");
        let mut b = vec![];
        for i in 0..2u32 {
            let r = V1 {
                seq: i as u64,
                time_unix_ms: 5,
                event: note(i),
            };
            b.extend(record::encode(RecordKind::Audit, 1, &r).unwrap());
        }
        fs::write(&p, &b).unwrap();
        let (mut log, rep) = AuditLog::open(&p).unwrap();
        assert_eq!((rep.records, rep.unchained), (2, 2));
        assert_eq!(log.append(note(2)).unwrap(), 2);
        drop(log);
        let (recs, rep) = read_log(&p).unwrap();
        assert_eq!(recs[1].event, note(1));
        assert_eq!(recs[1].prev_sha256, None);
        assert!(rep.is_intact(), "{rep:?}");
    }

    #[test]
    fn sectors_that_never_got_their_data_are_a_torn_tail() {
        let (_d, p, _) = log_of(39);
        let (mut log, _) = AuditLog::open(&p).unwrap();
        log.append(AuditEvent::Note("x".repeat(1500))).unwrap();
        drop(log);
        let b = fs::read(&p).unwrap();
        let f = frames(&b);
        let last = f[f.len() - 1];
        // the last record's sectors from a sector boundary inside it read as zeros
        let boundary = (last.0 + 1).next_multiple_of(SECTOR);
        assert!(
            boundary < b.len(),
            "the last record must cross a sector boundary"
        );
        let mut t = b.clone();
        t[boundary..].fill(0);
        let (recs, rep) = scan(&t);
        assert_eq!(recs.len(), 39);
        assert!(rep.is_intact(), "{rep:?}");
        assert_eq!(rep.valid_len as usize, last.0);
        // all of it zeros (size updated, no data)
        let mut t = b.clone();
        t[last.0..].fill(0);
        let (recs, rep) = scan(&t);
        assert_eq!((recs.len(), rep.valid_len as usize), (39, last.0));
        // an earlier sector missing but the last one written
        let mut t = b.clone();
        t[last.0 + 20] ^= 0x55;
        fs::write(&p, &t).unwrap();
        let (mut log, rep) = AuditLog::open(&p).unwrap();
        assert_eq!((rep.records, rep.torn_tail_bytes as usize), (39, last.1));
        assert_eq!(log.append(note(99)).unwrap(), 39);
        drop(log);
        let (_, rep) = read_log(&p).unwrap();
        assert!(rep.is_intact(), "{rep:?}");
        // damage followed by an intact record is damage, not a torn tail
        let mut t = b.clone();
        t[f[5].0 + 20] ^= 0x55;
        let (recs, rep) = scan(&t);
        assert_eq!((recs.len(), rep.damaged.len()), (39, 1));
        assert_eq!(rep.chain_breaks.len(), 1);
        assert!(rep.chain_breaks[0].reason.contains("damaged"));
    }

    fn names(dir: &Path) -> Vec<String> {
        log_files(dir)
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn rotation_keeps_one_chain_across_segments_and_verify_sees_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.log");
        let (log, _) = AuditLog::open(&p).unwrap();
        let mut log = log.with_segment_bytes(1500);
        for i in 0..60 {
            log.append(note(i)).unwrap();
        }
        drop(log);
        let files = names(dir.path());
        assert!(files.len() >= 3, "{files:?}");
        assert_eq!(files.last().unwrap(), "audit.log");
        let (recs, rep) = read_all(dir.path(), |_, _| {}).unwrap();
        assert!(rep.is_intact(), "{rep:?}");
        // sequence numbers run on without a gap; the notes are all there, in order
        assert!(recs.windows(2).all(|w| w[1].seq == w[0].seq + 1));
        let notes: Vec<&AuditEvent> = recs
            .iter()
            .map(|r| &r.event)
            .filter(|e| !matches!(e, AuditEvent::Rotated { .. }))
            .collect();
        assert_eq!(notes.len(), 60);
        assert_eq!(*notes[59], note(59));
        for f in &files {
            assert!(
                fs::metadata(dir.path().join(f)).unwrap().len() <= 1500,
                "{f}"
            );
        }
        assert!(verify(dir.path(), None).unwrap().is_intact());
        // reopen and carry on: the chain still links
        let (mut log, _) = AuditLog::open(&p).unwrap();
        log.append(note(60)).unwrap();
        drop(log);
        assert!(read_all(dir.path(), |_, _| {}).unwrap().1.is_intact());
        // a segment removed from the middle breaks the link between the files around it
        fs::remove_file(dir.path().join(&files[1])).unwrap();
        let v = verify(dir.path(), None).unwrap();
        assert!(!v.is_intact());
        assert_eq!(v.report.links.len(), 1, "{:?}", v.report.links);
        assert!(
            v.report.links[0].reason.contains(&files[1]),
            "{:?}",
            v.report.links
        );
    }

    #[test]
    fn power_lost_between_rotation_and_the_next_record_continues_the_segment_chain() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.log");
        let (mut log, _) = AuditLog::open(&p).unwrap();
        for i in 0..5 {
            log.append(note(i)).unwrap();
        }
        drop(log);
        // the rename happened; the new audit.log was not created yet
        fs::rename(&p, dir.path().join("audit-000000000000-000000000004.log")).unwrap();
        let (mut log, rep) = AuditLog::open(&p).unwrap();
        assert_eq!(rep.records, 0);
        assert_eq!(log.append(note(5)).unwrap(), 6, "5 is the rotation record");
        drop(log);
        let (recs, rep) = read_all(dir.path(), |_, _| {}).unwrap();
        assert!(rep.is_intact(), "{rep:?}");
        assert_eq!(recs.len(), 7);
        assert!(matches!(
            &recs[5].event,
            AuditEvent::Rotated {
                previous_last_seq: 4,
                ..
            }
        ));
    }

    #[test]
    fn exported_segments_are_deleted_at_the_size_limit_and_unexported_ones_never() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.log");
        let total = |d: &Path| -> u64 {
            log_files(d)
                .iter()
                .map(|f| fs::metadata(f).unwrap().len())
                .sum()
        };
        let open = || {
            let (log, _) = AuditLog::open(&p).unwrap();
            log.with_segment_bytes(1000).with_max_bytes(3000)
        };
        let mut log = open();
        for i in 0..80 {
            log.append(note(i)).unwrap();
        }
        drop(log);
        // nothing exported: nothing deleted, past the limit
        let before = log_files(dir.path()).len();
        assert!(total(dir.path()) > 3000);
        let (recs, _) = read_all(dir.path(), |_, _| {}).unwrap();
        assert_eq!(recs.first().unwrap().seq, 0);

        let usb = tempfile::tempdir().unwrap();
        let x = export(dir.path(), usb.path()).unwrap();
        assert!(x.verification.is_intact());
        assert_eq!(x.files.len(), before);
        let index = fs::read_to_string(&x.index).unwrap();
        assert!(
            index.contains("audit.log") && index.contains("intact"),
            "{index}"
        );
        // the copy verifies on its own
        assert!(verify(usb.path(), None).unwrap().is_intact());

        // the next rotation deletes exported segments down to the limit
        let mut log = open();
        for i in 80..100 {
            log.append(note(i)).unwrap();
        }
        drop(log);
        let after = log_files(dir.path());
        assert!(after.len() < before, "{after:?}");
        assert!(total(dir.path()) <= 3000 + 1000, "{}", total(dir.path()));
        // what remains still verifies: it starts at a rotation record after the deleted ones
        let v = verify(dir.path(), None).unwrap();
        assert!(v.is_intact(), "{:?}", v.report);
        assert!(v.first.unwrap().0 > 0);
        let (recs, _) = read_all(dir.path(), |_, _| {}).unwrap();
        assert_eq!(recs.last().unwrap().event, note(99));
        // and every record is in the export or still on the device
        let (old, _) = read_all(usb.path(), |_, _| {}).unwrap();
        assert!(old.last().unwrap().seq + 1 >= recs.first().unwrap().seq);
    }
}
