//! Appending: the open log, rotation, pruning of exported segments.

#[allow(unused_imports)]
use super::*;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::super::StoreError;
use super::super::record::{self, RecordKind};
use crate::disk::{Disk, RealDisk};

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
        let dir = self.dir();
        let files = log_files(&dir);
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
                .sync_dir(&dir)
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
        let dir = self.dir();
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

    /// The directory holding the log.
    fn dir(&self) -> PathBuf {
        self.path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned()
    }

    /// Create an empty `audit.log` (durably) and take its lock.
    fn create_file(&mut self) -> Result<(), StoreError> {
        let dir = self.dir();
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
