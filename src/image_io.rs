//! Bounded image decoding: every input becomes an 8-bit RGB image or a clear error naming the file.
//!
//! Files are read with a size cap, their header dimensions are checked before any pixel buffer is
//! allocated, the decoder runs under [`image::Limits`], and grayscale / RGBA / 16-bit inputs are
//! converted to RGB8.

use std::io::{Cursor, Read};
use std::path::Path;

use image::{ImageFormat, ImageReader, Limits, RgbImage};

use crate::error::{Error, Result};

/// Smallest accepted side, in pixels (28: the MedMNIST images of the shared data set).
pub const MIN_SIDE: u32 = 28;
/// Largest accepted side, in pixels.
pub const MAX_SIDE: u32 = 8192;
/// Largest accepted file, in bytes.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// Largest allocation the decoder may make.
pub const MAX_ALLOC_BYTES: u64 = 512 * 1024 * 1024;

/// File extensions (lower case) accepted as images in support folders.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp"];

/// True when the path has one of [`IMAGE_EXTENSIONS`] (case-insensitive).
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// Read and decode an image file into RGB8. The error names the file.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let f = std::fs::File::open(path).map_err(|e| Error::image(path, e))?;
    let mut bytes = Vec::new();
    f.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::image(path, e))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(Error::image(
            path,
            format!("file is larger than {} MiB", MAX_FILE_BYTES >> 20),
        ));
    }
    decode_rgb(&bytes, path)
}

/// Decode encoded image bytes (JPEG, PNG or BMP) into RGB8; `name` is used in errors.
pub fn decode_rgb(bytes: &[u8], name: &Path) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(Error::image(name, "file is empty"));
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::image(name, e))?;
    let format = reader.format().ok_or_else(|| {
        Error::image(
            name,
            "not a recognised image (expected JPEG, PNG or BMP data)",
        )
    })?;
    if format == ImageFormat::Jpeg && !jpeg_has_end_marker(bytes) {
        return Err(Error::image(
            name,
            "JPEG data is truncated (no end-of-image marker)",
        ));
    }
    let (w, h) = ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| Error::image(name, format!("cannot read the image header: {e}")))?;
    check_dimensions(w, h).map_err(|reason| Error::image(name, reason))?;

    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_ALLOC_BYTES);
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| Error::image(name, format!("cannot decode: {e}")))?;
    Ok(img.to_rgb8())
}

/// Accept images whose sides are within [`MIN_SIDE`, `MAX_SIDE`].
pub fn check_dimensions(w: u32, h: u32) -> std::result::Result<(), String> {
    if w < MIN_SIDE || h < MIN_SIDE {
        return Err(format!(
            "image is too small ({w}x{h}); each side must be at least {MIN_SIDE} px"
        ));
    }
    if w > MAX_SIDE || h > MAX_SIDE {
        return Err(format!(
            "image is too large ({w}x{h}); each side must be at most {MAX_SIDE} px"
        ));
    }
    Ok(())
}

/// A complete JPEG ends with the EOI marker FF D9 (some writers append a few padding bytes).
fn jpeg_has_end_marker(bytes: &[u8]) -> bool {
    let tail = &bytes[bytes.len().saturating_sub(64)..];
    tail.windows(2).any(|w| w == [0xFF, 0xD9])
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, ImageBuffer, Luma, Rgba, RgbaImage};

    fn encode(img: image::DynamicImage, fmt: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, fmt).unwrap();
        out.into_inner()
    }

    #[test]
    fn converts_gray_rgba_and_16_bit_to_rgb() {
        let p = Path::new("x.png");
        let gray = GrayImage::from_pixel(40, 50, Luma([77]));
        let rgb = decode_rgb(&encode(gray.into(), ImageFormat::Png), p).unwrap();
        assert_eq!(rgb.dimensions(), (40, 50));
        assert_eq!(rgb.get_pixel(3, 3).0, [77, 77, 77]);

        let rgba = RgbaImage::from_pixel(33, 33, Rgba([10, 20, 30, 128]));
        let rgb = decode_rgb(&encode(rgba.into(), ImageFormat::Png), p).unwrap();
        assert_eq!(rgb.get_pixel(0, 0).0, [10, 20, 30]);

        let g16: ImageBuffer<Luma<u16>, Vec<u16>> = ImageBuffer::from_pixel(32, 32, Luma([65535]));
        let rgb = decode_rgb(&encode(g16.into(), ImageFormat::Png), p).unwrap();
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
    }

    #[test]
    fn rejects_tiny_random_and_truncated() {
        let p = Path::new("bad.jpg");
        let tiny = RgbImage::from_pixel(27, 100, image::Rgb([1, 2, 3]));
        let e = decode_rgb(&encode(tiny.into(), ImageFormat::Png), p).unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
        assert!(e.to_string().contains("bad.jpg"), "{e}");

        let e = decode_rgb(&[7u8; 1000], p).unwrap_err();
        assert!(e.to_string().contains("bad.jpg"), "{e}");

        let big = RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8 * 3, y as u8 * 3, 9]));
        let jpg = encode(big.into(), ImageFormat::Jpeg);
        assert!(decode_rgb(&jpg, p).is_ok());
        let e = decode_rgb(&jpg[..jpg.len() / 2], p).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
    }

    #[test]
    fn dimension_bounds() {
        assert!(check_dimensions(28, 28).is_ok());
        assert!(check_dimensions(27, 28).is_err());
        assert!(check_dimensions(8192, 100).is_ok());
        assert!(
            check_dimensions(8193, 100)
                .unwrap_err()
                .contains("too large")
        );
        assert!(check_dimensions(100, 0).unwrap_err().contains("too small"));
    }

    #[test]
    fn image_extensions() {
        assert!(has_image_extension(Path::new("a/B.JPG")));
        assert!(has_image_extension(Path::new("a.bmp")));
        assert!(!has_image_extension(Path::new("a.txt")));
        assert!(!has_image_extension(Path::new("jpg")));
    }
}
