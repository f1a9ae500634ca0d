//! Cameras: a trait, a replay implementation (directory of frames, with injectable faults) and a
//! V4L2 implementation (feature `v4l2`).

pub mod replay;
#[cfg(all(feature = "v4l2", target_os = "linux"))]
pub mod v4l2;
#[cfg(all(feature = "v4l2", target_os = "linux"))]
mod v4l2_sys;

use std::time::Duration;

use image::RgbImage;

pub use replay::{Fault, ReplayCamera};

/// Why a capture failed. Every variant is recoverable by retrying except `Exhausted`.
#[derive(Debug, thiserror::Error)]
pub enum CameraError {
    #[error(
        "camera {device}: no frame within {after:?}; check the cable and that no other program uses the camera"
    )]
    Timeout { device: String, after: Duration },
    #[error("camera {device} is disconnected ({reason}); plug it back in, capture will resume")]
    Disconnected { device: String, reason: String },
    #[error("camera {device} delivered a corrupt frame ({reason}); capture again")]
    Corrupt { device: String, reason: String },
    #[error("camera {device} cannot be configured: {reason}")]
    Config { device: String, reason: String },
    #[error("replay camera {device} has no more frames")]
    Exhausted { device: String },
}

impl CameraError {
    /// True when retrying later can succeed.
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            CameraError::Exhausted { .. } | CameraError::Config { .. }
        )
    }
}

/// A source of RGB frames.
pub trait Camera {
    /// Capture one frame, waiting at most the configured time-out.
    fn capture(&mut self) -> Result<RgbImage, CameraError>;
    /// Human-readable name (device path or directory) for logs.
    fn describe(&self) -> String;
}

/// Decode an encoded frame (JPEG, PNG, BMP) into RGB with the same bounded decoder the CLI
/// pipeline uses (`image_io::decode_rgb`), so a replayed file gives exactly the pixels that
/// `Pipeline::embed_image_file` sees.
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage, String> {
    crate::image_io::decode_rgb(bytes, std::path::Path::new("frame")).map_err(|e| e.to_string())
}
