//! A power-cut model of the store: record every change a workload makes to its storage (through
//! the [`Disk`] trait), then, for every point of the recording, list what a power loss at that
//! point could leave on the card.
//!
//! The model follows what POSIX promises and ordinary file systems do:
//! - a file's data and size are durable only after an `fsync` of that file; until then each
//!   512-byte sector of what was written may or may not have reached the card (any subset, in
//!   any order), and the size may be the old or the new one (new sectors that got no data read
//!   as zeros);
//! - a directory entry (a new file or directory, a rename, a removal) is durable only after an
//!   `fsync` of the directory that holds it; until then a power loss leaves the entries as they
//!   were after some prefix of the operations on that directory since its last `fsync`.
//!
//! [`Model::crash_states`] does not list every subset of sectors (that grows as 2^n); it lists
//! the durable state, the state with everything written, every dirty file with its new sectors
//! reaching the card as a growing prefix, with a single sector missing, and with the size
//! updated but no data (zeros), and every prefix of every directory's pending operations.
//! The integration test `tests/powercut.rs` runs real store workloads over a [`Recorder`],
//! materialises every listed state into a directory and reopens it with the real code.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::disk::{Disk, RealDisk};

use super::audit::SECTOR;

/// One recorded change, with paths relative to the recorded directory.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    CreateDir(PathBuf),
    WriteFile { path: PathBuf, bytes: Vec<u8> },
    Append { path: PathBuf, bytes: Vec<u8> },
    SetLen { path: PathBuf, len: u64 },
    SyncFile(PathBuf),
    Rename { from: PathBuf, to: PathBuf },
    Remove(PathBuf),
    SyncDir(PathBuf),
}

/// A [`Disk`] that performs every operation on the real file system and records it.
/// Operations outside `base` are refused.
pub struct Recorder {
    base: PathBuf,
    ops: Mutex<Vec<Op>>,
}

impl Recorder {
    pub fn new(base: &Path) -> Recorder {
        Recorder {
            base: base.to_owned(),
            ops: Mutex::new(Vec::new()),
        }
    }

    /// Number of operations recorded so far (a position in the recording).
    pub fn len(&self) -> usize {
        self.ops.lock().expect("recorder lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The recording.
    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().expect("recorder lock").clone()
    }

    fn rel(&self, p: &Path) -> io::Result<PathBuf> {
        p.strip_prefix(&self.base).map(Path::to_owned).map_err(|_| {
            io::Error::other(format!(
                "{} is outside the recorded directory {}",
                p.display(),
                self.base.display()
            ))
        })
    }

    fn record(&self, op: Op) {
        self.ops.lock().expect("recorder lock").push(op);
    }
}

impl Disk for Recorder {
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        let r = self.rel(path)?;
        RealDisk.create_dir(path)?;
        self.record(Op::CreateDir(r));
        Ok(())
    }

    fn write_file(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let r = self.rel(path)?;
        RealDisk.write_file(path, bytes)?;
        self.record(Op::WriteFile {
            path: r,
            bytes: bytes.to_vec(),
        });
        Ok(())
    }

    fn append(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let r = self.rel(path)?;
        RealDisk.append(path, bytes)?;
        self.record(Op::Append {
            path: r,
            bytes: bytes.to_vec(),
        });
        Ok(())
    }

    fn set_len(&self, path: &Path, len: u64) -> io::Result<()> {
        let r = self.rel(path)?;
        RealDisk.set_len(path, len)?;
        self.record(Op::SetLen { path: r, len });
        Ok(())
    }

