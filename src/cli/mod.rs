//! The `sgps` binary's front ends: argument structs, dispatch, and what each command prints.
//! `main.rs` only parses and calls [`run`]; the library (`sgps::…`) holds the logic.
//!
//! Each subcommand's arguments live in their own struct, in this module or in the module of
//! that command (`eval`, `bench`, `demo`, `run`, `audit`, `board_tools`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;

use sgps::classifier::Classifier;
use sgps::image_io::has_image_extension;
use sgps::pipeline::{LoadOptions, Pipeline, SynthMode, resolve_models_dir};
use sgps::support::{SupportSpec, read_descriptions};

mod audit;
mod bench;
mod board_tools;
mod demo;
mod eval;
mod run;
pub use audit::{AuditArgs, audit};
pub use board_tools::{
    CaptureArgs, GpioCheckArgs, ReportArgs, UiWaitArgs, capture, gpio_check, report, ui_wait,
};

/// Offline few-shot medical image classification: synthesize a classifier from a few example
/// images and descriptions per class (no training), then classify new images.
#[derive(Debug, Parser)]
#[command(name = "sgps", version, about, propagate_version = true)]
pub struct Cli {
    /// Models directory (default: $SGPS_MODELS, else models/ of the workspace or next to the executable, else ./models).
    #[arg(long, global = true, value_name = "DIR")]
    pub models: Option<PathBuf>,
    /// Inference threads.
    #[arg(long, global = true, value_name = "N")]
    pub threads: Option<usize>,
    /// Image-encoder variant from the manifest (e.g. fp32, int8); default: the manifest's.
    #[arg(long, global = true, value_name = "NAME")]
    pub image_variant: Option<String>,
    /// Text-encoder variant from the manifest; default: the manifest's.
    #[arg(long, global = true, value_name = "NAME")]
    pub text_variant: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The models directory this invocation uses.
    pub fn models_dir(&self) -> PathBuf {
        resolve_models_dir(self.models.as_deref())
    }

    /// Load options from the global flags.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            image_variant: self.image_variant.clone(),
            text_variant: self.text_variant.clone(),
            threads: self.threads,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Synthesize a classifier from a support set (2-16 classes, 0-20 images each, optional descriptions).
    Synth(SynthArgs),
    /// Classify images with a saved classifier.
    Classify(ClassifyArgs),
    /// Evaluate on few-shot episodes (default: protocol ISIC-FS-novel) against baselines.
    Eval(eval::EvalArgs),
    /// Measure latency and peak memory, and compare with onnxruntime.
    Bench(bench::BenchArgs),
    /// Synthesize a classifier for 4 unseen skin-lesion classes and classify held-out images.
    Demo(demo::DemoArgs),
    /// Run the device loop (camera, buttons, LEDs, the screen) of a board profile; sim boards
    /// take --script, or serve the screen only.
    Run(run::RunArgs),
    /// Check a device's audit log: every record's checksum and the hash chain linking them.
    Audit(AuditArgs),
    /// Write a session report (self-contained HTML + CSV, SHA-256 of every capture) from a
    /// device's storage directory, as the screen's Export does.
    Report(ReportArgs),
    /// Wait until `sgps run` serves the screen of a board profile, then print its URL (used by
    /// board/sgps-kiosk.service to start the kiosk browser).
    UiWait(UiWaitArgs),
    /// Capture frames from a camera (a board profile's, or a V4L2 device) and check each with
    /// the quality gate: to try a camera on a new board, or to save sample frames.
    Capture(CaptureArgs),
    /// Check a board's buttons and LEDs: lights each LED in turn, then prints every button
    /// event and shows it on the LEDs (capture: green short, red long; next: amber short, off
    /// long).
    GpioCheck(GpioCheckArgs),
}

/// Which support information the synthesizer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Images and descriptions.
    ImagesAndText,
    /// Images only (descriptions ignored).
    ImagesOnly,
    /// Descriptions only (zero-shot).
    TextOnly,
}

impl From<ModeArg> for SynthMode {
    fn from(m: ModeArg) -> SynthMode {
        match m {
            ModeArg::ImagesAndText => SynthMode::ImagesAndText,
            ModeArg::ImagesOnly => SynthMode::ImagesOnly,
            ModeArg::TextOnly => SynthMode::TextOnly,
        }
    }
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    sgps synth support/ --out lesions.sgpc          # support/<class>/*.jpg, optional support/descriptions.json\n  \
    sgps synth --class ak=a1.jpg,a2.jpg --class df=d1.jpg --describe df=\"firm brown papule\" --out t.sgpc")]
