//! `sgps run`: profile, task, pipeline, hardware, screen, then the loop.

#[allow(unused_imports)]
use super::*;

/// Arguments of `sgps run`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunArgs {
    /// Board profile (board/<name>.toml; installed devices: /etc/sgps/board.toml).
    #[arg(long, value_name = "FILE")]
    pub board: PathBuf,
    /// Button script for boards with simulated GPIO (lines: `press capture`, `long next`, `wait 100`).
    #[arg(long, value_name = "FILE")]
    pub script: Option<PathBuf>,
    /// Override the profile's storage directory.
    #[arg(long, value_name = "DIR")]
    pub storage_dir: Option<PathBuf>,
    /// Override the replay camera's frame directory (replay boards only).
    #[arg(long, value_name = "DIR")]
    pub replay_dir: Option<PathBuf>,
    /// Ask on the console (stdin) for the description of each class the task file leaves
    /// without one, when its enrollment starts.
    #[arg(long)]
    pub console: bool,
    /// Serve the screen on this address instead of the profile's `[ui] listen`
    /// (e.g. 127.0.0.1:0 for any free port), or `off`.
    #[arg(long, value_name = "ADDR|off")]
    pub ui: Option<String>,
    /// Models directory; overrides the profile (the CLI fills it from the global --models).
    #[arg(skip)]
    pub models_dir: Option<PathBuf>,
    /// Inference threads; overrides the profile (the CLI fills it from the global --threads).
    #[arg(skip)]
    pub threads: Option<usize>,
    /// Image-encoder variant; overrides the profile (global --image-variant).
    #[arg(skip)]
    pub image_variant: Option<String>,
    /// Text-encoder variant; overrides the profile (global --text-variant).
    #[arg(skip)]
    pub text_variant: Option<String>,
}

/// `sgps run` from the command line: global flags given explicitly (`--models`, `--threads`,
/// variants) override the board profile; otherwise the profile decides.
pub fn run_cli(
    args: &RunArgs,
    models: Option<&Path>,
    opts: &LoadOptions,
) -> Result<std::process::ExitCode> {
    let mut a = args.clone();
    a.models_dir = models.map(Path::to_path_buf).or(a.models_dir);
    a.threads = opts.threads.or(a.threads);
    a.image_variant = opts.image_variant.clone().or(a.image_variant);
    a.text_variant = opts.text_variant.clone().or(a.text_variant);
    run(&a).map(|_| std::process::ExitCode::SUCCESS)
}

/// `sgps run`: load the profile, the task, the pipeline and the hardware, then run the loop.
pub fn run(args: &RunArgs) -> Result<Summary> {
    let mut profile = BoardProfile::load(&args.board)?;
    if let Some(d) = &args.storage_dir {
        profile.storage_dir = d.clone();
    }
    if let Some(d) = &args.models_dir {
        profile.models_dir = d.clone();
    }
    if let Some(t) = args.threads {
        profile.threads = Some(t);
    }
    if let Some(v) = &args.image_variant {
        profile.image_variant = Some(v.clone());
    }
    if let Some(v) = &args.text_variant {
        profile.text_variant = Some(v.clone());
    }
    if let Some(d) = &args.replay_dir {
        match &mut profile.camera {
            CameraConfig::Replay { dir, .. } => *dir = d.clone(),
            CameraConfig::V4l2 { .. } => {
                bail!("--replay-dir needs a board with a replay camera (e.g. board/sim.toml)")
            }
        }
    }
    log::info!(
        "board {} ({}), storage {}",
        profile.name,
        args.board.display(),
        profile.storage_dir.display()
    );
    let task = profile.load_task()?;
    let pipeline = Pipeline::load(
        &profile.models_dir,
        &LoadOptions {
            image_variant: profile.image_variant.clone(),
            text_variant: profile.text_variant.clone(),
            threads: profile.threads,
        },
    )
    .with_context(|| format!("loading models from {}", profile.models_dir.display()))?;
    let ui = match args.ui.as_deref() {
        Some("off") => None,
        Some(addr) => {
            let mut c = profile.ui.clone().unwrap_or_default();
            c.listen = addr.to_owned();
            c.validate().map_err(|e| anyhow!("--ui {addr}: {e}"))?;
            Some(c)
        }
        None => profile.ui.clone(),
    };
    if ui.is_none() && matches!(profile.gpio, GpioConfig::Sim { .. }) && args.script.is_none() {
        bail!(
            "board {} has simulated buttons and no screen: pass --script FILE (lines like `press capture`, `long next`, `wait 100`) or serve the screen with --ui 127.0.0.1:8080",
            profile.name
        );
    }
    profile.ui = ui.clone();
    let camera = open_camera(&profile.camera)?;
    let (buttons, leds) = open_gpio(&profile, args.script.as_deref())?;
    let info = crate::ui::DeviceInfo {
        board: profile.name.clone(),
        sgps_version: env!("CARGO_PKG_VERSION"),
        models_dir: profile.models_dir.display().to_string(),
        image_encoder: format!("variant {}", pipeline.image_encoder().variant),
        image_encoder_sha256: pipeline.encoder_sha256().to_owned(),
        text_encoder: format!(
            "variant {}, SHA-256 {}",
            pipeline.text_encoder().variant,
            pipeline.text_encoder().sha256
        ),
        synthesizer_sha256: pipeline.manifest().synthesizer.sha256.clone(),
        storage_dir: profile.storage_dir.display().to_string(),
    };
    let storage_dir = profile.storage_dir.clone();
    let mut dev = Device::new(profile, task, &pipeline, camera, leds)?;
    if args.console {
        dev = dev.with_console(Box::new(std::io::BufReader::new(std::io::stdin())));
    }
    let summary = match ui {
        None => {
            let mut buttons = buttons;
            dev.run(buttons.as_mut())?
        }
        Some(cfg) => {
            let (tx, rx) = mpsc::channel();
            let hub = std::sync::Arc::new(crate::ui::Hub::default());
            hub.publish(&dev.snapshot());
            let ctx = crate::ui::Context {
                inputs: tx.clone(),
                hub: hub.clone(),
                storage_dir,
                export_dir: cfg.export_dir.clone(),
                pairing_token: cfg.pairing_token.clone(),
                info,
            };
            match crate::ui::serve(&cfg, ctx) {
                Ok(s) => {
                    println!(
                        "UI http://{}/ (the clinician's screen; open it in a browser)",
                        s.addr
                    );
                    log::info!("screen served on http://{}/", s.addr);
                }
                // the device still works with its buttons; say so loudly
                Err(e) => {
                    log::error!("the screen is not served: {e}");
                    println!("UI unavailable: {e}");
                }
            }
            forward_buttons(buttons, tx);
            // a scripted session ends with its script; otherwise run until stopped
            dev.run_inputs(rx, args.script.is_some(), &|s| hub.publish(s))?
        }
    };
    println!(
        "SESSION shots={} rejected={} camera_errors={} syntheses={} decisions={} classifier={}",
        summary.shots_enrolled,
        summary.rejected,
        summary.camera_errors,
        summary.syntheses,
        summary.decisions.len(),
        summary.classifier_id.as_deref().unwrap_or("-")
    );
    if let Some(h) = summary.audit_head {
        let h = hex::encode(h);
        println!(
            "AUDIT head sha256 {h} (note it: sgps audit verify --expect-head {h} <storage dir> later shows whether records were removed)"
        );
    }
    Ok(summary)
}