    fn sync_file(&self, path: &Path) -> io::Result<()> {
        let r = self.rel(path)?;
        RealDisk.sync_file(path)?;
        self.record(Op::SyncFile(r));
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (f, t) = (self.rel(from)?, self.rel(to)?);
        RealDisk.rename(from, to)?;
        self.record(Op::Rename { from: f, to: t });
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let r = self.rel(path)?;
        RealDisk.remove_file(path)?;
        self.record(Op::Remove(r));
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let r = self.rel(dir)?;
        RealDisk.sync_dir(dir)?;
        self.record(Op::SyncDir(r));
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Node {
    File(usize),
    Dir,
}

type Entries = BTreeMap<String, Node>;

#[derive(Debug, Clone, Default)]
struct DirState {
    live: Entries,
    durable: Entries,
    /// The entries after each operation since the last `fsync` of the directory.
    pending: Vec<Entries>,
}

#[derive(Debug, Clone, Default)]
struct Inode {
    live: Vec<u8>,
    durable: Vec<u8>,
}

/// What one file holds after a power cut.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Content {
    Durable,
    Live,
    /// The size is the new one; sectors whose flag is set got their new data, the others hold
    /// what was durable (zeros past the durable size).
    Sectors {
        new: SectorSet,
    },
}

/// Which sectors reached the card: the first `prefix` ones, except `missing`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct SectorSet {
    prefix: usize,
    missing: Option<usize>,
}

impl SectorSet {
    fn has(&self, s: usize) -> bool {
        s < self.prefix && self.missing != Some(s)
    }
}

/// The state of a recorded directory tree as a power cut could leave it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CrashImage {
    /// Relative path → `None` for a directory, the bytes for a file.
    pub entries: BTreeMap<PathBuf, Option<Vec<u8>>>,
}

impl CrashImage {
    /// Write the image under `dest` (which exists and is empty).
    pub fn materialise(&self, dest: &Path) -> io::Result<()> {
        for (p, e) in &self.entries {
            let full = dest.join(p);
            match e {
                None => std::fs::create_dir_all(&full)?,
                Some(b) => std::fs::write(&full, b)?,
            }
        }
        Ok(())
    }
}

/// The durable and the live state of a recorded tree, advanced one operation at a time.
#[derive(Debug, Clone)]
pub struct Model {
    dirs: BTreeMap<PathBuf, DirState>,
    inodes: Vec<Inode>,
}

impl Default for Model {
    fn default() -> Self {
        Model::new()
    }
}

fn split(p: &Path) -> io::Result<(PathBuf, String)> {
    let name = p
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{} has no file name", p.display())))?;
    Ok((
        p.parent().map(Path::to_owned).unwrap_or_default(),
        name.to_string_lossy().into_owned(),
    ))
}

impl Model {
    /// The recorded directory itself, empty and durable.
    pub fn new() -> Model {
        let mut dirs = BTreeMap::new();
        dirs.insert(PathBuf::new(), DirState::default());
        Model {
            dirs,
            inodes: Vec::new(),
        }
    }

    fn dir(&mut self, d: &Path) -> io::Result<&mut DirState> {
        self.dirs
            .get_mut(d)
            .ok_or_else(|| io::Error::other(format!("no directory {}", d.display())))
    }

    fn lookup(&self, p: &Path) -> io::Result<usize> {
        let (d, n) = split(p)?;
        match self.dirs.get(&d).and_then(|s| s.live.get(&n)) {
            Some(Node::File(i)) => Ok(*i),
            _ => Err(io::Error::other(format!("no file {}", p.display()))),
        }
    }

    /// Change the live entries of `d` and remember the result as a pending state.
    fn change(&mut self, d: &Path, f: impl FnOnce(&mut Entries)) -> io::Result<()> {
        let s = self.dir(d)?;
        f(&mut s.live);
        let snap = s.live.clone();
        s.pending.push(snap);
        Ok(())
    }

