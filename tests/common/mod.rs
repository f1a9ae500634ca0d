//! Helpers shared by the integration tests: where the models and the images are, and one loaded
//! pipeline per test binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sgps::pipeline::{LoadOptions, Pipeline};

/// The shipped models, or `$SGPS_MODELS` (to check a candidate export before it is committed).
pub fn models_dir() -> PathBuf {
    std::env::var_os("SGPS_MODELS")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models"))
}

/// The image collection (`$SGPS_DATA`, else `../shared/data`), or `None` after printing why the
/// calling test is skipped.
pub fn data_dir() -> Option<PathBuf> {
    let d = std::env::var_os("SGPS_DATA")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
    if d.join("isic").is_dir() {
        Some(d)
    } else {
        eprintln!(
            "SKIP: data directory {} with isic/ not found (set SGPS_DATA to run this test)",
            d.display()
        );
        None
    }
}

/// The models of [`models_dir`], loaded once per test binary.
pub fn pipeline() -> &'static Pipeline {
    static P: OnceLock<Pipeline> = OnceLock::new();
    P.get_or_init(|| Pipeline::load(&models_dir(), &LoadOptions::default()).expect("load models"))
}
