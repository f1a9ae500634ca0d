//! `sgps run`: profile, task, pipeline, hardware, screen, then the loop (the binary's
//! `cli/run.rs` parses the arguments and prints the summary).

#[allow(unused_imports)]
use super::*;

/// What `sgps run` is asked to do beyond the board profile (the binary's arguments; `None`
/// keeps the profile's value).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Board profile (board/<name>.toml; installed devices: /etc/sgps/board.toml).
    pub board: PathBuf,
    /// Button script for boards with simulated GPIO.
    pub script: Option<PathBuf>,
    /// Overrides the profile's storage directory.
    pub storage_dir: Option<PathBuf>,
    /// Overrides the replay camera's frame directory (replay boards only).
    pub replay_dir: Option<PathBuf>,
    /// Ask on the console (stdin) for the description of each class the task file leaves
    /// without one, when its enrollment starts.
    pub console: bool,
    /// Serve the screen on this address instead of the profile's `[ui] listen`, or `off`.
    pub ui: Option<String>,
    /// Overrides the profile's models directory.
    pub models_dir: Option<PathBuf>,
    /// Overrides the profile's inference threads.
    pub threads: Option<usize>,
    /// Overrides the profile's image-encoder variant.
    pub image_variant: Option<String>,
    /// Overrides the profile's text-encoder variant.
    pub text_variant: Option<String>,
}

/// `sgps run`: load the profile, the task, the pipeline and the hardware, then run the loop.
pub fn run(args: &RunOptions) -> Result<Summary> {
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
            "{}, SHA-256 {}",
            pipeline.text_features_label(),
            pipeline.text_features_sha256()
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
                audit_cache: Default::default(),
                thumbnails: Default::default(),
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
    Ok(summary)
}
