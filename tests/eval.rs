//! `sgps eval` / `sgps demo` on the shipped models and real images (skipped when the data
//! directory is absent): small real evaluation, determinism, the embedding-cache hit path,
//! and the missing-data message.

mod common;
use common::{data_dir, models_dir};

use std::path::Path;

use sgps::eval::episodes::{EpisodeSpec, ImagePool, episodes_hash, sample_episodes};
use sgps::eval::{EvalConfig, ISIC_NOVEL, evaluate};
use sgps::pipeline::{LoadOptions, Pipeline};

fn small_config(data: &Path, seed: u64) -> EvalConfig {
    EvalConfig {
        protocol: "custom".into(),
        data_dir: data.to_path_buf(),
        classes: vec![
            "isic/actinic_keratosis".into(),
            "dermatofibroma".into(), // bare class names resolve too
        ],
        ways: 2,
        shots: vec![1, 5],
        episodes: 5,
        queries: 5,
        seed,
    }
}

#[test]
fn small_real_eval_is_deterministic_and_cached() {
    let Some(data) = data_dir() else { return };
    let pipeline =
        Pipeline::load(&models_dir(), &LoadOptions::default()).expect("shipped models load");
    let cache = tempfile::tempdir().unwrap();
    let cfg = small_config(&data, 0);

    let first = evaluate(&pipeline, &cfg, cache.path(), None, true, false).expect("eval runs");
    let n_images = 53 + 111;
    assert_eq!(first.images_embedded, n_images);
    assert_eq!(first.cache_hits, 0, "fresh cache directory");
    assert_eq!(first.results.len(), 2);
    for sr in &first.results {
        let names: Vec<&str> = sr.methods.iter().map(|m| m.method.as_str()).collect();
        assert_eq!(
            names,
            [
                "sgps images+text",
                "sgps images only",
                "sgps text only (0-shot)",
                "prototype",
                "logistic_regression"
            ]
        );
        for m in &sr.methods {
            assert_eq!(m.accuracy.n, 5);
            assert!((0.0..=1.0).contains(&m.accuracy.mean), "{m:?}");
            assert!((0.0..=1.0).contains(&m.macro_f1.mean), "{m:?}");
            // Referral figures cover every query (5 episodes x 2 ways x 5 queries) at the
            // shipped threshold, and pooled accuracy equals the mean of the balanced episodes'.
            let r = &m.referral;
            assert_eq!(r.predictions, 50, "{m:?}");
            assert_eq!(r.threshold, pipeline.manifest().head.refer_threshold);
            assert!((r.overall_accuracy - m.accuracy.mean).abs() < 1e-9, "{m:?}");
            assert!((0.0..=1.0).contains(&r.refer_rate) && (0.0..=1.0).contains(&r.ece));
            // the plots' data: every query in the confusion counts (25 per class), the
            // reliability bins and the risk-coverage curve, which ends at full coverage
            let rows: Vec<u32> = m.confusion.iter().map(|r| r.iter().sum()).collect();
            assert_eq!(rows, [25, 25], "{m:?}");
            let right: u32 = (0..2).map(|i| m.confusion[i][i]).sum();
            assert!((right as f64 / 50.0 - r.overall_accuracy).abs() < 1e-9);
            assert_eq!(m.reliability.iter().map(|b| b.count).sum::<usize>(), 50);
            let end = m.risk_coverage.last().unwrap();
            assert!(end[0] == 1.0 && (end[1] - (1.0 - r.overall_accuracy)).abs() < 1e-9);
        }
        // Every episode: disjoint support/query sets of the requested sizes.
        let list = sr.episode_list.as_ref().expect("--list-episodes");
        assert_eq!(list.len(), 5);
        for ep in list {
            for (s, q) in ep.support.iter().zip(&ep.queries) {
                assert_eq!(s.len(), sr.shots);
                assert_eq!(q.len(), 5);
                assert!(s.iter().all(|x| !q.contains(x)));
            }
        }
    }
    // Image-based methods beat chance (50%) clearly at 5 shots on these two dissimilar classes.
    let five = &first.results[1];
    for m in five.methods.iter().filter(|m| m.method == "prototype") {
        assert!(m.accuracy.mean > 0.6, "{m:?}");
    }

    // The plots `sgps eval` writes next to its JSON.
    let plots_dir = tempfile::tempdir().unwrap();
    let plots = sgps::eval::plots::write_plots(&first, plots_dir.path(), "small").unwrap();
    assert_eq!(plots.len(), 4);
    let svg = |name: &str| {
        let p = plots_dir.path().join(format!("small.{name}.svg"));
        let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(
            s.starts_with("<svg") && s.trim_end().ends_with("</svg>"),
            "{s}"
        );
        s
    };
    let c = svg("confusion");
    assert!(c.contains("actinic keratosis") && c.contains("dermatofibroma"));
    assert!(svg("reliability").contains("5-shot (ECE"));
    let rc = svg("risk-coverage");
    for m in &first.results[1].methods {
        assert!(rc.contains(&m.method), "{} missing", m.method);
    }
    assert!(svg("accuracy-vs-shots").contains("chance (50%)"));

    // The manifest block: only the headline protocol goes into models/manifest.json; from such
    // a report it carries every method's figures, and writing it keeps every other key in order.
    use sgps::eval::manifest_block::{manifest_block, write_manifest_block};
    let e = manifest_block(&first, "int8").unwrap_err().to_string();
    assert!(e.contains("ISIC-FS-novel") && e.contains("custom"), "{e}");
    let mut headline = first.clone();
    headline.config.protocol = "ISIC-FS-novel".into();
    let block = manifest_block(&headline, "int8").unwrap();
    let acc = block["results"]["prototype"]["5shot"]["accuracy"]
        .as_f64()
        .unwrap();
    assert!(
        (acc - five.methods[3].accuracy.mean).abs() < 1e-4,
        "{block}"
    );
    assert_eq!(five.methods[3].method, "prototype");
    let models = tempfile::tempdir().unwrap();
    let text = "{\n  \"format\": 1,\n  \"z\": [1, 2],\n  \"a\": {\"b\": 0.5},\n  \"evaluation\": {\"other\": true}\n}\n";
    std::fs::write(models.path().join("manifest.json"), text).unwrap();
    write_manifest_block(models.path(), block.clone()).unwrap();
    let out = std::fs::read_to_string(models.path().join("manifest.json")).unwrap();
    let keys: Vec<usize> = [
        "\"format\"",
        "\"z\"",
        "\"a\"",
        "\"evaluation\"",
        "\"other\"",
        "\"sgps_eval\"",
    ]
    .iter()
    .map(|k| out.find(k).unwrap_or_else(|| panic!("{k} missing: {out}")))
    .collect();
    assert!(
        keys.windows(2).all(|w| w[0] < w[1]),
        "key order changed: {out}"
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["evaluation"]["sgps_eval"], block);

    // Second run: every embedding comes from the cache, and the numbers are identical.
    let second = evaluate(&pipeline, &cfg, cache.path(), None, true, false).expect("eval runs");
    assert_eq!(
        second.cache_hits, n_images,
        "all embeddings served from the cache"
    );
    for (a, b) in first.results.iter().zip(&second.results) {
        assert_eq!(a.episodes_sha256, b.episodes_sha256);
        for (ma, mb) in a.methods.iter().zip(&b.methods) {
            assert_eq!(ma.method, mb.method);
            assert_eq!(ma.accuracy, mb.accuracy, "{}", ma.method);
            assert_eq!(ma.macro_f1, mb.macro_f1, "{}", ma.method);
            assert_eq!(ma.referral, mb.referral, "{}", ma.method);
        }
    }

    // Another seed draws other episodes.
    let other = evaluate(
        &pipeline,
        &small_config(&data, 1),
        cache.path(),
        None,
        false,
        false,
    )
    .expect("eval runs");
    assert_eq!(other.cache_hits, n_images);
    assert_ne!(
        other.results[0].episodes_sha256,
        first.results[0].episodes_sha256
    );
}

