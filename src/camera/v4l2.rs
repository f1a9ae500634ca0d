//! V4L2 camera (USB dermatoscopes, CSI cameras exposed as V4L2), through the kernel's ioctls
//! declared in `v4l2_sys` (no bindgen, so no libclang at build time).
//!
//! Opens the device by path, negotiates MJPEG or YUYV at the profile's resolution, streams with
//! mmap buffers, converts frames to RGB, times out cleanly and re-opens the device with
//! exponential back-off after it disappears (unplug / replug).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use image::RgbImage;

use super::v4l2_sys as sys;
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

    /// How people write the format.
    pub fn name(self) -> &'static str {
        match self {
            PixelFormat::Mjpeg => "MJPEG",
            PixelFormat::Yuyv => "YUYV",
            PixelFormat::Auto => "MJPEG or YUYV",
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
    stream: Stream,
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
        let gone = |e: io::Error| CameraError::Disconnected {
            device: device.clone(),
            reason: e.to_string(),
        };
        let config = |reason: String| CameraError::Config {
            device: device.clone(),
            reason,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&self.path)
            .map_err(gone)?;
        let fd = file.as_raw_fd();
        let mut cap: sys::v4l2_capability = sys::zeroed();
        // SAFETY: VIDIOC_QUERYCAP takes a v4l2_capability.
        unsafe { sys::ioctl(fd, sys::VIDIOC_QUERYCAP, &mut cap) }
            .map_err(|e| config(format!("not a V4L2 device ({e})")))?;
        let caps = if cap.capabilities & sys::V4L2_CAP_DEVICE_CAPS != 0 {
            cap.device_caps
        } else {
            cap.capabilities
        };
        let need = sys::V4L2_CAP_VIDEO_CAPTURE | sys::V4L2_CAP_STREAMING;
        if caps & need != need {
            return Err(config(format!(
                "{:?} is not a streaming capture device (capabilities {caps:#x}); point camera.device at the camera's capture node",
                String::from_utf8_lossy(cap.card.split(|b| *b == 0).next().unwrap_or(&[]))
            )));
        }
        let offered = enum_formats(fd).map_err(gone)?;
        let mut chosen = None;
        for want in self.format.candidates() {
            if !offered.contains(want) {
                continue;
            }
            let mut fmt: sys::v4l2_format = sys::zeroed();
            fmt.type_ = sys::V4L2_BUF_TYPE_VIDEO_CAPTURE;
            fmt.fmt.pix = sys::v4l2_pix_format {
                width: self.width,
                height: self.height,
                pixelformat: sys::fourcc(want),
                field: sys::V4L2_FIELD_ANY,
                ..sys::zeroed()
            };
            // SAFETY: VIDIOC_S_FMT takes a v4l2_format.
            unsafe { sys::ioctl(fd, sys::VIDIOC_S_FMT, &mut fmt) }.map_err(|e| {
                config(format!(
                    "setting {} failed: {e}",
                    String::from_utf8_lossy(*want)
                ))
            })?;
            // SAFETY: the driver filled the `pix` member for a capture type.
            let pix = unsafe { fmt.fmt.pix };
            if pix.pixelformat == sys::fourcc(want) {
                chosen = Some((**want, pix));
                break;
            }
        }
        let (fourcc, pix) = chosen.ok_or_else(|| {
            let shown: Vec<String> = offered.iter().take(12).map(fourcc_name).collect();
            let more = offered.len().saturating_sub(shown.len());
            config(format!(
                "the camera does not offer {} (it offers {}{}); sgps reads MJPEG and YUYV: set camera.format to one it offers, or \"auto\"",
                self.format.name(),
                shown.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            ))
        })?;
        if (pix.width, pix.height) != (self.width, self.height) {
            log::warn!(
                "camera {device}: asked for {}x{}, driver gave {}x{}",
                self.width,
                self.height,
                pix.width,
                pix.height
            );
        }
        let stream = Stream::start(file, BUFFERS, self.timeout).map_err(gone)?;
        log::info!(
            "camera {device}: streaming {} {}x{}",
            String::from_utf8_lossy(&fourcc),
            pix.width,
            pix.height
        );
        Ok(Open {
            stream,
            fourcc,
            width: pix.width,
            height: pix.height,
            stride: pix.bytesperline,
            fresh: true,
        })
    }
}

