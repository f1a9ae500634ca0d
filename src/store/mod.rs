//! Persistent device store: one directory per board profile (`storage_dir`).
//!
//! ```text
//! <storage_dir>/
//!   classes/<name>-<h>.rec  one framed record per class: name, description, urgent flag,
//!                           support embeddings + capture metadata (re-synthesis never re-captures)
//!   classifiers/<id>.sgpc   synthesized classifiers ([`Store::save_classifier`])
//!   active.rec              which classifier is in use
//!   task.rec                the task as edited on the device (UI), with the task file it came from
//!   thumbs/<sha256>.jpg     small JPEG of each accepted capture (shots kept; decisions bounded)
//!   audit.log               append-only audit log (see [`audit`])
//! ```
//! Every record carries magic, kind, format version, length and CRC32 ([`record`]); every
//! replacement is atomic (temp file, fsync, rename, fsync directory). Every write goes through
//! one [`Disk`], so that [`powercut`] can record it and check what a power loss leaves.

pub mod audit;
pub mod powercut;
pub mod record;
mod thumbs;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::classifier::Classifier;
use crate::disk::{self, Disk, RealDisk};

use serde::{Deserialize, Serialize};

use crate::quality::QualityMetrics;
pub use audit::{AuditEvent, AuditLog, AuditRecord, ScanReport, Verdict};
pub use record::{FrameError, RecordKind};
pub use thumbs::{
    Recorded, StoredThumbnail, ThumbnailIndex, encode_thumbnail, jpeg_sha256, read_thumbnail,
    thumbnail_path,
};

/// Format version of class records.
pub const CLASS_VERSION: u16 = 1;
/// Format version of the active-classifier pointer.
pub const ACTIVE_VERSION: u16 = 1;
/// Format version of the device task record.
pub const TASK_VERSION: u16 = 1;
/// Longest side of a stored thumbnail (pixels).
pub const THUMB_SIDE: u32 = 192;
/// Thumbnails kept beyond those of support shots (oldest decision thumbnails go first).
pub const MAX_THUMBS: usize = 2000;
/// Longest class name stored (bytes).
pub const MAX_LABEL: usize = 64;
/// Most classes in one task (matches the synthesizer's limit in the manifest contract).
pub const MAX_CLASSES: usize = 16;

/// A bounded class label.
pub type Label = heapless::String<MAX_LABEL>;

/// Errors of the store. Messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "storage full while writing {path}: free space on that filesystem (e.g. export and remove old audit logs); nothing stored before was lost"
    )]
    NoSpace { path: PathBuf },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "stored record {path} is corrupt ({reason}); it was ignored — re-enroll that class or re-synthesize"
    )]
    Corrupt { path: PathBuf, reason: FrameError },
    #[error("cannot encode record: {0}")]
    Encode(String),
    #[error("{0}")]
    Invalid(String),
}

impl StoreError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.raw_os_error() == Some(28) || source.kind() == std::io::ErrorKind::StorageFull {
            StoreError::NoSpace { path }
        } else {
            StoreError::Io { path, source }
        }
    }

    /// True when the error is a full filesystem.
    pub fn is_no_space(&self) -> bool {
        matches!(self, StoreError::NoSpace { .. })
    }
}

/// One support capture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShotRecord {
    /// SHA-256 of the captured RGB frame (width, height as u32 LE, then the pixels).
    pub capture_sha256: [u8; 32],
    pub time_unix_ms: u64,
    pub width: u32,
    pub height: u32,
    pub quality: QualityMetrics,
    /// Image-encoder embedding of the capture.
    pub embedding: Vec<f32>,
}

/// One class of the task with its support set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassRecord {
    pub name: Label,
    pub description: Option<String>,
    pub urgent: bool,
    /// SHA-256 of the image encoder that produced the embeddings; shots from another encoder
    /// are not comparable and are dropped on load.
    pub encoder_sha256: String,
    pub shots: Vec<ShotRecord>,
}

