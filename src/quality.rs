//! Quality gate run on every capture before it reaches a support set or a decision.
//!
//! Three families of checks, all on the luminance of the frame (downscaled so that its shorter
//! side is at most [`WORK_SIDE`] pixels, which keeps the thresholds comparable across cameras):
//! - exposure: mean luminance and the fractions of clipped dark / bright pixels;
//! - blur: variance of the 4-neighbour Laplacian (low = no edges = out of focus or motion blur);
//! - framing: contrast of the central region (a lesion should be centred and visible) and the
//!   fraction of very dark pixels in the border band (the dermatoscope is not on the skin, or
//!   the frame is shifted so that the lesion is off-centre and black padding/vignette dominates).
//!
//! Thresholds live in the board profile (`[gate]`), with defaults calibrated so that the ISIC
//! dermoscopy images in the shared data pass and synthetic blurred / dark / bright / shifted
//! versions of them fail (see the tests).

use image::{GrayImage, RgbImage, imageops::FilterType};
use serde::{Deserialize, Serialize};

/// Frames are analysed with their shorter side reduced to at most this many pixels.
pub const WORK_SIDE: u32 = 256;

/// Thresholds of the gate. Every field has a default, so a profile may set only some.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GateThresholds {
    /// Reject when the variance of the Laplacian is below this (blur).
    pub min_laplacian_var: f32,
    /// Reject when the mean luminance (0..255) is below this (under-exposed).
    pub min_mean: f32,
    /// Reject when the mean luminance (0..255) is above this (over-exposed).
    pub max_mean: f32,
    /// Reject when more than this fraction of pixels is clipped black (luma <= 4).
    pub max_dark_clipped: f32,
    /// Reject when more than this fraction of pixels is clipped white (luma >= 251).
    pub max_bright_clipped: f32,
    /// Reject when the standard deviation of luminance in the central half is below this
    /// (nothing visible in the centre: featureless skin, lens cap, wrong framing).
    pub min_center_contrast: f32,
    /// Reject when more than this fraction of the border band (outer 10 %) is very dark
    /// (luma < 24) while the rest is lit: off-centre lesion, device not flat on the skin.
    pub max_border_dark: f32,
}

impl Default for GateThresholds {
    fn default() -> Self {
        GateThresholds {
            min_laplacian_var: 12.0,
            min_mean: 40.0,
            max_mean: 235.0,
            max_dark_clipped: 0.35,
            max_bright_clipped: 0.25,
            min_center_contrast: 4.0,
            max_border_dark: 0.80,
        }
    }
}

/// Measurements of one frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct QualityMetrics {
    pub laplacian_var: f32,
    pub mean: f32,
    pub dark_clipped: f32,
    pub bright_clipped: f32,
    pub center_contrast: f32,
    pub border_dark: f32,
    /// Fraction of pixels that are not very dark (luma >= 24).
    pub lit_fraction: f32,
    /// Mean luminance of those pixels.
    pub lit_mean: f32,
}

/// Why a capture was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    Underexposed,
    Overexposed,
    Blurred,
    BadFraming,
    EmptyFrame,
}

impl RejectReason {
    /// Short machine-readable name (logs, audit).
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Underexposed => "underexposed",
            RejectReason::Overexposed => "overexposed",
            RejectReason::Blurred => "blurred",
            RejectReason::BadFraming => "bad_framing",
            RejectReason::EmptyFrame => "empty_frame",
        }
    }

    /// What the operator should do.
    pub fn advice(self) -> &'static str {
        match self {
            RejectReason::Underexposed => {
                "too dark: switch the dermatoscope light on or check the camera exposure"
            }
            RejectReason::Overexposed => {
                "too bright: reduce the light, avoid glare, press the contact plate flat"
            }
            RejectReason::Blurred => "blurred: hold the device still and refocus before capturing",
            RejectReason::BadFraming => {
                "badly framed: centre the lesion and place the dermatoscope flat on the skin"
            }
            RejectReason::EmptyFrame => {
                "nothing visible in the centre: centre the lesion in the frame"
            }
        }
    }
}

/// A rejected capture: the reason, the measurement and the threshold it violated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejection {
    pub reason: RejectReason,
    pub message: String,
    pub metrics: QualityMetrics,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "capture rejected ({}): {}",
            self.reason.as_str(),
            self.message
        )
    }
}

impl std::error::Error for Rejection {}

