//! The one pipeline every front end uses (CLI, device loop, eval, bench, demo):
//! decode → preprocess → E_I, text → E_T, support set → G → [`Classifier`] → prediction.

use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::classifier::{ClassInfo, Classifier, Prediction, now_unix};
use crate::encoders::{ImageEncoder, TextEncoder, WordFeatures};
use crate::error::{Error, Result};
use crate::image_io;
use crate::manifest::Manifest;
use crate::support::SupportSpec;
use crate::synthesizer::Synthesizer;

pub use crate::synthesizer::{ClassSupport, SynthMode};

/// An embedding vector (L2-normalised by the encoders).
pub type Embedding = Vec<f32>;

/// Environment variable naming the models directory.
pub const MODELS_ENV: &str = "SGPS_MODELS";

/// Which model variants to load and how many threads to use.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadOptions {
    /// Image-encoder variant (`fp32`, `int8`, …); `None` = manifest default.
    pub image_variant: Option<String>,
    /// Text-encoder variant; `None` = manifest default.
    pub text_variant: Option<String>,
    /// Inference threads; `None` = 1.
    pub threads: Option<usize>,
}

/// Where a class's support shots come from (see [`Pipeline::support`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Shots {
    /// Image files, decoded and embedded.
    Files(Vec<PathBuf>),
    /// Embeddings already computed (stored shots, an eval cache).
    Embedded(Vec<Embedding>),
}

/// One class as given to [`Pipeline::support`].
#[derive(Debug, Clone, PartialEq)]
pub struct SupportInput {
    pub name: String,
    pub description: Option<String>,
    /// The description's embedding when it is already known (computed otherwise).
    pub text_embedding: Option<Embedding>,
    pub shots: Shots,
}

impl SupportInput {
    /// A class whose description (if any) is still to be embedded.
    pub fn new(name: &str, description: Option<String>, shots: Shots) -> SupportInput {
        SupportInput {
            name: name.to_owned(),
            description,
            text_embedding: None,
            shots,
        }
    }
}

/// Loaded and optimised models plus the manifest.
pub struct Pipeline {
    manifest: Manifest,
    image: ImageEncoder,
    /// Loaded only where G reads the MiniLM embedding (`Manifest::uses_minilm`).
    text: Option<TextEncoder>,
    words: Option<WordFeatures>,
    synth: Synthesizer,
}