/// Which classifier is active.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActiveRecord {
    pub classifier_id: String,
    /// File name under `classifiers/`.
    pub file: String,
    pub encoder_sha256: String,
    pub classes: heapless::Vec<Label, MAX_CLASSES>,
    pub created_unix_ms: u64,
}

/// The task as it stands on the device: the task file, plus what was edited on the device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// SHA-256 of the task file's content this task started from; a different task file
    /// (re-provisioned device) replaces the edited task.
    pub source_sha256: [u8; 32],
    pub task: crate::board::TaskFile,
}

/// Check a class name typed by a person: 1..=64 bytes, no path separators, no control
/// characters, not `.`/`..`, no leading or trailing space.
pub fn check_class_name(name: &str) -> Result<(), StoreError> {
    let bad = |why: &str| {
        Err(StoreError::Invalid(format!(
            "class name {name:?} {why}; use letters, digits, spaces, '-' or '_'"
        )))
    };
    if name.trim().is_empty() {
        return bad("is empty");
    }
    if name.trim() != name {
        return bad("starts or ends with a space");
    }
    if name.contains(['/', '\\']) || name == "." || name == ".." {
        return bad("contains a path separator");
    }
    if name.chars().any(char::is_control) {
        return bad("contains a control character");
    }
    label(name).map(|_| ())
}

/// Make a bounded label; fails with a clear message when the name is too long.
pub fn label(name: &str) -> Result<Label, StoreError> {
    Label::try_from(name).map_err(|_| {
        StoreError::Invalid(format!(
            "class name {name:?} is longer than {MAX_LABEL} bytes; shorten it in the task file"
        ))
    })
}

/// The store of one board profile.
pub struct Store {
    root: PathBuf,
    disk: Arc<dyn Disk>,
}

