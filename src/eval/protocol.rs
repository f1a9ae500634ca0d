//! `sgps eval` arguments, the end-to-end evaluation through the runtime pipeline, and its report.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use super::cache::EmbeddingCache;
use super::descriptions::{self, Description};
use super::episodes::{EpisodeSpec, ImagePool, episodes_hash, sample_episodes};
use super::{LogisticRegression, Method, MethodResult, Prototype, Task, score_episodes};
use crate::classifier::Classifier;
use crate::pipeline::{ClassSupport, Embedding, LoadOptions, Pipeline, SynthMode};

pub use super::data::*;

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
}

/// The resolved evaluation settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalConfig {
    pub protocol: String,
    pub data_dir: PathBuf,
    pub classes: Vec<String>,
    pub ways: usize,
    pub shots: Vec<usize>,
    pub episodes: usize,
    pub queries: usize,
    pub seed: u64,
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

/// Results of one shot count.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShotResult {
    pub shots: usize,
    /// SHA-256 over the episode list (class folders and image paths, in order).
    pub episodes_sha256: String,
    pub methods: Vec<MethodResult>,
    /// Every episode as relative paths (only with `--list-episodes`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub episode_list: Option<Vec<EpisodeRecord>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpisodeRecord {
    pub classes: Vec<String>,
    pub support: Vec<Vec<String>>,
    pub queries: Vec<Vec<String>>,
}

/// The JSON report of `sgps eval`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub config: EvalConfig,
    pub image_encoder_variant: String,
    pub image_encoder_sha256: String,
    pub text_encoder_sha256: String,
    pub synthesizer_sha256: String,
    pub descriptions: Vec<Description>,
    pub images_embedded: usize,
    pub cache_hits: usize,
    pub accuracy_definition: String,
    pub macro_f1_definition: String,
    pub method_notes: Vec<String>,
    pub results: Vec<ShotResult>,
    pub embed_seconds: f64,
    pub score_seconds: f64,
    pub sgps_version: String,
}

/// The synthesized classifier as an eval method.
struct Sgps<'p> {
    pipeline: &'p Pipeline,
    mode: SynthMode,
    label: String,
    names: Vec<String>,
    descriptions: Vec<Option<String>>,
    text: Vec<Option<Embedding>>,
    /// Text-only classifiers per class set (they do not depend on the shots).
    text_only: HashMap<Vec<usize>, Classifier>,
}

impl Method for Sgps<'_> {
    fn name(&self) -> &str {
        &self.label
    }
    fn needs_shots(&self) -> bool {
        self.mode != SynthMode::TextOnly
    }
    fn predict(&mut self, task: &Task) -> anyhow::Result<Vec<Vec<f32>>> {
        let build = |with_shots: bool| -> Vec<ClassSupport> {
            task.classes
                .iter()
                .enumerate()
                .map(|(w, &c)| ClassSupport {
                    name: self.names[c].clone(),
                    description: self.descriptions[c].clone(),
                    text_embedding: self.text[c].clone(),
                    shots: if with_shots {
                        task.support[w].iter().map(|s| s.to_vec()).collect()
                    } else {
                        Vec::new()
                    },
                })
                .collect()
        };
        let fresh;
        let clf = if self.mode == SynthMode::TextOnly {
            if !self.text_only.contains_key(task.classes) {
                let c = self.pipeline.synthesize(&build(false), self.mode)?;
                self.text_only.insert(task.classes.to_vec(), c);
            }
            &self.text_only[task.classes]
        } else {
            fresh = self.pipeline.synthesize(&build(true), self.mode)?;
            &fresh
        };
        Ok(task
            .queries
            .iter()
            .map(|q| clf.predict(q).probabilities)
            .collect())
    }
}

