//! Command-line argument structs and dispatch. `main.rs` only parses and calls [`run`].
//!
//! Each subcommand's arguments live in their own struct; the subcommands implemented by other
//! modules (eval, bench, demo, run) own their argument structs in those modules.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;

use crate::classifier::Classifier;
use crate::image_io::has_image_extension;
use crate::pipeline::{LoadOptions, Pipeline, SynthMode, resolve_models_dir};
use crate::support::{SupportSpec, read_descriptions};

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
    Eval(crate::eval::EvalArgs),
    /// Measure latency and peak memory, and compare with onnxruntime.
    Bench(crate::bench::BenchArgs),
    /// Synthesize a classifier for 4 unseen skin-lesion classes and classify held-out images.
    Demo(crate::demo::DemoArgs),
    /// Run the device loop (camera, buttons, LEDs) of a board profile; sim boards take --script.
    Run(crate::app::RunArgs),
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

/// Arguments of `sgps gpio-check`.
#[derive(Debug, Args)]
pub struct GpioCheckArgs {
    /// Board profile (its [gpio] section).
    #[arg(long, value_name = "FILE")]
    pub board: PathBuf,
    /// Stop after this many button events.
    #[arg(long, default_value_t = 4)]
    pub events: usize,
    /// Stop after this many seconds without all events (exit status 1).
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
    /// How long each LED stays lit in the LED test.
    #[arg(long, default_value_t = 500)]
    pub led_ms: u64,
}

/// Arguments of `sgps capture`.
#[derive(Debug, Args)]
pub struct CaptureArgs {
    /// Use the camera and gate of this board profile.
    #[arg(long, value_name = "FILE", conflicts_with = "device")]
    pub board: Option<PathBuf>,
    /// A V4L2 capture device instead, e.g. /dev/video0.
    #[arg(long, value_name = "DEV", required_unless_present = "board")]
    pub device: Option<PathBuf>,
    /// Pixel format for --device: mjpeg, yuyv or auto.
    #[arg(long, default_value = "auto")]
    pub format: String,
    #[arg(long, default_value_t = 640)]
    pub width: u32,
    #[arg(long, default_value_t = 480)]
    pub height: u32,
    /// Per-frame time-out for --device.
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
    /// Frames to capture.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Pause between frames.
    #[arg(long, default_value_t = 0)]
    pub interval_ms: u64,
    /// Attempts per frame on transient errors (time-out, disconnected, corrupt), as the device
    /// loop makes per button press.
    #[arg(long, default_value_t = 4)]
    pub attempts: usize,
    /// Save each frame as PNG here.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Arguments of `sgps report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The device's storage directory (storage_dir of its board profile).
    #[arg(value_name = "DIR", required_unless_present = "board")]
    pub path: Option<PathBuf>,
    /// Take the storage directory from this board profile instead.
    #[arg(long, value_name = "FILE", conflicts_with = "path")]
    pub board: Option<PathBuf>,
    /// Where the report goes (an existing directory).
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
    /// session (since the device last started), today or all.
    #[arg(long, default_value = "all")]
    pub scope: String,
}

/// Arguments of `sgps ui-wait`.
#[derive(Debug, Args)]
pub struct UiWaitArgs {
    /// Board profile with a [ui] section.
    #[arg(long, value_name = "FILE")]
    pub board: PathBuf,
    /// Give up after this many seconds (exit status 1).
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
}

/// Arguments of `sgps audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: AuditCommand,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify every record and the chain; exit status 0 when intact, 1 when not.
    Verify {
        /// The device's storage directory (storage_dir of its board profile) or its audit.log.
        #[arg(value_name = "PATH", required_unless_present = "board")]
        path: Option<PathBuf>,
        /// Take the storage directory from this board profile instead.
        #[arg(long, value_name = "FILE", conflicts_with = "path")]
        board: Option<PathBuf>,
        /// A head hash printed by an earlier check: fail unless that record is still in the log
        /// (shows records removed from the end, which the chain alone cannot).
        #[arg(long, value_name = "SHA256")]
        expect_head: Option<String>,
    },
    /// Copy the whole log (every segment and audit.log) to a directory, e.g. a USB stick, with
    /// an index of SHA-256 sums; the copied segments may then be deleted by the device when the
    /// log reaches its size limit (never before).
    Export {
        /// The device's storage directory (storage_dir of its board profile).
        #[arg(value_name = "DIR", required_unless_present = "board")]
        path: Option<PathBuf>,
        /// Take the storage directory from this board profile instead.
        #[arg(long, value_name = "FILE", conflicts_with = "path")]
        board: Option<PathBuf>,
        /// Where the copies go.
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
    },
}

