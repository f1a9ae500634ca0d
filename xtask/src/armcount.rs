//! `cargo xtask arm-count`: guest instructions per inference of every model variant on each ARM
//! board's CPU, counted under qemu user-mode emulation, and each board's default variant chosen
//! from the counts.
//!
//! The board binary (aarch64, the `device` profile) runs `sgps bench --only MODEL:VARIANT` under
//! `qemu-aarch64 -cpu <board cpu>` with the counting plugin of `xtask/insn-count` loaded. The
//! count of a run includes loading and optimising the model, so each variant runs twice, with 1
//! and with 1 + R inferences, and the difference divided by R is the count per inference. tract
//! picks its kernels from the CPU features qemu reports for the emulated core (e.g. float16
//! arithmetic on the Cortex-A76, none on the A72), so the counts follow the board's CPU.
//!
//! Instruction counts are a proxy, not a time: instructions differ in cost, and qemu models no
//! caches, memory bandwidth or pipelines.

use crate::build::{self, AARCH64, Board, BuildOptions};
use crate::tools::{self, Requirement};
use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use sgps::manifest::Manifest;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// `cargo xtask arm-count`.
#[derive(Debug, Clone, Args)]
pub struct ArmCountArgs {
    /// Boards to count for (default: every aarch64 profile in board/). Boards with the same
    /// emulated CPU share one count.
    #[arg(long = "board")]
    pub boards: Vec<String>,
    /// Inferences in the longer run (the per-inference count is the difference to a 1-run count
    /// divided by this).
    #[arg(long, default_value_t = 2)]
    pub reps: usize,
    /// Models directory (default models/).
    #[arg(long)]
    pub models: Option<PathBuf>,
    /// Image collection for the bench input (default $SGPS_DATA or ../shared/data).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Use this aarch64 `sgps` binary instead of building one.
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Record the counts and each board's choice in the manifest (`arm_instruction_counts`).
    #[arg(long)]
    pub write_manifest: bool,
    /// Set each counted board's `image_variant` / `text_variant` in its profile to the chosen
    /// variant.
    #[arg(long)]
    pub apply: bool,
    /// Also count tract's float16 translation (`precision: f16`) of every shipped variant that
    /// does not have one, as candidates `<variant>-f16` (counted and reported, never chosen: a
    /// candidate must first be added to the manifest and pass the parity tests).
    #[arg(long)]
    pub f16_candidates: bool,
}

/// The two models whose variants are counted.
const MODELS: [(&str, &str); 2] = [("image", "image_encoder"), ("text", "text_encoder")];

/// Count per inference of one variant on one CPU.
#[derive(Debug, Clone)]
struct Count {
    cpu: String,
    model: &'static str,
    variant: String,
    per_inference: u64,
    load: u64,
    /// In the shipped manifest (not a `--f16-candidates` addition).
    shipped: bool,
}

/// What every counted run shares: qemu, the plugin, the board binary and its inputs.
struct Runner {
    qemu: PathBuf,
    plugin: PathBuf,
    bin: PathBuf,
    models: PathBuf,
    data: Option<PathBuf>,
}

impl Runner {
    /// Runs `sgps bench --only <only> --reps <reps>` on `cpu` and returns the plugin's count.
    fn count(&self, sysroot: &Path, cpu: &str, only: &str, reps: usize) -> Result<u64> {
        let out = tempfile::NamedTempFile::new()?;
        let mut c = Command::new(&self.qemu);
        c.args(["-cpu", cpu, "-L"])
            .arg(sysroot)
            .arg("-plugin")
            .arg(format!(
                "{},out={}",
                self.plugin.display(),
                out.path().display()
            ))
            .arg(&self.bin)
            .arg("--models")
            .arg(&self.models)
            .args([
                "bench",
                "--warmup",
                "0",
                "--reps",
                &reps.to_string(),
                "--only",
                only,
            ]);
        if let Some(d) = &self.data {
            c.arg("--data").arg(d);
        }
        tools::run(&mut c)
            .with_context(|| format!("`sgps bench --only {only}` under qemu ({cpu})"))?;
        let text = std::fs::read_to_string(out.path())?;
        text.trim()
            .parse()
            .with_context(|| format!("the counting plugin wrote {text:?}, not a number"))
    }
}

/// Everything `arm-count` needs that this machine lacks, besides the cross toolchain.
pub fn requirements() -> Vec<Requirement> {
    let mut missing = Vec::new();
    // the static qemu cannot load plugins
    missing.extend(tools::need_tool(
        "qemu-aarch64",
        "apt-get install qemu-user",
    ));
    missing
}

