//! The few V4L2 structures and ioctls the camera uses, declared from the kernel's UAPI header
//! `<linux/videodev2.h>` (stable ABI), so building needs no bindgen / libclang. Layouts are the
//! 64-bit ones (x86_64, aarch64: the boards); compile-time size checks guard them.

#![allow(non_camel_case_types)]

use std::io;
use std::os::fd::RawFd;

pub const V4L2_BUF_TYPE_VIDEO_CAPTURE: u32 = 1;
pub const V4L2_MEMORY_MMAP: u32 = 1;
pub const V4L2_FIELD_ANY: u32 = 0;
pub const V4L2_CAP_VIDEO_CAPTURE: u32 = 0x0000_0001;
pub const V4L2_CAP_STREAMING: u32 = 0x0400_0000;
pub const V4L2_CAP_DEVICE_CAPS: u32 = 0x8000_0000;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct v4l2_capability {
    pub driver: [u8; 16],
    pub card: [u8; 32],
    pub bus_info: [u8; 32],
    pub version: u32,
    pub capabilities: u32,
    pub device_caps: u32,
    pub reserved: [u32; 3],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct v4l2_fmtdesc {
    pub index: u32,
    pub type_: u32,
    pub flags: u32,
    pub description: [u8; 32],
    pub pixelformat: u32,
    pub mbus_code: u32,
    pub reserved: [u32; 3],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct v4l2_pix_format {
    pub width: u32,
    pub height: u32,
    pub pixelformat: u32,
    pub field: u32,
    pub bytesperline: u32,
    pub sizeimage: u32,
    pub colorspace: u32,
    pub priv_: u32,
    pub flags: u32,
    pub ycbcr_enc: u32,
    pub quantization: u32,
    pub xfer_func: u32,
}

/// `struct v4l2_format`: the 200-byte union holds pointer-carrying members (`v4l2_window`), so
/// it is 8-byte aligned on 64-bit targets and starts at offset 8.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct v4l2_format {
    pub type_: u32,
    pub fmt: v4l2_format_union,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub union v4l2_format_union {
    pub pix: v4l2_pix_format,
    pub raw_data: [u8; 200],
    _align: [u64; 25],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct v4l2_requestbuffers {
    pub count: u32,
    pub type_: u32,
    pub memory: u32,
    pub capabilities: u32,
    pub flags: u8,
    pub reserved: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct v4l2_timecode {
    pub type_: u32,
    pub flags: u32,
    pub frames: u8,
    pub seconds: u8,
    pub minutes: u8,
    pub hours: u8,
    pub userbits: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct timeval {
    pub tv_sec: i64,
    pub tv_usec: i64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub union v4l2_buffer_m {
    pub offset: u32,
    pub userptr: u64,
    pub fd: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct v4l2_buffer {
    pub index: u32,
    pub type_: u32,
    pub bytesused: u32,
    pub flags: u32,
    pub field: u32,
    pub timestamp: timeval,
    pub timecode: v4l2_timecode,
    pub sequence: u32,
    pub memory: u32,
    pub m: v4l2_buffer_m,
    pub length: u32,
    pub reserved2: u32,
    pub request_fd: i32,
}

// The ABI sizes from <linux/videodev2.h> on LP64 targets; a mismatch would corrupt memory.
#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(size_of::<v4l2_capability>() == 104);
    assert!(size_of::<v4l2_fmtdesc>() == 64);
    assert!(size_of::<v4l2_format>() == 208);
    assert!(size_of::<v4l2_requestbuffers>() == 20);
    assert!(size_of::<v4l2_buffer>() == 88);
    assert!(std::mem::offset_of!(v4l2_buffer, timestamp) == 24);
    assert!(std::mem::offset_of!(v4l2_buffer, m) == 64);
};
#[cfg(not(target_pointer_width = "64"))]
compile_error!("the V4L2 declarations are for 64-bit targets (the supported boards are aarch64)");

/// Kernel `_IOC(dir, 'V', nr, size)`.
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((b'V' as u64) << 8) | nr
}
const W: u64 = 1;
const R: u64 = 2;

pub const VIDIOC_QUERYCAP: u64 = ioc(R, 0, size_of::<v4l2_capability>());
pub const VIDIOC_ENUM_FMT: u64 = ioc(R | W, 2, size_of::<v4l2_fmtdesc>());
pub const VIDIOC_S_FMT: u64 = ioc(R | W, 5, size_of::<v4l2_format>());
pub const VIDIOC_REQBUFS: u64 = ioc(R | W, 8, size_of::<v4l2_requestbuffers>());
pub const VIDIOC_QUERYBUF: u64 = ioc(R | W, 9, size_of::<v4l2_buffer>());
pub const VIDIOC_QBUF: u64 = ioc(R | W, 15, size_of::<v4l2_buffer>());
pub const VIDIOC_DQBUF: u64 = ioc(R | W, 17, size_of::<v4l2_buffer>());
pub const VIDIOC_STREAMON: u64 = ioc(W, 18, size_of::<i32>());
pub const VIDIOC_STREAMOFF: u64 = ioc(W, 19, size_of::<i32>());

/// An all-zero value of a plain-old-data V4L2 struct (what the kernel API expects before filling).
pub fn zeroed<T: Copy>() -> T {
    // SAFETY: only used with the repr(C) integer/array structs above, for which zero is valid.
    unsafe { std::mem::zeroed() }
}

/// `ioctl(fd, request, arg)`, retried on EINTR.
///
/// # Safety
/// `T` must be the type the kernel expects for `request`.
pub unsafe fn ioctl<T>(fd: RawFd, request: u64, arg: &mut T) -> io::Result<()> {
    loop {
        // SAFETY: the caller pairs `request` with its argument type; `arg` is a valid pointer.
        let r = unsafe { libc::ioctl(fd, request as _, arg as *mut T) };
        if r != -1 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

pub fn fourcc(code: &[u8; 4]) -> u32 {
    u32::from_le_bytes(*code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        // values of the macros in <linux/videodev2.h> on x86_64 / aarch64
        assert_eq!(VIDIOC_QUERYCAP, 0x8068_5600);
        assert_eq!(VIDIOC_ENUM_FMT, 0xc040_5602);
        assert_eq!(VIDIOC_S_FMT, 0xc0d0_5605);
        assert_eq!(VIDIOC_REQBUFS, 0xc014_5608);
        assert_eq!(VIDIOC_QUERYBUF, 0xc058_5609);
        assert_eq!(VIDIOC_QBUF, 0xc058_560f);
        assert_eq!(VIDIOC_DQBUF, 0xc058_5611);
        assert_eq!(VIDIOC_STREAMON, 0x4004_5612);
        assert_eq!(VIDIOC_STREAMOFF, 0x4004_5613);
        assert_eq!(fourcc(b"MJPG"), 0x4750_4a4d);
    }
}
