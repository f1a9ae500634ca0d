//! `cargo xtask bench`: release build of the host binary, then `sgps bench …`.

use crate::build::{self, Board, BuildOptions};
use crate::tools;
use anyhow::{Context, Result};
use std::path::Path;
use std::process::Command;

/// Builds `sgps` for the host in release mode and runs `sgps bench` with `args`.
pub fn bench(root: &Path, args: &[String]) -> Result<()> {
    let bin = build::build(root, &Board::host(root), &BuildOptions::onnx_reader())?;
    tools::run(Command::new(bin).arg("bench").args(args).current_dir(root))
        .context("`sgps bench` failed")
}