impl Pipeline {
    /// Read the manifest in `models_dir`, verify every model file's SHA-256 and load the models.
    pub fn load(models_dir: &Path, opts: &LoadOptions) -> Result<Pipeline> {
        configure_threads(opts.threads);
        let manifest = Manifest::load(models_dir)?;
        let image = ImageEncoder::load(&manifest, opts.image_variant.as_deref())?;
        let text = if manifest.uses_minilm() {
            Some(TextEncoder::load(&manifest, opts.text_variant.as_deref())?)
        } else {
            log::info!("the synthesizer reads no MiniLM embedding: text encoder not loaded");
            None
        };
        let words = WordFeatures::load(&manifest)?;
        let synth = Synthesizer::load(&manifest)?;
        Ok(Pipeline {
            manifest,
            image,
            text,
            words,
            synth,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn image_encoder(&self) -> &ImageEncoder {
        &self.image
    }

    /// The MiniLM text encoder, where the shipped synthesizer reads its embedding.
    pub fn text_encoder(&self) -> Option<&TextEncoder> {
        self.text.as_ref()
    }

    /// What turns a description into G's text features: "MiniLM <variant>", "words" or both.
    pub fn text_features_label(&self) -> String {
        let mut parts = Vec::new();
        if let Some(t) = &self.text {
            parts.push(format!("MiniLM {}", t.variant));
        }
        if self.words.is_some() {
            parts.push("words".to_string());
        }
        parts.join(" + ")
    }

    /// SHA-256 of the files behind G's text features (MiniLM's, then the word features'; joined
    /// by "+" when both are read).
    pub fn text_features_sha256(&self) -> String {
        let mut parts = Vec::new();
        if let Some(t) = &self.text {
            parts.push(t.sha256.as_str());
        }
        if let Some(w) = &self.words {
            parts.push(w.sha256.as_str());
        }
        parts.join("+")
    }

    pub fn synthesizer(&self) -> &Synthesizer {
        &self.synth
    }

    /// SHA-256 of the image encoder file in use (classifiers are bound to it).
    pub fn encoder_sha256(&self) -> &str {
        &self.image.sha256
    }

    /// Embed decoded RGB images (batched).
    pub fn embed_images(&self, imgs: &[RgbImage]) -> Result<Vec<Embedding>> {
        self.image.embed(imgs)
    }

    /// Decode (bounded, converted to RGB) and embed one image file; errors name the file.
    pub fn embed_image_file(&self, path: &Path) -> Result<Embedding> {
        let img = image_io::load_rgb(path)?;
        Ok(self.image.embed(std::slice::from_ref(&img))?.remove(0))
    }

    /// Embed many files, batched; a bad file gives an error in its slot and the rest still run.
    pub fn embed_image_files(&self, paths: &[PathBuf]) -> Vec<Result<Embedding>> {
        let mut out: Vec<Option<Result<Embedding>>> = (0..paths.len()).map(|_| None).collect();
        let batch = crate::encoders::image::MAX_BATCH;
        let mut pending: Vec<(usize, RgbImage)> = Vec::with_capacity(batch);
        let flush = |pending: &mut Vec<(usize, RgbImage)>,
                     out: &mut Vec<Option<Result<Embedding>>>| {
            if pending.is_empty() {
                return;
            }
            let imgs: Vec<RgbImage> = pending.iter().map(|(_, i)| i.clone()).collect();
            match self.image.embed(&imgs) {
                Ok(embs) => {
                    for ((ix, _), e) in pending.iter().zip(embs) {
                        out[*ix] = Some(Ok(e));
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    for (ix, _) in pending.iter() {
                        out[*ix] = Some(Err(Error::image(&paths[*ix], &msg)));
                    }
                }
            }
            pending.clear();
        };
        for (ix, p) in paths.iter().enumerate() {
            match image_io::load_rgb(p) {
                Ok(img) => pending.push((ix, img)),
                Err(e) => out[ix] = Some(Err(e)),
            }
            if pending.len() == batch {
                flush(&mut pending, &mut out);
            }
        }
        flush(&mut pending, &mut out);
        out.into_iter()
            .map(|o| o.expect("every slot filled"))
            .collect()
    }

    /// The text features G reads for each description (manifest `synthesizer.text_features`):
    /// the text encoder's embedding, the word features, or both side by side.
    pub fn embed_texts(&self, texts: &[&str]) -> Result<Vec<Embedding>> {
        let mut out = match &self.text {
            Some(t) => t.embed(texts)?,
            None => vec![Vec::new(); texts.len()],
        };
        if let Some(w) = &self.words {
            for (o, t) in out.iter_mut().zip(texts) {
                o.extend(w.vector(t));
            }
        }
        Ok(out)
    }

    /// The word features, where the shipped synthesizer reads them.
    pub fn word_features(&self) -> Option<&WordFeatures> {
        self.words.as_ref()
    }

    /// Run G on embedded classes and build the classifier (bound to this image encoder).
    pub fn synthesize(&self, classes: &[ClassSupport], mode: SynthMode) -> Result<Classifier> {
        let out = self.synth.run(classes, mode)?;
        let mut c = Classifier {
            classes: classes
                .iter()
                .map(|c| ClassInfo {
                    name: c.name.clone(),
                    description: match mode {
                        SynthMode::ImagesOnly => None,
                        _ => c.description.clone(),
                    },
                })
                .collect(),
            weight: out.weight,
            bias: out.bias,
            scale: out.scale,
            refer_threshold: self.manifest.head.refer_threshold,
            encoder_sha256: self.image.sha256.clone(),
            text_encoder_sha256: self.text_features_sha256(),
            synthesizer_sha256: self.synth.sha256.clone(),
            manifest_format: self.manifest.format,
            mode: mode.label().to_string(),
            shots: classes
                .iter()
                .map(|c| match mode {
                    SynthMode::TextOnly => 0,
                    _ => c.shots.len() as u32,
                })
                .collect(),
            created_at_unix: now_unix(),
            id: String::new(),
        };
        c.validate().map_err(|e| Error::Inference {
            model: "synthesizer".into(),
            reason: format!("produced an invalid classifier: {e}"),
        })?;
        c.refresh_id();
        Ok(c)
    }

    /// The one support builder: every front end (CLI, device, demo, bench, eval) turns its classes
    /// into synthesizer input here. Shots given as files are decoded and embedded (a bad file is
    /// an error naming it), shots already embedded (stored records, an eval cache) are taken as
    /// they are, and every description without a known embedding is embedded, in class order.
    pub fn support(&self, classes: Vec<SupportInput>) -> Result<Vec<ClassSupport>> {
        let max = self.manifest.synthesizer.max_shots;
        let mut out = Vec::with_capacity(classes.len());
        for c in classes {
            let n = match &c.shots {
                Shots::Files(p) => p.len(),
                Shots::Embedded(e) => e.len(),
            };
            if n > max {
                return Err(Error::Support(format!(
                    "class {:?} has {n} images; at most {max} per class are supported",
                    c.name
                )));
            }
            let shots = match c.shots {
                Shots::Files(paths) => self
                    .embed_image_files(&paths)
                    .into_iter()
                    .collect::<Result<Vec<_>>>()?,
                Shots::Embedded(e) => e,
            };
            out.push(ClassSupport {
                name: c.name,
                description: c.description,
                text_embedding: c.text_embedding,
                shots,
            });
        }
        self.embed_descriptions(&mut out)?;
        Ok(out)
    }

    /// Embed a support-set specification (its images and descriptions; see [`Pipeline::support`]).
    pub fn embed_support(&self, spec: &SupportSpec) -> Result<Vec<ClassSupport>> {
        self.support(
            spec.classes
                .iter()
                .map(|c| {
                    SupportInput::new(
                        &c.name,
                        c.description.clone(),
                        Shots::Files(c.images.clone()),
                    )
                })
                .collect(),
        )
    }

    /// Fill `text_embedding` of every class that has a description and no embedding yet (text
    /// encoder, class order).
    pub fn embed_descriptions(&self, classes: &mut [ClassSupport]) -> Result<()> {
        let (described, texts): (Vec<usize>, Vec<&str>) = classes
            .iter()
            .enumerate()
            .filter(|(_, c)| c.text_embedding.is_none())
            .filter_map(|(i, c)| c.description.as_deref().map(|d| (i, d)))
            .unzip();
        if described.is_empty() {
            return Ok(());
        }
        let embeddings = self.embed_texts(&texts)?;
        for (i, e) in described.into_iter().zip(embeddings) {
            classes[i].text_embedding = Some(e);
        }
        Ok(())
    }

    /// Embed a support-set specification and synthesize its classifier.
    pub fn synthesize_spec(&self, spec: &SupportSpec, mode: SynthMode) -> Result<Classifier> {
        let classes = self.embed_support(spec)?;
        self.synthesize(&classes, mode)
    }

    /// Load a classifier artifact and check it belongs to this pipeline's image encoder.
    pub fn load_classifier(&self, path: &Path) -> Result<Classifier> {
        Classifier::load(path, self.encoder_sha256())
    }

    /// Classify image files; a bad file gets an error in its slot, the others are still classified.
    pub fn classify_files(&self, clf: &Classifier, paths: &[PathBuf]) -> Vec<Result<Prediction>> {
        self.embed_image_files(paths)
            .into_iter()
            .map(|r| r.map(|e| clf.predict(&e)))
            .collect()
    }
}

/// Set tract's thread count (1 unless asked otherwise). Process-wide: tract keeps one default executor.
fn configure_threads(threads: Option<usize>) {
    use tract_linalg::multithread::{Executor, set_default_executor};
    let n = threads.unwrap_or(1).max(1);
    if n > 1 {
        log::info!("tract inference on {n} threads");
        set_default_executor(Executor::multithread(n));
    } else {
        set_default_executor(Executor::SingleThread);
    }
}

/// Where the models are: `flag` if given, else `$SGPS_MODELS`, else a `models/` directory with a
/// manifest found by [`locate_installed`], else `./models`.
pub fn resolve_models_dir(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os(MODELS_ENV).filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    locate_installed(Path::new("models"), |d| d.join("manifest.json").is_file())
        .unwrap_or_else(|| PathBuf::from("models"))
}

/// `rel` next to the executable or one of its ancestors (a release bundle, or the workspace when
/// run from `target/…`), else in the source workspace: the first that `ok` accepts.
pub fn locate_installed(rel: &Path, ok: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok();
    exe.iter()
        .flat_map(|e| e.ancestors().skip(1))
        .map(|a| a.join(rel))
        .chain(std::iter::once(
            Path::new(env!("CARGO_MANIFEST_DIR")).join(rel),
        ))
        .find(|c| ok(c))
}
