//! `sgps run`: arguments, then `sgps::device::run`, then the session summary.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use sgps::device::{self, RunOptions};
use sgps::pipeline::LoadOptions;

/// Arguments of `sgps run`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunArgs {
    /// Board profile (board/<name>.toml; installed devices: /etc/sgps/board.toml).
    #[arg(long, value_name = "FILE")]
    pub board: PathBuf,
    /// Button script for boards with simulated GPIO (lines: `press capture`, `long next`, `wait 100`).
    #[arg(long, value_name = "FILE")]
    pub script: Option<PathBuf>,
    /// Override the profile's storage directory.
    #[arg(long, value_name = "DIR")]
    pub storage_dir: Option<PathBuf>,
    /// Override the replay camera's frame directory (replay boards only).
    #[arg(long, value_name = "DIR")]
    pub replay_dir: Option<PathBuf>,
    /// Ask on the console (stdin) for the description of each class the task file leaves
    /// without one, when its enrollment starts.
    #[arg(long)]
    pub console: bool,
    /// Serve the screen on this address instead of the profile's `[ui] listen`
    /// (e.g. 127.0.0.1:0 for any free port), or `off`.
    #[arg(long, value_name = "ADDR|off")]
    pub ui: Option<String>,
}

/// `sgps run`: the global flags given explicitly (`--models`, `--threads`, variants) override
/// the board profile; otherwise the profile decides.
pub fn run(args: &RunArgs, models: Option<&Path>, opts: &LoadOptions) -> anyhow::Result<ExitCode> {
    let summary = device::run(&RunOptions {
        board: args.board.clone(),
        script: args.script.clone(),
        storage_dir: args.storage_dir.clone(),
        replay_dir: args.replay_dir.clone(),
        console: args.console,
        ui: args.ui.clone(),
        models_dir: models.map(Path::to_path_buf),
        threads: opts.threads,
        image_variant: opts.image_variant.clone(),
        text_variant: opts.text_variant.clone(),
    })?;
    println!(
        "SESSION shots={} rejected={} camera_errors={} syntheses={} decisions={} classifier={}",
        summary.shots_enrolled,
        summary.rejected,
        summary.camera_errors,
        summary.syntheses,
        summary.decisions_made,
        summary.classifier_id.as_deref().unwrap_or("-")
    );
    if let Some(h) = summary.audit_head {
        let h = hex::encode(h);
        println!(
            "AUDIT head sha256 {h} (note it: sgps audit verify --expect-head {h} <storage dir> later shows whether records were removed)"
        );
    }
    // the session's memory high-water mark (issue 19's budget for the device loop is 150 MiB)
    if let Some(k) = sgps::bench::proc_status_kib("VmHWM") {
        println!("MEMORY peak RSS {:.1} MiB (VmHWM)", k as f64 / 1024.0);
    }
    Ok(ExitCode::SUCCESS)
}
