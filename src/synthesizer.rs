//! Synthesizer G: (support embeddings, text embeddings) → classifier parameters, in one forward pass.

use std::collections::HashSet;

use tract_nnef::prelude::*;

use crate::encoders::{Dim, ModelFile, Plan, run_f32, tensor};
use crate::error::{Error, Result};
use crate::manifest::{Manifest, Precision};

/// What the synthesizer may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SynthMode {
    /// Support images and descriptions (the default).
    ImagesAndText,
    /// Support images only (descriptions dropped).
    ImagesOnly,
    /// Descriptions only, zero-shot (images dropped).
    TextOnly,
}

impl SynthMode {
    /// Short label stored in the classifier and used in reports.
    pub fn label(self) -> &'static str {
        match self {
            SynthMode::ImagesAndText => "images+text",
            SynthMode::ImagesOnly => "images",
            SynthMode::TextOnly => "text",
        }
    }
}

/// One class of a support set, already embedded.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClassSupport {
    pub name: String,
    pub description: Option<String>,
    /// Embedding of `description` (None when there is none).
    pub text_embedding: Option<Vec<f32>>,
    /// Image embeddings of the support shots (0..=max_shots).
    pub shots: Vec<Vec<f32>>,
}

/// Raw outputs of G.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthOutput {
    pub weight: Vec<Vec<f32>>,
    pub bias: Vec<f32>,
    pub scale: f32,
}

impl SynthOutput {
    /// Class probabilities of one embedding under this head (what [`crate::classifier::Classifier`]
    /// predicts from the same parameters; eval scores the head without building a classifier).
    pub fn probabilities(&self, e: &[f32]) -> Vec<f32> {
        crate::classifier::softmax(&crate::classifier::cosine_logits(
            &self.weight,
            &self.bias,
            self.scale,
            e,
        ))
    }
}

/// The padded, masked input tensors of G (row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct SynthInputs {
    pub n: usize,
    pub k: usize,
    pub support: Vec<f32>,
    pub support_mask: Vec<f32>,
    pub text: Vec<f32>,
    pub text_mask: Vec<f32>,
}

/// Limits and sizes G works with (from the manifest).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SynthLimits {
    pub max_classes: usize,
    pub max_shots: usize,
    pub image_dim: usize,
    pub text_dim: usize,
}

impl SynthLimits {
    pub fn from_manifest(m: &Manifest) -> SynthLimits {
        SynthLimits {
            max_classes: m.synthesizer.max_classes,
            max_shots: m.synthesizer.max_shots,
            image_dim: m.image_encoder.embedding_dim,
            text_dim: m.text_dim(),
        }
    }

    /// Validate a support set for `mode` and build G's padded inputs
    /// (K = max shots; K = 0 becomes K = 1 with an all-zero mask).
    pub fn build_inputs(&self, classes: &[ClassSupport], mode: SynthMode) -> Result<SynthInputs> {
        let n = classes.len();
        if n < 2 || n > self.max_classes {
            return Err(Error::Support(format!(
                "{n} classes given; a classifier needs 2 to {} classes",
                self.max_classes
            )));
        }
        let mut seen = HashSet::new();
        for c in classes {
            if c.name.trim().is_empty() {
                return Err(Error::Support("a class has an empty name".into()));
            }
            if !seen.insert(c.name.as_str()) {
                return Err(Error::Support(format!(
                    "class name {:?} appears twice; class names must be unique",
                    c.name
                )));
            }
            if c.shots.len() > self.max_shots {
                return Err(Error::Support(format!(
                    "class {:?} has {} images; at most {} per class are supported",
                    c.name,
                    c.shots.len(),
                    self.max_shots
                )));
            }
            if let Some(s) = c.shots.iter().find(|s| s.len() != self.image_dim) {
                return Err(Error::Support(format!(
                    "class {:?}: image embedding has {} values, the encoder produces {}",
                    c.name,
                    s.len(),
                    self.image_dim
                )));
            }
            if let Some(t) = &c.text_embedding
                && t.len() != self.text_dim
            {
                return Err(Error::Support(format!(
                    "class {:?}: text embedding has {} values, the text encoder produces {}",
                    c.name,
                    t.len(),
                    self.text_dim
                )));
            }
            let use_shots = mode != SynthMode::TextOnly && !c.shots.is_empty();
            let use_text = mode != SynthMode::ImagesOnly && c.text_embedding.is_some();
            if !use_shots && !use_text {
                let (what, fix) = match mode {
                    SynthMode::ImagesAndText => (
                        "neither support images nor a description",
                        "give it at least one image or a description",
                    ),
                    SynthMode::ImagesOnly => (
                        "no support images (image-only synthesis)",
                        "give it at least one image",
                    ),
                    SynthMode::TextOnly => (
                        "no description (text-only synthesis)",
                        "give it a description",
                    ),
                };
                return Err(Error::Support(format!(
                    "class {:?} has {what}; {fix}",
                    c.name
                )));
            }
        }
        let k = if mode == SynthMode::TextOnly {
            1
        } else {
            classes
                .iter()
                .map(|c| c.shots.len())
                .max()
                .unwrap_or(0)
                .max(1)
        };
        let (d, t) = (self.image_dim, self.text_dim);
        let mut inp = SynthInputs {
            n,
            k,
            support: vec![0.0; n * k * d],
            support_mask: vec![0.0; n * k],
            text: vec![0.0; n * t],
            text_mask: vec![0.0; n],
        };
        for (i, c) in classes.iter().enumerate() {
            if mode != SynthMode::TextOnly {
                for (j, s) in c.shots.iter().enumerate() {
                    inp.support[(i * k + j) * d..(i * k + j + 1) * d].copy_from_slice(s);
                    inp.support_mask[i * k + j] = 1.0;
                }
            }
            if mode != SynthMode::ImagesOnly
                && let Some(te) = &c.text_embedding
            {
                inp.text[i * t..(i + 1) * t].copy_from_slice(te);
                inp.text_mask[i] = 1.0;
            }
        }
        Ok(inp)
    }
}

