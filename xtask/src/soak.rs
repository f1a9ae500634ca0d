//! `cargo xtask soak`: a long run of the sim device loop. The real binary (`sgps run` on a sim
//! board: replay camera over the shipped sample images, scripted buttons) enrolls four classes,
//! then screens `--decisions` captures. Every `--every` decisions the harness records the
//! process's resident memory (`/proc/<pid>/status`), the time per decision over the last window
//! and the storage size, writes them to a CSV and says whether memory and time per decision
//! stayed flat.

use anyhow::{Context, Result, bail};
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::build::{self, Board, BuildOptions};

/// Arguments of `cargo xtask soak`.
#[derive(Debug, Clone, clap::Args)]
pub struct SoakArgs {
    /// Screening decisions after enrollment.
    #[arg(long, default_value_t = 100_000)]
    pub decisions: usize,
    /// Record a sample every this many decisions.
    #[arg(long, default_value_t = 1000)]
    pub every: usize,
    /// CSV of the samples (default target/soak/soak.csv).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Use this sgps binary instead of building one.
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Rotate the audit log at this size (the board profile's `[audit] segment_kib`), to see
    /// rotation in a shorter run.
    #[arg(long)]
    pub segment_kib: Option<u64>,
}

/// One sample.
struct Sample {
    decisions: usize,
    seconds: f64,
    ms_per_decision: f64,
    rss_kib: u64,
    store_bytes: u64,
    audit_bytes: u64,
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Bytes of the audit log's files (segments and audit.log).
fn audit_bytes(storage: &Path) -> u64 {
    fs::read_dir(storage)
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.starts_with("audit") && n.ends_with(".log")
                })
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn dir_bytes(p: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(p) else { return 0 };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

pub fn soak(root: &Path, args: &SoakArgs) -> Result<()> {
    if args.every == 0 || args.decisions < args.every {
        bail!("need --every >= 1 and --decisions >= --every");
    }
    let bin = match &args.binary {
        Some(b) => b.clone(),
        None => build::build(root, &Board::host(root), &BuildOptions::onnx_reader())?,
    };
    let work = tempfile::Builder::new().prefix("sgps-soak").tempdir()?;
    // frames: every shipped sample image, replayed in a loop
    let frames = work.path().join("frames");
    fs::create_dir(&frames)?;
    let samples = root.join("tests/samples/isic");
    let mut n = 0;
    for class in fs::read_dir(&samples).with_context(|| samples.display().to_string())? {
        for img in fs::read_dir(class?.path())? {
            let img = img?.path();
            if img.extension().is_some_and(|x| x == "jpg") {
                std::os::unix::fs::symlink(&img, frames.join(format!("{n:03}.jpg")))?;
                n += 1;
            }
        }
    }
    if n == 0 {
        bail!("no sample images under {}", samples.display());
    }
    let shots = 5;
    let mut script = String::new();
    for _ in 0..(4 * shots + args.decisions) {
        script.push_str("press capture\n");
    }
    let script_path = work.path().join("script.txt");
    fs::write(&script_path, script)?;
    let storage = work.path().join("store");
    let board = work.path().join("soak.toml");
    let sim = fs::read_to_string(root.join("board/sim.toml"))?;
    let sim = sim
        .replace(
            "models_dir = \"../models\"",
            &format!("models_dir = {:?}", root.join("models")),
        )
        .replace(
            "task_file = \"tasks/isic-novel.toml\"",
            &format!("task_file = {:?}", root.join("board/tasks/isic-novel.toml")),
        );
    let sim = match args.segment_kib {
        Some(k) => format!("{sim}\n[audit]\nsegment_kib = {k}\nmax_mib = 64\n"),
        None => sim,
    };
    fs::write(&board, sim)?;

    println!(
        "soak: {} decisions after enrolling 4 x {shots} shots, {n} frames looped, sample every {}",
        args.decisions, args.every
    );
    let mut child = Command::new(&bin)
        .arg("run")
        .arg("--board")
        .arg(&board)
        .arg("--script")
        .arg(&script_path)
        .arg("--storage-dir")
        .arg(&storage)
        .arg("--replay-dir")
        .arg(&frames)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let pid = child.id();
    let stdout = child.stdout.take().expect("piped");
    let t0 = Instant::now();
    let mut window = Instant::now();
    let mut decisions = 0usize;
    let mut samples: Vec<Sample> = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if !line.starts_with("DECISION #") {
            continue;
        }
        decisions += 1;
        if decisions.is_multiple_of(args.every) {
            let s = Sample {
                decisions,
                seconds: t0.elapsed().as_secs_f64(),
                ms_per_decision: window.elapsed().as_secs_f64() * 1e3 / args.every as f64,
                rss_kib: rss_kib(pid).unwrap_or(0),
                store_bytes: dir_bytes(&storage),
                audit_bytes: audit_bytes(&storage),
            };
            println!(
                "{:>8} decisions  {:>8.1} s  {:>7.2} ms/decision  RSS {:>6.1} MiB  store {:>8.2} MiB (audit log {:.2} MiB)",
                s.decisions,
                s.seconds,
                s.ms_per_decision,
                s.rss_kib as f64 / 1024.0,
                s.store_bytes as f64 / 1048576.0,
                s.audit_bytes as f64 / 1048576.0
            );
            samples.push(s);
            window = Instant::now();
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("sgps run ended with {status} after {decisions} decisions");
    }
    if decisions != args.decisions {
        bail!(
            "sgps run made {decisions} decisions, expected {}",
            args.decisions
        );
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("target/soak/soak.csv"));
    if let Some(d) = out.parent() {
        fs::create_dir_all(d)?;
    }
    let mut csv =
        String::from("decisions,seconds,ms_per_decision,rss_kib,store_bytes,audit_bytes\n");
    for s in &samples {
        writeln!(
            csv,
            "{},{:.3},{:.3},{},{},{}",
            s.decisions, s.seconds, s.ms_per_decision, s.rss_kib, s.store_bytes, s.audit_bytes
        )?;
    }
    fs::write(&out, csv)?;
    let segments = fs::read_dir(&storage)?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("audit-"))
        .count();
    let verify = Command::new(&bin)
        .args(["audit", "verify"])
        .arg(&storage)
        .output()?;
    println!(
        "soak: audit log in {} files, `sgps audit verify`: {}",
        segments + 1,
        if verify.status.success() {
            "intact"
        } else {
            "NOT INTACT"
        }
    );
    if !verify.status.success() {
        bail!(
            "the audit log after the soak is not intact:\n{}",
            String::from_utf8_lossy(&verify.stdout)
        );
    }
    // flat: compare the second sample (after warm-up) with the last
    let (a, b) = (
        &samples[samples.len().min(2) - 1],
        &samples[samples.len() - 1],
    );
    let rss_growth = (b.rss_kib as f64 - a.rss_kib as f64) / 1024.0;
    let time_ratio = b.ms_per_decision / a.ms_per_decision;
    let per_decision = (b.audit_bytes - a.audit_bytes.min(b.audit_bytes)) as f64
        / (b.decisions - a.decisions).max(1) as f64;
    println!(
        "soak: RSS {:+.1} MiB and time per decision x{time_ratio:.2} from {} to {} decisions; audit log {per_decision:.0} bytes per decision; CSV {}",
        rss_growth,
        a.decisions,
        b.decisions,
        out.display()
    );
    if rss_growth > 8.0 || time_ratio > 1.25 {
        bail!("not flat: memory grew {rss_growth:.1} MiB or time per decision x{time_ratio:.2}");
    }
    Ok(())
}