fn progress_bar(len: u64, what: &str, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} ({elapsed}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Embed every image of `pool` once (cached on disk under `cache_dir`); errors name the file.
pub fn embed_pool(
    pipeline: &Pipeline,
    pool: &ImagePool,
    cache_dir: &Path,
    show_progress: bool,
) -> anyhow::Result<(Vec<Embedding>, usize)> {
    let mut cache = EmbeddingCache::open(cache_dir, pipeline.encoder_sha256());
    let paths: Vec<PathBuf> = (0..pool.images.len()).map(|i| pool.path(i)).collect();
    let pb = progress_bar(paths.len() as u64, "embedding", show_progress);
    let embs = cache.embed_files(
        &paths,
        crate::encoders::image::MAX_BATCH,
        |batch| {
            pipeline
                .embed_image_files(batch)
                .into_iter()
                .collect::<Result<Vec<_>, _>>()
                .map_err(anyhow::Error::from)
        },
        |n| pb.inc(n as u64),
    )?;
    pb.finish_and_clear();
    log::info!(
        "embeddings: {} from cache {}, {} computed",
        cache.hits,
        cache.path().display(),
        cache.misses
    );
    Ok((embs, cache.hits))
}

/// Run the evaluation described by `cfg` through `pipeline`.
pub fn evaluate(
    pipeline: &Pipeline,
    cfg: &EvalConfig,
    cache_dir: &Path,
    descriptions_file: Option<&Path>,
    list_episodes: bool,
    show_progress: bool,
) -> anyhow::Result<EvalReport> {
    if !cfg.data_dir.is_dir() {
        anyhow::bail!(missing_data_message(&cfg.data_dir, "eval"));
    }
    anyhow::ensure!(!cfg.shots.is_empty(), "--shots needs at least one value");
    let max_shots = pipeline.manifest().synthesizer.max_shots;
    let max_classes = pipeline.manifest().synthesizer.max_classes;
    for &k in &cfg.shots {
        anyhow::ensure!(
            k <= max_shots,
            "--shots {k} exceeds the synthesizer's maximum of {max_shots} shots per class"
        );
    }
    anyhow::ensure!(
        cfg.ways <= max_classes,
        "--ways {} exceeds the synthesizer's maximum of {max_classes} classes",
        cfg.ways
    );
    let pool = ImagePool::open(&cfg.data_dir, &cfg.classes)?;
    // Sample first so that bad arguments fail before the slow embedding pass.
    let mut all_episodes = Vec::new();
    for &shots in &cfg.shots {
        let spec = EpisodeSpec {
            ways: cfg.ways,
            shots,
            queries: cfg.queries,
            episodes: cfg.episodes,
            seed: cfg.seed,
        };
        all_episodes.push(sample_episodes(&pool, &spec)?);
    }

    let class_keys: Vec<(String, String)> = pool
        .classes
        .iter()
        .map(|c| (c.rel.clone(), c.name.clone()))
        .collect();
    let recipe = pipeline_models_dir_descriptions(pipeline);
    let descs = descriptions::resolve(&class_keys, descriptions_file, &recipe)?;
    for d in &descs {
        if d.text.is_none() {
            log::warn!(
                "no description for class {}: the text-using methods see it without text",
                d.class
            );
        }
    }
    let described: Vec<(usize, &str)> = descs
        .iter()
        .enumerate()
        .filter_map(|(i, d)| d.text.as_deref().map(|t| (i, t)))
        .collect();
    let mut text: Vec<Option<Embedding>> = vec![None; descs.len()];
    if !described.is_empty() {
        let texts: Vec<&str> = described.iter().map(|(_, t)| *t).collect();
        for ((i, _), e) in described.iter().zip(pipeline.embed_texts(&texts)?) {
            text[*i] = Some(e);
        }
    }

    let t0 = Instant::now();
    let (embeddings, hits) = embed_pool(pipeline, &pool, cache_dir, show_progress)?;
    let embed_seconds = t0.elapsed().as_secs_f64();

    let names: Vec<String> = pool.classes.iter().map(|c| c.name.clone()).collect();
    let desc_texts: Vec<Option<String>> = descs.iter().map(|d| d.text.clone()).collect();
    let sgps = |mode: SynthMode, label: &str| Sgps {
        pipeline,
        mode,
        label: label.to_string(),
        names: names.clone(),
        descriptions: desc_texts.clone(),
        text: text.clone(),
        text_only: HashMap::new(),
    };
    let mut m_it = sgps(SynthMode::ImagesAndText, "sgps images+text");
    let mut m_i = sgps(SynthMode::ImagesOnly, "sgps images only");
    let mut m_t = sgps(SynthMode::TextOnly, "sgps text only (0-shot)");
    let mut m_p = Prototype::default();
    let refer_threshold = pipeline.manifest().head.refer_threshold;
    let mut m_l = LogisticRegression::default();

    let t1 = Instant::now();
    let mut results = Vec::new();
    let total = (cfg.episodes * cfg.shots.len()) as u64;
    let pb = progress_bar(total, "episodes", show_progress);
    for (&shots, episodes) in cfg.shots.iter().zip(&all_episodes) {
        let mut methods: Vec<&mut dyn Method> =
            vec![&mut m_it, &mut m_i, &mut m_t, &mut m_p, &mut m_l];
        let labels: Vec<String> = methods.iter().map(|m| m.name().to_string()).collect();
        let scores = score_episodes(&embeddings, episodes, &mut methods, || pb.inc(1))?;
        let methods = labels
            .iter()
            .zip(&scores)
            .filter_map(|(l, s)| {
                s.as_ref()
                    .map(|s| MethodResult::from_scores(l, s, refer_threshold, pool.classes.len()))
            })
            .collect();
        let episode_list = list_episodes.then(|| {
            let p = |ids: &Vec<usize>| {
                ids.iter()
                    .map(|&i| pool.images[i].to_string_lossy().into_owned())
                    .collect()
            };
            episodes
                .iter()
                .map(|e| EpisodeRecord {
                    classes: e
                        .classes
                        .iter()
                        .map(|&c| pool.classes[c].rel.clone())
                        .collect(),
                    support: e.support.iter().map(p).collect(),
                    queries: e.queries.iter().map(p).collect(),
                })
                .collect()
        });
        results.push(ShotResult {
            shots,
            episodes_sha256: episodes_hash(&pool, episodes),
            methods,
            episode_list,
        });
    }
    pb.finish_and_clear();
    if m_l.not_converged > 0 {
        log::warn!(
            "logistic regression did not reach its tolerance in {} fits",
            m_l.not_converged
        );
    }
    let m = pipeline.manifest();
    Ok(EvalReport {
        config: cfg.clone(),
        image_encoder_variant: pipeline.image_encoder().variant.clone(),
        image_encoder_sha256: pipeline.encoder_sha256().to_string(),
        text_encoder_sha256: pipeline.text_encoder().sha256.clone(),
        synthesizer_sha256: m.synthesizer.sha256.clone(),
        descriptions: descs,
        images_embedded: pool.images.len(),
        cache_hits: hits,
        accuracy_definition: "mean over episodes of the per-episode query accuracy; ci95 = 1.96 * sample std / sqrt(episodes)".into(),
        macro_f1_definition: "mean over episodes of the per-episode macro-F1 (unweighted mean of per-class F1 over the episode's classes); ci95 as for accuracy".into(),
        method_notes: vec![
            "sgps *: the shipped synthesizer through Pipeline::synthesize, one fixed description per class (the first in the descriptions file)".into(),
            "sgps text only (0-shot): ignores the shots; synthesized once per class set and scored on every shot count's queries".into(),
            format!("prototype: argmax cosine to the L2-normalised mean of the L2-normalised support embeddings; probabilities softmax({} x cosine), uncalibrated (the synthesizer's starting scale)", m_p.scale),
            format!("referral: every method's prediction is referred when its top probability is below the shipped threshold {refer_threshold} (models/manifest.json head.refer_threshold); refer_rate, accepted_accuracy, overall_accuracy, ECE ({} equal-width bins) and AURC (area under the risk-coverage curve, confidence-ranked) are over every query of every episode", super::metrics::ECE_BINS),
            format!(
                "logistic_regression: multinomial, L2 (C = {}), unpenalised bias, on L2-normalised support embeddings; Nesterov gradient descent to max-gradient {} ({} of {} fits hit the iteration cap)",
                m_l.opts.c, m_l.opts.tol, m_l.not_converged, cfg.episodes * cfg.shots.iter().filter(|&&k| k > 0).count()
            ),
        ],
        results,
        embed_seconds,
        score_seconds: t1.elapsed().as_secs_f64(),
        sgps_version: env!("CARGO_PKG_VERSION").into(),
    })
}

/// `models/train/descriptions.json` next to the loaded models.
fn pipeline_models_dir_descriptions(pipeline: &Pipeline) -> PathBuf {
    pipeline
        .manifest()
        .dir
        .join("train")
        .join("descriptions.json")
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
    let plots = super::plots::write_plots(&report, dir, &stem)?;
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