/// The pixel formats the capture node offers (VIDIOC_ENUM_FMT until EINVAL).
/// A fourcc for people: printable characters, `?` for others, `-BE` for the big-endian flag.
pub fn fourcc_name(f: &[u8; 4]) -> String {
    let be = f[3] & 0x80 != 0;
    let mut b = *f;
    b[3] &= 0x7f;
    let s: String = b
        .iter()
        .map(|&c| if c.is_ascii_graphic() { c as char } else { '?' })
        .collect::<String>()
        .trim_end_matches('?')
        .to_string();
    if be { format!("{s}-BE") } else { s }
}

fn enum_formats(fd: i32) -> io::Result<Vec<[u8; 4]>> {
    let mut out = Vec::new();
    for index in 0..64 {
        let mut d: sys::v4l2_fmtdesc = sys::zeroed();
        d.index = index;
        d.type_ = sys::V4L2_BUF_TYPE_VIDEO_CAPTURE;
        // SAFETY: VIDIOC_ENUM_FMT takes a v4l2_fmtdesc.
        match unsafe { sys::ioctl(fd, sys::VIDIOC_ENUM_FMT, &mut d) } {
            Ok(()) => out.push(d.pixelformat.to_le_bytes()),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// One driver buffer mapped into our address space.
struct Mapped {
    ptr: *mut libc::c_void,
    len: usize,
}

/// A streaming capture: mmap buffers queued with the driver. Dropping it stops streaming,
/// unmaps the buffers and closes the device.
struct Stream {
    buffers: Vec<Mapped>,
    timeout: Duration,
    file: File,
}

impl Stream {
    fn start(file: File, count: u32, timeout: Duration) -> io::Result<Stream> {
        let fd = file.as_raw_fd();
        let mut req = sys::v4l2_requestbuffers {
            count,
            type_: sys::V4L2_BUF_TYPE_VIDEO_CAPTURE,
            memory: sys::V4L2_MEMORY_MMAP,
            ..sys::zeroed()
        };
        // SAFETY: VIDIOC_REQBUFS takes a v4l2_requestbuffers.
        unsafe { sys::ioctl(fd, sys::VIDIOC_REQBUFS, &mut req) }?;
        if req.count == 0 {
            return Err(io::Error::other("the driver granted no capture buffers"));
        }
        let mut stream = Stream {
            buffers: Vec::with_capacity(req.count as usize),
            timeout,
            file,
        };
        for index in 0..req.count {
            let mut buf = Self::buffer(index);
            // SAFETY: VIDIOC_QUERYBUF takes a v4l2_buffer.
            unsafe { sys::ioctl(fd, sys::VIDIOC_QUERYBUF, &mut buf) }?;
            let len = buf.length as usize;
            // SAFETY: maps the driver's buffer `index` at the offset it gave; checked below.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    buf.m.offset as libc::off_t,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            stream.buffers.push(Mapped { ptr, len });
            // SAFETY: VIDIOC_QBUF takes a v4l2_buffer.
            unsafe { sys::ioctl(fd, sys::VIDIOC_QBUF, &mut buf) }?;
        }
        let mut kind = sys::V4L2_BUF_TYPE_VIDEO_CAPTURE as i32;
        // SAFETY: VIDIOC_STREAMON takes an int (the buffer type).
        unsafe { sys::ioctl(fd, sys::VIDIOC_STREAMON, &mut kind) }?;
        Ok(stream)
    }

    fn buffer(index: u32) -> sys::v4l2_buffer {
        sys::v4l2_buffer {
            index,
            type_: sys::V4L2_BUF_TYPE_VIDEO_CAPTURE,
            memory: sys::V4L2_MEMORY_MMAP,
            ..sys::zeroed()
        }
    }

    /// Wait for the next filled buffer (at most the time-out), copy it out and re-queue it.
    fn next(&mut self) -> io::Result<Vec<u8>> {
        let fd = self.file.as_raw_fd();
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let deadline = Instant::now() + self.timeout;
        let mut buf;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r == 0 {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no frame"));
            }
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the device went away",
                ));
            }
            buf = Self::buffer(0);
            // SAFETY: VIDIOC_DQBUF takes a v4l2_buffer.
            match unsafe { sys::ioctl(fd, sys::VIDIOC_DQBUF, &mut buf) } {
                Ok(()) => break,
                // readable but nothing to dequeue yet (O_NONBLOCK): wait again
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        let m = self.buffers.get(buf.index as usize).ok_or_else(|| {
            io::Error::other(format!("driver returned unknown buffer {}", buf.index))
        })?;
        let used = (buf.bytesused as usize).min(m.len);
        let used = if used == 0 { m.len } else { used };
        // SAFETY: the mapping is `m.len` bytes long and the driver has handed it back to us.
        let frame = unsafe { std::slice::from_raw_parts(m.ptr as *const u8, used) }.to_vec();
        // SAFETY: VIDIOC_QBUF takes a v4l2_buffer (the one just dequeued).
        unsafe { sys::ioctl(fd, sys::VIDIOC_QBUF, &mut buf) }?;
        Ok(frame)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let mut kind = sys::V4L2_BUF_TYPE_VIDEO_CAPTURE as i32;
        // SAFETY: VIDIOC_STREAMOFF takes an int; errors (device gone) are irrelevant here.
        let _ = unsafe { sys::ioctl(self.file.as_raw_fd(), sys::VIDIOC_STREAMOFF, &mut kind) };
        for m in &self.buffers {
            // SAFETY: unmapping exactly what `start` mapped.
            unsafe { libc::munmap(m.ptr, m.len) };
        }
        // `file` closes the device after this.
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
            result = o.stream.next();
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
    fn fourccs_are_named_for_people() {
        assert_eq!(fourcc_name(b"YUYV"), "YUYV");
        assert_eq!(fourcc_name(b"Y10 "), "Y10");
        assert_eq!(fourcc_name(b"Y16\xa0"), "Y16-BE");
        assert_eq!(fourcc_name(&[0xff, b'A', 0, 0]), "?A");
    }

    #[test]
    fn yuyv_grey_white_black() {
        // 2x1: Y=16 (black) and Y=235 (white), neutral chroma
        let img = yuyv_to_rgb(&[16, 128, 235, 128], 2, 1, 0).unwrap();
        assert_eq!(img.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(img.get_pixel(1, 0).0, [255, 255, 255]);
        assert!(yuyv_to_rgb(&[0; 3], 2, 1, 0).is_none());
    }

    fn camera(path: &str) -> V4l2Camera {
        V4l2Camera::new(
            Path::new(path),
            PixelFormat::Auto,
            640,
            480,
            Duration::from_millis(10),
        )
    }

    #[test]
    fn missing_device_is_disconnected_and_backs_off() {
        let mut c = camera("/dev/video-does-not-exist");
        let e = c.capture().unwrap_err();
        assert!(matches!(e, CameraError::Disconnected { .. }), "{e}");
        assert!(c.backoff > MIN_BACKOFF);
        assert!(PixelFormat::parse("h264").is_err());
    }

    #[test]
    fn a_file_that_is_not_a_camera_is_a_config_error() {
        // /dev/null opens but answers VIDIOC_QUERYCAP with ENOTTY: not transient, say so
        let mut c = camera("/dev/null");
        let e = c.capture().unwrap_err();
        assert!(matches!(e, CameraError::Config { .. }), "{e}");
        assert!(e.to_string().contains("not a V4L2 device"), "{e}");
        assert!(!e.is_transient());
    }
}