/// The aarch64 boards to count for: the named ones, else every aarch64 profile.
fn boards(root: &Path, names: &[String]) -> Result<Vec<Board>> {
    if !names.is_empty() {
        return names
            .iter()
            .map(|n| {
                let b = Board::load(root, n)?;
                if b.target.as_deref() != Some(AARCH64) {
                    bail!("board {n} does not run on {AARCH64}: nothing to emulate");
                }
                Ok(b)
            })
            .collect();
    }
    let mut out = Vec::new();
    for n in build::available_boards(&root.join("board")) {
        let b = Board::load(root, &n)?;
        if b.target.as_deref() == Some(AARCH64) {
            out.push(b);
        }
    }
    if out.is_empty() {
        bail!("no aarch64 board profile in board/");
    }
    Ok(out)
}

/// `cargo xtask arm-count`.
pub fn arm_count(root: &Path, a: &ArmCountArgs) -> Result<()> {
    anyhow::ensure!(a.reps >= 1, "--reps must be at least 1");
    let boards = boards(root, &a.boards)?;
    let mut missing = requirements();
    if a.binary.is_none() {
        // one binary serves every board (same instruction set; kernels are chosen at run time)
        let mut b = boards[0].clone();
        b.glibc = None;
        missing.extend(build::cross_requirements(&b));
    }
    tools::ensure("arm-count", missing)?;
    let models = a.models.clone().unwrap_or_else(|| root.join("models"));
    let manifest = Manifest::load(&models)
        .with_context(|| format!("loading the manifest from {}", models.display()))?;

    let bin = match &a.binary {
        Some(b) => b.clone(),
        None => {
            let mut b = boards[0].clone();
            b.glibc = None;
            build::build(root, &b, &BuildOptions::onnx_reader())?
        }
    };
    let candidates_dir = tempfile::tempdir()?;
    let (run_models, candidates) = if a.f16_candidates {
        let c = f16_candidates(&models, &manifest, candidates_dir.path())?;
        (candidates_dir.path().to_path_buf(), c)
    } else {
        (models.clone(), Vec::new())
    };
    let run_manifest = Manifest::load(&run_models)?;
    let runner = Runner {
        plugin: build_plugin(root)?,
        qemu: tools::which("qemu-aarch64").context("qemu-aarch64 not found")?,
        bin,
        models: run_models,
        data: a.data.clone(),
    };

    // board models for a word-feature synthesizer carry no text encoder (nor its tokenizer): the
    // device never runs it, so there is nothing to count
    let counted: Vec<(&str, &str)> = MODELS
        .into_iter()
        .filter(|&(_, key)| key != "text_encoder" || run_manifest.uses_minilm())
        .collect();
    if counted.len() < MODELS.len() {
        log::info!("the synthesizer reads no MiniLM embedding: the text encoder is not counted");
    }
    let mut cpus: Vec<String> = boards.iter().map(|b| b.qemu_cpu.clone()).collect();
    cpus.sort();
    cpus.dedup();
    let mut counts = Vec::new();
    for cpu in &cpus {
        let sysroot = build::emulated_sysroot(root, cpu)?;
        for &(model, key) in &counted {
            let variants: Vec<String> = match key {
                "image_encoder" => run_manifest
                    .image_encoder
                    .variants
                    .keys()
                    .cloned()
                    .collect(),
                _ => run_manifest.text_encoder.variants.keys().cloned().collect(),
            };
            for variant in variants {
                let only = format!("{model}:{variant}");
                let t = Instant::now();
                let run = |reps| runner.count(&sysroot, cpu, &only, reps);
                let one = run(1)?;
                let more = run(1 + a.reps)?;
                if more <= one {
                    bail!(
                        "{cpu} {only}: {more} instructions for {} runs but {one} for 1: the count is not reliable",
                        1 + a.reps
                    );
                }
                let per = (more - one) / a.reps as u64;
                log::info!(
                    "{cpu} {only}: {:.1} M instructions per inference ({:.0} s under qemu)",
                    per as f64 / 1e6,
                    t.elapsed().as_secs_f64()
                );
                counts.push(Count {
                    cpu: cpu.clone(),
                    model,
                    per_inference: per,
                    load: one.saturating_sub(per),
                    shipped: !candidates.contains(&(model, variant.clone())),
                    variant,
                });
            }
        }
    }

    print_table(&counts);
    let choices = choose(&manifest, &boards, &counts);
    println!();
    for (board, (image, text)) in &choices {
        println!(
            "{board}: image {image}, text {text} (the manifest default unless another variant has {:.0} % fewer instructions per inference)",
            100.0 * MIN_GAIN
        );
    }
    if a.write_manifest {
        write_manifest(&models, &boards, &counts, &choices, a.reps)?;
    }
    if a.apply {
        for b in &boards {
            let (image, text) = &choices[&b.name];
            let text0 = std::fs::read_to_string(&b.profile)?;
            let t = crate::dist::set_top_level_key(&text0, "image_variant", image);
            let t = crate::dist::set_top_level_key(&t, "text_variant", text);
            if t != text0 {
                std::fs::write(&b.profile, t)
                    .with_context(|| format!("cannot write {}", b.profile.display()))?;
                println!(
                    "{}: image_variant = {image}, text_variant = {text}",
                    b.profile.display()
                );
            }
        }
    }
    Ok(())
}

