//! Image preprocessing exactly as `manifest.image_encoder.preprocess` says:
//! resize the shorter side to the crop size (triangle filter, bit-exact with Pillow's
//! `Image.resize(.., BILINEAR)` that the recipe uses), center-crop to `input_size`, scale to [0,1], `(x - mean) / std`, NCHW f32.

use image::RgbImage;
use image::imageops;

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
            resize_bilinear_pil(img, nw, nh)
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

/// Pillow's fixed-point precision for 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: first input index, number of taps, and fixed-point weights
/// (Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the bilinear filter).
fn pil_coeffs(in_size: u32, out_size: u32) -> (Vec<(usize, usize)>, Vec<i32>, usize) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // bilinear support 1.0
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size as usize);
    let mut kk = vec![0i32; out_size as usize * ksize];
    let ss = 1.0 / filterscale;
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size as usize {
        let center = (xx as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(n) {
            let t = ((x + xmin) as f64 - center + 0.5) * ss;
            let t = t.abs();
            *wx = if t < 1.0 { 1.0 - t } else { 0.0 };
            ww += *wx;
        }
        for x in 0..n {
            let k = if ww != 0.0 { w[x] / ww } else { w[x] };
            let f = k * (1u32 << PRECISION_BITS) as f64;
            kk[xx * ksize + x] = if k < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        bounds.push((xmin, n));
    }
    (bounds, kk, ksize)
}

fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Bilinear resize, bit-exact with Pillow (horizontal pass to 8-bit, then vertical pass).
pub fn resize_bilinear_pil(img: &RgbImage, nw: u32, nh: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let src = img.as_raw();
    let (hb, hk, hks) = pil_coeffs(w, nw);
    let (vb, vk, vks) = pil_coeffs(h, nh);
    // rows of the source the vertical pass needs
    let y_first = vb.first().map(|b| b.0).unwrap_or(0);
    let y_last = vb.last().map(|b| b.0 + b.1).unwrap_or(h as usize);
    let half = 1i64 << (PRECISION_BITS - 1);
    let (tmp, tw, t_off) = if nw != w {
        let rows = y_last - y_first;
        let mut tmp = vec![0u8; rows * nw as usize * 3];
        for y in 0..rows {
            let row = &src[(y + y_first) * w as usize * 3..(y + y_first + 1) * w as usize * 3];
            for (xx, &(xmin, n)) in hb.iter().enumerate() {
                let k = &hk[xx * hks..xx * hks + n];
                let mut acc = [half; 3];
                for (x, &kx) in k.iter().enumerate() {
                    let p = &row[(xmin + x) * 3..(xmin + x) * 3 + 3];
                    for c in 0..3 {
                        acc[c] += p[c] as i64 * kx as i64;
                    }
                }
                let o = (y * nw as usize + xx) * 3;
                for c in 0..3 {
                    tmp[o + c] = clip8(acc[c]);
                }
            }
        }
        (tmp, nw as usize, y_first)
    } else {
        (src.to_vec(), w as usize, 0)
    };
    if nh == h {
        return RgbImage::from_raw(nw, nh, tmp[..].to_vec()).expect("buffer size");
    }
    let mut out = vec![0u8; nw as usize * nh as usize * 3];
    for (yy, &(ymin, n)) in vb.iter().enumerate() {
        let k = &vk[yy * vks..yy * vks + n];
        for xx in 0..tw {
            let mut acc = [half; 3];
            for (y, &ky) in k.iter().enumerate() {
                let o = ((ymin - t_off + y) * tw + xx) * 3;
                for c in 0..3 {
                    acc[c] += tmp[o + c] as i64 * ky as i64;
                }
            }
            let o = (yy * tw + xx) * 3;
            for c in 0..3 {
                out[o + c] = clip8(acc[c]);
            }
        }
    }
    RgbImage::from_raw(nw, nh, out).expect("buffer size")
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
    fn pil_bilinear_resize_matches_known_values() {
        // 2x1 -> 4x1 upscale: Pillow gives [0, 64, 191, 255] for a [0, 255] row.
        let img = RgbImage::from_fn(2, 1, |x, _| image::Rgb([(x * 255) as u8; 3]));
        let r = resize_bilinear_pil(&img, 4, 1);
        let v: Vec<u8> = r.pixels().map(|p| p.0[0]).collect();
        assert_eq!(v, [0, 64, 191, 255]);
        // constant images stay constant, identity size is identity
        let c = RgbImage::from_pixel(7, 5, image::Rgb([9, 200, 77]));
        let r = resize_bilinear_pil(&c, 13, 3);
        assert!(r.pixels().all(|p| p.0 == [9, 200, 77]));
        let t = RgbImage::from_fn(9, 6, |x, y| image::Rgb([x as u8 * 20, y as u8 * 30, 5]));
        assert_eq!(resize_bilinear_pil(&t, 9, 6), t);
        // downscale 9x6 -> 4x3 (values from Pillow 13)
        let d = resize_bilinear_pil(&t, 4, 3);
        let r: Vec<u8> = (0..4).map(|x| d.get_pixel(x, 0).0[0]).collect();
        let g: Vec<u8> = (0..3).map(|y| d.get_pixel(0, y).0[1]).collect();
        assert_eq!(r, [17, 57, 103, 143]);
        assert_eq!(g, [21, 75, 129]);
        // upscale 9x6 -> 13x11, first row
        let u = resize_bilinear_pil(&t, 13, 11);
        let r: Vec<u8> = (0..13).map(|x| u.get_pixel(x, 0).0[0]).collect();
        assert_eq!(r, [0, 11, 25, 38, 52, 66, 80, 94, 108, 122, 135, 149, 160]);
        assert_eq!(u.get_pixel(0, 1).0[1], 10);
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
