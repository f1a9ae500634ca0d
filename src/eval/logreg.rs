//! Multinomial logistic regression with L2 regularisation, fitted on a few-shot support set.
//!
//! Objective (the same as scikit-learn's `LogisticRegression(C, multi_class="multinomial")`,
//! intercept not penalised):
//!
//! ```text
//! min_{W,b}  Σ_i CE(softmax(W x_i + b), y_i) + ||W||² / (2C)
//! ```
//!
//! Support sets are tiny (n ≤ a few hundred) while the embedding dimension is large, so the fit
//! runs in the span of the samples: W = Aᵀ X (representer theorem, exact because only W is
//! penalised). Gradient descent on W with step 1/L is then the same iteration on A, costing
//! O(n²·C) per step instead of O(n·C·D). Nesterov momentum with gradient-based restart;
//! stops when the largest gradient entry is below `tol`.

/// Fit options.
#[derive(Debug, Clone, Copy)]
pub struct LogRegOptions {
    /// Inverse regularisation strength (scikit-learn's `C`).
    pub c: f64,
    /// Stop when max |∂f/∂θ| < tol (objective divided by n).
    pub tol: f64,
    pub max_iter: usize,
}

impl Default for LogRegOptions {
    fn default() -> Self {
        LogRegOptions {
            c: 1.0,
            tol: 1e-6,
            max_iter: 20_000,
        }
    }
}

/// A fitted model: `logits = weight · x + bias`.
#[derive(Debug, Clone)]
pub struct LogReg {
    pub weight: Vec<Vec<f32>>,
    pub bias: Vec<f32>,
    /// Iterations used and whether the tolerance was reached.
    pub iterations: usize,
    pub converged: bool,
}

struct State {
    a: Vec<f64>, // n × C, row-major
    b: Vec<f64>, // C
}

impl LogReg {
    /// Fit on samples `x` (all of one dimension) with labels `y` in `0..n_classes`.
    pub fn fit(x: &[&[f32]], y: &[usize], n_classes: usize, opts: &LogRegOptions) -> LogReg {
        assert_eq!(x.len(), y.len());
        assert!(
            !x.is_empty(),
            "logistic regression needs at least one sample"
        );
        assert!(n_classes >= 1);
        let n = x.len();
        let k = n_classes;
        let d = x[0].len();
        // Gram matrix.
        let mut g = vec![0f64; n * n];
        for i in 0..n {
            for j in i..n {
                let v: f64 = x[i]
                    .iter()
                    .zip(x[j])
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum();
                g[i * n + j] = v;
                g[j * n + i] = v;
            }
        }
        let lambda = 1.0 / (opts.c * n as f64);
        // Lipschitz constant of the gradient of (1/n)·Σ CE + λ/2·||W||²: the softmax CE Hessian
        // w.r.t. logits is ≤ ½·I (Böhning), so L ≤ ½·λ_max((1/n)·[X 1]ᵀ[X 1]) + λ ≤ ½·mean(||x||² + 1) + λ.
        let mean_sq = (0..n).map(|i| g[i * n + i] + 1.0).sum::<f64>() / n as f64;
        let lip = 0.5 * mean_sq + lambda;
        let step = 1.0 / lip;

        let zero = || State {
            a: vec![0.0; n * k],
            b: vec![0.0; k],
        };
        let mut cur = zero(); // θ_k
        let mut look = zero(); // extrapolated point
        let mut t = 1.0f64;
        let mut grad_a = vec![0.0; n * k];
        let mut grad_b = vec![0.0; k];
        let mut iterations = 0;
        let mut converged = false;
        while iterations < opts.max_iter {
            let gmax = gradient(&g, y, n, k, lambda, &look, &mut grad_a, &mut grad_b);
            if gmax < opts.tol {
                cur = look;
                converged = true;
                break;
            }
            iterations += 1;
            // Gradient step from the look-ahead point (in A-space: A − η·M).
            let next = State {
                a: look
                    .a
                    .iter()
                    .zip(&grad_a)
                    .map(|(v, gv)| v - step * gv)
                    .collect(),
                b: look
                    .b
                    .iter()
                    .zip(&grad_b)
                    .map(|(v, gv)| v - step * gv)
                    .collect(),
            };
            // Restart momentum when the step goes against the previous direction
            // (O'Donoghue & Candès); <∇f(look), next − cur> in W-space uses the Gram matrix.
            let dir = dot_w(&g, n, k, &grad_a, &sub(&next.a, &cur.a))
                + grad_b
                    .iter()
                    .zip(next.b.iter().zip(&cur.b))
                    .map(|(gb, (nb, cb))| gb * (nb - cb))
                    .sum::<f64>();
            let beta = if dir > 0.0 {
                t = 1.0;
                0.0
            } else {
                let t_next = (1.0 + (1.0 + 4.0 * t * t).sqrt()) / 2.0;
                let beta = (t - 1.0) / t_next;
                t = t_next;
                beta
            };
            look = State {
                a: next
                    .a
                    .iter()
                    .zip(&cur.a)
                    .map(|(nv, cv)| nv + beta * (nv - cv))
                    .collect(),
                b: next
                    .b
                    .iter()
                    .zip(&cur.b)
                    .map(|(nv, cv)| nv + beta * (nv - cv))
                    .collect(),
            };
            cur = next;
        }
        if !converged {
            log::debug!(
                "logistic regression stopped after {} iterations without reaching tol {}",
                opts.max_iter,
                opts.tol
            );
        }
        // W = Aᵀ X
        let mut weight = vec![vec![0f32; d]; k];
        for (c, w) in weight.iter_mut().enumerate() {
            let mut acc = vec![0f64; d];
            for (i, xi) in x.iter().enumerate() {
                let a = cur.a[i * k + c];
                if a != 0.0 {
                    for (s, &v) in acc.iter_mut().zip(xi.iter()) {
                        *s += a * v as f64;
                    }
                }
            }
            for (o, s) in w.iter_mut().zip(acc) {
                *o = s as f32;
            }
        }
        LogReg {
            weight,
            bias: cur.b.iter().map(|&v| v as f32).collect(),
            iterations,
            converged,
        }
    }