/// Measure a frame. Returns zeros for empty images.
pub fn measure(img: &RgbImage) -> QualityMetrics {
    let luma = work_luma(img);
    let (w, h) = luma.dimensions();
    if w < 3 || h < 3 {
        return QualityMetrics {
            laplacian_var: 0.0,
            mean: 0.0,
            dark_clipped: 1.0,
            bright_clipped: 0.0,
            center_contrast: 0.0,
            border_dark: 1.0,
            lit_fraction: 0.0,
            lit_mean: 0.0,
        };
    }
    let px = |x: u32, y: u32| luma.get_pixel(x, y).0[0] as f64;

    // exposure
    let n = (w * h) as f64;
    let (mut sum, mut dark, mut bright) = (0.0f64, 0usize, 0usize);
    let (mut lit_sum, mut lit) = (0.0f64, 0usize);
    for p in luma.pixels() {
        let v = p.0[0];
        sum += v as f64;
        if v >= 24 {
            lit_sum += v as f64;
            lit += 1;
        }
        dark += (v <= 4) as usize;
        bright += (v >= 251) as usize;
    }

    // blur: variance of the Laplacian over the interior
    let (mut ls, mut ls2, mut ln) = (0.0f64, 0.0f64, 0.0f64);
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            let l = px(x - 1, y) + px(x + 1, y) + px(x, y - 1) + px(x, y + 1) - 4.0 * px(x, y);
            ls += l;
            ls2 += l * l;
            ln += 1.0;
        }
    }
    let lmean = ls / ln;
    let laplacian_var = (ls2 / ln - lmean * lmean).max(0.0);

    // framing: centre contrast and dark border band
    let (cx0, cx1, cy0, cy1) = (w / 4, w - w / 4, h / 4, h - h / 4);
    let (mut cs, mut cs2, mut cn) = (0.0f64, 0.0f64, 0.0f64);
    for y in cy0..cy1 {
        for x in cx0..cx1 {
            let v = px(x, y);
            cs += v;
            cs2 += v * v;
            cn += 1.0;
        }
    }
    let cmean = cs / cn.max(1.0);
    let center_contrast = (cs2 / cn.max(1.0) - cmean * cmean).max(0.0).sqrt();
    let (bx, by) = ((w / 10).max(1), (h / 10).max(1));
    let (mut bd, mut bn) = (0usize, 0usize);
    for y in 0..h {
        for x in 0..w {
            if x < bx || x >= w - bx || y < by || y >= h - by {
                bn += 1;
                bd += (px(x, y) < 24.0) as usize;
            }
        }
    }

    QualityMetrics {
        laplacian_var: laplacian_var as f32,
        mean: (sum / n) as f32,
        dark_clipped: (dark as f64 / n) as f32,
        bright_clipped: (bright as f64 / n) as f32,
        center_contrast: center_contrast as f32,
        border_dark: (bd as f64 / bn.max(1) as f64) as f32,
        lit_fraction: (lit as f64 / n) as f32,
        lit_mean: if lit > 0 {
            (lit_sum / lit as f64) as f32
        } else {
            0.0
        },
    }
}

/// Run the gate: `Ok(metrics)` when the frame may be used, `Err(rejection)` with the first
/// violated check otherwise. Order: framing (a dark border around a well-lit part: the lesion is
/// off-centre or the device is not flat on the skin), exposure, blur, centre contrast.
pub fn check(img: &RgbImage, t: &GateThresholds) -> Result<QualityMetrics, Rejection> {
    let m = measure(img);
    let reject = |reason: RejectReason, detail: String| Rejection {
        reason,
        message: format!("{}; {detail}", reason.advice()),
        metrics: m,
    };
    // in order: the first failed check names the reason
    let framing =
        m.border_dark > t.max_border_dark && m.lit_fraction >= 0.05 && m.lit_mean >= t.min_mean;
    let checks: [(bool, RejectReason, &dyn Fn() -> String); 7] = [
        (framing, RejectReason::BadFraming, &|| {
            format!(
                "{:.0}% of the border is black > {:.0}%",
                m.border_dark * 100.0,
                t.max_border_dark * 100.0
            )
        }),
        (m.mean < t.min_mean, RejectReason::Underexposed, &|| {
            format!("mean luminance {:.1} < {:.1}", m.mean, t.min_mean)
        }),
        (
            m.dark_clipped > t.max_dark_clipped,
            RejectReason::Underexposed,
            &|| {
                format!(
                    "{:.0}% of pixels clipped black > {:.0}%",
                    m.dark_clipped * 100.0,
                    t.max_dark_clipped * 100.0
                )
            },
        ),
        (m.mean > t.max_mean, RejectReason::Overexposed, &|| {
            format!("mean luminance {:.1} > {:.1}", m.mean, t.max_mean)
        }),
        (
            m.bright_clipped > t.max_bright_clipped,
            RejectReason::Overexposed,
            &|| {
                format!(
                    "{:.0}% of pixels clipped white > {:.0}%",
                    m.bright_clipped * 100.0,
                    t.max_bright_clipped * 100.0
                )
            },
        ),
        (
            m.laplacian_var < t.min_laplacian_var,
            RejectReason::Blurred,
            &|| {
                format!(
                    "Laplacian variance {:.1} < {:.1}",
                    m.laplacian_var, t.min_laplacian_var
                )
            },
        ),
        (
            m.center_contrast < t.min_center_contrast,
            RejectReason::EmptyFrame,
            &|| {
                format!(
                    "centre contrast {:.1} < {:.1}",
                    m.center_contrast, t.min_center_contrast
                )
            },
        ),
    ];
    if let Some((_, reason, detail)) = checks.into_iter().find(|c| c.0) {
        return Err(reject(reason, detail()));
    }
    Ok(m)
}