/// A models directory in `dir` (links to the files in `models`) whose manifest adds a
/// `<variant>-f16` variant (`precision: f16`) for every variant without float16 arithmetic.
/// Returns the added (model, variant) pairs.
fn f16_candidates(
    models: &Path,
    manifest: &Manifest,
    dir: &Path,
) -> Result<Vec<(&'static str, String)>> {
    use sgps::manifest::Precision;
    for e in std::fs::read_dir(models)? {
        let e = e?;
        if e.file_name() != "manifest.json" {
            std::os::unix::fs::symlink(e.path(), dir.join(e.file_name()))?;
        }
    }
    let mut m: Value =
        serde_json::from_str(&std::fs::read_to_string(models.join("manifest.json"))?)?;
    let mut added = Vec::new();
    for (model, key) in MODELS {
        let variants = match key {
            "image_encoder" => &manifest.image_encoder.variants,
            _ => &manifest.text_encoder.variants,
        };
        let has_f16: Vec<&str> = variants
            .values()
            .filter(|e| e.precision == Precision::F16)
            .map(|e| e.file.as_str())
            .collect();
        for (name, e) in variants {
            if e.precision == Precision::F16 || has_f16.contains(&e.file.as_str()) {
                continue;
            }
            let mut c = serde_json::to_value(e)?;
            c["precision"] = json!("f16");
            let cname = format!("{name}-f16");
            m[key]["variants"][&cname] = c;
            added.push((model, cname));
        }
    }
    std::fs::write(dir.join("manifest.json"), serde_json::to_string_pretty(&m)?)?;
    Ok(added)
}

/// Builds the counting plugin for the host and returns its path.
fn build_plugin(root: &Path) -> Result<PathBuf> {
    let mut c = Command::new(tools::cargo());
    c.current_dir(root)
        .args(["build", "--release", "--package", "insn-count"]);
    tools::run(&mut c).context("building the qemu counting plugin (xtask/insn-count)")?;
    let so = build::target_dir(root).join("release/libinsn_count.so");
    if !so.is_file() {
        bail!("built the plugin but {} is missing", so.display());
    }
    Ok(so)
}

fn print_table(counts: &[Count]) {
    println!(
        "\n{:<12} {:<6} {:<12} {:>16} {:>10} {:>14}",
        "cpu", "model", "variant", "M insn / run", "vs best", "M insn (load)"
    );
    for c in counts {
        let best = counts
            .iter()
            .filter(|o| o.cpu == c.cpu && o.model == c.model)
            .map(|o| o.per_inference)
            .min()
            .unwrap_or(c.per_inference)
            .max(1);
        println!(
            "{:<12} {:<6} {:<12} {:>16.1} {:>9.2}x {:>14.1}",
            c.cpu,
            c.model,
            if c.shipped {
                c.variant.clone()
            } else {
                format!("{} *", c.variant)
            },
            c.per_inference as f64 / 1e6,
            c.per_inference as f64 / best as f64,
            c.load as f64 / 1e6
        );
    }
    println!(
        "(guest instructions under qemu user mode: a proxy for time on the core, not a time; * = a candidate, not shipped)"
    );
}

/// A variant replaces the manifest's default on a board only with at least this many fewer
/// instructions per inference (counts are a proxy for time, so small differences decide nothing).
pub const MIN_GAIN: f64 = 0.10;

/// The variant of `model` for `cpu`: the one with the fewest instructions per inference if it
/// beats `default` by more than [`MIN_GAIN`], else `default`.
fn best_variant(counts: &[Count], cpu: &str, model: &str, default: &str) -> String {
    let of = |v: &str| {
        counts
            .iter()
            .find(|c| c.cpu == cpu && c.model == model && c.variant == v)
            .map(|c| c.per_inference)
    };
    let fewest = counts
        .iter()
        .filter(|c| c.cpu == cpu && c.model == model && c.shipped)
        .min_by_key(|c| c.per_inference);
    match (fewest, of(default)) {
        (Some(f), Some(d)) if (f.per_inference as f64) < (1.0 - MIN_GAIN) * d as f64 => {
            f.variant.clone()
        }
        (Some(f), None) => f.variant.clone(),
        _ => default.to_string(),
    }
}

