//! The manifest's `evaluation.sgps_eval` block, written from an eval report by
//! `sgps eval --write-manifest` (and `cargo xtask train` after the recipe), so no figure in
//! `models/manifest.json` is pasted by hand.

use std::path::Path;

use serde_json::{Map, Value, json};

use super::EvalReport;

/// Round as the recipe rounds figures in the manifest (4 decimals).
fn r4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// The `evaluation.sgps_eval` block of a report of protocol ISIC-FS-novel.
pub fn manifest_block(report: &EvalReport, text_features: &str) -> anyhow::Result<Value> {
    let c = &report.config;
    anyhow::ensure!(
        c.protocol == "ISIC-FS-novel",
        "only the ISIC-FS-novel protocol (sgps eval without --classes/--ways/--shots/--episodes/--queries/--seed) goes into the manifest; this run is {:?}",
        c.protocol
    );
    let mut results = Map::new();
    for sr in &report.results {
        for m in &sr.methods {
            let f = &m.referral;
            let entry = results
                .entry(m.method.clone())
                .or_insert_with(|| Value::Object(Map::new()));
            entry[format!("{}shot", sr.shots)] = json!({
                "accuracy": r4(m.accuracy.mean),
                "ci95": r4(m.accuracy.ci95),
                "macro_f1": r4(m.macro_f1.mean),
                "refer_rate": r4(f.refer_rate),
                "accepted_accuracy": r4(f.accepted_accuracy),
                "ece": r4(f.ece),
                "aurc": r4(f.aurc),
            });
        }
    }
    let acc = |method: &str, shots: usize| -> Option<f64> {
        let sr = report.results.iter().find(|r| r.shots == shots)?;
        let m = sr.methods.iter().find(|m| m.method == method)?;
        Some(100.0 * m.accuracy.mean)
    };
    let pair = |method: &str| match (acc(method, 1), acc(method, 5)) {
        (Some(a), Some(b)) => format!("{a:.2} / {b:.2}"),
        _ => "-".into(),
    };
    let five = report
        .results
        .iter()
        .find(|r| r.shots == 5)
        .and_then(|r| r.methods.first());
    let mut status = format!(
        "images+text {} vs imprinting {}; text only {:.2} (chance {:.0})",
        pair("sgps images+text"),
        pair("prototype"),
        acc("sgps text only (0-shot)", 1).unwrap_or(f64::NAN),
        100.0 / c.ways as f64
    );
    if let Some(m) = five {
        status += &format!(
            "; 5-shot referral {:.1} % referred, accepted {:.2} vs {:.2} overall",
            100.0 * m.referral.refer_rate,
            100.0 * m.referral.accepted_accuracy,
            100.0 * m.accuracy.mean
        );
    }
    let hash = |shots: usize| {
        report
            .results
            .iter()
            .find(|r| r.shots == shots)
            .map(|r| r.episodes_sha256[..16].to_string())
            .unwrap_or_else(|| "-".into())
    };
    let threshold = five.map(|m| m.referral.threshold).unwrap_or(0.5);
    Ok(json!({
        "command": "cargo run --release -- eval --write-manifest",
        "protocol": format!(
            "ISIC-FS-novel: {}-way, {} episodes, {} queries/class, seed {} (Rust sampler; episode sha256 1-shot {}, 5-shot {})",
            c.ways, c.episodes, c.queries, c.seed, hash(1), hash(5)
        ),
        "image_variant": report.image_encoder_variant,
        "text_features": text_features,
        "synthesizer_sha256": report.synthesizer_sha256,
        "results": results,
        "status": status,
        "source": "written by `sgps eval --write-manifest` from its report on the shipped files",
        "image_encoder_sha256": report.image_encoder_sha256,
        "referral": format!(
            "refer when top p < {threshold} (head.refer_threshold), pooled over every query"
        ),
    }))
}

/// Replace `evaluation.sgps_eval` in `<models_dir>/manifest.json` (atomically; every other key,
/// and the key order, kept).
pub fn write_manifest_block(models_dir: &Path, block: Value) -> anyhow::Result<()> {
    use anyhow::Context;
    let path = models_dir.join("manifest.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut m: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let obj = m
        .as_object_mut()
        .with_context(|| format!("{} is not a JSON object", path.display()))?;
    let eval = obj
        .entry("evaluation")
        .or_insert_with(|| Value::Object(Map::new()));
    eval["sgps_eval"] = block;
    let out = serde_json::to_string_pretty(&m)? + "\n";
    crate::atomic_file::write(&path, out.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}
