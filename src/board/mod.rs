//! Board profiles (`board/<name>.toml`) and task files (`board/tasks/<name>.toml`, in `task`).
//!
//! Adding a board is adding a profile file. Relative paths in a profile are resolved against
//! the directory of the profile file; relative paths in a task file likewise.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::gpio::ButtonTiming;
use crate::quality::GateThresholds;

mod task;
pub use task::{MAX_DESCRIPTION, TaskClass, TaskFile, check_description};

/// Errors reading a profile or task file.
#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    #[error(
        "cannot read board profile {path}: {source}; pass an existing file to --board (see board/*.toml)"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid board profile {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// A board profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardProfile {
    pub name: String,
    /// Inference threads (None = all cores).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Where classifiers, support sets and the audit log live.
    pub storage_dir: PathBuf,
    /// The shipped models (manifest.json and the ONNX files).
    pub models_dir: PathBuf,
    /// Image-encoder variant from the manifest (e.g. "int8"); None = manifest default.
    #[serde(default)]
    pub image_variant: Option<String>,
    #[serde(default)]
    pub text_variant: Option<String>,
    /// The task: classes, descriptions, urgent flags.
    pub task_file: PathBuf,
    /// Support shots to capture per class during enrollment.
    #[serde(default = "default_shots")]
    pub shots_per_class: usize,
    pub camera: CameraConfig,
    pub gpio: GpioConfig,
    #[serde(default)]
    pub gate: GateThresholds,
    /// Audit-log rotation and size limit.
    #[serde(default)]
    pub audit: AuditLimits,
    /// The screen served by `sgps run` (absent: buttons and LEDs only).
    #[serde(default)]
    pub ui: Option<UiConfig>,
    /// Rust target triple of the board (read by `cargo xtask`; "host" for sim).
    #[serde(default)]
    pub target: Option<String>,
    /// Oldest glibc on the board's OS, "MAJOR.MINOR" (read by `cargo xtask`: older than the
    /// cross toolchain's means the build goes through `cargo zigbuild`).
    #[serde(default)]
    pub glibc: Option<String>,
    /// The board's CPU as qemu names it (`qemu-aarch64 -cpu`), for the emulated tests of
    /// `cargo xtask test-arm` (absent: qemu's `max`).
    #[serde(default)]
    pub qemu_cpu: Option<String>,
}

fn default_shots() -> usize {
    5
}

/// `[audit]`: when the log rotates, and how much the device keeps once segments are exported
/// (unexported records are never deleted).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditLimits {
    /// Rotate `audit.log` into a segment at this size.
    pub segment_kib: u64,
    /// Delete the oldest exported segments while the log takes more than this.
    pub max_mib: u64,
}

impl Default for AuditLimits {
    fn default() -> Self {
        AuditLimits {
            segment_kib: crate::store::audit::SEGMENT_BYTES / 1024,
            max_mib: crate::store::audit::MAX_LOG_BYTES / (1024 * 1024),
        }
    }
}

/// `[ui]`: where the clinician's screen is served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UiConfig {
    /// Address to listen on, e.g. "127.0.0.1:8080" (the kiosk browser on the board). Another
    /// interface needs `pairing_token`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Required when `listen` is not a loopback address: a browser elsewhere must present it
    /// (open `http://<board>:<port>/pair?token=<token>` once). At least 16 characters.
    #[serde(default)]
    pub pairing_token: Option<String>,
    /// Where Export writes session reports (the USB stick's mount point).
    #[serde(default = "default_export_dir")]
    pub export_dir: PathBuf,
}

