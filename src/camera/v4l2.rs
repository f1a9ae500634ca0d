//! V4L2 camera (USB dermatoscopes, CSI cameras exposed as V4L2) through the `v4l` crate.
//!
//! Opens the device by path, negotiates MJPEG or YUYV at the profile's resolution, streams with
//! mmap buffers, converts frames to RGB, times out cleanly and re-opens the device with
//! exponential back-off after it disappears (unplug / replug).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use image::RgbImage;
use v4l::buffer::Type;
use v4l::io::mmap::Stream;
use v4l::io::traits::CaptureStream;
use v4l::video::Capture;
use v4l::{Device, Format, FourCC};

use super::{Camera, CameraError, decode_rgb};

/// Pixel format preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    Mjpeg,
    Yuyv,
    /// MJPEG if the camera offers it, else YUYV.
    Auto,
}

impl PixelFormat {
    pub fn parse(s: &str) -> Result<PixelFormat, String> {
        match s.to_ascii_lowercase().as_str() {
            "mjpeg" | "mjpg" => Ok(PixelFormat::Mjpeg),
            "yuyv" => Ok(PixelFormat::Yuyv),
            "auto" => Ok(PixelFormat::Auto),
            o => Err(format!(
                "unknown camera format {o:?}: use mjpeg, yuyv or auto"
            )),
        }
    }

    fn candidates(self) -> &'static [&'static [u8; 4]] {
        match self {
            PixelFormat::Mjpeg => &[b"MJPG"],
            PixelFormat::Yuyv => &[b"YUYV"],
            PixelFormat::Auto => &[b"MJPG", b"YUYV"],
        }
    }
}

struct Open {
    // field order matters: the stream must be dropped before the device
    stream: Stream<'static>,
    _dev: Device,
    fourcc: [u8; 4],
    width: u32,
    height: u32,
    stride: u32,
    /// No frame taken since opening.
    fresh: bool,
}

/// Capture buffers queued with the driver.
const BUFFERS: u32 = 4;
/// Frames dropped after opening (auto exposure / white balance settling).
const WARMUP_FRAMES: usize = 5;

/// A V4L2 capture device.
pub struct V4l2Camera {
    path: PathBuf,
    format: PixelFormat,
    width: u32,
    height: u32,
    timeout: Duration,
    open: Option<Open>,
    backoff: Duration,
    next_attempt: Instant,
}

const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl V4l2Camera {
    /// Create the camera; the device is opened on first capture (and re-opened after errors),
    /// so a camera plugged in after start-up is picked up.
    pub fn new(
        path: &Path,
        format: PixelFormat,
        width: u32,
        height: u32,
        timeout: Duration,
    ) -> V4l2Camera {
        V4l2Camera {
            path: path.to_owned(),
            format,
            width,
            height,
            timeout,
            open: None,
            backoff: MIN_BACKOFF,
            next_attempt: Instant::now(),
        }
    }

    fn device(&self) -> String {
        self.path.display().to_string()
    }

    fn try_open(&self) -> Result<Open, CameraError> {
        let device = self.device();
        let dev = Device::with_path(&self.path).map_err(|e| CameraError::Disconnected {
            device: device.clone(),
            reason: e.to_string(),
        })?;
        let offered: Vec<[u8; 4]> = dev
            .enum_formats()
            .map_err(|e| CameraError::Disconnected {
                device: device.clone(),
                reason: e.to_string(),
            })?
            .into_iter()
            .map(|d| d.fourcc.repr)
            .collect();
        let mut chosen = None;
        for want in self.format.candidates() {
            if !offered.contains(want) {
                continue;
            }
            let fmt = dev
                .set_format(&Format::new(self.width, self.height, FourCC::new(want)))
                .map_err(|e| CameraError::Config {
                    device: device.clone(),
                    reason: e.to_string(),
                })?;
            if fmt.fourcc.repr == **want {
                chosen = Some(fmt);
                break;
            }
        }
        let fmt = chosen.ok_or_else(|| CameraError::Config {
            device: device.clone(),
            reason: format!(
                "camera offers {:?}, none of the requested {:?}; set camera.format in the board profile",
                offered.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect::<Vec<_>>(),
                self.format
            ),
        })?;
        if (fmt.width, fmt.height) != (self.width, self.height) {
            log::warn!(
                "camera {device}: asked for {}x{}, driver gave {}x{}",
                self.width,
                self.height,
                fmt.width,
                fmt.height
            );
        }
        let mut stream = Stream::with_buffers(&dev, Type::VideoCapture, BUFFERS).map_err(|e| {
            CameraError::Disconnected {
                device: device.clone(),
                reason: e.to_string(),
            }
        })?;
        stream.set_timeout(self.timeout);
        log::info!(
            "camera {device}: streaming {} {}x{}",
            String::from_utf8_lossy(&fmt.fourcc.repr),
            fmt.width,
            fmt.height
        );
        Ok(Open {
            stream,
            _dev: dev,
            fourcc: fmt.fourcc.repr,
            width: fmt.width,
            height: fmt.height,
            stride: fmt.stride,
            fresh: true,
        })
    }
}

