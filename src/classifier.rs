//! The synthesized classifier f_θ (cosine head) and its on-disk artifact.
//!
//! Artifact layout (all little-endian):
//! `b"SGPSCLF1"` · format version `u16` · payload length `u32` · CRC32 of the payload `u32` · payload
//! (postcard of [`Classifier`]). Saving is atomic: temp file in the same directory, fsync, rename,
//! fsync of the directory.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Magic bytes at the start of every classifier file.
pub const MAGIC: &[u8; 8] = b"SGPSCLF1";
/// Current artifact format version.
pub const FORMAT_VERSION: u16 = 1;
const HEADER_LEN: usize = 8 + 2 + 4 + 4;
/// Refuse to read artifacts larger than this (a 16-class classifier is ~100 KiB).
const MAX_PAYLOAD: usize = 64 * 1024 * 1024;

/// A class of the classifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassInfo {
    pub name: String,
    pub description: Option<String>,
}

/// A synthesized classifier: `logits_c = scale * cos(e, weight_c) + bias_c`, `p = softmax(logits)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Classifier {
    pub classes: Vec<ClassInfo>,
    pub weight: Vec<Vec<f32>>,
    pub bias: Vec<f32>,
    pub scale: f32,
    /// Refer when the top probability is below this.
    pub refer_threshold: f32,
    /// SHA-256 of the image encoder file the weights belong to.
    pub encoder_sha256: String,
    pub text_encoder_sha256: String,
    pub synthesizer_sha256: String,
    /// `format` of the models manifest that produced it.
    pub manifest_format: u32,
    /// How it was synthesized (`images+text`, `images`, `text`).
    pub mode: String,
    /// Shots used per class.
    pub shots: Vec<u32>,
    /// Seconds since the Unix epoch.
    pub created_at_unix: u64,
    /// Hex of the content hash (classes, parameters, encoder); recomputed on load, not stored.
    #[serde(skip)]
    pub id: String,
}

/// Output of [`Classifier::predict`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    pub probabilities: Vec<f32>,
    pub top: usize,
    pub top_label: String,
    pub confidence: f32,
    /// True when `confidence < refer_threshold`: the case should be referred to a specialist.
    pub refer: bool,
}

impl Classifier {
    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Class names in order.
    pub fn class_names(&self) -> Vec<&str> {
        self.classes.iter().map(|c| c.name.as_str()).collect()
    }

    /// Recompute [`Classifier::id`] from the content.
    pub fn refresh_id(&mut self) {
        let mut h = Sha256::new();
        for c in &self.classes {
            h.update(c.name.as_bytes());
            h.update([0]);
            h.update(c.description.as_deref().unwrap_or("").as_bytes());
            h.update([0]);
        }
        for w in &self.weight {
            for x in w {
                h.update(x.to_le_bytes());
            }
        }
        for b in &self.bias {
            h.update(b.to_le_bytes());
        }
        h.update(self.scale.to_le_bytes());
        h.update(self.refer_threshold.to_le_bytes());
        h.update(self.encoder_sha256.as_bytes());
        self.id = hex::encode(&h.finalize()[..8]);
    }

    /// Per-class logits for one embedding.
    pub fn logits(&self, e: &[f32]) -> Vec<f32> {
        cosine_logits(&self.weight, &self.bias, self.scale, e)
    }

    /// Classify one embedding.
    pub fn predict(&self, e: &[f32]) -> Prediction {
        let probabilities = softmax(&self.logits(e));
        let (top, confidence) =
            probabilities
                .iter()
                .copied()
                .enumerate()
                .fold(
                    (0, f32::MIN),
                    |acc, (i, p)| if p > acc.1 { (i, p) } else { acc },
                );
        Prediction {
            top_label: self
                .classes
                .get(top)
                .map(|c| c.name.clone())
                .unwrap_or_default(),
            refer: confidence < self.refer_threshold,
            probabilities,
            top,
            confidence,
        }
    }

    /// Structural checks: consistent sizes, finite parameters.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let n = self.classes.len();
        if n < 2 {
            return Err(format!("{n} classes (need at least 2)"));
        }
        if self.weight.len() != n || self.bias.len() != n {
            return Err(format!(
                "{n} classes but {} weight rows and {} biases",
                self.weight.len(),
                self.bias.len()
            ));
        }
        let d = self.weight[0].len();
        if d == 0 || self.weight.iter().any(|w| w.len() != d) {
            return Err("weight rows have inconsistent or zero length".into());
        }
        let finite = self
            .weight
            .iter()
            .flatten()
            .chain(&self.bias)
            .all(|x| x.is_finite());
        if !finite || !self.scale.is_finite() || !self.refer_threshold.is_finite() {
            return Err("non-finite parameters".into());
        }
        Ok(())
    }

    /// Encode to the artifact bytes (header + postcard payload).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let payload = postcard::to_allocvec(self)
            .map_err(|e| Error::Invalid(format!("cannot encode classifier: {e}")))?;
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// Decode artifact bytes; `path` is only used in error messages. Does not check the encoder.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Classifier> {
        let corrupt = |reason: String| Error::ClassifierCorrupt {
            path: path.to_path_buf(),
            reason,
        };
        if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
            return Err(corrupt("not an sgps classifier file (bad header)".into()));
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != FORMAT_VERSION {
            return Err(Error::ClassifierVersion {
                path: path.to_path_buf(),
                found: version,
                expected: FORMAT_VERSION,
            });
        }
        let len = u32::from_le_bytes(bytes[10..14].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[14..18].try_into().unwrap());
        let payload = &bytes[HEADER_LEN..];
        if len > MAX_PAYLOAD || payload.len() != len {
            return Err(corrupt(format!(
                "payload is {} bytes, header says {len}",
                payload.len()
            )));
        }
        if crc32fast::hash(payload) != crc {
            return Err(corrupt("checksum mismatch".into()));
        }
        let mut c: Classifier =
            postcard::from_bytes(payload).map_err(|e| corrupt(format!("cannot decode: {e}")))?;
        c.validate().map_err(corrupt)?;
        c.refresh_id();
        Ok(c)
    }

    /// Save atomically to `path` (temp file in the same directory, fsync, rename, fsync dir).
    pub fn save(&self, path: &Path) -> Result<()> {
        self.validate()
            .map_err(|e| Error::Invalid(format!("refusing to save an invalid classifier: {e}")))?;
        let bytes = self.to_bytes()?;
        crate::atomic_file::write(path, &bytes).map_err(|e| Error::io(path, e))
    }

    /// Load from `path` and check that it belongs to the encoder with `expected_encoder_sha256`.
    pub fn load(path: &Path, expected_encoder_sha256: &str) -> Result<Classifier> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let c = Classifier::from_bytes(&bytes, path)?;
        if !c
            .encoder_sha256
            .eq_ignore_ascii_case(expected_encoder_sha256)
        {
            return Err(Error::ClassifierEncoder {
                path: path.to_path_buf(),
                made_for: c.encoder_sha256.clone(),
                loaded: expected_encoder_sha256.to_string(),
            });
        }
        Ok(c)
    }
}

