//! `sgps eval`: arguments, the report table and the files it writes; the scoring is
//! `sgps::eval::evaluate`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;

use sgps::eval::{
    EvalConfig, EvalReport, ISIC_NOVEL, evaluate, manifest_block, missing_data_message, plots,
    resolve_data_dir,
};
use sgps::pipeline::{LoadOptions, Pipeline};

/// `sgps eval`: score the synthesized classifier (images+text, images only, text only),
/// prototype imprinting and logistic regression on identical few-shot episodes.
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "With no arguments: protocol ISIC-FS-novel (4-way, 1 and 5 shots, 600 episodes, 15 queries per class, seed 0).\n\
Example: sgps eval --data ../shared/data --classes isic/nevus,isic/melanoma --shots 1,5 --episodes 100"
)]
pub struct EvalArgs {
    /// Data directory (ImageFolder: <DATA>/<dataset>/<class>/*.jpg). Default: $SGPS_DATA, else ../shared/data.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Classes (`class` or `dataset/class`), comma-separated. Default: the four ISIC novel classes.
    #[arg(long, value_delimiter = ',', value_name = "A,B,...")]
    pub classes: Vec<String>,
    /// Classes per episode (default: all given classes).
    #[arg(long, value_name = "N")]
    pub ways: Option<usize>,
    /// Shots per class, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 5], value_name = "K,...")]
    pub shots: Vec<usize>,
    /// Episodes per shot count.
    #[arg(long, default_value_t = 600, value_name = "E")]
    pub episodes: usize,
    /// Query images per class per episode.
    #[arg(long, default_value_t = 15, value_name = "Q")]
    pub queries: usize,
    /// Episode sampling seed.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,
    /// JSON report path (default: target/eval/<protocol>.json).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Embedding cache directory.
    #[arg(long, default_value = "target/sgps-cache", value_name = "DIR")]
    pub cache: PathBuf,
    /// Class descriptions JSON ({"class": "text"}); default: the recipe's models/train/descriptions.json (first text per class).
    #[arg(long, value_name = "FILE")]
    pub descriptions: Option<PathBuf>,
    /// Also write every episode (image paths) into the JSON report.
    #[arg(long)]
    pub list_episodes: bool,
    /// Write the figures into the models' manifest.json (`evaluation.sgps_eval`); protocol
    /// ISIC-FS-novel only.
    #[arg(long)]
    pub write_manifest: bool,
}

impl EvalArgs {
    pub fn config(&self) -> EvalConfig {
        let default_classes = self.classes.is_empty();
        let classes: Vec<String> = if default_classes {
            ISIC_NOVEL.iter().map(|s| s.to_string()).collect()
        } else {
            self.classes.clone()
        };
        let ways = self.ways.unwrap_or(classes.len());
        let is_headline = default_classes
            && ways == 4
            && self.shots == [1, 5]
            && self.episodes == 600
            && self.queries == 15
            && self.seed == 0;
        EvalConfig {
            protocol: if is_headline {
                "ISIC-FS-novel".into()
            } else {
                "custom".into()
            },
            data_dir: resolve_data_dir(self.data.as_deref()),
            classes,
            ways,
            shots: self.shots.clone(),
            episodes: self.episodes,
            queries: self.queries,
            seed: self.seed,
        }
    }
}

