//! Few-shot evaluation (`sgps eval`): score methods on identical episodes (protocol ISIC-FS-novel by default).
//!
//! The flow: resolve the classes of an ImageFolder tree ([`episodes::ImagePool`]), draw seeded
//! episodes, embed every image of those classes once through the runtime pipeline (cached on
//! disk, [`cache::EmbeddingCache`]), then score every [`Method`] on the same episodes and report
//! accuracy ± 95% CI and macro-F1, and the referral figures (refer rate and accepted-case
//! accuracy at the shipped threshold, ECE, area under the risk-coverage curve) ([`metrics`]).

pub mod cache;
pub mod data;
pub mod descriptions;
pub mod episodes;
pub mod logreg;
pub mod manifest_block;
pub mod metrics;
pub mod plots;
pub mod protocol;

pub use protocol::{
    DemoData, EvalConfig, EvalReport, ISIC_NOVEL, demo_data_dir, evaluate, missing_data_message,
    resolve_data_dir, samples_dir,
};

use serde::{Deserialize, Serialize};

use crate::classifier::softmax;
use episodes::Episode;
use logreg::{LogReg, LogRegOptions, argmax};
use metrics::{MeanCi, Referral};

/// One episode as seen by a method: embeddings of the support images per way (possibly none,
/// for 0-shot) and of the queries, plus the pool class index of each way.
pub struct Task<'a> {
    pub classes: &'a [usize],
    pub support: Vec<Vec<&'a [f32]>>,
    pub queries: Vec<&'a [f32]>,
}

/// A few-shot method: the probability of each way (index into `task.classes`) for every query.
pub trait Method {
    fn name(&self) -> &str;
    /// Whether the method needs at least one shot per class.
    fn needs_shots(&self) -> bool {
        true
    }
    fn predict(&mut self, task: &Task) -> anyhow::Result<Vec<Vec<f32>>>;
}

/// L2-normalised copy of `v` (zero vector stays zero).
pub fn normalized(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter().map(|x| x / n).collect()
    } else {
        v.to_vec()
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Prototype imprinting: cosine similarity to the normalised mean of the normalised shots;
/// probabilities are softmax(`scale` · cosine).
pub struct Prototype {
    pub scale: f32,
}

impl Default for Prototype {
    /// Scale 10: the synthesizer's starting scale before calibration (recipe `init_scale`).
    fn default() -> Self {
        Prototype { scale: 10.0 }
    }
}

impl Method for Prototype {
    fn name(&self) -> &str {
        "prototype"
    }
    fn predict(&mut self, task: &Task) -> anyhow::Result<Vec<Vec<f32>>> {
        let protos: Vec<Vec<f32>> = task
            .support
            .iter()
            .map(|shots| {
                let d = shots[0].len();
                let mut m = vec![0f32; d];
                for s in shots {
                    for (a, b) in m.iter_mut().zip(normalized(s)) {
                        *a += b;
                    }
                }
                normalized(&m)
            })
            .collect();
        Ok(task
            .queries
            .iter()
            .map(|q| {
                let q = normalized(q);
                let sims: Vec<f32> = protos.iter().map(|p| self.scale * dot(p, &q)).collect();
                softmax(&sims)
            })
            .collect())
    }
}

/// Multinomial L2-regularised logistic regression fitted on the (normalised) support embeddings.
#[derive(Default)]
pub struct LogisticRegression {
    pub opts: LogRegOptions,
    /// Fits that hit `max_iter` before the tolerance.
    pub not_converged: usize,
}

impl Method for LogisticRegression {
    fn name(&self) -> &str {
        "logistic_regression"
    }
    fn predict(&mut self, task: &Task) -> anyhow::Result<Vec<Vec<f32>>> {
        let mut x = Vec::new();
        let mut y = Vec::new();
        for (w, shots) in task.support.iter().enumerate() {
            for s in shots {
                x.push(normalized(s));
                y.push(w);
            }
        }
        let xr: Vec<&[f32]> = x.iter().map(|v| v.as_slice()).collect();
        let m = LogReg::fit(&xr, &y, task.support.len(), &self.opts);
        if !m.converged {
            self.not_converged += 1;
        }
        Ok(task
            .queries
            .iter()
            .map(|q| softmax(&m.logits(&normalized(q))))
            .collect())
    }
}

/// Per-episode scores of one method.
#[derive(Debug, Clone, Default)]
pub struct EpisodeScores {
    pub accuracy: Vec<f64>,
    pub macro_f1: Vec<f64>,
    /// Top probability of every query of every episode, in order.
    pub confidence: Vec<f32>,
    /// Whether each of those predictions was right.
    pub correct: Vec<bool>,
    /// True and predicted class of each of those queries (indices into the pool's classes).
    pub truth: Vec<usize>,
    pub predicted: Vec<usize>,
    /// Wall time spent in the method (fit + predict), all episodes.
    pub seconds: f64,
}

/// Summary of one method at one shot count.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MethodResult {
    pub method: String,
    pub accuracy: MeanCi,
    /// Mean over episodes of the per-episode macro-F1 (each episode is class-balanced).
    pub macro_f1: MeanCi,
    /// Referral at the shipped threshold, ECE and risk-coverage over every query of every episode.
    pub referral: Referral,
    /// Wall time spent in the method over all episodes (from cached embeddings).
    #[serde(default)]
    pub seconds: f64,
    /// Reliability diagram over every query ([`metrics::ECE_BINS`] bins).
    #[serde(default)]
    pub reliability: Vec<metrics::ReliabilityBin>,
    /// Risk-coverage curve over every query (about [`RISK_COVERAGE_POINTS`] points).
    #[serde(default)]
    pub risk_coverage: Vec<[f64; 2]>,
    /// Confusion counts over the pool's classes, `[true][predicted]`, every query.
    #[serde(default)]
    pub confusion: Vec<Vec<u32>>,
}

