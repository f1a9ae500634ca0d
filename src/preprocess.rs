//! Image preprocessing exactly as `manifest.image_encoder.preprocess` says:
//! resize the shorter side to the crop size (triangle filter, like PIL's bilinear resize),
//! center-crop to `input_size`, scale to [0,1], `(x - mean) / std`, NCHW f32.

use image::RgbImage;
use image::imageops::{self, FilterType};

use crate::manifest::ImageEncoderSpec;

/// Preprocessing parameters taken from the manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    /// Output height.
    pub height: u32,
    /// Output width.
    pub width: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Preprocess {
    pub fn from_spec(spec: &ImageEncoderSpec) -> Preprocess {
        Preprocess {
            height: spec.input_size[0] as u32,
            width: spec.input_size[1] as u32,
            mean: spec.preprocess.mean,
            std: spec.preprocess.std,
        }
    }

    /// Number of f32 values of one preprocessed image (3 * H * W).
    pub fn tensor_len(&self) -> usize {
        3 * self.height as usize * self.width as usize
    }

    /// Size after the "shorter side" resize, computed exactly like the recipe
    /// (`models/train/sgps_train/data.py`): `s = size / min(w, h)`, sides `max(size, round(side * s))`
    /// with Python's round-half-to-even.
    pub fn resized_size(&self, w: u32, h: u32) -> (u32, u32) {
        let s = (self.width as f64 / w as f64).max(self.height as f64 / h as f64);
        let nw = ((w as f64 * s).round_ties_even() as u32).max(self.width);
        let nh = ((h as f64 * s).round_ties_even() as u32).max(self.height);
        (nw, nh)
    }

    /// Resize + center-crop to `width` x `height` RGB.
    pub fn resize_crop(&self, img: &RgbImage) -> RgbImage {
        let (w, h) = img.dimensions();
        let (nw, nh) = self.resized_size(w, h);
        let resized = if (nw, nh) == (w, h) {
            img.clone()
        } else {
            imageops::resize(img, nw, nh, FilterType::Triangle)
        };
        if (nw, nh) == (self.width, self.height) {
            return resized;
        }
        let left = (nw - self.width) / 2;
        let top = (nh - self.height) / 2;
        imageops::crop_imm(&resized, left, top, self.width, self.height).to_image()
    }

    /// Append one image's normalised CHW tensor to `out`.
    pub fn write_chw(&self, img: &RgbImage, out: &mut Vec<f32>) {
        let crop = self.resize_crop(img);
        let plane = self.height as usize * self.width as usize;
        let start = out.len();
        out.resize(start + 3 * plane, 0.0);
        let dst = &mut out[start..];
        let scale = [
            1.0 / (255.0 * self.std[0]),
            1.0 / (255.0 * self.std[1]),
            1.0 / (255.0 * self.std[2]),
        ];
        let shift = [
            self.mean[0] / self.std[0],
            self.mean[1] / self.std[1],
            self.mean[2] / self.std[2],
        ];
        for (i, px) in crop.pixels().enumerate() {
            for c in 0..3 {
                dst[c * plane + i] = px.0[c] as f32 * scale[c] - shift[c];
            }
        }
    }

    /// Preprocess a batch into one NCHW buffer.
    pub fn batch(&self, imgs: &[RgbImage]) -> Vec<f32> {
        let mut out = Vec::with_capacity(imgs.len() * self.tensor_len());
        for img in imgs {
            self.write_chw(img, &mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pp(h: u32, w: u32) -> Preprocess {
        Preprocess {
            height: h,
            width: w,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }

    #[test]
    fn shorter_side_resize_sizes() {
        let p = pp(224, 224);
        assert_eq!(p.resized_size(180, 180), (224, 224));
        assert_eq!(p.resized_size(256, 192), (299, 224)); // 256*224/192 = 298.67 -> 299
        assert_eq!(p.resized_size(192, 256), (224, 299));
        assert_eq!(p.resized_size(320, 240), (299, 224)); // 298.67
        assert_eq!(p.resized_size(448, 32), (3136, 224));
        assert_eq!(p.resized_size(224, 224), (224, 224));
        assert_eq!(p.resized_size(28, 28), (224, 224));
    }

    #[test]
    fn normalises_constant_image_per_channel() {
        let p = pp(40, 40);
        let img = RgbImage::from_pixel(100, 60, image::Rgb([255, 0, 128]));
        let t = p.batch(&[img.clone(), img]);
        assert_eq!(t.len(), 2 * 3 * 40 * 40);
        let plane = 1600;
        let expect = [
            (1.0 - 0.485) / 0.229,
            (0.0 - 0.456) / 0.224,
            (128.0 / 255.0 - 0.406) / 0.225,
        ];
        for c in 0..3 {
            for v in &t[c * plane..(c + 1) * plane] {
                assert!((v - expect[c]).abs() < 1e-5, "channel {c}: {v}");
            }
        }
    }

    #[test]
    fn center_crop_keeps_the_middle() {
        // left third red, middle third green, right third blue; crop of a wide image keeps green centre.
        let p = pp(32, 32);
        let img = RgbImage::from_fn(96, 32, |x, _| match x / 32 {
            0 => image::Rgb([255, 0, 0]),
            1 => image::Rgb([0, 255, 0]),
            _ => image::Rgb([0, 0, 255]),
        });
        let c = p.resize_crop(&img);
        assert_eq!(c.dimensions(), (32, 32));
        assert_eq!(c.get_pixel(16, 16).0, [0, 255, 0]);
        assert_eq!(c.get_pixel(0, 0).0, [0, 255, 0]);
    }
}
