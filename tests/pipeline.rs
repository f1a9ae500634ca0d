//! The whole pipeline on the shipped models: support set → synthesis → artifact → classification,
//! through the library and through the `sgps` binary. Real ISIC images from the samples shipped in
//! `tests/samples` (so these never skip), synthetic images too.

mod common;
use common::{models_dir, pipeline, samples_dir};

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use sgps::classifier::Classifier;
use sgps::pipeline::{ClassSupport, SynthMode};
use sgps::support::{ClassSpec, SupportSpec};

const BASE: [&str; 4] = [
    "actinic_keratosis",
    "dermatofibroma",
    "squamous_cell_carcinoma",
    "vascular_lesion",
];

/// Sorted image files of one ISIC class.
fn isic_files(data: &Path, class: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(data.join("isic").join(class))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| sgps::image_io::has_image_extension(p))
        .collect();
    v.sort();
    v
}

fn base_spec(data: &Path, shots: usize) -> (SupportSpec, Vec<(String, PathBuf)>) {
    let mut spec = SupportSpec::default();
    let mut queries = Vec::new();
    for c in BASE {
        let files = isic_files(data, c);
        spec.classes.push(ClassSpec {
            name: c.to_string(),
            images: files[..shots].to_vec(),
            description: Some(format!("dermoscopy image of {}", c.replace('_', " "))),
        });
        for q in &files[shots..shots + 3] {
            queries.push((c.to_string(), q.clone()));
        }
    }
    (spec, queries)
}

#[test]
fn synthesize_save_load_and_classify_real_isic_images() {
    let data = samples_dir();
    let p = pipeline();
    let (spec, queries) = base_spec(&data, 5);
    let clf = p.synthesize_spec(&spec, SynthMode::ImagesAndText).unwrap();
    assert_eq!(clf.class_names(), BASE);
    assert_eq!(clf.shots, vec![5; 4]);
    assert_eq!(clf.encoder_sha256, p.encoder_sha256());

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("isic.sgpc");
    clf.save(&path).unwrap();
    let back = p.load_classifier(&path).unwrap();
    assert_eq!(back, clf);

    // every support image is closest to its own class prototype (imprinting or better)
    let mut own = 0;
    let mut total = 0;
    for c in &spec.classes {
        for (img, r) in c.images.iter().zip(p.classify_files(&back, &c.images)) {
            let pred = r.unwrap();
            total += 1;
            own += (pred.top_label == c.name) as usize;
            assert!(
                (pred.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-4,
                "{img:?}"
            );
        }
    }
    println!("support images classified to their own class: {own}/{total}");
    assert!(own * 10 >= total * 8, "{own}/{total}");

    // held-out queries: valid predictions (accuracy is measured by `sgps eval`, not here)
    let paths: Vec<PathBuf> = queries.iter().map(|(_, p)| p.clone()).collect();
    let preds = p.classify_files(&back, &paths);
    let correct = queries
        .iter()
        .zip(&preds)
        .filter(|((c, _), r)| &r.as_ref().unwrap().top_label == c)
        .count();
    println!("held-out queries correct: {correct}/{}", queries.len());
    for r in preds {
        let r = r.unwrap();
        assert!(BASE.contains(&r.top_label.as_str()));
        assert_eq!(r.refer, r.confidence < back.refer_threshold);
    }
}

#[test]
fn every_mode_synthesizes_from_real_images() {
    let data = samples_dir();
    let p = pipeline();
    let (spec, _) = base_spec(&data, 1);
    let classes = p.embed_support(&spec).unwrap();
    for mode in [
        SynthMode::ImagesAndText,
        SynthMode::ImagesOnly,
        SynthMode::TextOnly,
    ] {
        let c = p.synthesize(&classes, mode).unwrap();
        assert_eq!(c.mode, mode.label());
        assert_eq!(c.num_classes(), 4);
        let pred = c.predict(&classes[0].shots[0]);
        assert_eq!(pred.probabilities.len(), 4);
    }
    // a mixed set: one class text-only (no images), the others with images
    let mut mixed = classes.clone();
    mixed[2].shots.clear();
    let c = p.synthesize(&mixed, SynthMode::ImagesAndText).unwrap();
    assert_eq!(c.shots, vec![1, 1, 0, 1]);
}

fn solid(rgb: [u8; 3], seed: u32) -> RgbImage {
    RgbImage::from_fn(64, 48, |x, y| {
        let n = ((x * 7 + y * 13 + seed * 31) % 17) as u8;
        Rgb([
            rgb[0].saturating_add(n),
            rgb[1].saturating_add(n),
            rgb[2].saturating_add(n),
        ])
    })
}

#[test]
fn synthetic_colours_are_separated() {
    // Runs without the data directory: red-ish vs blue-ish images.
    let p = pipeline();
    let red: Vec<RgbImage> = (0..3).map(|i| solid([200, 30, 30], i)).collect();
    let blue: Vec<RgbImage> = (0..3).map(|i| solid([30, 30, 200], i)).collect();
    let classes = vec![
        ClassSupport {
            name: "red".into(),
            shots: p.embed_images(&red).unwrap(),
            ..Default::default()
        },
        ClassSupport {
            name: "blue".into(),
            shots: p.embed_images(&blue).unwrap(),
            ..Default::default()
        },
    ];
    let clf = p.synthesize(&classes, SynthMode::ImagesOnly).unwrap();
    let q = p
        .embed_images(&[solid([210, 40, 35], 9), solid([35, 40, 210], 9)])
        .unwrap();
    assert_eq!(clf.predict(&q[0]).top_label, "red");
    assert_eq!(clf.predict(&q[1]).top_label, "blue");
    // a batch gives the same embeddings as one by one
    let one = p.embed_images(&red[1..2]).unwrap().remove(0);
    let diff = one
        .iter()
        .zip(&classes[0].shots[1])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-4, "batch vs single max abs diff {diff}");
}

