//! Measurement for `sgps bench` (the command itself is the binary's `cli/bench.rs`): timings
//! as median and p90 of repeated runs, peak memory from `/proc`, and the onnxruntime side run by
//! a Python script on the same model files and inputs.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use serde_json::Value;
use tract_nnef::prelude::*;
use tract_nnef::tract_core::plan::SimpleState;

/// Environment variable naming the Python interpreter that has onnxruntime.
pub const PYTHON_ENV: &str = "SGPS_PYTHON";
/// The onnxruntime side, run with `python - SPEC.json`.
pub const ORT_SCRIPT: &str = include_str!("../scripts/bench_onnxruntime.py");

/// Median and p90 (nearest rank) of timings in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Timing {
    pub median_ms: f64,
    pub p90_ms: f64,
    pub runs: usize,
}

impl Timing {
    pub fn of(samples_ms: &[f64]) -> Timing {
        let mut s = samples_ms.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        let n = s.len();
        if n == 0 {
            return Timing {
                median_ms: f64::NAN,
                p90_ms: f64::NAN,
                runs: 0,
            };
        }
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            0.5 * (s[n / 2 - 1] + s[n / 2])
        };
        let rank = (9 * n).div_ceil(10).max(1) - 1;
        Timing {
            median_ms: median,
            p90_ms: s[rank.min(n - 1)],
            runs: n,
        }
    }
}

/// Run `f` `warmup` times untimed, then `reps` times timed.
pub fn measure<T>(
    warmup: usize,
    reps: usize,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<Timing> {
    for _ in 0..warmup {
        f()?;
    }
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        let r = f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
        drop(r);
    }
    Ok(Timing::of(&v))
}

/// A `/proc/self/status` field in KiB (e.g. `VmHWM`, the peak resident set size); None off Linux.
pub fn proc_status_kib(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Run the onnxruntime script on `spec`; Err carries a message saying how to fix it.
pub fn run_ort(python: &Path, spec: &Value) -> anyhow::Result<Value> {
    let dir = std::env::temp_dir().join(format!("sgps-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let spec_path = dir.join("spec.json");
    std::fs::write(&spec_path, serde_json::to_vec(spec)?)?;
    let out = Command::new(python)
        .arg("-")
        .arg(&spec_path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("piped stdin")
                .write_all(ORT_SCRIPT.as_bytes())?;
            child.wait_with_output()
        });
    let _ = std::fs::remove_dir_all(&dir);
    let hint = format!(
        "install it with `python3 -m venv models/train/.venv && models/train/.venv/bin/pip install onnxruntime numpy`, \
         or point {PYTHON_ENV} / --python at a Python that has it, or pass --no-ort"
    );
    let out = out.with_context(|| format!("cannot run {} ({hint})", python.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "onnxruntime benchmark with {} failed ({}): {} ({hint})",
                python.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        anyhow::bail!("{e} with {} ({hint})", python.display());
    }
    Ok(v)
}

/// The median / p90 of one model in the onnxruntime script's output.
pub fn ort_timing(v: &Value, key: &str) -> Option<Timing> {
    let r = v.get("results")?.get(key)?;
    Some(Timing {
        median_ms: r.get("median_ms")?.as_f64()?,
        p90_ms: r.get("p90_ms")?.as_f64()?,
        runs: r.get("runs")?.as_u64()? as usize,
    })
}

/// Time spent in one kind of operator (tract's op name) per run of a plan.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OpTime {
    pub op: String,
    /// Nodes of this kind in the optimised plan that ran.
    pub nodes: usize,
    /// Median over the runs of the summed time of these nodes, in ms.
    pub median_ms: f64,
    /// Share of the run's total (median of per-run totals), 0..1.
    pub share: f64,
}

/// Time spent in one node of a plan per run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeTime {
    pub node: String,
    pub op: String,
    /// The op's own description (kernel shape, strides, ...), as tract gives it.
    pub info: String,
    pub median_ms: f64,
}

/// A per-operator profile: median total per run, op kinds and nodes, most expensive first.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OpProfile {
    pub total_ms: f64,
    pub ops: Vec<OpTime>,
    pub nodes: Vec<NodeTime>,
}

/// Per-operator profile of a plan: each node's `eval` timed over `reps` runs (after one untimed
/// run), grouped by op kind, most expensive first, and the median total in ms.
pub fn profile_ops(
    plan: &crate::encoders::Plan,
    inputs: &TVec<TValue>,
    reps: usize,
) -> anyhow::Result<OpProfile> {
    use std::collections::BTreeMap;
    let reps = reps.max(1);
    let mut state = SimpleState::new(plan)?;
    state.run(inputs.clone())?;
    // node id -> ms in each run; op kinds and run totals are sums over these
    let mut by_node: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for run in 0..reps {
        state.run_plan_with_eval(inputs.clone(), |ctx, op_state, node, input| {
            let t = Instant::now();
            let out = tract_nnef::tract_core::plan::eval(ctx, op_state, node, input);
            let ms = by_node.entry(node.id).or_default();
            ms.resize(run + 1, 0.0);
            ms[run] += t.elapsed().as_secs_f64() * 1e3;
            out
        })?;
    }
    let mut totals = vec![0.0; reps];
    let mut by_op: BTreeMap<String, (usize, Vec<f64>)> = BTreeMap::new();
    for (id, ms) in &by_node {
        let e = by_op
            .entry(plan.model().node(*id).op().name().to_string())
            .or_insert_with(|| (0, vec![0.0; reps]));
        e.0 += 1;
        for (run, v) in ms.iter().enumerate() {
            e.1[run] += v;
            totals[run] += v;
        }
    }
    let total = Timing::of(&totals).median_ms;
    let mut ops: Vec<OpTime> = by_op
        .into_iter()
        .map(|(op, (nodes, ms))| {
            let median_ms = Timing::of(&ms).median_ms;
            OpTime {
                op,
                nodes,
                median_ms,
                share: if total > 0.0 { median_ms / total } else { 0.0 },
            }
        })
        .collect();
    ops.sort_by(|a, b| b.median_ms.total_cmp(&a.median_ms));
    let mut nodes: Vec<NodeTime> = by_node
        .into_iter()
        .map(|(id, ms)| {
            let n = plan.model().node(id);
            NodeTime {
                node: n.name.clone(),
                op: n.op().name().to_string(),
                info: n.op().info().unwrap_or_default().join("; "),
                median_ms: Timing::of(&ms).median_ms,
            }
        })
        .collect();
    nodes.sort_by(|a, b| b.median_ms.total_cmp(&a.median_ms));
    Ok(OpProfile {
        total_ms: total,
        ops,
        nodes,
    })
}

/// CPU model, cores available and architecture, for the report header.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("{cpu}, {cores} cores available, {}", std::env::consts::ARCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_median_and_p90() {
        let t = Timing::of(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!(t.median_ms, 3.0);
        assert_eq!(t.p90_ms, 5.0);
        let v: Vec<f64> = (1..=20).map(|x| x as f64).collect();
        let t = Timing::of(&v);
        assert_eq!(t.median_ms, 10.5);
        assert_eq!(t.p90_ms, 18.0);
        assert_eq!(t.runs, 20);
    }

    #[test]
    fn reads_peak_rss() {
        if cfg!(target_os = "linux") {
            let k = proc_status_kib("VmHWM").expect("VmHWM on Linux");
            assert!(k > 0);
        }
    }
}