impl Default for UiConfig {
    fn default() -> Self {
        UiConfig {
            listen: default_listen(),
            pairing_token: None,
            export_dir: default_export_dir(),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}

fn default_export_dir() -> PathBuf {
    "/media/usb".into()
}

impl UiConfig {
    /// Check the address and the pairing rule.
    pub fn validate(&self) -> Result<std::net::SocketAddr, String> {
        let addr: std::net::SocketAddr = self.listen.parse().map_err(|_| {
            format!(
                "ui.listen = {:?} is not an address like \"127.0.0.1:8080\"",
                self.listen
            )
        })?;
        match &self.pairing_token {
            None if !addr.ip().is_loopback() => Err(format!(
                "ui.listen = {:?} is reachable from other machines: set ui.pairing_token (16 or more characters) or listen on 127.0.0.1",
                self.listen
            )),
            Some(t) if t.len() < 16 || !t.chars().all(|c| c.is_ascii_graphic()) => Err(
                "ui.pairing_token must be 16 or more printable characters without spaces".into(),
            ),
            _ => Ok(addr),
        }
    }
}

/// Which camera and how to drive it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum CameraConfig {
    /// A V4L2 device.
    V4l2 {
        device: PathBuf,
        /// "mjpeg", "yuyv" or "auto".
        #[serde(default = "default_format")]
        format: String,
        width: u32,
        height: u32,
        #[serde(default = "default_timeout")]
        timeout_ms: u64,
    },
    /// Frames from a directory (sim board, tests).
    Replay {
        dir: PathBuf,
        #[serde(default)]
        looping: bool,
        #[serde(default = "default_timeout")]
        timeout_ms: u64,
        /// Injected faults, e.g. ["timeout@3", "corrupt@5", "unplug@7x2"].
        #[serde(default)]
        faults: Vec<String>,
    },
}

fn default_format() -> String {
    "auto".into()
}

fn default_timeout() -> u64 {
    2000
}

/// Buttons and LEDs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum GpioConfig {
    /// Character-device GPIO.
    Cdev {
        chip: String,
        capture_line: u32,
        next_line: u32,
        green_line: u32,
        amber_line: u32,
        red_line: u32,
        #[serde(default = "yes")]
        buttons_active_low: bool,
        #[serde(default)]
        leds_active_low: bool,
        #[serde(default)]
        timing: ButtonTiming,
    },
    /// Scripted buttons (`--script`) and logged LEDs.
    Sim {
        #[serde(default)]
        timing: ButtonTiming,
    },
}

fn yes() -> bool {
    true
}