/// `sgps report`.
pub fn report(a: &ReportArgs) -> anyhow::Result<ExitCode> {
    let dir = audit_target(&a.path, &a.board)?;
    let scope = crate::report::Scope::parse(&a.scope).map_err(anyhow::Error::msg)?;
    let board = match &a.board {
        Some(b) => crate::board::BoardProfile::load(b)?.name,
        None => "device".to_string(),
    };
    let w = crate::report::write(
        &dir,
        &a.to,
        scope,
        &board,
        crate::store::audit::now_unix_ms(),
    )
    .map_err(anyhow::Error::msg)?;
    println!(
        "{} records: {} and {}",
        w.records,
        w.html.display(),
        w.csv.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `sgps capture`: one line per frame (`FRAME`, `RETRY`, `FAILED`); exit status 1 when a frame
/// could not be captured.
pub fn capture(a: &CaptureArgs) -> anyhow::Result<ExitCode> {
    use crate::board::{BoardProfile, CameraConfig};
    let (camera, gate) = match (&a.board, &a.device) {
        (Some(b), _) => {
            let p = BoardProfile::load(b)?;
            (crate::app::open_camera(&p)?, p.gate)
        }
        (None, Some(dev)) => {
            let cfg = CameraConfig::V4l2 {
                device: dev.clone(),
                format: a.format.clone(),
                width: a.width,
                height: a.height,
                timeout_ms: a.timeout_ms,
            };
            let p = BoardProfile {
                camera: cfg,
                ..BoardProfile::parse(SIM_PROFILE_FOR_CAPTURE).map_err(anyhow::Error::msg)?
            };
            p.validate().map_err(anyhow::Error::msg)?;
            (crate::app::open_camera(&p)?, p.gate)
        }
        (None, None) => anyhow::bail!("pass --board FILE or --device /dev/videoN"),
    };
    let mut camera = camera;
    if let Some(d) = &a.out {
        std::fs::create_dir_all(d)?;
    }
    let mut failed = 0;
    for i in 1..=a.count {
        if i > 1 && a.interval_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(a.interval_ms));
        }
        let mut got = None;
        for attempt in 1..=a.attempts.max(1) {
            let t = std::time::Instant::now();
            match camera.capture() {
                Ok(img) => {
                    got = Some((img, t.elapsed()));
                    break;
                }
                Err(e) if e.is_transient() && attempt < a.attempts => {
                    println!("RETRY {i} attempt {attempt}: {e}");
                }
                Err(e) => {
                    println!("FAILED {i}: {e}");
                    break;
                }
            }
        }
        let Some((img, took)) = got else {
            failed += 1;
            continue;
        };
        let sha = crate::store::capture_sha256(&img);
        let verdict = match crate::quality::check(&img, &gate) {
            Ok(_) => "gate=ok".to_string(),
            Err(r) => format!("gate=rejected ({}: {})", r.reason.as_str(), r.message),
        };
        println!(
            "FRAME {i} {}x{} {:.0} ms sha256={} {verdict}",
            img.width(),
            img.height(),
            took.as_secs_f64() * 1000.0,
            hex::encode(&sha[..8])
        );
        if let Some(d) = &a.out {
            let p = d.join(format!("frame-{i:03}.png"));
            img.save(&p)
                .map_err(|e| anyhow::anyhow!("saving {}: {e}", p.display()))?;
        }
    }
    println!(
        "CAPTURE {} of {} frames from {}",
        a.count - failed,
        a.count,
        camera.describe()
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `sgps gpio-check`.
pub fn gpio_check(a: &GpioCheckArgs) -> anyhow::Result<ExitCode> {
    use crate::gpio::{Button, Indication, Press};
    let p = crate::board::BoardProfile::load(&a.board)?;
    let (buttons, mut leds) = crate::app::open_gpio(&p, None)?;
    for ind in [
        Indication::Green,
        Indication::Amber,
        Indication::Red,
        Indication::Off,
    ] {
        leds.show(ind)?;
        println!("LED {ind:?}");
        std::thread::sleep(std::time::Duration::from_millis(a.led_ms));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    crate::app::forward_buttons(buttons, tx);
    println!("READY press the buttons ({} events)", a.events);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(a.timeout_s);
    let mut seen = 0;
    while seen < a.events {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(crate::app::Input::Button(ev)) => {
                seen += 1;
                let ind = match (ev.button, ev.press) {
                    (Button::Capture, Press::Short) => Indication::Green,
                    (Button::Capture, Press::Long) => Indication::Red,
                    (Button::Next, Press::Short) => Indication::Amber,
                    (Button::Next, Press::Long) => Indication::Off,
                };
                leds.show(ind)?;
                println!(
                    "BUTTON {} {} -> LED {ind:?}",
                    format!("{:?}", ev.button).to_lowercase(),
                    format!("{:?}", ev.press).to_lowercase()
                );
            }
            Ok(crate::app::Input::ButtonError(e)) => return Err(e.into()),
            Ok(_) => break,
            Err(_) => {
                println!("TIMEOUT {seen} of {} events in {} s", a.events, a.timeout_s);
                return Ok(ExitCode::from(1));
            }
        }
    }
    println!("GPIO {seen} events");
    Ok(ExitCode::SUCCESS)
}

/// A profile whose camera `sgps capture --device` replaces (gate thresholds at their defaults).
const SIM_PROFILE_FOR_CAPTURE: &str = "name = \"capture\"\nstorage_dir = \"/nonexistent\"\nmodels_dir = \"/nonexistent\"\ntask_file = \"/nonexistent\"\n[camera]\nkind = \"replay\"\ndir = \"/nonexistent\"\n[gpio]\nkind = \"sim\"\n";

/// `sgps ui-wait`.
pub fn ui_wait(a: &UiWaitArgs) -> anyhow::Result<ExitCode> {
    let profile = crate::board::BoardProfile::load(&a.board)?;
    let ui = profile.ui.ok_or_else(|| {
        anyhow::anyhow!(
            "board profile {} has no [ui] section: the device serves no screen",
            a.board.display()
        )
    })?;
    let mut addr = ui.validate().map_err(anyhow::Error::msg)?;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(a.timeout_s);
    loop {
        if std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(1)).is_ok() {
            println!("http://{addr}/");
            return Ok(ExitCode::SUCCESS);
        }
        if std::time::Instant::now() >= deadline {
            eprintln!(
                "sgps does not serve the screen on {addr} after {} s: check `systemctl status sgps`",
                a.timeout_s
            );
            return Ok(ExitCode::from(1));
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// The storage directory (or log file) named by `path` or by the board profile `board`.
fn audit_target(path: &Option<PathBuf>, board: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    Ok(match (path, board) {
        (Some(p), _) => p.clone(),
        (None, Some(b)) => crate::board::BoardProfile::load(b)?.storage_dir,
        (None, None) => anyhow::bail!("give the storage directory, the audit.log or --board FILE"),
    })
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
        Command::Eval(a) => crate::eval::run(a, &models, &opts).map(|()| ExitCode::SUCCESS),
        Command::Bench(a) => crate::bench::run(a, &models, &opts).map(|()| ExitCode::SUCCESS),
        Command::Demo(a) => crate::demo::run(a, &models, &opts).map(|()| ExitCode::SUCCESS),
        Command::Run(a) => crate::app::run_cli(a, cli.models.as_deref(), &opts),
        Command::Audit(a) => audit(a),
        Command::Report(a) => report(a),
        Command::UiWait(a) => ui_wait(a),
        Command::Capture(a) => capture(a),
        Command::GpioCheck(a) => gpio_check(a),
    }
}

/// `sgps audit verify`.
pub fn audit(a: &AuditArgs) -> anyhow::Result<ExitCode> {
    let (path, board, expect_head) = match &a.command {
        AuditCommand::Verify {
            path,
            board,
            expect_head,
        } => (path, board, expect_head),
        AuditCommand::Export { path, board, to } => {
            let dir = audit_target(path, board)?;
            if !dir.is_dir() {
                anyhow::bail!(
                    "{} is not a storage directory: give the device's storage_dir (or --board FILE)",
                    dir.display()
                );
            }
            let x = crate::store::audit::export(&dir, to)?;
            for (f, sha) in &x.files {
                println!("{sha}  {}", f.display());
            }
            println!(
                "exported {} records in {} files to {}; index {}; {}",
                x.verification.records,
                x.files.len(),
                to.display(),
                x.index.display(),
                if x.verification.is_intact() {
                    "the log is intact"
                } else {
                    "the log is NOT intact: run sgps audit verify"
                }
            );
            return Ok(if x.verification.is_intact() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
    };
    let expect = match expect_head {
        None => None,
        Some(h) => Some(
            hex::decode(h.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| {
                    anyhow::anyhow!("--expect-head {h:?}: expected 64 hex digits (a SHA-256)")
                })?,
        ),
    };
    let target = audit_target(path, board)?;
    let v = crate::store::audit::verify(&target, expect)?;
    let rep = &v.report;
    let time = |ms: u64| {
        jiff::Timestamp::from_millisecond(ms as i64)
            .map(|t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_else(|_| format!("{ms} ms"))
    };
    println!(
        "audit log {} ({} file{})",
        v.path.display(),
        rep.files.len(),
        if rep.files.len() == 1 { "" } else { "s" }
    );
    match (v.first, v.last) {
        (Some((s0, t0)), Some((s1, t1))) => println!(
            "  {} records, #{s0} ({}) .. #{s1} ({})",
            v.records,
            time(t0),
            time(t1)
        ),
        _ => println!("  no records"),
    }
    for (what, n) in v.counts.iter().filter(|(_, n)| *n > 0) {
        println!("  {n:>8}  {what}");
    }
    let (mut damaged, mut breaks) = (0, 0);
    for (file, r) in &rep.files {
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        if r.unchained > 0 {
            println!(
                "  {name}: {} records of format 1 were written before the hash chain: their checksums are checked, their order is not",
                r.unchained
            );
        }
        if r.torn_tail_bytes > 0 {
            println!(
                "  {name}: torn last append, {} bytes after byte {} (power lost while writing; never acknowledged; the device cuts it at its next start)",
                r.torn_tail_bytes, r.valid_len
            );
        }
        for d in &r.damaged {
            println!(
                "  {name}: DAMAGED record at byte {}: {}",
                d.offset, d.reason
            );
        }
        for b in &r.chain_breaks {
            println!(
                "  {name}: CHAIN BROKEN at record #{} (byte {}): {}",
                b.seq, b.offset, b.reason
            );
        }
        damaged += r.damaged.len();
        breaks += r.chain_breaks.len();
    }
    for b in &rep.links {
        println!("  CHAIN BROKEN at record #{}: {}", b.seq, b.reason);
    }
    match v.anchor {
        Some(Some(seq)) => {
            println!("  the expected head is record #{seq}: nothing before it was removed")
        }
        Some(None) => println!(
            "  EXPECTED HEAD NOT FOUND: no record has that hash (records were removed from the end, or this is another log)"
        ),
        None => {}
    }
    if v.is_intact() {
        println!(
            "  intact: every record checks and links to the one before it; head sha256 {}",
            hex::encode(rep.head_sha256().unwrap_or([0; 32]))
        );
        println!(
            "  (note the head hash elsewhere: a later `sgps audit verify --expect-head <hash>` also shows records removed from the end)"
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "  NOT INTACT: {} damaged, {} chain breaks{}. Keep this file as it is (copy it off the device) and report it; the device keeps working and appends after the damage",
            damaged,
            breaks + rep.links.len(),
            if matches!(v.anchor, Some(None)) {
                ", expected head missing"
            } else {
                ""
            }
        );
        Ok(ExitCode::from(1))
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

type Results = [crate::error::Result<crate::classifier::Prediction>];

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
    use crate::classifier::{ClassInfo, Prediction};
    use crate::error::Error;

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