    /// Apply one recorded operation to the live state (and to the durable state for syncs).
    pub fn apply(&mut self, op: &Op) -> io::Result<()> {
        match op {
            Op::CreateDir(p) => {
                let (d, n) = split(p)?;
                self.change(&d, |e| {
                    e.insert(n, Node::Dir);
                })?;
                self.dirs.insert(p.clone(), DirState::default());
            }
            Op::WriteFile { path, bytes } => match self.lookup(path) {
                Ok(i) => self.inodes[i].live = bytes.clone(),
                Err(_) => {
                    let (d, n) = split(path)?;
                    let i = self.inodes.len();
                    self.inodes.push(Inode {
                        live: bytes.clone(),
                        durable: Vec::new(),
                    });
                    self.change(&d, |e| {
                        e.insert(n, Node::File(i));
                    })?;
                }
            },
            Op::Append { path, bytes } => {
                let i = self.lookup(path)?;
                self.inodes[i].live.extend_from_slice(bytes);
            }
            Op::SetLen { path, len } => {
                let i = self.lookup(path)?;
                self.inodes[i].live.resize(*len as usize, 0);
            }
            Op::SyncFile(p) => {
                let i = self.lookup(p)?;
                self.inodes[i].durable = self.inodes[i].live.clone();
            }
            Op::Rename { from, to } => {
                let (fd, fname) = split(from)?;
                let (td, tname) = split(to)?;
                let node = self
                    .dir(&fd)?
                    .live
                    .get(&fname)
                    .copied()
                    .ok_or_else(|| io::Error::other(format!("no {}", from.display())))?;
                if fd == td {
                    self.change(&fd, |e| {
                        e.remove(&fname);
                        e.insert(tname, node);
                    })?;
                } else {
                    self.change(&fd, |e| {
                        e.remove(&fname);
                    })?;
                    self.change(&td, |e| {
                        e.insert(tname, node);
                    })?;
                }
            }
            Op::Remove(p) => {
                let (d, n) = split(p)?;
                self.change(&d, |e| {
                    e.remove(&n);
                })?;
            }
            Op::SyncDir(d) => {
                let s = self.dir(d)?;
                s.durable = s.live.clone();
                s.pending.clear();
            }
        }
        Ok(())
    }

    fn file_bytes(&self, i: usize, c: Content) -> Vec<u8> {
        let ino = &self.inodes[i];
        match c {
            Content::Durable => ino.durable.clone(),
            Content::Live => ino.live.clone(),
            Content::Sectors { new } => (0..ino.live.len())
                .map(|j| {
                    let src = if new.has(j / SECTOR) {
                        &ino.live
                    } else {
                        &ino.durable
                    };
                    src.get(j).copied().unwrap_or(0)
                })
                .collect(),
        }
    }

    /// The ways file `i` can be left: durable, everything, and partial sector sets.
    fn variants(&self, i: usize) -> Vec<Content> {
        let ino = &self.inodes[i];
        if ino.live == ino.durable {
            return vec![Content::Durable];
        }
        let sectors = ino.live.len().div_ceil(SECTOR);
        // only the sectors that differ matter
        let differs: Vec<usize> = (0..sectors)
            .filter(|&s| {
                let r = s * SECTOR..((s + 1) * SECTOR).min(ino.live.len());
                ino.durable.get(r.clone()) != Some(&ino.live[r])
            })
            .collect();
        let mut v = vec![Content::Durable, Content::Live];
        let pick = |n: usize| -> Vec<usize> {
            // at most 6 evenly spread positions
            let step = n.div_ceil(6).max(1);
            (0..n).step_by(step).collect()
        };
        for k in pick(differs.len()) {
            // new data reached the card up to (not including) the k-th differing sector
            v.push(Content::Sectors {
                new: SectorSet {
                    prefix: differs[k],
                    missing: None,
                },
            });
            // every sector but the k-th differing one
            v.push(Content::Sectors {
                new: SectorSet {
                    prefix: sectors,
                    missing: Some(differs[k]),
                },
            });
        }
        v
    }

    fn image(&self, dir_choice: &BTreeMap<PathBuf, usize>, files: &[Content]) -> CrashImage {
        let mut entries = BTreeMap::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(d) = stack.pop() {
            let Some(s) = self.dirs.get(&d) else { continue };
            let k = dir_choice.get(&d).copied().unwrap_or(0);
            let chosen = if k == 0 {
                &s.durable
            } else {
                &s.pending[k - 1]
            };
            for (name, node) in chosen {
                let p = d.join(name);
                match node {
                    Node::Dir => {
                        entries.insert(p.clone(), None);
                        stack.push(p);
                    }
                    Node::File(i) => {
                        entries.insert(p, Some(self.file_bytes(*i, files[*i])));
                    }
                }
            }
        }
        CrashImage { entries }
    }