impl GpioConfig {
    pub fn timing(&self) -> ButtonTiming {
        match self {
            GpioConfig::Cdev { timing, .. } | GpioConfig::Sim { timing } => *timing,
        }
    }
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

impl BoardProfile {
    /// Read, validate and resolve relative paths against the profile's directory.
    pub fn load(path: &Path) -> Result<BoardProfile, BoardError> {
        let text = std::fs::read_to_string(path).map_err(|source| BoardError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut p = Self::parse(&text).map_err(|reason| BoardError::Invalid {
            path: path.to_owned(),
            reason,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        p.resolve_paths(base);
        Ok(p)
    }

    /// Parse and validate TOML (paths left as written).
    pub fn parse(text: &str) -> Result<BoardProfile, String> {
        let p: BoardProfile = toml::from_str(text).map_err(|e| e.to_string())?;
        p.validate()?;
        Ok(p)
    }

    /// `glibc` as (major, minor); None when the profile does not say.
    pub fn glibc_version(&self) -> Result<Option<(u32, u32)>, String> {
        let Some(v) = &self.glibc else {
            return Ok(None);
        };
        let bad = || format!("glibc = {v:?}: expected \"MAJOR.MINOR\", e.g. \"2.31\"");
        let (a, b) = v.split_once('.').ok_or_else(bad)?;
        Ok(Some((
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        )))
    }

    fn resolve_paths(&mut self, base: &Path) {
        self.storage_dir = resolve(base, &self.storage_dir);
        self.models_dir = resolve(base, &self.models_dir);
        self.task_file = resolve(base, &self.task_file);
        if let Some(ui) = &mut self.ui {
            ui.export_dir = resolve(base, &ui.export_dir);
        }
        match &mut self.camera {
            CameraConfig::V4l2 { device, .. } => *device = resolve(base, device),
            CameraConfig::Replay { dir, .. } => *dir = resolve(base, dir),
        }
    }

    /// Check values TOML cannot (ranges, distinct lines, formats, the screen's address).
    pub fn validate(&self) -> Result<(), String> {
        self.glibc_version()?;
        if !(1..=20).contains(&self.shots_per_class) {
            return Err(format!(
                "shots_per_class = {} must be within 1..=20",
                self.shots_per_class
            ));
        }
        if self.threads == Some(0) {
            return Err("threads must be at least 1 (or omitted for all cores)".into());
        }
        match &self.camera {
            CameraConfig::V4l2 {
                format,
                width,
                height,
                ..
            } => {
                if !["mjpeg", "mjpg", "yuyv", "auto"]
                    .contains(&format.to_ascii_lowercase().as_str())
                {
                    return Err(format!(
                        "camera.format = {format:?}: use mjpeg, yuyv or auto"
                    ));
                }
                if *width == 0 || *height == 0 {
                    return Err("camera.width and camera.height must be positive".into());
                }
            }
            CameraConfig::Replay { faults, .. } => {
                for f in faults {
                    crate::camera::Fault::parse(f)?;
                }
            }
        }
        if let GpioConfig::Cdev {
            capture_line,
            next_line,
            green_line,
            amber_line,
            red_line,
            ..
        } = &self.gpio
        {
            let mut lines = [
                *capture_line,
                *next_line,
                *green_line,
                *amber_line,
                *red_line,
            ];
            lines.sort();
            if lines.windows(2).any(|w| w[0] == w[1]) {
                return Err("gpio lines must be distinct".into());
            }
        }
        if let Some(ui) = &self.ui {
            ui.validate()?;
        }
        if self.audit.segment_kib < 4 || self.audit.max_mib * 1024 < self.audit.segment_kib {
            return Err("audit: need segment_kib >= 4 and max_mib * 1024 >= segment_kib".into());
        }
        let t = self.gpio.timing();
        if t.debounce_ms == 0 || t.long_press_ms <= 2 * t.debounce_ms {
            return Err(
                "gpio.timing: need debounce_ms > 0 and long_press_ms > 2 * debounce_ms".into(),
            );
        }
        Ok(())
    }

    /// Load this profile's task file.
    pub fn load_task(&self) -> Result<TaskFile, BoardError> {
        TaskFile::load(&self.task_file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("board")
    }

    #[test]
    fn every_shipped_profile_and_task_loads() {
        let mut n = 0;
        for e in std::fs::read_dir(board_dir()).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                let b = BoardProfile::load(&p).unwrap_or_else(|e| panic!("{e}"));
                // installed profiles point at /etc/sgps/tasks/...: check the shipped copy
                let task = board_dir()
                    .join("tasks")
                    .join(b.task_file.file_name().unwrap());
                let t = TaskFile::load(&task).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                assert!(t.classes.len() >= 2);
                n += 1;
            }
        }
        assert!(n >= 4, "rpi4, rpi5, jetson-orin-nano and sim");
        let sim = BoardProfile::load(&board_dir().join("sim.toml")).unwrap();
        assert!(matches!(sim.camera, CameraConfig::Replay { .. }));
        assert!(matches!(sim.gpio, GpioConfig::Sim { .. }));
        let rpi = BoardProfile::load(&board_dir().join("rpi4.toml")).unwrap();
        assert!(matches!(rpi.camera, CameraConfig::V4l2 { .. }));
        assert!(rpi.storage_dir.is_absolute());
    }

    #[test]
    fn the_screen_listens_on_loopback_unless_paired() {
        let base = std::fs::read_to_string(board_dir().join("sim.toml")).unwrap();
        let sim = BoardProfile::parse(&base).unwrap();
        let ui = sim.ui.expect("the sim board serves the screen");
        assert!(ui.validate().unwrap().ip().is_loopback());
        let open = base.replace("listen = \"127.0.0.1:8080\"", "listen = \"0.0.0.0:8080\"");
        let e = BoardProfile::parse(&open).unwrap_err();
        assert!(e.contains("pairing_token"), "{e}");
        let weak = open.replace("[ui]\n", "[ui]\npairing_token = \"short\"\n");
        assert!(
            BoardProfile::parse(&weak)
                .unwrap_err()
                .contains("16 or more")
        );
        let paired = open.replace(
            "[ui]\n",
            "[ui]\npairing_token = \"correct-horse-battery-staple\"\n",
        );
        assert!(
            !BoardProfile::parse(&paired)
                .unwrap()
                .ui
                .unwrap()
                .validate()
                .unwrap()
                .ip()
                .is_loopback()
        );
        let e = BoardProfile::parse(&base.replace("127.0.0.1:8080", "localhost:http")).unwrap_err();
        assert!(e.contains("not an address"), "{e}");
        // every shipped board keeps the screen on loopback
        for b in ["rpi4", "rpi5", "jetson-orin-nano"] {
            let p = BoardProfile::load(&board_dir().join(format!("{b}.toml"))).unwrap();
            assert!(p.ui.unwrap().validate().unwrap().ip().is_loopback(), "{b}");
        }
    }

    #[test]
    fn task_names_and_descriptions_are_checked() {
        let ok = "name = \"t\"\n[[classes]]\nname = \"a\"\n[[classes]]\nname = \"b c\"\n";
        assert!(TaskFile::parse(ok).is_ok());
        for (bad, why) in [
            ("a/b", "path separator"),
            ("..", "path separator"),
            (" a", "space"),
            ("a\tb", "control character"),
        ] {
            let t = ok.replace("\"b c\"", &format!("{bad:?}"));
            let e = TaskFile::parse(&t).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        let long = ok.replace(
            "name = \"a\"\n",
            &format!("name = \"a\"\ndescription = \"{}\"\n", "x".repeat(1001)),
        );
        assert!(TaskFile::parse(&long).unwrap_err().contains("at most 1000"));
    }

    #[test]
    fn bad_profiles_are_explained() {
        let base = std::fs::read_to_string(board_dir().join("sim.toml")).unwrap();
        let e = BoardProfile::parse(&base.replace("shots_per_class = 5", "shots_per_class = 0"))
            .unwrap_err();
        assert!(e.contains("shots_per_class"), "{e}");
        let e = BoardProfile::parse(&format!("{base}\nfavourite_colour = 1\n")).unwrap_err();
        assert!(e.contains("favourite_colour"), "{e}");
        let e = BoardProfile::load(Path::new("/nonexistent/board.toml")).unwrap_err();
        assert!(e.to_string().contains("--board"), "{e}");
        let small =
            BoardProfile::parse(&format!("{base}\n[audit]\nsegment_kib = 64\nmax_mib = 1\n"))
                .unwrap();
        assert_eq!((small.audit.segment_kib, small.audit.max_mib), (64, 1));
        let e = BoardProfile::parse(&format!(
            "{base}\n[audit]\nsegment_kib = 4096\nmax_mib = 1\n"
        ))
        .unwrap_err();
        assert!(e.contains("max_mib"), "{e}");
    }

    #[test]
    fn profile_model_variants_exist_in_the_manifest() {
        let Ok(text) = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("models/manifest.json"),
        ) else {
            eprintln!("SKIP: models/manifest.json absent");
            return;
        };
        let m: serde_json::Value = serde_json::from_str(&text).unwrap();
        for e in std::fs::read_dir(board_dir()).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                let b = BoardProfile::load(&p).unwrap();
                if let Some(v) = &b.image_variant {
                    assert!(
                        !m["image_encoder"]["variants"][v].is_null(),
                        "{}: image_variant {v} not in the manifest",
                        p.display()
                    );
                }
                if let Some(v) = &b.text_variant {
                    assert!(
                        !m["text_encoder"]["variants"][v].is_null(),
                        "{}: text_variant {v} not in the manifest",
                        p.display()
                    );
                }
            }
        }
    }

    #[test]
    fn gate_thresholds_default_when_omitted() {
        let base = std::fs::read_to_string(board_dir().join("rpi4.toml")).unwrap();
        let p = BoardProfile::parse(&base).unwrap();
        assert_eq!(p.gate.max_mean, GateThresholds::default().max_mean);
    }
}
