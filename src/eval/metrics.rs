//! Accuracy, macro-F1 and confidence intervals over episodes; referral, calibration (ECE) and
//! risk-coverage over the pooled queries.

use serde::{Deserialize, Serialize};

/// Fraction of `pred[i] == truth[i]`. Empty input gives 0.
pub fn accuracy(truth: &[usize], pred: &[usize]) -> f64 {
    assert_eq!(truth.len(), pred.len());
    if truth.is_empty() {
        return 0.0;
    }
    let ok = truth.iter().zip(pred).filter(|(t, p)| t == p).count();
    ok as f64 / truth.len() as f64
}

/// Macro-averaged F1 over classes `0..n_classes` (unweighted mean of per-class F1).
/// A class with no true and no predicted samples is skipped; a class with true samples but no
/// correct prediction has F1 = 0.
pub fn macro_f1(truth: &[usize], pred: &[usize], n_classes: usize) -> f64 {
    assert_eq!(truth.len(), pred.len());
    let mut tp = vec![0usize; n_classes];
    let mut n_true = vec![0usize; n_classes];
    let mut n_pred = vec![0usize; n_classes];
    for (&t, &p) in truth.iter().zip(pred) {
        n_true[t] += 1;
        n_pred[p] += 1;
        if t == p {
            tp[t] += 1;
        }
    }
    let mut sum = 0.0;
    let mut count = 0usize;
    for c in 0..n_classes {
        if n_true[c] == 0 && n_pred[c] == 0 {
            continue;
        }
        count += 1;
        // F1 = 2TP / (2TP + FP + FN) = 2TP / (n_true + n_pred)
        sum += 2.0 * tp[c] as f64 / (n_true[c] + n_pred[c]) as f64;
    }
    if count == 0 { 0.0 } else { sum / count as f64 }
}

/// Mean, sample standard deviation and 95% confidence half-width (1.96·std/√n) of per-episode values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanCi {
    pub mean: f64,
    /// Sample standard deviation (n − 1 in the denominator); 0 for fewer than 2 values.
    pub std: f64,
    /// 1.96 · std / √n.
    pub ci95: f64,
    pub n: usize,
}

impl MeanCi {
    pub fn of(values: &[f64]) -> MeanCi {
        let n = values.len();
        if n == 0 {
            return MeanCi {
                mean: 0.0,
                std: 0.0,
                ci95: 0.0,
                n: 0,
            };
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let std = if n < 2 {
            0.0
        } else {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        };
        MeanCi {
            mean,
            std,
            ci95: 1.96 * std / (n as f64).sqrt(),
            n,
        }
    }
}

/// Number of equal-width confidence bins of [`expected_calibration_error`].
pub const ECE_BINS: usize = 15;

/// Referral and calibration figures over pooled predictions (`confidence` = the top class's
/// probability, `correct` = whether the top class was right).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Referral {
    /// Refer when the top probability is below this.
    pub threshold: f32,
    /// Fraction of predictions referred.
    pub refer_rate: f64,
    /// Accuracy on the predictions not referred (0 when every one was referred).
    pub accepted_accuracy: f64,
    /// Accuracy over every prediction.
    pub overall_accuracy: f64,
    /// Expected calibration error, [`ECE_BINS`] equal-width bins of the top probability.
    pub ece: f64,
    /// Area under the risk-coverage curve (predictions ranked by confidence; lower is better).
    pub aurc: f64,
    pub predictions: usize,
}

impl Referral {
    pub fn of(confidence: &[f32], correct: &[bool], threshold: f32) -> Referral {
        assert_eq!(confidence.len(), correct.len());
        let n = confidence.len();
        let accepted: Vec<bool> = confidence
            .iter()
            .zip(correct)
            .filter(|(c, _)| **c >= threshold)
            .map(|(_, ok)| *ok)
            .collect();
        let frac = |k: usize, of: usize| if of == 0 { 0.0 } else { k as f64 / of as f64 };
        Referral {
            threshold,
            refer_rate: frac(n - accepted.len(), n),
            accepted_accuracy: frac(accepted.iter().filter(|ok| **ok).count(), accepted.len()),
            overall_accuracy: frac(correct.iter().filter(|ok| **ok).count(), n),
            ece: expected_calibration_error(confidence, correct, ECE_BINS),
            aurc: aurc(confidence, correct),
            predictions: n,
        }
    }
}

/// One bin of a reliability diagram.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityBin {
    /// The bin covers top probabilities in [lo, hi) (the last bin includes 1).
    pub lo: f64,
    pub hi: f64,
    pub count: usize,
    /// Mean top probability of the predictions in the bin (0 when empty).
    pub confidence: f64,
    /// Fraction of them that were right (0 when empty).
    pub accuracy: f64,
}