/// The ISIC-FS-novel episodes are fixed: same files, same seed, same hash on every machine and
/// every run. A change here means the protocol's episodes changed — update the published figures.
#[test]
fn isic_fs_novel_episodes_are_stable() {
    let Some(data) = data_dir() else { return };
    let classes: Vec<String> = ISIC_NOVEL.iter().map(|s| s.to_string()).collect();
    let pool = ImagePool::open(&data, &classes).unwrap();
    assert_eq!(pool.images.len(), 53 + 111 + 197 + 142);
    let mut hashes = Vec::new();
    for shots in [1, 5] {
        let spec = EpisodeSpec {
            ways: 4,
            shots,
            queries: 15,
            episodes: 600,
            seed: 0,
        };
        let a = sample_episodes(&pool, &spec).unwrap();
        let b = sample_episodes(&pool, &spec).unwrap();
        assert_eq!(a, b);
        hashes.push(episodes_hash(&pool, &a));
    }
    // Pinned: the episodes behind the published ISIC-FS-novel figures.
    assert_eq!(
        hashes,
        [
            "5ad339d2d7ca0141bcf55208970d93874475a5875dcd3f16c20662255d8da2f9",
            "34707d8853dede6cfa33e3c305388639ef33ddec563dd781052a271546736a90"
        ]
    );
}