    pub fn logits(&self, x: &[f32]) -> Vec<f32> {
        self.weight
            .iter()
            .zip(&self.bias)
            .map(|(w, b)| w.iter().zip(x).map(|(a, b)| a * b).sum::<f32>() + b)
            .collect()
    }

    pub fn predict(&self, x: &[f32]) -> usize {
        argmax(&self.logits(x))
    }
}

/// Index of the largest value (first on ties).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

fn sub(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

/// <Aᵀ X, Bᵀ X>_F = tr(Aᵀ G B).
fn dot_w(g: &[f64], n: usize, k: usize, a: &[f64], b: &[f64]) -> f64 {
    let mut s = 0.0;
    for i in 0..n {
        for j in 0..n {
            let gij = g[i * n + j];
            if gij == 0.0 {
                continue;
            }
            for c in 0..k {
                s += a[i * k + c] * gij * b[j * k + c];
            }
        }
    }
    s
}

/// Writes the A-space gradient M = (P − Y)/n + λA (so that ∇_W = Mᵀ X) and ∇_b; returns the
/// largest absolute entry of the true gradient (∇_W and ∇_b).
#[allow(clippy::too_many_arguments)]
fn gradient(
    g: &[f64],
    y: &[usize],
    n: usize,
    k: usize,
    lambda: f64,
    s: &State,
    grad_a: &mut [f64],
    grad_b: &mut [f64],
) -> f64 {
    grad_b.iter_mut().for_each(|v| *v = 0.0);
    let mut z = vec![0f64; k];
    for i in 0..n {
        for (c, zc) in z.iter_mut().enumerate() {
            let mut v = s.b[c];
            for j in 0..n {
                v += g[i * n + j] * s.a[j * k + c];
            }
            *zc = v;
        }
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = z.iter().map(|v| (v - m).exp()).sum();
        for c in 0..k {
            let p = (z[c] - m).exp() / sum;
            let r = (p - if y[i] == c { 1.0 } else { 0.0 }) / n as f64;
            grad_a[i * k + c] = r + lambda * s.a[i * k + c];
            grad_b[c] += r;
        }
    }
    // ∇_W = Mᵀ X: its largest entry is bounded by the norms; compute ||∇_W||_F = sqrt(tr(Mᵀ G M))
    // (a cheap, conservative stand-in for the max entry) and compare with ∇_b.
    let gw = dot_w(g, n, k, grad_a, grad_a).max(0.0).sqrt();
    let gb = grad_b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    gw.max(gb)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Gaussian-ish clusters around orthogonal-ish centres, L2-normalised like embeddings.
    fn clusters(
        k: usize,
        per: usize,
        d: usize,
        spread: f32,
        seed: u64,
    ) -> (Vec<Vec<f32>>, Vec<usize>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let centres: Vec<Vec<f32>> = (0..k)
            .map(|_| (0..d).map(|_| rng.random_range(-1.0..1.0)).collect())
            .collect();
        let mut x = Vec::new();
        let mut y = Vec::new();
        for (c, centre) in centres.iter().enumerate() {
            for _ in 0..per {
                let mut v: Vec<f32> = centre
                    .iter()
                    .map(|m| m + spread * rng.random_range(-1.0..1.0))
                    .collect();
                let nrm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
                v.iter_mut().for_each(|a| *a /= nrm);
                x.push(v);
                y.push(c);
            }
        }
        (x, y)
    }

    /// Full objective Σ CE + ||W||²/(2C) computed directly in W-space.
    fn objective(m: &LogReg, x: &[Vec<f32>], y: &[usize], c: f64) -> f64 {
        let mut f = 0.0;
        for (xi, &yi) in x.iter().zip(y) {
            let z: Vec<f64> = m.logits(xi).iter().map(|&v| v as f64).collect();
            let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = mx + z.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
            f += lse - z[yi];
        }
        let w2: f64 = m.weight.iter().flatten().map(|&v| (v as f64).powi(2)).sum();
        f + w2 / (2.0 * c)
    }

    #[test]
    fn separable_toy_data_is_fitted_and_generalises() {
        let (x, y) = clusters(4, 5, 64, 0.3, 1);
        let xr: Vec<&[f32]> = x.iter().map(|v| v.as_slice()).collect();
        let m = LogReg::fit(&xr, &y, 4, &LogRegOptions::default());
        assert!(
            m.converged,
            "did not converge in {} iterations",
            m.iterations
        );
        for (xi, &yi) in x.iter().zip(&y) {
            assert_eq!(m.predict(xi), yi);
        }
        // Fresh points from the same clusters (same centres: same seed, more points).
        let (xt, yt) = clusters(4, 30, 64, 0.3, 1);
        let ok = xt
            .iter()
            .zip(&yt)
            .filter(|(v, t)| m.predict(v) == **t)
            .count();
        assert!(ok as f64 / xt.len() as f64 > 0.95, "{ok}/{}", xt.len());
    }

    #[test]
    fn solution_is_the_minimum() {
        // Overlapping classes so the optimum is interior; check that perturbing W or b in any
        // coordinate direction does not lower the objective, and that the gradient vanishes.
        let (x, y) = clusters(3, 6, 8, 2.0, 7);
        let xr: Vec<&[f32]> = x.iter().map(|v| v.as_slice()).collect();
        let c = 0.5;
        let opts = LogRegOptions {
            c,
            tol: 1e-9,
            max_iter: 100_000,
        };
        let m = LogReg::fit(&xr, &y, 3, &opts);
        assert!(m.converged);
        let f0 = objective(&m, &x, &y, c);
        let h = 1e-3f32;
        for cls in 0..3 {
            for j in 0..8 {
                for s in [h, -h] {
                    let mut p = m.clone();
                    p.weight[cls][j] += s;
                    assert!(objective(&p, &x, &y, c) >= f0 - 1e-9, "W[{cls}][{j}] {s}");
                }
            }
            for s in [h, -h] {
                let mut p = m.clone();
                p.bias[cls] += s;
                assert!(objective(&p, &x, &y, c) >= f0 - 1e-9, "b[{cls}] {s}");
            }
        }
    }

    #[test]
    fn stronger_regularisation_shrinks_weights() {
        let (x, y) = clusters(2, 4, 16, 0.5, 3);
        let xr: Vec<&[f32]> = x.iter().map(|v| v.as_slice()).collect();
        let norm = |m: &LogReg| m.weight.iter().flatten().map(|v| v * v).sum::<f32>();
        let weak = LogReg::fit(
            &xr,
            &y,
            2,
            &LogRegOptions {
                c: 10.0,
                ..Default::default()
            },
        );
        let strong = LogReg::fit(
            &xr,
            &y,
            2,
            &LogRegOptions {
                c: 0.01,
                ..Default::default()
            },
        );
        assert!(norm(&strong) < norm(&weak));
        assert!(weak.converged && strong.converged);
    }

    #[test]
    fn one_shot_per_class_predicts_its_own_support() {
        let (x, y) = clusters(5, 1, 1280, 0.1, 11);
        let xr: Vec<&[f32]> = x.iter().map(|v| v.as_slice()).collect();
        let m = LogReg::fit(&xr, &y, 5, &LogRegOptions::default());
        assert!(m.converged);
        for (xi, &yi) in x.iter().zip(&y) {
            assert_eq!(m.predict(xi), yi);
        }
    }
}
