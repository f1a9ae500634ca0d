//! Replay camera: serves the image files of a directory in sorted order, for the `sim` board,
//! tests and demos. Faults can be injected at given capture attempts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use image::RgbImage;

use super::{Camera, CameraError, decode_rgb};

/// A fault injected at one capture attempt (attempts count from 0 and include failed ones).
/// Faults never consume a frame: the next successful capture returns the frame that was due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The attempt times out.
    Timeout,
    /// The attempt returns a corrupt frame.
    Corrupt,
    /// The camera is unplugged for this many attempts (this one included), then plugged back.
    Unplug(u32),
}

impl Fault {
    /// Parse `timeout@N`, `corrupt@N`, `unplug@NxM` (M attempts unplugged) into (N, fault).
    pub fn parse(spec: &str) -> Result<(u64, Fault), String> {
        let bad = || format!("bad fault spec {spec:?}: use timeout@N, corrupt@N or unplug@NxM");
        let (kind, at) = spec.split_once('@').ok_or_else(bad)?;
        let (n, m) = match at.split_once('x') {
            Some((n, m)) => (n, Some(m)),
            None => (at, None),
        };
        let n: u64 = n.trim().parse().map_err(|_| bad())?;
        let f = match (kind.trim(), m) {
            ("timeout", None) => Fault::Timeout,
            ("corrupt", None) => Fault::Corrupt,
            ("unplug", Some(m)) => Fault::Unplug(m.trim().parse().map_err(|_| bad())?),
            ("unplug", None) => Fault::Unplug(1),
            _ => return Err(bad()),
        };
        Ok((n, f))
    }
}

/// Frames from a directory.
pub struct ReplayCamera {
    dir: PathBuf,
    frames: Vec<PathBuf>,
    next: usize,
    looping: bool,
    attempt: u64,
    faults: BTreeMap<u64, Fault>,
    unplugged_left: u32,
    timeout: Duration,
}

const EXTS: &[&str] = &["jpg", "jpeg", "png", "bmp"];

impl ReplayCamera {
    /// Open a directory of frames (files with image extensions, sorted by name; symlinks followed).
    pub fn open(dir: &Path, looping: bool, timeout: Duration) -> Result<ReplayCamera, CameraError> {
        let cfg = |reason: String| CameraError::Config {
            device: dir.display().to_string(),
            reason,
        };
        let rd = std::fs::read_dir(dir).map_err(|e| {
            cfg(format!(
                "cannot read replay directory: {e}; set camera.dir in the board profile or pass --replay-dir"
            ))
        })?;
        let mut frames: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| EXTS.contains(&e.to_ascii_lowercase().as_str()))
            })
            .collect();
        frames.sort();
        if frames.is_empty() {
            return Err(cfg(
                "no .jpg/.png/.bmp frames in the replay directory".into()
            ));
        }
        Ok(ReplayCamera {
            dir: dir.to_owned(),
            frames,
            next: 0,
            looping,
            attempt: 0,
            faults: BTreeMap::new(),
            unplugged_left: 0,
            timeout,
        })
    }

    /// Inject faults at capture attempts.
    pub fn with_faults(mut self, faults: impl IntoIterator<Item = (u64, Fault)>) -> Self {
        self.faults.extend(faults);
        self
    }

    /// The frame files, in replay order.
    pub fn frames(&self) -> &[PathBuf] {
        &self.frames
    }

    /// Index of the frame the next successful capture returns.
    pub fn position(&self) -> usize {
        self.next
    }
}