pub struct SynthArgs {
    /// Support folder: <DIR>/<class>/*.jpg|png|bmp, optional <DIR>/descriptions.json.
    #[arg(value_name = "DIR", conflicts_with = "class")]
    pub dir: Option<PathBuf>,
    /// A class and its images: name=img1,img2 (empty list = text-only class). Repeat per class.
    #[arg(long = "class", value_name = "NAME=IMG,...")]
    pub class: Vec<String>,
    /// A class description: name="text". Repeatable.
    #[arg(long, value_name = "NAME=TEXT")]
    pub describe: Vec<String>,
    /// JSON file of {"class": "description"} (instead of / in addition to --describe).
    #[arg(long, value_name = "FILE")]
    pub descriptions: Option<PathBuf>,
    /// What the synthesizer may use.
    #[arg(long, value_enum, default_value_t = ModeArg::ImagesAndText)]
    pub mode: ModeArg,
    /// Output classifier file.
    #[arg(long, short, default_value = "classifier.sgpc")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct ClassifyArgs {
    /// Classifier file made by `sgps synth`.
    #[arg(long, short, value_name = "FILE")]
    pub classifier: PathBuf,
    /// Images (or folders of images) to classify.
    #[arg(required = true, value_name = "IMG")]
    pub images: Vec<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Run a parsed command line. Returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let models = cli.models_dir();
    let opts = cli.load_options();
    match &cli.command {
        Command::Synth(a) => synth(a, &models, &opts),
        Command::Classify(a) => classify(a, &models, &opts),
        Command::Eval(a) => eval::run(a, &models, &opts).map(|()| ExitCode::SUCCESS),
        Command::Bench(a) => bench::run(a, &models, &opts).map(|()| ExitCode::SUCCESS),
        Command::Demo(a) => demo::run(a, &models, &opts).map(|()| ExitCode::SUCCESS),
        Command::Run(a) => run::run(a, cli.models.as_deref(), &opts),
        Command::Audit(a) => audit(a),
        Command::Report(a) => report(a),
        Command::UiWait(a) => ui_wait(a),
        Command::Capture(a) => capture(a),
        Command::GpioCheck(a) => gpio_check(a),
    }
}

fn load_pipeline(models: &Path, opts: &LoadOptions) -> anyhow::Result<Pipeline> {
    Pipeline::load(models, opts)
        .with_context(|| format!("loading the models from {}", models.display()))
}