impl Camera for V4l2Camera {
    fn capture(&mut self) -> Result<RgbImage, CameraError> {
        let device = self.device();
        if self.open.is_none() {
            let now = Instant::now();
            if now < self.next_attempt {
                std::thread::sleep((self.next_attempt - now).min(self.timeout));
            }
            match self.try_open() {
                Ok(o) => {
                    self.open = Some(o);
                    self.backoff = MIN_BACKOFF;
                }
                Err(e) => {
                    self.next_attempt = Instant::now() + self.backoff;
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                    return Err(e);
                }
            }
        }
        let o = self.open.as_mut().expect("opened above");
        let (fourcc, w, h, stride) = (o.fourcc, o.width, o.height, o.stride);
        // The driver keeps filling the queued buffers while nobody reads: the first BUFFERS
        // frames dequeued after a pause are stale (or, right after opening, still adjusting
        // exposure). Drop them so that a button press gets a frame taken after the press.
        let skip = if o.fresh {
            WARMUP_FRAMES
        } else {
            BUFFERS as usize
        };
        o.fresh = false;
        let mut result = Ok(Vec::new());
        for _ in 0..=skip {
            result = match o.stream.next() {
                Ok((buf, meta)) => {
                    let used = (meta.bytesused as usize).min(buf.len());
                    let used = if used == 0 { buf.len() } else { used };
                    Ok(buf[..used].to_vec())
                }
                Err(e) => Err(e),
            };
            if result.is_err() {
                break;
            }
        }
        let frame = match result {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                // drop the stream: some drivers stall until re-opened
                self.open = None;
                return Err(CameraError::Timeout {
                    device,
                    after: self.timeout,
                });
            }
            Err(e) => {
                self.open = None;
                self.next_attempt = Instant::now() + self.backoff;
                return Err(CameraError::Disconnected {
                    device,
                    reason: e.to_string(),
                });
            }
        };
        match &fourcc {
            b"MJPG" => decode_rgb(&frame).map_err(|reason| CameraError::Corrupt { device, reason }),
            b"YUYV" => yuyv_to_rgb(&frame, w, h, stride).ok_or_else(|| CameraError::Corrupt {
                device,
                reason: format!(
                    "YUYV frame of {} bytes is too short for {w}x{h}",
                    frame.len()
                ),
            }),
            other => Err(CameraError::Config {
                device,
                reason: format!("unsupported fourcc {other:?}"),
            }),
        }
    }

    fn describe(&self) -> String {
        format!("v4l2:{}", self.path.display())
    }
}

/// Convert packed YUYV 4:2:2 (BT.601, limited range) to RGB. `stride` 0 means `2 * width`.
pub fn yuyv_to_rgb(data: &[u8], width: u32, height: u32, stride: u32) -> Option<RgbImage> {
    let stride = if stride == 0 {
        width as usize * 2
    } else {
        stride as usize
    };
    let (w, h) = (width as usize, height as usize);
    if w == 0 || h == 0 || data.len() < stride * (h - 1) + w * 2 {
        return None;
    }
    let mut out = RgbImage::new(width, height);
    let conv = |y: u8, u: u8, v: u8| -> [u8; 3] {
        let c = y as i32 - 16;
        let d = u as i32 - 128;
        let e = v as i32 - 128;
        let clip = |x: i32| x.clamp(0, 255) as u8;
        [
            clip((298 * c + 409 * e + 128) >> 8),
            clip((298 * c - 100 * d - 208 * e + 128) >> 8),
            clip((298 * c + 516 * d + 128) >> 8),
        ]
    };
    for row in 0..h {
        let line = &data[row * stride..row * stride + w * 2];
        for x in 0..w {
            let pair = x / 2 * 4;
            let y = line[x * 2];
            let u = line[pair + 1];
            let v = *line.get(pair + 3).unwrap_or(&128);
            out.put_pixel(x as u32, row as u32, image::Rgb(conv(y, u, v)));
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yuyv_grey_white_black() {
        // 2x1: Y=16 (black) and Y=235 (white), neutral chroma
        let img = yuyv_to_rgb(&[16, 128, 235, 128], 2, 1, 0).unwrap();
        assert_eq!(img.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(img.get_pixel(1, 0).0, [255, 255, 255]);
        assert!(yuyv_to_rgb(&[0; 3], 2, 1, 0).is_none());
    }

    #[test]
    fn missing_device_is_disconnected_and_backs_off() {
        let mut c = V4l2Camera::new(
            Path::new("/dev/video-does-not-exist"),
            PixelFormat::Auto,
            640,
            480,
            Duration::from_millis(10),
        );
        let e = c.capture().unwrap_err();
        assert!(matches!(e, CameraError::Disconnected { .. }), "{e}");
        assert!(c.backoff > MIN_BACKOFF);
        assert!(PixelFormat::parse("h264").is_err());
    }
}