/// Points kept of each risk-coverage curve.
pub const RISK_COVERAGE_POINTS: usize = 100;

/// Score `methods` on `episodes`; `embeddings[id]` is the embedding of global image `id`.
/// Every method sees exactly the same support and query sets. Methods that need shots are
/// skipped (None) when the episodes have none. `on_episode` is called after each episode.
pub fn score_episodes(
    embeddings: &[Vec<f32>],
    episodes: &[Episode],
    methods: &mut [&mut dyn Method],
    mut on_episode: impl FnMut(),
) -> anyhow::Result<Vec<Option<EpisodeScores>>> {
    let zero_shot = episodes
        .first()
        .map(|e| e.support.iter().any(|s| s.is_empty()))
        .unwrap_or(false);
    let mut out: Vec<Option<EpisodeScores>> = methods
        .iter()
        .map(|m| (!(zero_shot && m.needs_shots())).then(EpisodeScores::default))
        .collect();
    for ep in episodes {
        let mut truth = Vec::new();
        let mut queries = Vec::new();
        for (w, qs) in ep.queries.iter().enumerate() {
            for &q in qs {
                truth.push(w);
                queries.push(embeddings[q].as_slice());
            }
        }
        let task = Task {
            classes: &ep.classes,
            support: ep
                .support
                .iter()
                .map(|s| s.iter().map(|&i| embeddings[i].as_slice()).collect())
                .collect(),
            queries,
        };
        for (m, scores) in methods.iter_mut().zip(out.iter_mut()) {
            let Some(scores) = scores else { continue };
            let t = std::time::Instant::now();
            let probs = m.predict(&task)?;
            scores.seconds += t.elapsed().as_secs_f64();
            let pred: Vec<usize> = probs.iter().map(|p| argmax(p)).collect();
            anyhow::ensure!(
                pred.len() == truth.len(),
                "method {} returned {} predictions for {} queries",
                m.name(),
                pred.len(),
                truth.len()
            );
            for ((p, &k), &t) in probs.iter().zip(&pred).zip(&truth) {
                scores.confidence.push(p[k]);
                scores.correct.push(k == t);
                scores.truth.push(ep.classes[t]);
                scores.predicted.push(ep.classes[k]);
            }
            scores.accuracy.push(metrics::accuracy(&truth, &pred));
            scores
                .macro_f1
                .push(metrics::macro_f1(&truth, &pred, ep.classes.len()));
        }
        on_episode();
    }
    Ok(out)
}

