//! Helpers shared by the integration tests: where the models and the images are, and one loaded
//! pipeline per test binary.
#![allow(dead_code)]

pub mod fixtures;

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

/// Whether a requirement of the calling test is met. When it is not: under `CI=true` the test
/// fails (a green CI must mean the whole suite ran); elsewhere it prints `SKIP <test>: <what>`
/// and the caller returns.
pub fn require(met: bool, test: &str, what: impl std::fmt::Display) -> bool {
    if met {
        return true;
    }
    if ci() {
        panic!("{test}: {what} (CI=true: a missing requirement fails instead of skipping)");
    }
    eprintln!("SKIP {test}: {what}");
    false
}

/// True under CI (`CI=true`, as CI services and `.ci/run` set it).
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The full image collection (`$SGPS_DATA`, else `../shared/data`), or `None` after printing why
/// the calling test is skipped (a failure under `CI=true`, see [`require`]).
pub fn data_dir() -> Option<PathBuf> {
    let d = collection_dir();
    require(
        d.join("isic").is_dir(),
        "this test",
        format_args!(
            "the image collection is not at {} (needs isic/ and the other datasets; set SGPS_DATA)",
            d.display()
        ),
    )
    .then_some(d)
}

/// Where the image collection should be: `$SGPS_DATA`, else `../shared/data` (may not exist).
pub fn collection_dir() -> PathBuf {
    std::env::var_os("SGPS_DATA")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"))
}

/// The 40 sample images shipped in `tests/samples` (10 per ISIC novel class): always present.
#[allow(unused_imports)] // used by some test binaries only
pub use sgps::eval::samples_dir;

/// The models of [`models_dir`], loaded once per test binary.
pub fn pipeline() -> &'static Pipeline {
    static P: OnceLock<Pipeline> = OnceLock::new();
    P.get_or_init(|| Pipeline::load(&models_dir(), &LoadOptions::default()).expect("load models"))
}

/// A command that runs the executable `exe` (a test binary or `sgps`), through
/// `$SGPS_TEST_RUNNER` when set: whitespace-separated program and arguments, e.g.
/// `qemu-aarch64-static -cpu cortex-a76 -L /usr/aarch64-linux-gnu` when the tests are cross-built
/// and run under emulation (`cargo xtask test-arm` sets it). Without it, `exe` runs directly.
pub fn command(exe: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    let runner = std::env::var("SGPS_TEST_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(prog) => {
            let mut c = std::process::Command::new(prog);
            c.args(words).arg(exe);
            c
        }
        None => std::process::Command::new(exe),
    }
}

/// How much slower than native the tests run (`$SGPS_TEST_SLOWDOWN`, default 1; e.g. 10 under
/// qemu): timing windows of tests that spawn and kill processes stretch by this factor.
pub fn slowdown() -> u32 {
    match std::env::var("SGPS_TEST_SLOWDOWN") {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|&n| n >= 1)
            .unwrap_or_else(|| panic!("SGPS_TEST_SLOWDOWN={v:?}: expected a whole number >= 1")),
        _ => 1,
    }
}

/// A replay directory for a sim-board session in `dir/frames`: class 0's support images, then a
/// dark copy of class 1's first (rejected by the quality gate, not enrolled), then the other
/// classes' support images, then the queries; files are numbered symlinks. Returns the
/// directory and the queries in order.
pub fn session_frames(
    dir: &Path,
    picks: &[(Vec<PathBuf>, Vec<PathBuf>)],
) -> (PathBuf, Vec<PathBuf>) {
    let frames = dir.join("frames");
    std::fs::create_dir(&frames).unwrap();
    let img = sgps::image_io::load_rgb(&picks[1].0[0]).unwrap();
    let dark = image::RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let p = img.get_pixel(x, y).0;
        image::Rgb([p[0] / 10, p[1] / 10, p[2] / 10])
    });
    let dark_path = dir.join("dark.png");
    dark.save(&dark_path).unwrap();
    let queries: Vec<PathBuf> = picks.iter().flat_map(|(_, q)| q.clone()).collect();
    let mut order: Vec<PathBuf> = picks[0].0.clone();
    order.push(dark_path);
    order.extend(picks[1..].iter().flat_map(|(s, _)| s.clone()));
    order.extend(queries.iter().cloned());
    for (i, p) in order.iter().enumerate() {
        let ext = p.extension().unwrap().to_str().unwrap();
        std::os::unix::fs::symlink(p, frames.join(format!("{i:03}.{ext}"))).unwrap();
    }
    (frames, queries)
}
