//! Atomic file replacement, shared by the classifier artifact and the device store.
//!
//! Write a temporary file in the same directory, fsync it, rename it over the target, fsync the
//! directory. A crash at any point leaves either the old or the new content; a failure (e.g. a
//! full disk) leaves the old content and removes the temporary.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::disk::{Disk, RealDisk};

/// Atomically replace `path` with `bytes`.
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_on(&RealDisk, path, bytes)
}

/// [`write`] through `disk` (the store's disk: recorded by the power-cut model, full in tests).
pub fn write_on(disk: &dyn Disk, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a file path", path.display()),
        )
    })?;
    let tmp = dir.join(format!(
        ".{}{TMP_MARK}{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> io::Result<()> {
        disk.write_file(&tmp, bytes)?;
        disk.sync_file(&tmp)?;
        disk.rename(&tmp, path)?;
        disk.sync_dir(dir)
    })();
    if result.is_err() && tmp.exists() {
        let _ = disk.remove_file(&tmp);
    }
    result
}

const TMP_MARK: &str = ".tmp-";

/// fsync a directory so that a rename or a new file in it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    RealDisk.sync_dir(dir)
}

/// Remove temporary files left in `dir` by an interrupted [`write`] (`.<name>.tmp-<pid>`).
pub fn remove_stale_temps(disk: &dyn Disk, dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with('.') && n.contains(TMP_MARK) && disk.remove_file(&e.path()).is_ok() {
                removed.push(e.path());
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        write(&p, b"old").unwrap();
        write(&p, b"new").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn failed_write_keeps_old_content_and_removes_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        write(&p, b"old").unwrap();
        let err = write_on(&crate::disk::testing::FullDisk, &p, b"new").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(28), "{err}");
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn stale_temporaries_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(".a.bin.tmp-123"), b"x").unwrap();
        fs::write(dir.path().join("keep.bin"), b"x").unwrap();
        assert_eq!(remove_stale_temps(&RealDisk, dir.path()).len(), 1);
        assert!(dir.path().join("keep.bin").exists());
    }
}
