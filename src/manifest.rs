//! `models/manifest.json`: the index of the shipped models (see models/CONTRACT.md).
//!
//! Everything shape-related the runtime needs comes from here. File hashes are verified on use
//! ([`Manifest::verified_path`]), so a missing or tampered model file is refused before tract sees it.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The manifest format this runtime understands.
pub const MANIFEST_FORMAT: u32 = 1;

/// A model file with its expected SHA-256.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    pub file: String,
    pub sha256: String,
    #[serde(default)]
    pub bytes: u64,
    /// The arithmetic the runtime uses for the file (default fp32, as stored).
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

/// The floating-point arithmetic a model variant runs in.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// As the ONNX file says (float32 activations).
    #[default]
    F32,
    /// tract's float32 -> float16 translation at load (weights and activations in float16; the
    /// inputs are cast on the way in and the outputs back to float32). Worth it only on CPUs with
    /// float16 arithmetic (ARMv8.2-A FP16, e.g. the Cortex-A76 and A78AE); elsewhere tract
    /// emulates it.
    F16,
}

impl Precision {
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PreprocessSpec {
    /// Only `shorter_side_then_center_crop` is defined.
    pub resize: String,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageEncoderSpec {
    pub variants: BTreeMap<String, FileEntry>,
    pub default_variant: String,
    pub input: String,
    pub output: String,
    /// `[H, W]`.
    pub input_size: [usize; 2],
    pub preprocess: PreprocessSpec,
    pub embedding_dim: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenizerSpec {
    pub file: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TextInputs {
    pub input_ids: String,
    pub attention_mask: String,
    #[serde(default)]
    pub token_type_ids: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TextEncoderSpec {
    pub variants: BTreeMap<String, FileEntry>,
    pub default_variant: String,
    pub tokenizer: TokenizerSpec,
    pub inputs: TextInputs,
    pub output: String,
    pub max_tokens: usize,
    pub embedding_dim: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SynthInputs {
    pub support: String,
    pub support_mask: String,
    pub text: String,
    pub text_mask: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SynthOutputs {
    pub weight: String,
    pub bias: String,
    pub scale: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SynthesizerSpec {
    pub file: String,
    pub sha256: String,
    #[serde(default)]
    pub bytes: u64,
    pub inputs: SynthInputs,
    pub outputs: SynthOutputs,
    pub max_classes: usize,
    pub max_shots: usize,
    /// What G reads as a class's text (absent: the MiniLM embedding alone, as before word features).
    #[serde(default)]
    pub text_features: Option<TextFeaturesSpec>,
}

/// The text features G reads: the MiniLM embedding, the word features, or both side by side
/// (MiniLM first), chosen by the recipe's text map check.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TextFeaturesSpec {
    pub minilm: bool,
    #[serde(default)]
    pub words: Option<WordsSpec>,
    pub dim: usize,
}

/// The word-feature file (vocabulary and idf; `encoders::words`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WordsSpec {
    pub file: String,
    pub sha256: String,
    #[serde(default)]
    pub bytes: u64,
    pub dim: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HeadSpec {
    /// Only `cosine` is defined.
    pub kind: String,
    pub refer_threshold: f32,
    #[serde(default)]
    pub ece: Option<f32>,
}

/// The parsed `models/manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: u32,
    pub image_encoder: ImageEncoderSpec,
    pub text_encoder: TextEncoderSpec,
    pub synthesizer: SynthesizerSpec,
    pub head: HeadSpec,
    #[serde(default)]
    pub provenance: serde_json::Value,
    #[serde(default)]
    pub evaluation: serde_json::Value,
    /// Directory the manifest was read from (not part of the JSON).
    #[serde(skip)]
    pub dir: PathBuf,
}

impl Manifest {
    /// Read and validate `<models_dir>/manifest.json`. Model files are verified later, on use.
    pub fn load(models_dir: &Path) -> Result<Manifest> {
        let path = models_dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::Manifest {
                    path: path.clone(),
                    reason: "file not found; point --models (or SGPS_MODELS) at the models/ directory of the release, or regenerate it with `cargo xtask train`".into(),
                }
            } else {
                Error::io(&path, e)
            }
        })?;
        let mut m = Self::from_json(&text).map_err(|reason| Error::Manifest {
            path: path.clone(),
            reason,
        })?;
        m.dir = models_dir.to_path_buf();
        Ok(m)
    }

    /// Parse and validate manifest JSON text (no file access).
    pub fn from_json(text: &str) -> std::result::Result<Manifest, String> {
        let m: Manifest = serde_json::from_str(text).map_err(|e| e.to_string())?;
        m.validate()?;
        Ok(m)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.format != MANIFEST_FORMAT {
            return Err(format!(
                "manifest format {} is not supported (this sgps reads format {MANIFEST_FORMAT})",
                self.format
            ));
        }
        let ie = &self.image_encoder;
        if !ie.variants.contains_key(&ie.default_variant) {
            return Err(format!(
                "image_encoder.default_variant {:?} is not among the variants",
                ie.default_variant
            ));
        }
        if ie.preprocess.resize != "shorter_side_then_center_crop" {
            return Err(format!(
                "image_encoder.preprocess.resize {:?} is not supported (expected shorter_side_then_center_crop)",
                ie.preprocess.resize
            ));
        }
        if ie.input_size[0] == 0 || ie.input_size[1] == 0 || ie.embedding_dim == 0 {
            return Err("image_encoder.input_size and embedding_dim must be positive".into());
        }
        if ie.preprocess.std.iter().any(|s| *s <= 0.0) {
            return Err("image_encoder.preprocess.std must be positive".into());
        }
        let te = &self.text_encoder;
        if !te.variants.contains_key(&te.default_variant) {
            return Err(format!(
                "text_encoder.default_variant {:?} is not among the variants",
                te.default_variant
            ));
        }
        if te.max_tokens < 2 || te.embedding_dim == 0 {
            return Err("text_encoder.max_tokens must be >= 2 and embedding_dim positive".into());
        }
        if let Some(tf) = &self.synthesizer.text_features {
            let expected = if tf.minilm { te.embedding_dim } else { 0 }
                + tf.words.as_ref().map_or(0, |w| w.dim);
            if expected == 0 || tf.dim != expected {
                return Err(format!(
                    "synthesizer.text_features.dim is {} but its parts add up to {expected} (MiniLM {}, words {}); \
                     regenerate the models with `cargo xtask train`",
                    tf.dim,
                    if tf.minilm { te.embedding_dim } else { 0 },
                    tf.words.as_ref().map_or(0, |w| w.dim)
                ));
            }
        }
        if self.synthesizer.max_classes < 2 || self.synthesizer.max_shots == 0 {
            return Err("synthesizer.max_classes must be >= 2 and max_shots >= 1".into());
        }
        if self.head.kind != "cosine" {
            return Err(format!(
                "head.kind {:?} is not supported (expected cosine)",
                self.head.kind
            ));
        }
        Ok(())
    }

    /// Every file the manifest names (encoder variants, tokenizer, synthesizer, word features),
    /// relative to the models directory.
    pub fn files(&self) -> Vec<&str> {
        let mut f: Vec<&str> = self
            .image_encoder
            .variants
            .values()
            .chain(self.text_encoder.variants.values())
            .map(|v| v.file.as_str())
            .collect();
        f.push(&self.text_encoder.tokenizer.file);
        f.push(&self.synthesizer.file);
        if let Some(w) = self.words_spec() {
            f.push(&w.file);
        }
        f.sort_unstable();
        f.dedup();
        f
    }

    /// The word-feature file, where G reads word features.
    pub fn words_spec(&self) -> Option<&WordsSpec> {
        self.synthesizer
            .text_features
            .as_ref()
            .and_then(|t| t.words.as_ref())
    }

    /// Length of the text feature vector G reads for a class.
    pub fn text_dim(&self) -> usize {
        self.synthesizer
            .text_features
            .as_ref()
            .map_or(self.text_encoder.embedding_dim, |t| t.dim)
    }

    /// Whether G reads the MiniLM embedding of a description.
    pub fn uses_minilm(&self) -> bool {
        self.synthesizer
            .text_features
            .as_ref()
            .is_none_or(|t| t.minilm)
    }

    /// The image-encoder variant to use (`None` = manifest default), or an error listing the choices.
    pub fn image_variant(&self, name: Option<&str>) -> Result<(&str, &FileEntry)> {
        pick_variant(
            "image encoder",
            &self.image_encoder.variants,
            name.unwrap_or(&self.image_encoder.default_variant),
        )
    }

    /// The text-encoder variant to use (`None` = manifest default).
    pub fn text_variant(&self, name: Option<&str>) -> Result<(&str, &FileEntry)> {
        pick_variant(
            "text encoder",
            &self.text_encoder.variants,
            name.unwrap_or(&self.text_encoder.default_variant),
        )
    }

    /// Path of `file` inside the models directory after checking its SHA-256 against `sha256`.
    pub fn verified_path(&self, file: &str, sha256: &str) -> Result<PathBuf> {
        let path = self.dir.join(file);
        verify_file(&path, sha256)?;
        Ok(path)
    }
}

fn pick_variant<'a>(
    what: &str,
    variants: &'a BTreeMap<String, FileEntry>,
    name: &str,
) -> Result<(&'a str, &'a FileEntry)> {
    variants
        .get_key_value(name)
        .map(|(k, v)| (k.as_str(), v))
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{what} variant {name:?} is not in the manifest; available: {}",
                variants.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
}

/// SHA-256 of a file, lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::ModelMissing {
                path: path.to_path_buf(),
            }
        } else {
            Error::io(path, e)
        }
    })?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Check that `path` exists and hashes to `expected` (hex, case-insensitive).
