//! The write side of the filesystem as one trait, so that what the store makes durable can be
//! recorded and cut like a power loss would ([`crate::store::powercut`]).
//!
//! Every change the device makes to its storage goes through a [`Disk`]: creating directories,
//! writing and appending to files, truncating, `fsync`, renaming, removing and `fsync`ing a
//! directory. Reads go to the filesystem directly. [`RealDisk`] is the operating system.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Mutating file-system operations, by path.
pub trait Disk: Send + Sync {
    /// Create one directory (its parent exists). Not durable until the parent is synced.
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    /// Create or truncate `path` and write `bytes` with one `write` call sequence. Not durable
    /// until [`Disk::sync_file`].
    fn write_file(&self, path: &Path, bytes: &[u8]) -> io::Result<()>;
    /// Append `bytes` to an existing file.
    fn append(&self, path: &Path, bytes: &[u8]) -> io::Result<()>;
    /// Truncate or extend a file to `len` bytes.
    fn set_len(&self, path: &Path, len: u64) -> io::Result<()>;
    /// `fsync` a file's data and size.
    fn sync_file(&self, path: &Path) -> io::Result<()>;
    /// Rename within the filesystem, replacing `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Remove a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// `fsync` a directory, making the entries created, renamed or removed in it durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The operating system's file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealDisk;

impl Disk for RealDisk {
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        fs::create_dir(path)
    }

    fn write_file(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?
            .write_all(bytes)
    }

    fn append(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        OpenOptions::new().append(true).open(path)?.write_all(bytes)
    }

    fn set_len(&self, path: &Path, len: u64) -> io::Result<()> {
        OpenOptions::new().write(true).open(path)?.set_len(len)
    }

    fn sync_file(&self, path: &Path) -> io::Result<()> {
        // fsync through any descriptor flushes the file's dirty pages and size
        OpenOptions::new().write(true).open(path)?.sync_all()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// Create `path` and its missing ancestors, and make each new entry durable by syncing the
/// directory that holds it.
pub fn create_dir_all(disk: &dyn Disk, path: &Path) -> io::Result<()> {
    if path.as_os_str().is_empty() || path.is_dir() {
        return Ok(());
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(p) = parent {
        create_dir_all(disk, p)?;
    }
    match disk.create_dir(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => return Ok(()),
        Err(e) => return Err(e),
    }
    disk.sync_dir(parent.unwrap_or(Path::new(".")))
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A disk that fills up: `write_file` and `append` write half of their bytes, then fail
    /// with ENOSPC, as a full filesystem does.
    pub struct FullDisk;

    impl Disk for FullDisk {
        fn create_dir(&self, path: &Path) -> io::Result<()> {
            RealDisk.create_dir(path)
        }
        fn write_file(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
            RealDisk.write_file(path, &bytes[..bytes.len() / 2])?;
            Err(io::Error::from_raw_os_error(28))
        }
        fn append(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
            RealDisk.append(path, &bytes[..bytes.len() / 2])?;
            Err(io::Error::from_raw_os_error(28))
        }
        fn set_len(&self, path: &Path, len: u64) -> io::Result<()> {
            RealDisk.set_len(path, len)
        }
        fn sync_file(&self, path: &Path) -> io::Result<()> {
            RealDisk.sync_file(path)
        }
        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            RealDisk.rename(from, to)
        }
        fn remove_file(&self, path: &Path) -> io::Result<()> {
            RealDisk.remove_file(path)
        }
        fn sync_dir(&self, dir: &Path) -> io::Result<()> {
            RealDisk.sync_dir(dir)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_dir_all_makes_missing_ancestors_and_accepts_existing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b/c");
        create_dir_all(&RealDisk, &p).unwrap();
        assert!(p.is_dir());
        create_dir_all(&RealDisk, &p).unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        assert!(create_dir_all(&RealDisk, &d.path().join("f/g")).is_err());
    }
}