/// Without the collection (SGPS_DATA pointing nowhere), the README's first command runs on the
/// samples shipped in tests/samples and says so.
#[test]
fn demo_without_the_collection_runs_on_the_shipped_samples() {
    let mut cmd = common::command(env!("CARGO_BIN_EXE_sgps"));
    cmd.arg("--models")
        .arg(models_dir())
        .arg("demo")
        .env("SGPS_DATA", "/nonexistent/sgps-data");
    let stdout = succeeds_saying(
        &mut cmd,
        &[
            "tests/samples (shipped samples)",
            "SGPS_DATA=/nonexistent/sgps-data holds no isic/<novel class>/ folders",
            "CC BY-NC 4.0",
            "Support set (5 images per class)",
            "Held-out images (5 per class)",
            "Accuracy: ",
        ],
    );
    // 20 held-out rows, each with a verdict, and no image failed
    let rows = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("ISIC_"))
        .filter(|l| l.ends_with("correct") || l.ends_with("WRONG") || l.ends_with("(unsure)"))
        .count();
    assert_eq!(rows, 20, "{stdout}");
    assert!(!stdout.contains("error:"), "{stdout}");
}

#[test]
fn demo_without_data_says_what_it_needs() {
    let out = common::command(env!("CARGO_BIN_EXE_sgps"))
        .args(["demo", "--data", "/nonexistent/sgps-data"])
        .env_remove("SGPS_DATA")
        .output()
        .expect("sgps runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "/nonexistent/sgps-data",
        "isic/actinic_keratosis",
        "not redistributed",
        "SGPS_DATA=",
        "--data",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in: {err}");
    }
}

#[test]
fn eval_rejects_impossible_arguments_before_embedding() {
    let Some(data) = data_dir() else { return };
    let pipeline =
        Pipeline::load(&models_dir(), &LoadOptions::default()).expect("shipped models load");
    let cache = tempfile::tempdir().unwrap();
    let mut cfg = small_config(&data, 0);
    cfg.queries = 60; // actinic_keratosis has 53 images
    let err = evaluate(&pipeline, &cfg, cache.path(), None, false, false).unwrap_err();
    assert!(format!("{err:#}").contains("has only 53 images"), "{err:#}");
    cfg.queries = 5;
    cfg.classes.push("isic/no_such_class".into());
    cfg.ways = 3;
    let err = evaluate(&pipeline, &cfg, cache.path(), None, false, false).unwrap_err();
    assert!(format!("{err:#}").contains("not found"), "{err:#}");
    // Nothing was embedded.
    assert!(std::fs::read_dir(cache.path()).unwrap().next().is_none());
}

#[test]
fn bench_smoke_without_onnxruntime() {
    let Some(data) = data_dir() else { return };
    let mut cmd = common::command(env!("CARGO_BIN_EXE_sgps"));
    cmd.args([
        "bench",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--python",
        "/nonexistent/python",
        "--profile",
        "3",
    ])
    .arg("--data")
    .arg(&data)
    .arg("--models")
    .arg(models_dir());
    // the text rows follow what the shipped synthesizer reads
    let m = sgps::manifest::Manifest::load(&models_dir()).unwrap();
    let words = m.words_spec().is_some();
    let out = succeeds_saying(
        &mut cmd,
        &[
            "end to end",
            if words {
                "text: word features ("
            } else {
                "text: tokenize + encoder"
            },
            "from cached embeddings",
            "raw captures",
            "peak RSS (VmHWM)",
            "onnxruntime comparison skipped",
            "--no-ort",
            // the per-operator profile: tract's op kinds, with the depthwise convolutions of the
            // image encoder among them, and the slowest nodes
            "profile image encoder [fp32]",
            "slowest nodes:",
        ],
    );
    assert_eq!(
        out.contains("text: tokenize + encoder"),
        m.uses_minilm(),
        "{out}"
    );
    assert_eq!(
        out.contains("profile text encoder ["),
        m.uses_minilm(),
        "{out}"
    );
}

#[test]
fn bench_only_runs_one_variant_and_names_a_bad_one() {
    // `cargo xtask arm-count` counts instructions of `sgps bench --only MODEL:VARIANT`
    let Some(data) = data_dir() else { return };
    let only = |what: &str| {
        let mut cmd = common::command(env!("CARGO_BIN_EXE_sgps"));
        cmd.args(["bench", "--reps", "2", "--warmup", "1", "--only", what])
            .arg("--data")
            .arg(&data)
            .arg("--models")
            .arg(models_dir());
        cmd
    };
    // the float16 text variant: the shipped file, translated at load
    let out = succeeds_saying(
        &mut only("text:f16"),
        &["ran the text encoder [f16] 3 times"],
    );
    assert!(!out.contains("median"), "--only prints no timings:\n{out}");
    succeeds_saying(
        &mut only("image:fp32"),
        &["ran the image encoder [fp32] 3 times"],
    );
    for (bad, says) in [
        ("image:int4", "not in the manifest"),
        ("audio:fp32", "the model is `image` or `text`"),
        ("fp32", "expected image:VARIANT"),
    ] {
        let out = only(bad).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{bad}: {err}");
    }
}

/// Run `cmd`, require success and every needle in its standard output; returns that output.
fn succeeds_saying(cmd: &mut std::process::Command, needles: &[&str]) -> String {
    let out = cmd.output().expect("sgps runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in needles {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
    stdout
}
