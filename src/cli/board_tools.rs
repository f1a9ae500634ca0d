//! Board bring-up and records: `sgps capture`, `sgps gpio-check`, `sgps ui-wait`, `sgps report`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::audit::audit_target;

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

/// `sgps report`.
pub fn report(a: &ReportArgs) -> anyhow::Result<ExitCode> {
    let dir = audit_target(&a.path, &a.board)?;
    let scope = sgps::report::Scope::parse(&a.scope).map_err(anyhow::Error::msg)?;
    let board = match &a.board {
        Some(b) => sgps::board::BoardProfile::load(b)?.name,
        None => "device".to_string(),
    };
    let w = sgps::report::write(
        &dir,
        &a.to,
        scope,
        &board,
        sgps::store::audit::now_unix_ms(),
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
    use sgps::board::{BoardProfile, CameraConfig};
    let (camera, gate) = match (&a.board, &a.device) {
        (Some(b), _) => {
            let p = BoardProfile::load(b)?;
            (sgps::device::open_camera(&p.camera)?, p.gate)
        }
        (None, Some(dev)) => {
            let cfg = CameraConfig::V4l2 {
                device: dev.clone(),
                format: a.format.clone(),
                width: a.width,
                height: a.height,
                timeout_ms: a.timeout_ms,
            };
            (
                sgps::device::open_camera(&cfg)?,
                sgps::quality::GateThresholds::default(),
            )
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
        let sha = sgps::store::capture_sha256(&img);
        let verdict = match sgps::quality::check(&img, &gate) {
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
    use sgps::gpio::{Button, Indication, Press};
    let p = sgps::board::BoardProfile::load(&a.board)?;
    let (buttons, mut leds) = sgps::device::open_gpio(&p, None)?;
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
    sgps::device::forward_buttons(buttons, tx);
    println!("READY press the buttons ({} events)", a.events);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(a.timeout_s);
    let mut seen = 0;
    while seen < a.events {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(sgps::device::Input::Button(ev)) => {
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
            Ok(sgps::device::Input::ButtonError(e)) => return Err(e.into()),
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

/// `sgps ui-wait`.
pub fn ui_wait(a: &UiWaitArgs) -> anyhow::Result<ExitCode> {
    let profile = sgps::board::BoardProfile::load(&a.board)?;
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