/// `bins` equal-width bins of the top probability over [0, 1] (1 falls in the last bin).
pub fn reliability(confidence: &[f32], correct: &[bool], bins: usize) -> Vec<ReliabilityBin> {
    assert_eq!(confidence.len(), correct.len());
    let mut count = vec![0usize; bins];
    let mut conf = vec![0f64; bins];
    let mut ok = vec![0usize; bins];
    for (&c, &r) in confidence.iter().zip(correct) {
        let b = ((c.clamp(0.0, 1.0) as f64 * bins as f64) as usize).min(bins - 1);
        count[b] += 1;
        conf[b] += c as f64;
        ok[b] += r as usize;
    }
    (0..bins)
        .map(|b| {
            let k = count[b].max(1) as f64;
            ReliabilityBin {
                lo: b as f64 / bins as f64,
                hi: (b + 1) as f64 / bins as f64,
                count: count[b],
                confidence: conf[b] / k,
                accuracy: ok[b] as f64 / k,
            }
        })
        .collect()
}

/// Σ_b (n_b / n) · |accuracy_b − mean confidence_b| over `bins` equal-width bins of [0, 1]
/// (confidence 1 falls in the last bin). Empty input gives 0.
pub fn expected_calibration_error(confidence: &[f32], correct: &[bool], bins: usize) -> f64 {
    let n = confidence.len();
    if n == 0 || bins == 0 {
        return 0.0;
    }
    reliability(confidence, correct, bins)
        .iter()
        .map(|b| b.count as f64 / n as f64 * (b.accuracy - b.confidence).abs())
        .sum()
}

/// The risk-coverage curve at about `points` evenly spaced coverages: (coverage, error rate
/// among the most confident predictions up to that coverage), predictions ranked as in [`aurc`].
pub fn risk_coverage(confidence: &[f32], correct: &[bool], points: usize) -> Vec<[f64; 2]> {
    assert_eq!(confidence.len(), correct.len());
    let n = confidence.len();
    if n == 0 || points == 0 {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| confidence[b].total_cmp(&confidence[a]));
    let step = n.div_ceil(points).max(1);
    let mut out = Vec::new();
    let mut wrong = 0usize;
    for (i, &j) in order.iter().enumerate() {
        wrong += (!correct[j]) as usize;
        let k = i + 1;
        if k % step == 0 || k == n {
            out.push([k as f64 / n as f64, wrong as f64 / k as f64]);
        }
    }
    out
}

/// Confusion counts: `m[t][p]` = predictions of class `p` for queries of class `t`.
pub fn confusion(truth: &[usize], pred: &[usize], n_classes: usize) -> Vec<Vec<u32>> {
    assert_eq!(truth.len(), pred.len());
    let mut m = vec![vec![0u32; n_classes]; n_classes];
    for (&t, &p) in truth.iter().zip(pred) {
        m[t][p] += 1;
    }
    m
}