/// The loaded synthesizer model.
pub struct Synthesizer {
    plan: Plan,
    pub limits: SynthLimits,
    pub sha256: String,
}

impl Synthesizer {
    /// The synthesizer file, checked against its SHA-256, with symbolic N (classes) and K (shots).
    pub(crate) fn model_file(manifest: &Manifest) -> Result<ModelFile<'_>> {
        let s = &manifest.synthesizer;
        let path = manifest.verified_path(&s.file, &s.sha256)?;
        let limits = SynthLimits::from_manifest(manifest);
        let (d, t) = (limits.image_dim, limits.text_dim);
        let f = f32::datum_type();
        Ok(ModelFile {
            path,
            inputs: vec![
                (
                    s.inputs.support.as_str(),
                    f,
                    vec![Dim::Sym("N"), Dim::Sym("K"), Dim::Fixed(d)],
                ),
                (
                    s.inputs.support_mask.as_str(),
                    f,
                    vec![Dim::Sym("N"), Dim::Sym("K")],
                ),
                (
                    s.inputs.text.as_str(),
                    f,
                    vec![Dim::Sym("N"), Dim::Fixed(t)],
                ),
                (s.inputs.text_mask.as_str(), f, vec![Dim::Sym("N")]),
            ],
            outputs: vec![
                s.outputs.weight.as_str(),
                s.outputs.bias.as_str(),
                s.outputs.scale.as_str(),
            ],
            precision: Precision::F32,
        })
    }

    /// Verify and load the synthesizer (ONNX, or the NNEF archive of a board bundle).
    pub fn load(manifest: &Manifest) -> Result<Synthesizer> {
        let s = &manifest.synthesizer;
        let file = Self::model_file(manifest)?;
        let limits = SynthLimits::from_manifest(manifest);
        let plan = file.load()?;
        let path = file.path;
        log::info!("loaded synthesizer ({})", path.display());
        Ok(Synthesizer {
            plan,
            limits,
            sha256: s.sha256.to_ascii_lowercase(),
        })
    }

    /// Validate the support set and run G once.
    pub fn run(&self, classes: &[ClassSupport], mode: SynthMode) -> Result<SynthOutput> {
        let inp = self.limits.build_inputs(classes, mode)?;
        self.run_inputs(&inp)
    }

    /// Run G on prepared inputs.
    pub fn run_inputs(&self, inp: &SynthInputs) -> Result<SynthOutput> {
        let what = "synthesizer";
        let (n, k, d, t) = (inp.n, inp.k, self.limits.image_dim, self.limits.text_dim);
        let inputs = tvec![
            tensor(what, &[n, k, d], &inp.support)?,
            tensor(what, &[n, k], &inp.support_mask)?,
            tensor(what, &[n, t], &inp.text)?,
            tensor(what, &[n], &inp.text_mask)?,
        ];
        let outs = run_f32(&self.plan, what, inputs)?;
        let bad = |reason: String| Error::Inference {
            model: what.into(),
            reason,
        };
        let [(ws, w), (bs, b), (_, s)] = <[_; 3]>::try_from(outs)
            .map_err(|o: Vec<_>| bad(format!("{} outputs, expected 3", o.len())))?;
        if ws != [n, d] || b.len() != n || bs.iter().product::<usize>() != n || s.len() != 1 {
            return Err(bad(format!(
                "output shapes weight {ws:?}, bias {bs:?}, scale {} values; expected [{n}, {d}], [{n}], 1",
                s.len()
            )));
        }
        Ok(SynthOutput {
            weight: w.chunks(d).map(|c| c.to_vec()).collect(),
            bias: b,
            scale: s[0],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: SynthLimits = SynthLimits {
        max_classes: 16,
        max_shots: 20,
        image_dim: 3,
        text_dim: 2,
    };

    fn class(name: &str, shots: usize, text: bool) -> ClassSupport {
        ClassSupport {
            name: name.into(),
            description: text.then(|| format!("{name} text")),
            text_embedding: text.then(|| vec![0.5, 0.5]),
            shots: (0..shots).map(|i| vec![i as f32 + 1.0, 0.0, 1.0]).collect(),
        }
    }

    #[test]
    fn pads_shots_and_masks() {
        let inp = L
            .build_inputs(
                &[class("a", 2, true), class("b", 1, false)],
                SynthMode::ImagesAndText,
            )
            .unwrap();
        assert_eq!((inp.n, inp.k), (2, 2));
        assert_eq!(inp.support_mask, vec![1.0, 1.0, 1.0, 0.0]);
        assert_eq!(inp.text_mask, vec![1.0, 0.0]);
        assert_eq!(&inp.support[3..6], &[2.0, 0.0, 1.0]);
        assert_eq!(&inp.support[9..12], &[0.0, 0.0, 0.0]);
        assert_eq!(inp.text, vec![0.5, 0.5, 0.0, 0.0]);
    }

    #[test]
    fn modes_drop_shots_or_text() {
        let cs = [class("a", 2, true), class("b", 3, true)];
        let t = L.build_inputs(&cs, SynthMode::TextOnly).unwrap();
        assert_eq!(t.k, 1);
        assert!(t.support_mask.iter().all(|m| *m == 0.0));
        assert!(t.support.iter().all(|m| *m == 0.0));
        assert_eq!(t.text_mask, vec![1.0, 1.0]);
        let i = L.build_inputs(&cs, SynthMode::ImagesOnly).unwrap();
        assert_eq!(i.k, 3);
        assert_eq!(i.text_mask, vec![0.0, 0.0]);
        assert!(i.text.iter().all(|m| *m == 0.0));
    }

    #[test]
    fn rejects_bad_support_sets_with_named_errors() {
        let err = |cs: &[ClassSupport], m| L.build_inputs(cs, m).unwrap_err().to_string();
        let e = err(
            &[class("a", 1, false), class("empty", 0, false)],
            SynthMode::ImagesAndText,
        );
        assert!(e.contains("\"empty\"") && e.contains("neither"), "{e}");
        let e = err(
            &[class("a", 1, true), class("b", 1, false)],
            SynthMode::TextOnly,
        );
        assert!(e.contains("\"b\"") && e.contains("description"), "{e}");
        let e = err(
            &[class("a", 0, true), class("b", 1, true)],
            SynthMode::ImagesOnly,
        );
        assert!(e.contains("\"a\""), "{e}");
        let e = err(&[class("a", 1, true)], SynthMode::ImagesAndText);
        assert!(e.contains("2 to 16"), "{e}");
        let many: Vec<_> = (0..17).map(|i| class(&format!("c{i}"), 1, false)).collect();
        assert!(err(&many, SynthMode::ImagesAndText).contains("17 classes"));
        let e = err(
            &[class("a", 1, true), class("a", 1, true)],
            SynthMode::ImagesAndText,
        );
        assert!(e.contains("twice"), "{e}");
        let e = err(
            &[class("a", 21, true), class("b", 1, true)],
            SynthMode::ImagesAndText,
        );
        assert!(e.contains("21 images"), "{e}");
        let mut bad = class("a", 1, true);
        bad.shots[0].push(1.0);
        let e = err(&[bad, class("b", 1, true)], SynthMode::ImagesAndText);
        assert!(e.contains("4 values"), "{e}");
    }
}