impl MethodResult {
    /// Summary of `s`; predictions whose top probability is below `refer_threshold` count as referred.
    /// `n_classes` is the number of classes in the pool (for the confusion matrix).
    pub fn from_scores(
        method: &str,
        s: &EpisodeScores,
        refer_threshold: f32,
        n_classes: usize,
    ) -> MethodResult {
        MethodResult {
            method: method.to_string(),
            accuracy: MeanCi::of(&s.accuracy),
            macro_f1: MeanCi::of(&s.macro_f1),
            referral: Referral::of(&s.confidence, &s.correct, refer_threshold),
            seconds: s.seconds,
            reliability: metrics::reliability(&s.confidence, &s.correct, metrics::ECE_BINS),
            risk_coverage: metrics::risk_coverage(&s.confidence, &s.correct, RISK_COVERAGE_POINTS),
            confusion: metrics::confusion(&s.truth, &s.predicted, n_classes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::episodes::{ClassSource, EpisodeSpec, ImagePool, sample_episodes};
    use super::*;
    use std::path::PathBuf;

    /// Pool of `k` classes whose fake embeddings are noisy copies of one direction per class.
    fn toy(k: usize, per: usize, noise: f32) -> (ImagePool, Vec<Vec<f32>>) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let d = 16;
        let mut classes = Vec::new();
        let mut images = Vec::new();
        let mut embs = Vec::new();
        for c in 0..k {
            let start = images.len();
            for i in 0..per {
                images.push(PathBuf::from(format!("c{c}/{i}.png")));
                let mut e: Vec<f32> = (0..d)
                    .map(|_| noise * rng.random_range(-1.0..1.0))
                    .collect();
                e[c] += 1.0;
                embs.push(normalized(&e));
            }
            classes.push(ClassSource {
                name: format!("c{c}"),
                rel: format!("c{c}"),
                images: (start..images.len()).collect(),
            });
        }
        (
            ImagePool {
                data_dir: PathBuf::from("/x"),
                classes,
                images,
            },
            embs,
        )
    }

    #[test]
    fn easy_episodes_score_perfectly_and_hard_ones_do_not() {
        let (pool, embs) = toy(4, 20, 0.05);
        let spec = EpisodeSpec {
            ways: 4,
            shots: 2,
            queries: 5,
            episodes: 10,
            seed: 0,
        };
        let eps = sample_episodes(&pool, &spec).unwrap();
        let mut p = Prototype::default();
        let mut l = LogisticRegression::default();
        let res = score_episodes(&embs, &eps, &mut [&mut p, &mut l], || {}).unwrap();
        for r in &res {
            let r = MethodResult::from_scores("x", r.as_ref().unwrap(), 0.5, 4);
            assert_eq!(r.accuracy.mean, 1.0);
            assert_eq!(r.macro_f1.mean, 1.0);
            assert_eq!(r.accuracy.n, 10);
            // 10 episodes x 4 ways x 5 queries, all right and confident enough to be accepted.
            assert_eq!(r.referral.predictions, 200);
            assert_eq!(r.referral.overall_accuracy, 1.0);
            assert_eq!(r.referral.aurc, 0.0);
            // every query on the diagonal, 50 per class (4 ways, 10 episodes x 5 queries)
            for (t, row) in r.confusion.iter().enumerate() {
                assert_eq!(row.iter().sum::<u32>(), 50);
                assert_eq!(row[t], 50);
            }
            assert_eq!(r.reliability.iter().map(|b| b.count).sum::<usize>(), 200);
            assert_eq!(r.risk_coverage.last(), Some(&[1.0, 0.0]));
        }
        assert_eq!(l.not_converged, 0);

        let (pool, embs) = toy(4, 20, 3.0);
        let eps = sample_episodes(&pool, &spec).unwrap();
        let res = score_episodes(&embs, &eps, &mut [&mut Prototype::default()], || {}).unwrap();
        let r = MethodResult::from_scores("p", res[0].as_ref().unwrap(), 0.5, 4);
        assert!(r.accuracy.mean < 0.9 && r.accuracy.mean > 0.25, "{r:?}");
        assert!(r.accuracy.ci95 > 0.0);
        // Pooled over queries, the referral figures agree with the episode accuracies.
        assert!((r.referral.overall_accuracy - r.accuracy.mean).abs() < 1e-9);
        assert!(r.referral.aurc > 0.0 && r.referral.aurc < 1.0 - r.accuracy.mean);
    }

    #[test]
    fn zero_shot_episodes_skip_methods_that_need_shots() {
        let (pool, embs) = toy(3, 10, 0.1);
        let spec = EpisodeSpec {
            ways: 3,
            shots: 0,
            queries: 4,
            episodes: 3,
            seed: 1,
        };
        let eps = sample_episodes(&pool, &spec).unwrap();
        let res = score_episodes(&embs, &eps, &mut [&mut Prototype::default()], || {}).unwrap();
        assert!(res[0].is_none());
    }
}
