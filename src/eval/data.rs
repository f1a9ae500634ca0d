//! Where the evaluation's images are: the collection (`$SGPS_DATA`, `../shared/data`), or the
//! shipped samples for the demo; the novel ISIC classes of the protocol.

use std::path::{Path, PathBuf};

/// Environment variable naming the data directory.
pub const DATA_ENV: &str = "SGPS_DATA";
/// Default data directory (relative to the working directory, then to the workspace).
pub const DEFAULT_DATA: &str = "../shared/data";
/// The novel classes of protocol ISIC-FS-novel.
pub const ISIC_NOVEL: &[&str] = &[
    "isic/actinic_keratosis",
    "isic/dermatofibroma",
    "isic/squamous_cell_carcinoma",
    "isic/vascular_lesion",
];

/// Data directory: `flag`, else `$SGPS_DATA`, else `../shared/data` (from the working directory,
/// else from the source workspace).
pub fn resolve_data_dir(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os(DATA_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    let local = PathBuf::from(DEFAULT_DATA);
    if local.is_dir() {
        return local;
    }
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_DATA);
    if ws.is_dir() { ws } else { local }
}

/// The sample images shipped with sgps (`tests/samples`: 10 per ISIC novel class, CC BY-NC 4.0,
/// see its ATTRIBUTION.md), found by [`crate::pipeline::locate_installed`].
pub fn samples_dir() -> PathBuf {
    let rel = Path::new("tests").join("samples");
    crate::pipeline::locate_installed(&rel, |d| d.join("isic").is_dir())
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(rel))
}

/// Where the demo's images come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DemoData {
    /// The full image collection (`--data`, `$SGPS_DATA` or `../shared/data`).
    Collection(PathBuf),
    /// The samples shipped in the repository; `note` says why the collection was not used.
    Samples { dir: PathBuf, note: String },
}

impl DemoData {
    pub fn dir(&self) -> &Path {
        match self {
            DemoData::Collection(d) | DemoData::Samples { dir: d, .. } => d,
        }
    }
}

/// The demo's data: an explicit `--data` must exist (an error names it otherwise); without one,
/// the collection when it holds the ISIC novel classes, else the shipped samples.
pub fn demo_data_dir(flag: Option<&Path>) -> Result<DemoData, String> {
    let has_novel = |d: &Path| ISIC_NOVEL.iter().all(|c| d.join(c).is_dir());
    if let Some(d) = flag {
        return if has_novel(d) {
            Ok(DemoData::Collection(d.to_path_buf()))
        } else {
            Err(missing_data_message(d, "demo"))
        };
    }
    let d = resolve_data_dir(None);
    if has_novel(&d) {
        return Ok(DemoData::Collection(d));
    }
    let dir = samples_dir();
    if !has_novel(&dir) {
        return Err(format!(
            "{}\nThe sample images shipped with sgps are missing too (expected at {}).",
            missing_data_message(&d, "demo"),
            dir.display()
        ));
    }
    let why = match std::env::var_os(DATA_ENV).filter(|v| !v.is_empty()) {
        Some(v) => format!(
            "{DATA_ENV}={} holds no isic/<novel class>/ folders",
            Path::new(&v).display()
        ),
        None => format!("{} not found", d.display()),
    };
    Ok(DemoData::Samples {
        dir,
        note: format!(
            "{why}; using the 40 sample images shipped with sgps (ISIC Archive, CC BY-NC 4.0). \
             For the full collection set {DATA_ENV} or pass --data."
        ),
    })
}

/// What to do when the data directory is missing: the exact layout and how to point at it.
pub fn missing_data_message(dir: &Path, command: &str) -> String {
    format!(
        "the image data directory {} does not exist.\n\
         sgps {command} needs the medical image collection in ImageFolder layout, e.g.\n  \
         <DATA>/isic/actinic_keratosis/*.jpg\n  <DATA>/isic/dermatofibroma/*.jpg\n  \
         <DATA>/isic/squamous_cell_carcinoma/*.jpg\n  <DATA>/isic/vascular_lesion/*.jpg\n\
         The images are research / non-commercial licensed and are not redistributed with sgps.\n\
         Point sgps at your copy with `SGPS_DATA=/path/to/data cargo run --release -- {command}` \
         or `--data /path/to/data` (default: {DEFAULT_DATA}).",
        dir.display()
    )
}