/// Area under the risk-coverage curve: predictions sorted by confidence (highest first), the
/// mean over coverages i/n (i = 1..n) of the error rate among the i most confident. Ties are
/// taken in input order. Empty input gives 0.
pub fn aurc(confidence: &[f32], correct: &[bool]) -> f64 {
    assert_eq!(confidence.len(), correct.len());
    let n = confidence.len();
    if n == 0 {
        return 0.0;
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| confidence[b].total_cmp(&confidence[a]));
    let mut wrong = 0usize;
    let mut sum = 0f64;
    for (i, &j) in order.iter().enumerate() {
        wrong += (!correct[j]) as usize;
        sum += wrong as f64 / (i + 1) as f64;
    }
    sum / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reliability_risk_coverage_and_confusion() {
        let conf = [0.95, 0.92, 0.3, 0.35, 1.0];
        let ok = [true, false, false, true, true];
        let r = reliability(&conf, &ok, 10);
        assert_eq!(r.len(), 10);
        assert_eq!(r[9].count, 3); // 0.95, 0.92 and 1.0
        assert!((r[9].accuracy - 2.0 / 3.0).abs() < 1e-12);
        assert!((r[9].confidence - 2.87 / 3.0).abs() < 1e-6);
        assert_eq!(r[3].count, 2);
        assert_eq!(r.iter().map(|b| b.count).sum::<usize>(), 5);
        // ranked 1.0 ok, 0.95 ok, 0.92 wrong, 0.35 ok, 0.3 wrong
        let rc = risk_coverage(&conf, &ok, 5);
        assert_eq!(
            rc,
            vec![
                [0.2, 0.0],
                [0.4, 0.0],
                [0.6, 1.0 / 3.0],
                [0.8, 0.25],
                [1.0, 0.4]
            ]
        );
        let mean: f64 = rc.iter().map(|p| p[1]).sum::<f64>() / 5.0;
        assert!((mean - aurc(&conf, &ok)).abs() < 1e-12);
        let m = confusion(&[0, 0, 1, 2], &[0, 1, 1, 1], 3);
        assert_eq!(m, vec![vec![1, 1, 0], vec![0, 1, 0], vec![0, 1, 0]]);
    }

    #[test]
    fn accuracy_counts_matches() {
        assert_eq!(accuracy(&[0, 1, 2, 2], &[0, 1, 1, 2]), 0.75);
        assert_eq!(accuracy(&[], &[]), 0.0);
    }

    #[test]
    fn macro_f1_matches_hand_computation() {
        // class 0: tp 2, fp 1, fn 0 -> 4/5; class 1: tp 1, fp 1, fn 1 -> 2/4; class 2: tp 0 -> 0
        let truth = [0, 0, 1, 1, 2];
        let pred = [0, 0, 1, 0, 1];
        let f1 = macro_f1(&truth, &pred, 3);
        let expect = (0.8 + 0.5 + 0.0) / 3.0;
        assert!((f1 - expect).abs() < 1e-12, "{f1} vs {expect}");
        assert_eq!(macro_f1(&[0, 1, 2], &[0, 1, 2], 3), 1.0);
        // An absent class (never true, never predicted) does not count.
        assert_eq!(macro_f1(&[0, 1], &[0, 1], 5), 1.0);
    }

    #[test]
    fn mean_ci_uses_sample_std() {
        let m = MeanCi::of(&[1.0, 2.0, 3.0, 4.0]);
        assert!((m.mean - 2.5).abs() < 1e-12);
        let std = (5.0f64 / 3.0).sqrt();
        assert!((m.std - std).abs() < 1e-12);
        assert!((m.ci95 - 1.96 * std / 2.0).abs() < 1e-12);
        assert_eq!(MeanCi::of(&[0.7]).ci95, 0.0);
    }

    #[test]
    fn ece_is_zero_when_confidence_matches_accuracy_and_large_when_not() {
        // Bin [0.6, 0.667): confidence 0.6 on 5 predictions, 3 right -> calibrated.
        let conf = [0.6f32; 5];
        let ok = [true, true, true, false, false];
        assert!(expected_calibration_error(&conf, &ok, 15) < 1e-6);
        // Always 0.95 sure, right half the time -> ECE 0.45.
        let conf = [0.95f32; 4];
        let ok = [true, false, true, false];
        assert!((expected_calibration_error(&conf, &ok, 15) - 0.45).abs() < 1e-6);
        // Two bins, weighted by their share: |1 - 0.9| * 0.5 + |0 - 0.3| * 0.5.
        let e = expected_calibration_error(&[0.9, 0.3], &[true, false], 10);
        assert!((e - 0.2).abs() < 1e-6, "{e}");
        assert_eq!(expected_calibration_error(&[1.0], &[true], 15), 0.0);
    }

    #[test]
    fn aurc_rewards_confidence_that_ranks_errors_last() {
        let ok = [true, true, false, false];
        // Errors least confident: risks 0, 0, 1/3, 1/2.
        let good = aurc(&[0.9, 0.8, 0.4, 0.3], &ok);
        assert!((good - (0.0 + 0.0 + 1.0 / 3.0 + 0.5) / 4.0).abs() < 1e-12);
        // Errors most confident: risks 1, 1, 2/3, 1/2.
        let bad = aurc(&[0.3, 0.4, 0.9, 0.8], &ok);
        assert!((bad - (1.0 + 1.0 + 2.0 / 3.0 + 0.5) / 4.0).abs() < 1e-12);
        assert_eq!(aurc(&[], &[]), 0.0);
    }

    #[test]
    fn referral_splits_at_the_threshold() {
        let r = Referral::of(&[0.9, 0.7, 0.45, 0.3], &[true, false, true, false], 0.5);
        assert_eq!(r.refer_rate, 0.5);
        assert_eq!(r.accepted_accuracy, 0.5);
        assert_eq!(r.overall_accuracy, 0.5);
        assert_eq!(r.predictions, 4);
        let all = Referral::of(&[0.2, 0.3], &[true, true], 0.5);
        assert_eq!((all.refer_rate, all.accepted_accuracy), (1.0, 0.0));
    }
}
