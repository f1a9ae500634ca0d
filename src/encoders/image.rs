//! Image encoder E_I: preprocessed NCHW batch → L2-normalised embedding per image.

use image::RgbImage;
use tract_nnef::prelude::*;

use super::{Dim, ModelFile, Plan, conform_inputs, rows, run_f32, tensor};
use crate::error::Result;
use crate::manifest::Manifest;
use crate::preprocess::Preprocess;

/// Largest batch fed to the encoder at once (bounds activation memory).
///
/// 1: tract runs the fixed-batch-1 plan about 4x faster per image than the symbolic-batch plan
/// (EfficientNet-Lite0 fp32, 1 thread: 66 ms vs 285 ms per image at batch 1, 460 ms at batch 8;
/// a fixed batch of 8 gave 124 ms per image), so images go through it one at a time.
pub const MAX_BATCH: usize = 1;

/// The loaded, optimised image encoder.
pub struct ImageEncoder {
    /// The model optimised for batch 1 (the only one: see [`MAX_BATCH`]).
    plan1: Plan,
    pub preprocess: Preprocess,
    pub embedding_dim: usize,
    pub variant: String,
    pub sha256: String,
}

impl ImageEncoder {
    /// The image encoder file `variant` (`None` = manifest default), checked against its
    /// SHA-256, with the batch-1 input the runtime feeds it.
    pub(crate) fn model_file<'m>(
        manifest: &'m Manifest,
        variant: Option<&str>,
    ) -> Result<(&'m str, &'m crate::manifest::FileEntry, ModelFile<'m>)> {
        let spec = &manifest.image_encoder;
        let (name, entry) = manifest.image_variant(variant)?;
        let path = manifest.verified_path(&entry.file, &entry.sha256)?;
        let [h, w] = spec.input_size;
        let shape1 = vec![Dim::Fixed(1), Dim::Fixed(3), Dim::Fixed(h), Dim::Fixed(w)];
        let file = ModelFile {
            path,
            inputs: vec![(spec.input.as_str(), f32::datum_type(), shape1)],
            outputs: vec![spec.output.as_str()],
            precision: entry.precision,
        };
        Ok((name, entry, file))
    }

    /// Verify and load the image encoder `variant` (`None` = manifest default).
    pub fn load(manifest: &Manifest, variant: Option<&str>) -> Result<ImageEncoder> {
        let spec = &manifest.image_encoder;
        let (name, entry, file) = Self::model_file(manifest, variant)?;
        let plan1 = file.load()?;
        let path = file.path;
        log::info!("loaded image encoder {name} ({})", path.display());
        Ok(ImageEncoder {
            plan1,
            preprocess: Preprocess::from_spec(spec),
            embedding_dim: spec.embedding_dim,
            variant: name.to_string(),
            sha256: entry.sha256.to_ascii_lowercase(),
        })
    }

    /// The optimised batch-1 plan (for `sgps bench --profile`).
    pub fn plan(&self) -> &Plan {
        &self.plan1
    }

    /// Embed decoded RGB images (preprocessing included), in batches of at most [`MAX_BATCH`].
    pub fn embed(&self, imgs: &[RgbImage]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(imgs.len());
        for chunk in imgs.chunks(MAX_BATCH) {
            let t = self.preprocess.batch(chunk);
            out.extend(self.embed_tensor(&t, chunk.len())?);
        }
        Ok(out)
    }

    /// Embed an already preprocessed `[n, 3, H, W]` tensor, one image at a time through the
    /// batch-1 plan (used by the parity tests and the bench).
    pub fn embed_tensor(&self, data: &[f32], n: usize) -> Result<Vec<Vec<f32>>> {
        let (h, w) = (
            self.preprocess.height as usize,
            self.preprocess.width as usize,
        );
        let per = 3 * h * w;
        if data.len() != n * per {
            return Err(crate::error::Error::Inference {
                model: "image encoder".into(),
                reason: format!("{} values for {n} images of 3 x {h} x {w}", data.len()),
            });
        }
        let mut out = Vec::with_capacity(n);
        for img in data.chunks(per) {
            let mut outs = run_f32(&self.plan1, "image encoder", self.inputs(img)?)?;
            let (shape, data) = outs.remove(0);
            out.extend(rows("image encoder", &shape, data, 1, self.embedding_dim)?);
        }
        Ok(out)
    }

    /// The plan's inputs for one preprocessed `[3, H, W]` image.
    pub fn inputs(&self, img: &[f32]) -> Result<TVec<TValue>> {
        let (h, w) = (
            self.preprocess.height as usize,
            self.preprocess.width as usize,
        );
        conform_inputs(
            &self.plan1,
            "image encoder",
            tvec![tensor("image encoder", &[1, 3, h, w], img)?],
        )
    }
}