/// Per board: (image variant, text variant) by [`best_variant`].
fn choose(
    manifest: &Manifest,
    boards: &[Board],
    counts: &[Count],
) -> BTreeMap<String, (String, String)> {
    let (di, dt) = (
        &manifest.image_encoder.default_variant,
        &manifest.text_encoder.default_variant,
    );
    boards
        .iter()
        .map(|b| {
            (
                b.name.clone(),
                (
                    best_variant(counts, &b.qemu_cpu, "image", di),
                    best_variant(counts, &b.qemu_cpu, "text", dt),
                ),
            )
        })
        .collect()
}

fn write_manifest(
    models: &Path,
    boards: &[Board],
    counts: &[Count],
    choices: &BTreeMap<String, (String, String)>,
    reps: usize,
) -> Result<()> {
    let path = models.join("manifest.json");
    let text = std::fs::read_to_string(&path)?;
    let mut m: Value = serde_json::from_str(&text)?;
    let qemu = tools::output(Command::new("qemu-aarch64").arg("--version"))
        .map(|s| s.lines().next().unwrap_or_default().to_string())
        .unwrap_or_default();
    let mut cpus = serde_json::Map::new();
    for c in counts {
        let e = cpus
            .entry(c.cpu.clone())
            .or_insert_with(|| json!({"image_encoder": {}, "text_encoder": {}}));
        let key = if c.model == "image" {
            "image_encoder"
        } else {
            "text_encoder"
        };
        let name = if c.shipped {
            c.variant.clone()
        } else {
            format!("{} (candidate, not shipped)", c.variant)
        };
        e[key][name] = json!(c.per_inference);
    }
    let mut defaults = serde_json::Map::new();
    for b in boards {
        let (image, text) = &choices[&b.name];
        defaults.insert(
            b.name.clone(),
            json!({
                "cpu": b.qemu_cpu,
                "image_variant": image,
                "text_variant": text,
                "reason": format!("the manifest's default variant unless another shipped variant (each passes the parity tests) needs at least {:.0} % fewer guest instructions per inference on the board's CPU", 100.0 * MIN_GAIN),
            }),
        );
    }
    m["arm_instruction_counts"] = json!({
        "method": format!("guest instructions per inference counted by cargo xtask arm-count: the aarch64 board binary runs `sgps bench --only MODEL:VARIANT` under qemu user mode with a counting TCG plugin (xtask/insn-count), once with 1 and once with {} inferences; the difference / {reps}. One thread; image: the bench capture preprocessed; text: the first bench description with tokenization. A proxy for time on the core, not a time: instructions differ in cost and qemu models no caches or pipelines.", 1 + reps),
        "qemu": qemu,
        "sgps": tools::release_version(),
        "per_cpu": cpus,
        "board_defaults": defaults,
    });
    let out = serde_json::to_string_pretty(&m)? + "\n";
    sgps::atomic_file::write(&path, out.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("counts written to {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(cpu: &str, model: &'static str, variant: &str, per: u64, shipped: bool) -> Count {
        Count {
            cpu: cpu.into(),
            model,
            variant: variant.into(),
            per_inference: per,
            load: 0,
            shipped,
        }
    }

    #[test]
    fn a_variant_replaces_the_default_only_with_clearly_fewer_instructions() {
        let counts = [
            count("cortex-a76", "text", "f16w", 111, true),
            count("cortex-a76", "text", "f16", 93, true),
            count("cortex-a72", "text", "f16w", 111, true),
            count("cortex-a72", "text", "f16", 296, true),
            count("cortex-a55", "text", "f16w", 100, true),
            count("cortex-a55", "text", "f16", 95, true),
            // a candidate never wins, however few instructions it needs
            count("cortex-a76", "image", "fp32", 181, true),
            count("cortex-a76", "image", "fp32-f16", 10, false),
        ];
        assert_eq!(best_variant(&counts, "cortex-a76", "text", "f16w"), "f16");
        assert_eq!(best_variant(&counts, "cortex-a72", "text", "f16w"), "f16w");
        // 5 % fewer is within the proxy's uncertainty: the default stays
        assert_eq!(best_variant(&counts, "cortex-a55", "text", "f16w"), "f16w");
        assert_eq!(best_variant(&counts, "cortex-a76", "image", "fp32"), "fp32");
    }

    #[test]
    fn emulated_cpus_report_their_float16_arithmetic_to_tract() {
        // tract enables its float16 kernels on `asimdhp` in /proc/cpuinfo
        let a76 = build::cpuinfo("cortex-a76").unwrap();
        assert!(a76.contains("CPU part\t: 0xd0b") && a76.contains(" asimdhp"));
        let a72 = build::cpuinfo("cortex-a72").unwrap();
        assert!(a72.contains("CPU part\t: 0xd08") && !a72.contains("asimdhp"));
        let e = build::cpuinfo("cortex-a78ae").unwrap_err().to_string();
        assert!(e.contains("cortex-a78ae") && e.contains("CPUINFO"), "{e}");
    }
}