impl Store {
    /// Open on the real disk (creating directories as needed) and clean temporaries of
    /// interrupted writes.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        Store::open_on(Arc::new(RealDisk), root)
    }

    /// [`Store::open`] writing through `disk`.
    pub fn open_on(disk: Arc<dyn Disk>, root: &Path) -> Result<Store, StoreError> {
        let dirs = [
            root.to_owned(),
            root.join("classes"),
            root.join("classifiers"),
            root.join("thumbs"),
        ];
        for d in &dirs {
            disk::create_dir_all(&*disk, d).map_err(|e| StoreError::io(d, e))?;
        }
        for d in &dirs {
            for p in crate::atomic_file::remove_stale_temps(&*disk, d) {
                log::info!(
                    "store: removed temporary of an interrupted write {}",
                    p.display()
                );
            }
        }
        Ok(Store {
            root: root.to_owned(),
            disk,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn audit_path(&self) -> PathBuf {
        Store::audit_path_in(&self.root)
    }

    /// The audit log of the storage directory `root`.
    pub fn audit_path_in(root: &Path) -> PathBuf {
        root.join("audit.log")
    }

    /// Open the audit log for appending.
    pub fn open_audit(&self) -> Result<(AuditLog, ScanReport), StoreError> {
        AuditLog::open_on(self.disk.clone(), &self.audit_path())
    }

    fn class_path(&self, name: &str) -> PathBuf {
        self.root.join("classes").join(class_file_name(name))
    }

    /// Atomically replace the record of the class `rec.name`.
    pub fn save_class(&self, rec: &ClassRecord) -> Result<(), StoreError> {
        record::write_record(
            &*self.disk,
            &self.class_path(&rec.name),
            RecordKind::Class,
            CLASS_VERSION,
            rec,
        )
    }

    /// Load the record of class `name`; `Ok(None)` when absent.
    pub fn load_class(&self, name: &str) -> Result<Option<ClassRecord>, StoreError> {
        let p = self.class_path(name);
        if !p.exists() {
            return Ok(None);
        }
        let r: ClassRecord = record::read_record(&p, RecordKind::Class, CLASS_VERSION)?;
        if r.name.as_str() != name {
            return Err(StoreError::Invalid(format!(
                "{} holds class {:?}, expected {name:?}; remove the file",
                p.display(),
                r.name.as_str()
            )));
        }
        Ok(Some(r))
    }

    /// Load every class record present. A corrupt record is reported in the second list and
    /// skipped (only that class has to be re-enrolled).
    pub fn load_classes(&self) -> (Vec<ClassRecord>, Vec<StoreError>) {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        let dir = self.root.join("classes");
        let mut paths: Vec<PathBuf> = match fs::read_dir(&dir) {
            Ok(rd) => rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "rec"))
                .collect(),
            Err(e) => {
                bad.push(StoreError::io(&dir, e));
                return (ok, bad);
            }
        };
        paths.sort();
        for p in paths {
            match record::read_record::<ClassRecord>(&p, RecordKind::Class, CLASS_VERSION) {
                Ok(r) => ok.push(r),
                Err(e) => bad.push(e),
            }
        }
        (ok, bad)
    }

    /// Remove the record of class `name` (if any).
    pub fn remove_class(&self, name: &str) -> Result<(), StoreError> {
        let p = self.class_path(name);
        match self.disk.remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StoreError::io(&p, e)),
        }
        let d = self.root.join("classes");
        self.disk.sync_dir(&d).map_err(|e| StoreError::io(&d, e))
    }

    /// The directory of stored classifiers.
    pub fn classifier_dir(&self) -> PathBuf {
        self.root.join("classifiers")
    }

    /// Where a classifier with this id is stored.
    pub fn classifier_path(&self, id: &str) -> PathBuf {
        self.classifier_dir().join(format!("{id}.sgpc"))
    }

    /// Store a classifier (atomically) under `classifiers/`; returns its file name for the
    /// [`ActiveRecord`].
    pub fn save_classifier(&self, clf: &Classifier) -> Result<String, StoreError> {
        clf.validate().map_err(|e| {
            StoreError::Invalid(format!("refusing to store an invalid classifier: {e}"))
        })?;
        let bytes = clf
            .to_bytes()
            .map_err(|e| StoreError::Encode(e.to_string()))?;
        let path = self.classifier_path(&clf.id);
        crate::atomic_file::write_on(&*self.disk, &path, &bytes)
            .map_err(|e| StoreError::io(&path, e))?;
        Ok(path
            .file_name()
            .expect("classifier_path ends in a file name")
            .to_string_lossy()
            .into_owned())
    }

    /// Make a stored classifier active (atomic pointer replace). Store the classifier first.
    pub fn set_active(&self, rec: &ActiveRecord) -> Result<(), StoreError> {
        record::write_record(
            &*self.disk,
            &self.root.join("active.rec"),
            RecordKind::Active,
            ACTIVE_VERSION,
            rec,
        )
    }

    /// Store the device's task (atomic replace).
    pub fn save_task(&self, rec: &TaskRecord) -> Result<(), StoreError> {
        record::write_record(
            &*self.disk,
            &self.root.join("task.rec"),
            RecordKind::Task,
            TASK_VERSION,
            rec,
        )
    }

    /// The device's task; `Ok(None)` when it was never edited on the device.
    pub fn task(&self) -> Result<Option<TaskRecord>, StoreError> {
        let p = self.root.join("task.rec");
        if !p.exists() {
            return Ok(None);
        }
        record::read_record(&p, RecordKind::Task, TASK_VERSION).map(Some)
    }

    /// The active classifier pointer; `Ok(None)` when none was synthesized yet.
    pub fn active(&self) -> Result<Option<ActiveRecord>, StoreError> {
        let p = self.root.join("active.rec");
        if !p.exists() {
            return Ok(None);
        }
        record::read_record(&p, RecordKind::Active, ACTIVE_VERSION).map(Some)
    }
}