#[test]
fn cli_synth_then_classify_json_with_a_bad_file_in_the_batch() {
    let data = samples_dir();
    let bin = env!("CARGO_BIN_EXE_sgps");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("c.sgpc");
    let mut cmd = common::command(bin);
    cmd.arg("--models").arg(models_dir()).arg("synth");
    let mut queries = Vec::new();
    for c in &BASE[..3] {
        let files = isic_files(&data, c);
        let list: Vec<String> = files[..2].iter().map(|p| p.display().to_string()).collect();
        cmd.arg("--class").arg(format!("{c}={}", list.join(",")));
        queries.push(files[5].clone());
    }
    cmd.arg("--describe")
        .arg("dermatofibroma=firm brown papule with a central white patch");
    cmd.arg("--out").arg(&out);
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "synth failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("+ description"));

    let bad = dir.path().join("broken.jpg");
    std::fs::write(&bad, b"definitely not a jpeg").unwrap();
    let o = common::command(bin)
        .arg("--models")
        .arg(models_dir())
        .arg("classify")
        .arg("--classifier")
        .arg(&out)
        .arg("--json")
        .arg(&queries[0])
        .arg(&bad)
        .arg(&queries[1])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "a failed image makes the exit code non-zero"
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = v["results"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert!(rows[0]["top_label"].is_string());
    assert!(rows[1]["error"].as_str().unwrap().contains("broken.jpg"));
    assert!(rows[2]["probabilities"].as_object().unwrap().len() == 3);

    // the human-readable table
    let o = common::command(bin)
        .arg("--models")
        .arg(models_dir())
        .arg("classify")
        .arg("-c")
        .arg(&out)
        .arg(&queries[2])
        .output()
        .unwrap();
    assert!(o.status.success());
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("confidence") && table.contains('%'),
        "{table}"
    );

    // the artifact loads through the library too
    let c = Classifier::load(&out, pipeline().encoder_sha256()).unwrap();
    assert_eq!(
        c.classes[1].description.as_deref(),
        Some("firm brown papule with a central white patch")
    );
}

#[test]
fn cli_version_and_missing_models_dir() {
    let bin = env!("CARGO_BIN_EXE_sgps");
    let o = common::command(bin).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains(env!("CARGO_PKG_VERSION")));
    let dir = tempfile::tempdir().unwrap();
    let o = common::command(bin)
        .arg("--models")
        .arg(dir.path())
        .arg("classify")
        .arg("-c")
        .arg("x.sgpc")
        .arg("y.jpg")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("manifest.json") && err.contains("--models"),
        "{err}"
    );
}

#[test]
fn operator_profile_times_every_node() {
    // `sgps bench --profile` times each node's eval: every node that ran is counted once, under
    // its op kind, and the kinds come most expensive first.
    let p = pipeline();
    let enc = p.image_encoder();
    let (h, w) = (
        enc.preprocess.height as usize,
        enc.preprocess.width as usize,
    );
    let img: Vec<f32> = (0..3 * h * w)
        .map(|i| ((i % 97) as f32 / 97.0) - 0.5)
        .collect();
    let prof = sgps::bench::profile_ops(enc.plan(), &enc.inputs(&img).unwrap(), 2).unwrap();
    assert!(prof.total_ms > 0.0);
    let counted: usize = prof.ops.iter().map(|o| o.nodes).sum();
    assert_eq!(counted, prof.nodes.len());
    assert!(prof.nodes.len() > 50, "{} nodes", prof.nodes.len());
    assert!(
        prof.ops
            .windows(2)
            .all(|w| w[0].median_ms >= w[1].median_ms)
    );
    assert!(
        prof.ops.iter().any(|o| o.op.contains("DepthWise")),
        "{:?}",
        prof.ops.iter().map(|o| &o.op).collect::<Vec<_>>()
    );
    let share: f64 = prof.ops.iter().map(|o| o.share).sum();
    assert!(share > 0.5 && share < 1.5, "shares sum to {share}");
}
