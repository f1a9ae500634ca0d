//! `sgps eval` arguments, the end-to-end evaluation through the runtime pipeline, and its report.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[cfg(feature = "terminal")]
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use super::cache::EmbeddingCache;
use super::descriptions::{self, Description};
use super::episodes::{EpisodeSpec, ImagePool, episodes_hash, sample_episodes};
use super::{LogisticRegression, Method, MethodResult, Prototype, Task, score_episodes};
use crate::pipeline::{ClassSupport, Embedding, Pipeline, Shots, SupportInput, SynthMode};
use crate::synthesizer::SynthOutput;

pub use super::data::*;

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

/// The synthesized head as an eval method (weights only: no classifier artifact per episode).
struct Sgps<'p> {
    pipeline: &'p Pipeline,
    mode: SynthMode,
    label: String,
    /// Every class of the pool with its description embedded once (no shots).
    classes: Vec<ClassSupport>,
    /// Text-only heads per class set (they do not depend on the shots).
    text_only: HashMap<Vec<usize>, SynthOutput>,
}

impl Method for Sgps<'_> {
    fn name(&self) -> &str {
        &self.label
    }
    fn needs_shots(&self) -> bool {
        self.mode != SynthMode::TextOnly
    }
    fn predict(&mut self, task: &Task) -> anyhow::Result<Vec<Vec<f32>>> {
        let build = |with_shots: bool| -> crate::error::Result<Vec<ClassSupport>> {
            self.pipeline.support(
                task.classes
                    .iter()
                    .enumerate()
                    .map(|(w, &c)| {
                        let class = &self.classes[c];
                        SupportInput {
                            name: class.name.clone(),
                            description: class.description.clone(),
                            text_embedding: class.text_embedding.clone(),
                            shots: Shots::Embedded(if with_shots {
                                task.support[w].iter().map(|s| s.to_vec()).collect()
                            } else {
                                Vec::new()
                            }),
                        }
                    })
                    .collect(),
            )
        };
        let synth = self.pipeline.synthesizer();
        let fresh;
        let head = if self.mode == SynthMode::TextOnly {
            if !self.text_only.contains_key(task.classes) {
                let h = synth.run(&build(false)?, self.mode)?;
                self.text_only.insert(task.classes.to_vec(), h);
            }
            &self.text_only[task.classes]
        } else {
            fresh = synth.run(&build(true)?, self.mode)?;
            &fresh
        };
        Ok(task.queries.iter().map(|q| head.probabilities(q)).collect())
    }
}

/// Without the `terminal` feature (board binaries, whose output goes to the journal) evaluation
/// shows no progress bar, only one line per stage saying what it is doing.
#[cfg(not(feature = "terminal"))]
struct ProgressBar;

#[cfg(not(feature = "terminal"))]
impl ProgressBar {
    fn inc(&self, _: u64) {}
    fn finish_and_clear(&self) {}
}

#[cfg(not(feature = "terminal"))]
fn progress_bar(len: u64, what: &str, show: bool) -> ProgressBar {
    if show {
        eprintln!("{what}: {len} ...");
    }
    ProgressBar
}

#[cfg(feature = "terminal")]
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
    // every class once, its description embedded (the episodes reuse these)
    let classes = pipeline.support(
        pool.classes
            .iter()
            .zip(&descs)
            .map(|(c, d)| SupportInput::new(&c.name, d.text.clone(), Shots::Embedded(Vec::new())))
            .collect(),
    )?;

    let t0 = Instant::now();
    let (embeddings, hits) = embed_pool(pipeline, &pool, cache_dir, show_progress)?;
    let embed_seconds = t0.elapsed().as_secs_f64();

    let sgps = |mode: SynthMode, label: &str| Sgps {
        pipeline,
        mode,
        label: label.to_string(),
        classes: classes.clone(),
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
        text_encoder_sha256: pipeline.text_features_sha256(),
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