/// File name of a class record: the name with unsafe characters replaced, plus a short hash of
/// the exact name (so that distinct names never share a file).
pub fn class_file_name(name: &str) -> String {
    use sha2::{Digest, Sha256};
    let safe: String = name
        .chars()
        .take(40)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let h = Sha256::digest(name.as_bytes());
    format!("{safe}-{}.rec", hex::encode(&h[..4]))
}

/// SHA-256 of an RGB frame: width and height (u32 LE) followed by the raw pixels.
pub fn capture_sha256(img: &image::RgbImage) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(img.width().to_le_bytes());
    h.update(img.height().to_le_bytes());
    h.update(img.as_raw());
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(name: &str, shots: usize) -> ClassRecord {
        ClassRecord {
            name: label(name).unwrap(),
            description: Some(format!("{name} description")),
            urgent: name == "melanoma",
            encoder_sha256: "abc".into(),
            shots: (0..shots)
                .map(|i| ShotRecord {
                    capture_sha256: [i as u8; 32],
                    time_unix_ms: 1000 + i as u64,
                    width: 180,
                    height: 180,
                    quality: crate::quality::measure(&image::RgbImage::new(8, 8)),
                    embedding: vec![i as f32; 16],
                })
                .collect(),
        }
    }

    #[test]
    fn classes_and_active_roundtrip_and_corrupt_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.save_class(&class("nevus", 2)).unwrap();
        s.save_class(&class("melanoma", 3)).unwrap();
        s.save_class(&class("melanoma", 4)).unwrap();
        let (ok, bad) = s.load_classes();
        assert!(bad.is_empty());
        assert_eq!(ok.len(), 2);
        assert_eq!(
            s.load_class("melanoma").unwrap().unwrap(),
            class("melanoma", 4)
        );
        assert!(s.load_class("dermatofibroma").unwrap().is_none());
        assert!(s.active().unwrap().is_none());
        let mut classes = heapless::Vec::new();
        classes.push(label("nevus").unwrap()).unwrap();
        let a = ActiveRecord {
            classifier_id: "00ff".into(),
            file: "00ff.sgpc".into(),
            encoder_sha256: "abc".into(),
            classes,
            created_unix_ms: 5,
        };
        s.set_active(&a).unwrap();
        assert_eq!(s.active().unwrap().unwrap(), a);

        // corrupt class 0: it is reported, class 1 still loads
        let p = dir.path().join("classes").join(class_file_name("nevus"));
        let mut b = fs::read(&p).unwrap();
        let n = b.len();
        b[n - 5] ^= 1;
        fs::write(&p, b).unwrap();
        let (ok, bad) = s.load_classes();
        assert_eq!(ok.len(), 1);
        assert_eq!(bad.len(), 1);
        assert!(bad[0].to_string().contains("corrupt"), "{}", bad[0]);
    }

    #[test]
    fn long_label_is_a_clear_error() {
        let e = label(&"x".repeat(65)).unwrap_err();
        assert!(e.to_string().contains("shorten"));
    }

    #[test]
    fn stale_temporaries_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("classes")).unwrap();
        fs::write(dir.path().join("classes/.x.rec.tmp-123"), b"partial").unwrap();
        fs::create_dir_all(dir.path().join("classifiers")).unwrap();
        fs::write(dir.path().join("classifiers/.a.sgpc.tmp-77"), b"partial").unwrap();
        fs::write(dir.path().join("classifiers/a.sgpc"), b"kept").unwrap();
        Store::open(dir.path()).unwrap();
        assert!(!dir.path().join("classes/.x.rec.tmp-123").exists());
        assert!(!dir.path().join("classifiers/.a.sgpc.tmp-77").exists());
        assert!(dir.path().join("classifiers/a.sgpc").exists());
        assert_ne!(class_file_name("a/b"), class_file_name("a_b"));
    }
}
