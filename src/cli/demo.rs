//! `sgps demo`: synthesize a 4-way classifier for the ISIC novel classes from a few shots and
//! descriptions, classify held-out images and print a readable report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;

use sgps::eval::descriptions;
use sgps::eval::episodes::{EpisodeSpec, ImagePool, sample_episodes};
use sgps::eval::{DemoData, ISIC_NOVEL, demo_data_dir};
use sgps::pipeline::{LoadOptions, Pipeline, Shots, SupportInput, SynthMode};

/// `sgps demo`: few-shot classifier for four skin-lesion classes it was never trained on.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Data directory (needs <DATA>/isic/<class>/*.jpg). Default: $SGPS_DATA, else ../shared/data,
    /// else the sample images shipped in tests/samples.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Example images per class.
    #[arg(long, default_value_t = 5, value_name = "K")]
    pub shots: usize,
    /// Held-out images classified per class.
    #[arg(long, default_value_t = 5, value_name = "Q")]
    pub queries: usize,
    /// Seed choosing the examples and the held-out images.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also save the synthesized classifier to this file.
    #[arg(long, value_name = "FILE")]
    pub save: Option<PathBuf>,
}

/// Outcome of one held-out image.
#[derive(Debug, Clone)]
pub struct DemoRow {
    pub truth: String,
    pub predicted: String,
    pub refer: bool,
}