fn work_luma(img: &RgbImage) -> GrayImage {
    let (w, h) = img.dimensions();
    let short = w.min(h);
    let src = if short > WORK_SIDE {
        let s = WORK_SIDE as f64 / short as f64;
        let nw = ((w as f64 * s).round() as u32).max(1);
        let nh = ((h as f64 * s).round() as u32).max(1);
        image::imageops::resize(img, nw, nh, FilterType::Triangle)
    } else {
        img.clone()
    };
    let mut out = GrayImage::new(src.width(), src.height());
    for (o, p) in out.pixels_mut().zip(src.pixels()) {
        let [r, g, b] = p.0;
        // ITU-R BT.601 luma, integer arithmetic (identical on every architecture)
        o.0[0] = ((77 * r as u32 + 150 * g as u32 + 29 * b as u32 + 128) >> 8) as u8;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    /// A synthetic "lesion": a dark textured disc on textured skin.
    fn lesion(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let (dx, dy) = (x as f32 - w as f32 / 2.0, y as f32 - h as f32 / 2.0);
            let tex = (((x * 7 + y * 13) % 17) as f32) * 3.0;
            if dx * dx + dy * dy < (w.min(h) as f32 / 4.0).powi(2) {
                Rgb([(90.0 + tex) as u8, (60.0 + tex) as u8, (50.0 + tex) as u8])
            } else {
                Rgb([
                    (200.0 + tex * 0.5) as u8,
                    (150.0 + tex * 0.5) as u8,
                    (130.0 + tex * 0.5) as u8,
                ])
            }
        })
    }

    #[test]
    fn synthetic_lesion_passes() {
        let img = lesion(200, 160);
        check(&img, &GateThresholds::default()).unwrap();
    }

    #[test]
    fn dark_bright_flat_and_blurred_are_rejected_with_reasons() {
        let t = GateThresholds::default();
        let img = lesion(200, 160);
        let dark = RgbImage::from_fn(200, 160, |x, y| {
            let p = img.get_pixel(x, y).0;
            Rgb([p[0] / 8, p[1] / 8, p[2] / 8])
        });
        assert_eq!(
            check(&dark, &t).unwrap_err().reason,
            RejectReason::Underexposed
        );
        let bright = RgbImage::from_fn(200, 160, |x, y| {
            let p = img.get_pixel(x, y).0;
            Rgb([
                p[0].saturating_add(150),
                p[1].saturating_add(150),
                p[2].saturating_add(150),
            ])
        });
        assert_eq!(
            check(&bright, &t).unwrap_err().reason,
            RejectReason::Overexposed
        );
        let blurred = image::imageops::blur(&img, 6.0);
        let r = check(&blurred, &t).unwrap_err();
        assert_eq!(r.reason, RejectReason::Blurred, "{r}");
        assert!(r.message.contains("Laplacian"));
        let flat = RgbImage::from_pixel(200, 160, Rgb([180, 140, 120]));
        assert!(check(&flat, &t).is_err());
    }

    #[test]
    fn shifted_frame_with_black_border_is_badly_framed() {
        let img = lesion(200, 160);
        let shifted = RgbImage::from_fn(200, 160, |x, y| {
            if x < 140 || y < 112 {
                Rgb([0, 0, 0])
            } else {
                *img.get_pixel(x - 140, y - 112)
            }
        });
        let r = check(&shifted, &GateThresholds::default()).unwrap_err();
        assert_eq!(r.reason, RejectReason::BadFraming, "{r}");
    }

    #[test]
    fn tiny_image_is_rejected_not_panicking() {
        let img = RgbImage::new(2, 2);
        assert!(check(&img, &GateThresholds::default()).is_err());
    }
}