    /// The distinct states a power cut now could leave (see the module documentation).
    pub fn crash_states(&self) -> Vec<CrashImage> {
        let pending: Vec<(&PathBuf, usize)> = self
            .dirs
            .iter()
            .filter(|(_, s)| !s.pending.is_empty())
            .map(|(d, s)| (d, s.pending.len()))
            .collect();
        let none: BTreeMap<PathBuf, usize> = BTreeMap::new();
        let all: BTreeMap<PathBuf, usize> =
            pending.iter().map(|(d, n)| ((*d).clone(), *n)).collect();
        let mut dir_choices = vec![none.clone(), all.clone()];
        for (d, n) in &pending {
            for k in 1..*n {
                for base in [&none, &all] {
                    let mut c = base.clone();
                    c.insert((*d).clone(), k);
                    dir_choices.push(c);
                }
            }
        }
        let durable = vec![Content::Durable; self.inodes.len()];
        let live = vec![Content::Live; self.inodes.len()];
        let mut out = BTreeSet::new();
        for (ci, dc) in dir_choices.iter().enumerate() {
            out.insert(self.image(dc, &durable));
            out.insert(self.image(dc, &live));
            if ci >= 2 {
                continue; // partial sectors only with all-or-nothing directory states
            }
            for i in 0..self.inodes.len() {
                for c in self.variants(i) {
                    for base in [&durable, &live] {
                        let mut f = base.clone();
                        f[i] = c;
                        out.insert(self.image(dc, &f));
                    }
                }
            }
        }
        out.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    fn file(img: &CrashImage, path: &str) -> Option<Vec<u8>> {
        img.entries.get(&p(path)).cloned().flatten()
    }

    #[test]
    fn unsynced_data_and_entries_may_be_lost_synced_ones_may_not() {
        let mut m = Model::new();
        m.apply(&Op::WriteFile {
            path: p("a"),
            bytes: vec![1; 1000],
        })
        .unwrap();
        let states = m.crash_states();
        // the entry may be missing, present and empty, or present with any prefix of sectors
        assert!(states.iter().any(|s| s.entries.is_empty()));
        assert!(states.iter().any(|s| file(s, "a") == Some(vec![])));
        assert!(states.iter().any(|s| file(s, "a") == Some(vec![1; 1000])));
        assert!(states.iter().any(|s| {
            file(s, "a")
                .is_some_and(|b| b.len() == 1000 && b[..512] == [1; 512] && b[512..] == [0; 488])
        }));
        m.apply(&Op::SyncFile(p("a"))).unwrap();
        m.apply(&Op::SyncDir(p(""))).unwrap();
        assert_eq!(m.crash_states().len(), 1);
        // a rename not yet made durable may be undone; the renamed file's data was synced
        m.apply(&Op::WriteFile {
            path: p("b"),
            bytes: vec![2; 10],
        })
        .unwrap();
        m.apply(&Op::SyncFile(p("b"))).unwrap();
        m.apply(&Op::Rename {
            from: p("b"),
            to: p("a"),
        })
        .unwrap();
        let states = m.crash_states();
        let contents: BTreeSet<Option<Vec<u8>>> = states.iter().map(|s| file(s, "a")).collect();
        assert_eq!(
            contents,
            BTreeSet::from([Some(vec![1; 1000]), Some(vec![2; 10])])
        );
        // between the writes and the rename: "b" exists or not, "a" is always the old file
        assert!(states.iter().any(|s| file(s, "b") == Some(vec![2; 10])));
    }

    #[test]
    fn recorder_records_what_it_does_and_refuses_paths_outside() {
        let d = tempfile::tempdir().unwrap();
        let r = Recorder::new(d.path());
        r.create_dir(&d.path().join("x")).unwrap();
        r.write_file(&d.path().join("x/f"), b"abc").unwrap();
        r.append(&d.path().join("x/f"), b"de").unwrap();
        assert_eq!(std::fs::read(d.path().join("x/f")).unwrap(), b"abcde");
        assert_eq!(r.len(), 3);
        assert!(r.write_file(Path::new("/tmp/elsewhere"), b"x").is_err());
        assert_eq!(r.len(), 3);
        let mut m = Model::new();
        for op in r.ops() {
            m.apply(&op).unwrap();
        }
        let img = m
            .crash_states()
            .into_iter()
            .max_by_key(|s| s.entries.len())
            .unwrap();
        let out = tempfile::tempdir().unwrap();
        img.materialise(out.path()).unwrap();
        assert!(out.path().join("x").is_dir());
    }
}