impl Camera for ReplayCamera {
    fn capture(&mut self) -> Result<RgbImage, CameraError> {
        let attempt = self.attempt;
        self.attempt += 1;
        let device = self.describe();
        if let Some(f) = self.faults.get(&attempt).copied() {
            match f {
                Fault::Timeout => {
                    return Err(CameraError::Timeout {
                        device,
                        after: self.timeout,
                    });
                }
                Fault::Corrupt => {
                    return Err(CameraError::Corrupt {
                        device,
                        reason: "injected: truncated JPEG".into(),
                    });
                }
                Fault::Unplug(n) => self.unplugged_left = n,
            }
        }
        if self.unplugged_left > 0 {
            self.unplugged_left -= 1;
            return Err(CameraError::Disconnected {
                device,
                reason: "injected: device unplugged".into(),
            });
        }
        if self.next >= self.frames.len() {
            if self.looping {
                self.next = 0;
            } else {
                return Err(CameraError::Exhausted { device });
            }
        }
        let path = self.frames[self.next].clone();
        self.next += 1;
        let bytes = std::fs::read(&path).map_err(|e| CameraError::Corrupt {
            device: device.clone(),
            reason: format!("{}: {e}", path.display()),
        })?;
        let img = decode_rgb(&bytes).map_err(|e| CameraError::Corrupt {
            device,
            reason: format!("{}: {e}", path.display()),
        })?;
        log::debug!("replay camera: frame {}", path.display());
        Ok(img)
    }

    fn describe(&self) -> String {
        format!("replay:{}", self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with_frames(n: usize) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for i in 0..n {
            let img = RgbImage::from_pixel(40 + i as u32, 40, image::Rgb([i as u8 * 10, 0, 0]));
            img.save(d.path().join(format!("{i:03}.png"))).unwrap();
        }
        std::fs::write(d.path().join("notes.txt"), b"ignored").unwrap();
        d
    }

    #[test]
    fn frames_in_sorted_order_then_exhausted() {
        let d = dir_with_frames(3);
        let mut c = ReplayCamera::open(d.path(), false, Duration::from_millis(100)).unwrap();
        for i in 0..3 {
            assert_eq!(c.capture().unwrap().width(), 40 + i);
        }
        let e = c.capture().unwrap_err();
        assert!(matches!(e, CameraError::Exhausted { .. }));
        assert!(!e.is_transient());
    }

    #[test]
    fn injected_faults_do_not_consume_frames_and_replug_recovers() {
        let d = dir_with_frames(3);
        let faults = ["timeout@0", "corrupt@2", "unplug@3x2"].map(|s| Fault::parse(s).unwrap());
        let mut c = ReplayCamera::open(d.path(), true, Duration::from_millis(50))
            .unwrap()
            .with_faults(faults);
        let e = c.capture().unwrap_err();
        assert!(
            matches!(e, CameraError::Timeout { .. }) && e.is_transient(),
            "{e}"
        );
        assert!(e.to_string().contains("no frame within"));
        assert_eq!(c.capture().unwrap().width(), 40);
        assert!(matches!(
            c.capture().unwrap_err(),
            CameraError::Corrupt { .. }
        ));
        assert!(matches!(
            c.capture().unwrap_err(),
            CameraError::Disconnected { .. }
        ));
        assert!(matches!(
            c.capture().unwrap_err(),
            CameraError::Disconnected { .. }
        ));
        assert_eq!(c.capture().unwrap().width(), 41);
        assert_eq!(c.capture().unwrap().width(), 42);
        assert_eq!(c.capture().unwrap().width(), 40, "loops");
    }

    #[test]
    fn corrupt_file_is_reported_and_skipped() {
        let d = dir_with_frames(2);
        std::fs::write(d.path().join("000b.jpg"), b"\xff\xd8\xff garbage").unwrap();
        let mut c = ReplayCamera::open(d.path(), false, Duration::from_millis(50)).unwrap();
        assert_eq!(c.capture().unwrap().width(), 40);
        let e = c.capture().unwrap_err();
        assert!(
            matches!(e, CameraError::Corrupt { .. }) && e.to_string().contains("000b.jpg"),
            "{e}"
        );
        assert_eq!(c.capture().unwrap().width(), 41);
    }

    #[test]
    fn empty_or_missing_dir_is_config_error() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            ReplayCamera::open(d.path(), false, Duration::ZERO),
            Err(CameraError::Config { .. })
        ));
        assert!(ReplayCamera::open(&d.path().join("nope"), false, Duration::ZERO).is_err());
        assert!(Fault::parse("explode@1").is_err());
    }
}