pub fn verify_file(path: &Path, expected: &str) -> Result<()> {
    let actual = sha256_file(path)?;
    if !actual.eq_ignore_ascii_case(expected.trim()) {
        return Err(Error::ModelTampered {
            path: path.to_path_buf(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const SAMPLE: &str = r#"{
      "format": 1,
      "image_encoder": {
        "variants": {"fp32": {"file": "image_encoder.onnx", "sha256": "00", "bytes": 1}},
        "default_variant": "fp32", "input": "image", "output": "embedding",
        "input_size": [224, 224],
        "preprocess": {"resize": "shorter_side_then_center_crop",
                        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "embedding_dim": 1280
      },
      "text_encoder": {
        "variants": {"int8": {"file": "text_encoder.int8.onnx", "sha256": "00", "bytes": 1}},
        "default_variant": "int8",
        "tokenizer": {"file": "tokenizer.json", "sha256": "00"},
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "token_type_ids": null},
        "output": "embedding", "max_tokens": 128, "embedding_dim": 384
      },
      "synthesizer": {
        "file": "synthesizer.onnx", "sha256": "00", "bytes": 1,
        "inputs": {"support": "support", "support_mask": "support_mask", "text": "text", "text_mask": "text_mask"},
        "outputs": {"weight": "weight", "bias": "bias", "scale": "scale"},
        "max_classes": 16, "max_shots": 20
      },
      "head": {"kind": "cosine", "refer_threshold": 0.5, "ece": 0.0},
      "provenance": {}, "evaluation": {}
    }"#;

    #[test]
    fn parses_contract_example() {
        let m = Manifest::from_json(SAMPLE).unwrap();
        assert_eq!(m.image_encoder.input_size, [224, 224]);
        assert_eq!(m.text_encoder.inputs.token_type_ids, None);
        assert_eq!(m.synthesizer.max_shots, 20);
        assert_eq!(m.image_variant(None).unwrap().0, "fp32");
        let err = m.image_variant(Some("int4")).unwrap_err().to_string();
        assert!(err.contains("int4") && err.contains("fp32"), "{err}");
    }

    #[test]
    fn rejects_unknown_format_and_bad_default() {
        let bad = SAMPLE.replace("\"format\": 1", "\"format\": 2");
        assert!(Manifest::from_json(&bad).unwrap_err().contains("format 2"));
        let bad = SAMPLE.replace(
            "\"default_variant\": \"fp32\"",
            "\"default_variant\": \"x\"",
        );
        assert!(
            Manifest::from_json(&bad)
                .unwrap_err()
                .contains("default_variant")
        );
    }

    #[test]
    fn text_features_say_what_g_reads_and_must_add_up() {
        let m = Manifest::from_json(SAMPLE).unwrap();
        assert_eq!((m.text_dim(), m.uses_minilm()), (384, true)); // absent: MiniLM alone
        let with = |tf: serde_json::Value| {
            let mut v: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
            v["synthesizer"]["text_features"] = tf;
            Manifest::from_json(&v.to_string())
        };
        let words = serde_json::json!({"file": "text_words.json", "sha256": "00", "dim": 1000});
        let m = with(serde_json::json!({"minilm": false, "words": words, "dim": 1000})).unwrap();
        assert_eq!((m.text_dim(), m.uses_minilm()), (1000, false));
        let m = with(serde_json::json!({"minilm": true, "words": words, "dim": 1384})).unwrap();
        assert_eq!((m.text_dim(), m.uses_minilm()), (1384, true));
        for bad in [
            serde_json::json!({"minilm": true, "words": words, "dim": 1000}),
            serde_json::json!({"minilm": false, "dim": 0}),
        ] {
            let e = with(bad).unwrap_err();
            assert!(
                e.contains("text_features.dim") && e.contains("cargo xtask train"),
                "{e}"
            );
        }
    }

    #[test]
    fn verify_detects_missing_and_tampered_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.onnx");
        std::fs::write(&p, b"hello").unwrap();
        let good = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        verify_file(&p, good).unwrap();
        std::fs::write(&p, b"hellp").unwrap();
        let e = verify_file(&p, good).unwrap_err();
        assert!(matches!(e, Error::ModelTampered { .. }), "{e}");
        assert!(e.to_string().contains("cargo xtask train"));
        let e = verify_file(&dir.path().join("nope.onnx"), good).unwrap_err();
        assert!(matches!(e, Error::ModelMissing { .. }), "{e}");
    }
}
