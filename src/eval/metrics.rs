//! Accuracy, macro-F1 and confidence intervals over episodes.

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