/// Human-readable table of a report.
pub fn report_table(r: &EvalReport) -> String {
    let c = &r.config;
    let mut s = format!(
        "{}: {} classes, {}-way, {} queries/class, {} episodes per shot count, seed {}\n\
         image encoder {} ({}), data {}\n\n",
        c.protocol,
        c.classes.len(),
        c.ways,
        c.queries,
        c.episodes,
        c.seed,
        r.image_encoder_variant,
        &r.image_encoder_sha256[..r.image_encoder_sha256.len().min(12)],
        c.data_dir.display()
    );
    s += &format!(
        "{:>5}  {:<26} {:>18} {:>18} {:>9}\n",
        "shots", "method", "accuracy % ±95%CI", "macro-F1 % ±95%CI", "time s"
    );
    for sr in &r.results {
        for m in &sr.methods {
            s += &format!(
                "{:>5}  {:<26} {:>11.2} ± {:<4.2} {:>11.2} ± {:<4.2} {:>9.2}\n",
                sr.shots,
                m.method,
                100.0 * m.accuracy.mean,
                100.0 * m.accuracy.ci95,
                100.0 * m.macro_f1.mean,
                100.0 * m.macro_f1.ci95,
                m.seconds
            );
        }
    }
    let threshold = r
        .results
        .iter()
        .flat_map(|sr| sr.methods.first())
        .map(|m| m.referral.threshold)
        .next()
        .unwrap_or(0.5);
    s += &format!(
        "\nreferral (refer when top p < {threshold:.2}; all queries of all episodes)\n{:>5}  {:<26} {:>10} {:>14} {:>11} {:>7} {:>7}\n",
        "shots", "method", "referred %", "accepted acc %", "overall %", "ECE", "AURC"
    );
    for sr in &r.results {
        for m in &sr.methods {
            let f = &m.referral;
            s += &format!(
                "{:>5}  {:<26} {:>10.1} {:>14.2} {:>11.2} {:>7.3} {:>7.3}\n",
                sr.shots,
                m.method,
                100.0 * f.refer_rate,
                100.0 * f.accepted_accuracy,
                100.0 * f.overall_accuracy,
                f.ece,
                f.aurc
            );
        }
    }
    s += "\nmacro-F1: mean of per-episode macro-F1. Text only (0-shot) ignores the shots; it is scored on each shot count's queries.\n";
    for sr in &r.results {
        s += &format!("episodes {}-shot sha256 {}\n", sr.shots, sr.episodes_sha256);
    }
    s
}

/// `sgps eval`.
pub fn run(args: &EvalArgs, models: &Path, opts: &LoadOptions) -> anyhow::Result<()> {
    let cfg = args.config();
    anyhow::ensure!(
        !args.write_manifest || cfg.protocol == "ISIC-FS-novel",
        "--write-manifest records protocol ISIC-FS-novel only: drop --classes/--ways/--shots/--episodes/--queries/--seed"
    );
    if !cfg.data_dir.is_dir() {
        anyhow::bail!(missing_data_message(&cfg.data_dir, "eval"));
    }
    let pipeline = Pipeline::load(models, opts)
        .with_context(|| format!("loading the models from {}", models.display()))?;
    let report = evaluate(
        &pipeline,
        &cfg,
        &args.cache,
        args.descriptions.as_deref(),
        args.list_episodes,
        true,
    )?;
    print!("{}", report_table(&report));
    if args.write_manifest {
        let block = manifest_block::manifest_block(&report, &pipeline.text_features_label())?;
        manifest_block::write_manifest_block(models, block)?;
        println!(
            "figures written to {} (evaluation.sgps_eval)",
            models.join("manifest.json").display()
        );
    }
    let out = args.out.clone().unwrap_or_else(|| {
        let name = if cfg.protocol == "ISIC-FS-novel" {
            "isic-fs-novel".to_string()
        } else {
            format!("eval-{}", &report.results[0].episodes_sha256[..12])
        };
        PathBuf::from("target/eval").join(format!("{name}.json"))
    });
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(&out, json).with_context(|| format!("cannot write {}", out.display()))?;
    println!(
        "report written to {} (embedding {:.1} s, {} of {} images from cache; scoring {:.1} s)",
        out.display(),
        report.embed_seconds,
        report.cache_hits,
        report.images_embedded,
        report.score_seconds
    );
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "eval".into());
    let plots = plots::write_plots(&report, dir, &stem)?;
    println!(
        "plots: {}",
        plots
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
