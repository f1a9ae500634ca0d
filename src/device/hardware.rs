//! Camera and GPIO built from a board profile.

#[allow(unused_imports)]
use super::*;

/// Build the camera a profile's `[camera]` section describes.
pub fn open_camera(camera: &CameraConfig) -> Result<Box<dyn Camera>> {
    match camera {
        CameraConfig::Replay {
            dir,
            looping,
            timeout_ms,
            faults,
        } => {
            let faults = faults
                .iter()
                .map(|f| Fault::parse(f).map_err(|e| anyhow!(e)))
                .collect::<Result<Vec<_>>>()?;
            let cam = ReplayCamera::open(dir, *looping, Duration::from_millis(*timeout_ms))?
                .with_faults(faults);
            log::info!(
                "replay camera: {} frames from {}",
                cam.frames().len(),
                dir.display()
            );
            Ok(Box::new(cam))
        }
        #[cfg(all(feature = "v4l2", target_os = "linux"))]
        CameraConfig::V4l2 {
            device,
            format,
            width,
            height,
            timeout_ms,
        } => {
            use crate::camera::v4l2::{PixelFormat, V4l2Camera};
            let fmt = PixelFormat::parse(format).map_err(|e| anyhow!(e))?;
            Ok(Box::new(V4l2Camera::new(
                device,
                fmt,
                *width,
                *height,
                Duration::from_millis(*timeout_ms),
            )))
        }
        #[cfg(not(all(feature = "v4l2", target_os = "linux")))]
        CameraConfig::V4l2 { .. } => {
            bail!(
                "this sgps was built without the `v4l2` feature (or not for Linux); rebuild with --features v4l2"
            )
        }
    }
}

/// Build buttons and LEDs; a sim board needs a script.
pub fn open_gpio(
    profile: &BoardProfile,
    script: Option<&Path>,
) -> Result<(Box<dyn ButtonInput + Send>, Box<dyn StatusLeds>)> {
    match &profile.gpio {
        GpioConfig::Sim { timing } => {
            let Some(path) = script else {
                if profile.ui.is_some() {
                    log::info!("board {}: no button script, the screen only", profile.name);
                    let none = SimButtons::from_script("", "(none)", *timing)?;
                    return Ok((Box::new(none), Box::new(SimLeds::default())));
                }
                bail!(
                    "board {} has simulated buttons: pass --script FILE (lines like `press capture`, `long next`, `wait 100`)",
                    profile.name
                )
            };
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading button script {}", path.display()))?;
            let b = SimButtons::from_script(&text, &path.display().to_string(), *timing)?;
            log::info!(
                "button script {}: {} presses",
                path.display(),
                b.remaining()
            );
            Ok((Box::new(b), Box::new(SimLeds::default())))
        }
        #[cfg(target_os = "linux")]
        GpioConfig::Cdev {
            chip,
            capture_line,
            next_line,
            green_line,
            amber_line,
            red_line,
            buttons_active_low,
            leds_active_low,
            timing,
        } => {
            if script.is_some() {
                log::warn!(
                    "--script is ignored: board {} has real buttons",
                    profile.name
                );
            }
            let b = crate::gpio::linux::open_buttons(
                chip,
                *capture_line,
                *next_line,
                *buttons_active_low,
                *timing,
            )?;
            let l = crate::gpio::linux::open_leds(
                chip,
                *green_line,
                *amber_line,
                *red_line,
                *leds_active_low,
            )?;
            Ok((Box::new(b), Box::new(l)))
        }
        #[cfg(not(target_os = "linux"))]
        GpioConfig::Cdev { .. } => bail!("character-device GPIO needs Linux"),
    }
}