/// The head every synthesized classifier is: `scale * cos(e, weight_c) + bias_c` per class.
pub fn cosine_logits(weight: &[Vec<f32>], bias: &[f32], scale: f32, e: &[f32]) -> Vec<f32> {
    let en = norm(e);
    weight
        .iter()
        .zip(bias)
        .map(|(w, b)| {
            let wn = norm(w);
            let dot: f32 = w.iter().zip(e).map(|(a, b)| a * b).sum();
            let cos = if en > 0.0 && wn > 0.0 {
                dot / (en * wn)
            } else {
                0.0
            };
            scale * cos + b
        })
        .collect()
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

/// Numerically stable softmax.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|l| (l - m).exp()).collect();
    let s: f32 = exps.iter().sum();
    exps.iter().map(|e| e / s).collect()
}

/// Seconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(encoder: &str) -> Classifier {
        let mut c = Classifier {
            classes: vec![
                ClassInfo {
                    name: "a".into(),
                    description: Some("first".into()),
                },
                ClassInfo {
                    name: "b".into(),
                    description: None,
                },
            ],
            weight: vec![vec![1.0, 0.0, 0.0], vec![0.0, 2.0, 0.0]],
            bias: vec![0.0, 0.1],
            scale: 10.0,
            refer_threshold: 0.6,
            encoder_sha256: encoder.into(),
            text_encoder_sha256: "t".into(),
            synthesizer_sha256: "s".into(),
            manifest_format: 1,
            mode: "images+text".into(),
            shots: vec![1, 1],
            created_at_unix: 1,
            id: String::new(),
        };
        c.refresh_id();
        c
    }

    #[test]
    fn predict_is_cosine_softmax_with_refer() {
        let c = sample("e");
        let p = c.predict(&[3.0, 0.0, 0.0]);
        assert_eq!(p.top, 0);
        assert_eq!(p.top_label, "a");
        let expect = 1.0 / (1.0 + (0.1f32 - 10.0).exp());
        assert!((p.confidence - expect).abs() < 1e-6);
        assert!((p.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(!p.refer);
        // equidistant query: ~50/50 -> refer
        let p = c.predict(&[1.0, 1.0, 0.0]);
        assert!(p.refer, "{p:?}");
        assert_eq!(p.top_label, "b");
    }

    #[test]
    fn round_trip_and_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sgpc");
        let c = sample("enc");
        c.save(&path).unwrap();
        let back = Classifier::load(&path, "ENC").unwrap();
        assert_eq!(back, c);
        assert_eq!(back.id.len(), 16);
        // no temp file left behind
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn load_errors_are_specific() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sgpc");
        let c = sample("enc");
        c.save(&path).unwrap();
        let e = Classifier::load(&path, "other").unwrap_err();
        assert!(matches!(e, Error::ClassifierEncoder { .. }), "{e}");
        assert!(e.to_string().contains("re-synthesize"));

        let good = std::fs::read(&path).unwrap();
        let mut flipped = good.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x40;
        let e = Classifier::from_bytes(&flipped, &path).unwrap_err();
        assert!(matches!(e, Error::ClassifierCorrupt { .. }), "{e}");
        assert!(e.to_string().contains("sgps synth"));

        let e = Classifier::from_bytes(&good[..good.len() - 5], &path).unwrap_err();
        assert!(matches!(e, Error::ClassifierCorrupt { .. }), "{e}");

        let mut v2 = good.clone();
        v2[8..10].copy_from_slice(&2u16.to_le_bytes());
        let e = Classifier::from_bytes(&v2, &path).unwrap_err();
        assert!(
            matches!(e, Error::ClassifierVersion { found: 2, .. }),
            "{e}"
        );

        let e = Classifier::from_bytes(b"hello", &path).unwrap_err();
        assert!(matches!(e, Error::ClassifierCorrupt { .. }), "{e}");
    }

    #[test]
    fn softmax_is_stable() {
        let p = softmax(&[1000.0, 1000.0]);
        assert!((p[0] - 0.5).abs() < 1e-6);
    }
}