/// `sgps synth`.
pub fn synth(a: &SynthArgs, models: &Path, opts: &LoadOptions) -> anyhow::Result<ExitCode> {
    let mut spec = match &a.dir {
        Some(dir) => SupportSpec::from_dir(dir)?,
        None if !a.class.is_empty() => SupportSpec::from_args(&a.class, &[])?,
        None => anyhow::bail!(
            "no support set given: pass a folder (sgps synth DIR) or --class name=img1,img2 for each class"
        ),
    };
    if let Some(f) = &a.descriptions {
        spec.apply_descriptions(read_descriptions(f)?)?;
    }
    if !a.describe.is_empty() {
        let names: Vec<String> = spec.class_names();
        let only_desc = SupportSpec::from_args(
            &names.iter().map(|n| format!("{n}=")).collect::<Vec<_>>(),
            &a.describe,
        )?;
        let map = only_desc
            .classes
            .into_iter()
            .filter_map(|c| c.description.map(|d| (c.name, d)))
            .collect();
        spec.apply_descriptions(map)?;
    }
    let pipeline = load_pipeline(models, opts)?;
    let clf = pipeline.synthesize_spec(&spec, a.mode.into())?;
    clf.save(&a.out)?;
    println!(
        "synthesized classifier {} ({}, {} classes) -> {}",
        clf.id,
        clf.mode,
        clf.num_classes(),
        a.out.display()
    );
    for (c, shots) in clf.classes.iter().zip(&clf.shots) {
        println!(
            "  {:<28} {:>2} image(s){}",
            c.name,
            shots,
            if c.description.is_some() {
                " + description"
            } else {
                ""
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Expand folders into their image files (sorted); keep files as given.
fn expand_inputs(inputs: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|f| f.is_file() && has_image_extension(f))
                .collect();
            files.sort();
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    out
}

/// `sgps classify`.
pub fn classify(a: &ClassifyArgs, models: &Path, opts: &LoadOptions) -> anyhow::Result<ExitCode> {
    let pipeline = load_pipeline(models, opts)?;
    let clf = pipeline.load_classifier(&a.classifier)?;
    let files = expand_inputs(&a.images);
    let results = pipeline.classify_files(&clf, &files);
    let failed = results.iter().filter(|r| r.is_err()).count();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&classify_json(&clf, &files, &results))?
        );
    } else {
        print!("{}", classify_table(&clf, &files, &results));
    }
    if failed > 0 {
        eprintln!(
            "{failed} of {} image(s) could not be classified",
            files.len()
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

type Results = [sgps::error::Result<sgps::classifier::Prediction>];

/// JSON report of a classify run.
pub fn classify_json(clf: &Classifier, files: &[PathBuf], results: &Results) -> serde_json::Value {
    let rows: Vec<_> = files
        .iter()
        .zip(results)
        .map(|(f, r)| match r {
            Ok(p) => json!({
                "file": f.display().to_string(),
                "top_label": p.top_label,
                "confidence": p.confidence,
                "refer": p.refer,
                "probabilities": clf.classes.iter().zip(&p.probabilities)
                    .map(|(c, p)| (c.name.clone(), json!(p)))
                    .collect::<serde_json::Map<_, _>>(),
            }),
            Err(e) => json!({"file": f.display().to_string(), "error": e.to_string()}),
        })
        .collect();
    json!({
        "classifier": {
            "id": clf.id,
            "classes": clf.class_names(),
            "refer_threshold": clf.refer_threshold,
            "mode": clf.mode,
        },
        "results": rows,
    })
}

/// Human-readable table of a classify run.
pub fn classify_table(clf: &Classifier, files: &[PathBuf], results: &Results) -> String {
    use std::fmt::Write;
    let fw = files
        .iter()
        .map(|f| f.display().to_string().len())
        .max()
        .unwrap_or(4)
        .max(4);
    let cw = clf
        .classes
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "classifier {} ({} classes, refer below {:.0}%)",
        clf.id,
        clf.num_classes(),
        clf.refer_threshold * 100.0
    );
    let _ = writeln!(
        s,
        "{:<fw$}  {:<cw$}  {:>10}  verdict",
        "file", "class", "confidence"
    );
    for (f, r) in files.iter().zip(results) {
        let name = f.display().to_string();
        match r {
            Ok(p) => {
                let _ = writeln!(
                    s,
                    "{name:<fw$}  {:<cw$}  {:>9.1}%  {}",
                    p.top_label,
                    p.confidence * 100.0,
                    if p.refer { "REFER" } else { "ok" }
                );
            }
            Err(e) => {
                let _ = writeln!(s, "{name:<fw$}  ERROR: {e}");
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use sgps::classifier::{ClassInfo, Prediction};
    use sgps::error::Error;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("sgps").chain(args.iter().copied()))
    }

    #[test]
    fn parses_synth_and_classify() {
        let c = parse(&[
            "--models",
            "m",
            "synth",
            "--class",
            "a=x.jpg,y.jpg",
            "--class",
            "b=",
            "--describe",
            "b=text",
            "--mode",
            "text-only",
            "-o",
            "out.sgpc",
        ])
        .unwrap();
        assert_eq!(c.models_dir(), PathBuf::from("m"));
        let Command::Synth(s) = c.command else {
            panic!("not synth")
        };
        assert_eq!(s.class, ["a=x.jpg,y.jpg", "b="]);
        assert_eq!(s.mode, ModeArg::TextOnly);
        assert_eq!(s.out, PathBuf::from("out.sgpc"));
        // folder and --class are exclusive; classify needs images
        assert!(parse(&["synth", "dir", "--class", "a=x"]).is_err());
        assert!(parse(&["classify", "-c", "c.sgpc"]).is_err());
        let c = parse(&[
            "classify",
            "-c",
            "c.sgpc",
            "a.jpg",
            "b.png",
            "--json",
            "--threads",
            "2",
        ])
        .unwrap();
        assert_eq!(c.load_options().threads, Some(2));
        let Command::Classify(a) = c.command else {
            panic!("not classify")
        };
        assert!(a.json);
        assert_eq!(a.images.len(), 2);
    }

    #[test]
    fn reports_list_every_file_and_name_failures() {
        let mut clf = Classifier {
            classes: vec![
                ClassInfo {
                    name: "ak".into(),
                    description: None,
                },
                ClassInfo {
                    name: "df".into(),
                    description: None,
                },
            ],
            weight: vec![vec![1.0], vec![-1.0]],
            bias: vec![0.0, 0.0],
            scale: 1.0,
            refer_threshold: 0.5,
            encoder_sha256: "e".into(),
            text_encoder_sha256: String::new(),
            synthesizer_sha256: String::new(),
            manifest_format: 1,
            mode: "images".into(),
            shots: vec![1, 1],
            created_at_unix: 0,
            id: String::new(),
        };
        clf.refresh_id();
        let files = vec![PathBuf::from("a.jpg"), PathBuf::from("bad.jpg")];
        let results = vec![
            Ok(Prediction {
                probabilities: vec![0.4, 0.6],
                top: 1,
                top_label: "df".into(),
                confidence: 0.6,
                refer: false,
            }),
            Err(Error::Invalid("boom".into())),
        ];
        let t = classify_table(&clf, &files, &results);
        assert!(
            t.contains("a.jpg") && t.contains("df") && t.contains("60.0%"),
            "{t}"
        );
        assert!(
            t.contains("bad.jpg") && t.contains("ERROR") && t.contains("boom"),
            "{t}"
        );
        let j = classify_json(&clf, &files, &results);
        assert_eq!(
            j["results"][0]["probabilities"]["ak"],
            serde_json::json!(0.4f32)
        );
        assert_eq!(j["results"][1]["file"], "bad.jpg");
        assert!(j["results"][1]["error"].as_str().unwrap().contains("boom"));
        assert_eq!(j["classifier"]["classes"][1], "df");
    }
}
