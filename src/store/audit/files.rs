//! The log's files: reading every segment, export, verification.

#[allow(unused_imports)]
use super::*;
use std::fs::{self};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::super::StoreError;
use crate::disk::RealDisk;

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
    link_files(files, |f| {
        let bytes = fs::read(f).map_err(|e| StoreError::io(f, e))?;
        Ok(scan_with(&bytes, &mut each))
    })
}

/// The parsed closed segments (`audit-*.log`) of one storage directory. A rotated segment is
/// never written again, so [`read_all_cached`] scans only `audit.log` and the segments that are
/// new or changed (length or modification time) since the last read: the screen's history
/// stays as fast on a year of records as on a day. Segments deleted from the directory leave
/// the cache on the next read, so it holds at most what the directory holds.
#[derive(Debug, Default)]
pub struct SegmentCache {
    entries: std::collections::HashMap<PathBuf, CachedSegment>,
}

#[derive(Debug)]
struct CachedSegment {
    len: u64,
    modified: Option<std::time::SystemTime>,
    records: Vec<AuditRecord>,
    report: ScanReport,
}

impl SegmentCache {
    /// Closed segments held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// [`read_all`] of a storage directory, reusing `cache` for the closed segments.
pub fn read_all_cached(
    dir: &Path,
    cache: &mut SegmentCache,
) -> Result<(Vec<AuditRecord>, LogReport), StoreError> {
    let files = log_files(dir);
    cache.entries.retain(|p, _| files.contains(p));
    link_files(files, |f| {
        let closed = f.file_name().is_some_and(|n| n != "audit.log");
        let meta = fs::metadata(f).map_err(|e| StoreError::io(f, e))?;
        let (len, modified) = (meta.len(), meta.modified().ok());
        if closed
            && let Some(c) = cache.entries.get(f)
            && c.len == len
            && c.modified == modified
        {
            return Ok((c.records.clone(), c.report.clone()));
        }
        let bytes = fs::read(f).map_err(|e| StoreError::io(f, e))?;
        let (records, report) = scan(&bytes);
        // what was read, not what the metadata said before (a segment cannot grow, but be sure)
        if closed && bytes.len() as u64 == len {
            cache.entries.insert(
                f.to_path_buf(),
                CachedSegment {
                    len,
                    modified,
                    records: records.clone(),
                    report: report.clone(),
                },
            );
        }
        Ok((records, report))
    })
}

/// Scan each file with `load` and check that each continues the one before it.
fn link_files(
    files: Vec<PathBuf>,
    mut load: impl FnMut(&Path) -> Result<(Vec<AuditRecord>, ScanReport), StoreError>,
) -> Result<(Vec<AuditRecord>, LogReport), StoreError> {
    let mut all: Vec<AuditRecord> = Vec::new();
    let mut rep = LogReport::default();
    for f in files {
        let (recs, r) = load(&f)?;
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
    /// The thumbnails of a storage directory against the log's records of them (`None` when a
    /// single log file was checked).
    pub thumbnails: Option<ThumbnailCheck>,
}

impl Verification {
    /// True when every record is intact, the chain links from the first record to the last
    /// across every file, the expected head (if one was given) is in it, and no thumbnail
    /// differs from what the log recorded.
    pub fn is_intact(&self) -> bool {
        self.report.is_intact()
            && !matches!(self.anchor, Some(None))
            && self
                .thumbnails
                .as_ref()
                .is_none_or(|t| t.altered.is_empty())
    }
}

/// What checking a storage directory's thumbnails against the audit log found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ThumbnailCheck {
    /// Files whose JPEG has the SHA-256 the log recorded.
    pub matching: usize,
    /// Files with nothing to check against (written before the log recorded thumbnails, or of a
    /// capture no longer in the log).
    pub unchecked: usize,
    /// Recorded thumbnails with no file (pruned, or a write the power cut).
    pub missing: usize,
    /// Files that are not what the log recorded: capture SHA-256 (hex) and why.
    pub altered: Vec<(String, String)>,
    /// Files that fail their own checksum (damage): capture SHA-256 (hex) and why.
    pub damaged: Vec<(String, String)>,
    /// Files in `thumbs/` that are not named `<capture SHA-256>.jpg`.
    pub strays: Vec<String>,
}

/// Check every file in `dir/thumbs` against the thumbnail records of `records`.
pub fn check_thumbnails(dir: &Path, records: &[AuditRecord]) -> ThumbnailCheck {
    use crate::store::{Recorded, StoredThumbnail, ThumbnailIndex, read_thumbnail};
    let ix = ThumbnailIndex::from_records(records);
    let mut check = ThumbnailCheck::default();
    let mut seen = std::collections::HashSet::new();
    let mut names: Vec<String> = fs::read_dir(dir.join("thumbs"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    for name in names {
        let mut sha = [0u8; 32];
        let parsed = name
            .strip_suffix(".jpg")
            .is_some_and(|h| hex::decode_to_slice(h, &mut sha).is_ok());
        if !parsed {
            // the writer's temporary files are not thumbnails either
            check.strays.push(name);
            continue;
        }
        seen.insert(sha);
        let recorded = ix.recorded(&sha);
        match read_thumbnail(dir, &sha, recorded) {
            StoredThumbnail::Intact(_) if matches!(recorded, Recorded::Hash(_)) => {
                check.matching += 1
            }
            StoredThumbnail::Intact(_) | StoredThumbnail::Missing => check.unchecked += 1,
            StoredThumbnail::Altered(why) => check.altered.push((hex::encode(sha), why)),
            StoredThumbnail::Damaged(why) => check.damaged.push((hex::encode(sha), why)),
        }
    }
    check.missing = records
        .iter()
        .filter_map(|r| match &r.event {
            AuditEvent::Thumbnail { capture_sha256, .. } => Some(capture_sha256),
            _ => None,
        })
        .collect::<std::collections::HashSet<_>>()
        .into_iter()
        .filter(|c| !seen.contains(*c))
        .count();
    check
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
        ("thumbnail recorded", 0),
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
            AuditEvent::Thumbnail { .. } => 8,
        };
        counts[i].1 += 1;
    }
    let thumbnails = path.is_dir().then(|| check_thumbnails(path, &records));
    Ok(Verification {
        thumbnails,
        path: path.to_owned(),
        records: records.len(),
        first: records.first().map(|r| (r.seq, r.time_unix_ms)),
        last: records.last().map(|r| (r.seq, r.time_unix_ms)),
        report,
        counts,
        anchor: expect_head.map(|_| anchor),
    })
}