/// `sgps demo`.
pub fn run(args: &DemoArgs, models: &Path, opts: &LoadOptions) -> anyhow::Result<()> {
    let source = demo_data_dir(args.data.as_deref()).map_err(anyhow::Error::msg)?;
    let data = source.dir().to_path_buf();
    let t_load = Instant::now();
    let pipeline = Pipeline::load(models, opts)
        .with_context(|| format!("loading the models from {}", models.display()))?;
    let load_s = t_load.elapsed().as_secs_f64();

    let classes: Vec<String> = ISIC_NOVEL.iter().map(|s| s.to_string()).collect();
    let pool = ImagePool::open(&data, &classes).with_context(|| {
        format!(
            "the demo needs the ISIC novel classes under {}",
            data.display()
        )
    })?;
    let spec = EpisodeSpec {
        ways: classes.len(),
        shots: args.shots,
        queries: args.queries,
        episodes: 1,
        seed: args.seed,
    };
    let ep = sample_episodes(&pool, &spec)?.remove(0);
    let keys: Vec<(String, String)> = pool
        .classes
        .iter()
        .map(|c| (c.rel.clone(), c.name.clone()))
        .collect();
    let descs = descriptions::resolve(
        &keys,
        None,
        &pipeline
            .manifest()
            .dir
            .join("train")
            .join("descriptions.json"),
    )?;

    println!("sgps demo: a classifier for 4 skin-lesion classes the models never saw in training,");
    println!(
        "synthesized in one pass from {} example images and one description per class (no training).\n",
        args.shots
    );
    println!(
        "models: {} (image encoder {})",
        models.display(),
        pipeline.image_encoder().variant
    );
    match &source {
        DemoData::Collection(d) => println!("data:   {} (the image collection)\n", d.display()),
        DemoData::Samples { dir, note } => {
            println!("data:   {} (shipped samples)", dir.display());
            println!("        {note}\n");
        }
    }

    // Support set: embed the example images and the descriptions, then synthesize.
    let t_synth = Instant::now();
    let support = pipeline.support(
        ep.classes
            .iter()
            .zip(&ep.support)
            .map(|(&c, shots)| {
                SupportInput::new(
                    &pool.classes[c].name,
                    descs[c].text.clone(),
                    Shots::Files(shots.iter().map(|&i| pool.path(i)).collect()),
                )
            })
            .collect(),
    )?;
    let clf = pipeline.synthesize(&support, SynthMode::ImagesAndText)?;
    let synth_s = t_synth.elapsed().as_secs_f64();

    println!("Support set ({} images per class):", args.shots);
    for (w, &c) in ep.classes.iter().enumerate() {
        let files: Vec<String> = ep.support[w]
            .iter()
            .map(|&i| file_name(&pool.images[i]))
            .collect();
        println!("  {:<24} {}", pool.classes[c].name, files.join(" "));
        if let Some(d) = &descs[c].text {
            println!("  {:<24} \"{d}\"", "");
        }
    }
    println!(
        "\nSynthesized classifier {} ({} classes, refer below {:.0}% confidence) in {:.2} s (models loaded in {:.2} s).",
        &clf.id[..clf.id.len().min(12)],
        clf.num_classes(),
        100.0 * clf.refer_threshold,
        synth_s,
        load_s
    );
    if let Some(path) = &args.save {
        clf.save(path)?;
        println!("Saved to {}.", path.display());
    }

    // Held-out images.
    let mut files = Vec::new();
    let mut truths = Vec::new();
    for (w, &c) in ep.classes.iter().enumerate() {
        for &q in &ep.queries[w] {
            files.push(pool.path(q));
            truths.push(pool.classes[c].name.clone());
        }
    }
    let t_cls = Instant::now();
    let preds = pipeline.classify_files(&clf, &files);
    let cls_s = t_cls.elapsed().as_secs_f64();
    let mut rows = Vec::new();
    println!("\nHeld-out images ({} per class):", args.queries);
    println!(
        "  {:<20} {:<24} {:<24} {:>10}  verdict",
        "image", "truth", "prediction", "confidence"
    );
    for ((file, truth), pred) in files.iter().zip(&truths).zip(preds) {
        match pred {
            Ok(p) => {
                let ok = p.top_label == *truth;
                let verdict = match (p.refer, ok) {
                    (true, _) => "REFER (unsure)",
                    (false, true) => "correct",
                    (false, false) => "WRONG",
                };
                println!(
                    "  {:<20} {:<24} {:<24} {:>9.1}%  {verdict}",
                    file_name(file),
                    truth,
                    p.top_label,
                    100.0 * p.confidence
                );
                rows.push(DemoRow {
                    truth: truth.clone(),
                    predicted: p.top_label.clone(),
                    refer: p.refer,
                });
            }
            Err(e) => println!("  {:<20} {:<24} error: {e}", file_name(file), truth),
        }
    }
    let s = summarize(&rows);
    println!(
        "\nAccuracy: {}/{} correct ({:.0}%); chance is {:.0}%.",
        s.correct,
        s.total,
        100.0 * s.correct as f64 / s.total.max(1) as f64,
        100.0 / clf.num_classes() as f64
    );
    println!(
        "Referred to a clinician: {} of {}; accuracy on the {} not referred: {}.",
        s.referred,
        s.total,
        s.total - s.referred,
        if s.total > s.referred {
            format!(
                "{:.0}%",
                100.0 * s.correct_not_referred as f64 / (s.total - s.referred) as f64
            )
        } else {
            "n/a".into()
        }
    );
    println!(
        "Classified {} images in {:.2} s ({:.0} ms per image incl. decoding).",
        files.len(),
        cls_s,
        1000.0 * cls_s / files.len().max(1) as f64
    );
    println!("Full evaluation on 600 episodes: `cargo run --release -- eval`.");
    Ok(())
}

/// Counts of a demo run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoSummary {
    pub total: usize,
    pub correct: usize,
    pub referred: usize,
    pub correct_not_referred: usize,
}

pub fn summarize(rows: &[DemoRow]) -> DemoSummary {
    let ok = |r: &&DemoRow| r.predicted == r.truth;
    DemoSummary {
        total: rows.len(),
        correct: rows.iter().filter(ok).count(),
        referred: rows.iter().filter(|r| r.refer).count(),
        correct_not_referred: rows.iter().filter(|r| !r.refer).filter(ok).count(),
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}
