//! Text encoder E_T: tokenizer (pure-Rust `tokenizers`) + MiniLM ONNX → L2-normalised embedding.
//!
//! The tokenizer is behind the `minilm` cargo feature (on by default). A build without it (what
//! `cargo xtask dist` builds for boards whose synthesizer reads only word features) still runs
//! every model but this one: loading the text encoder then fails with a message that says so.

#[cfg(feature = "minilm")]
pub use tokenizers::Tokenizer;
#[cfg(feature = "minilm")]
use tokenizers::TruncationParams;
use tract_nnef::prelude::*;

/// Stand-in for the tokenizer in a build without the `minilm` feature (never constructed).
#[cfg(not(feature = "minilm"))]
pub struct Tokenizer(());

#[cfg(not(feature = "minilm"))]
const NO_MINILM: &str = "this sgps was built without the `minilm` feature (the lean board build), so it cannot \
                         run the MiniLM text encoder; use a build with default features (`cargo build --release`), \
                         or the release bundle `cargo xtask dist` makes for models that read MiniLM";

use super::{Dim, ModelFile, Plan, rows, run_f32, tensor};
use crate::error::{Error, Result};
use crate::manifest::Manifest;

/// Token ids of one batch, padded to the longest sequence (no fixed-length padding).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    pub n: usize,
    pub seq: usize,
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub token_type_ids: Vec<i64>,
}

/// The loaded tokenizer and text encoder.
pub struct TextEncoder {
    plan: Plan,
    tokenizer: Tokenizer,
    has_token_type_ids: bool,
    pub embedding_dim: usize,
    pub max_tokens: usize,
    pub variant: String,
    pub sha256: String,
}

impl TextEncoder {
    /// The text encoder file `variant` (`None` = manifest default), checked against its SHA-256,
    /// with the token inputs the runtime feeds it (symbolic batch and length).
    pub(crate) fn model_file<'m>(
        manifest: &'m Manifest,
        variant: Option<&str>,
    ) -> Result<(&'m str, &'m crate::manifest::FileEntry, ModelFile<'m>)> {
        let spec = &manifest.text_encoder;
        let (name, entry) = manifest.text_variant(variant)?;
        let path = manifest.verified_path(&entry.file, &entry.sha256)?;
        let shape = || vec![Dim::Sym("N"), Dim::Sym("S")];
        let mut inputs = vec![
            (spec.inputs.input_ids.as_str(), i64::datum_type(), shape()),
            (
                spec.inputs.attention_mask.as_str(),
                i64::datum_type(),
                shape(),
            ),
        ];
        if let Some(tt) = &spec.inputs.token_type_ids {
            inputs.push((tt.as_str(), i64::datum_type(), shape()));
        }
        let file = ModelFile {
            path,
            inputs,
            outputs: vec![spec.output.as_str()],
            precision: entry.precision,
        };
        Ok((name, entry, file))
    }

    /// Verify and load the tokenizer and text encoder `variant` (`None` = manifest default).
    pub fn load(manifest: &Manifest, variant: Option<&str>) -> Result<TextEncoder> {
        let spec = &manifest.text_encoder;
        let tok_path = manifest.verified_path(&spec.tokenizer.file, &spec.tokenizer.sha256)?;
        let tokenizer = load_tokenizer(&tok_path, spec.max_tokens)?;
        let (name, entry, file) = Self::model_file(manifest, variant)?;
        let plan = file.load()?;
        let path = file.path;
        log::info!("loaded text encoder {name} ({})", path.display());
        Ok(TextEncoder {
            plan,
            tokenizer,
            has_token_type_ids: spec.inputs.token_type_ids.is_some(),
            embedding_dim: spec.embedding_dim,
            max_tokens: spec.max_tokens,
            variant: name.to_string(),
            sha256: entry.sha256.to_ascii_lowercase(),
        })
    }

    /// Tokenize a batch: special tokens added, truncated to `max_tokens`, padded to the longest.
    pub fn tokenize(&self, texts: &[&str]) -> Result<TokenBatch> {
        tokenize_with(&self.tokenizer, texts)
    }

    /// Embed texts, one forward pass per text (no padding at all).
    ///
    /// One text per run keeps each embedding independent of the other texts: a dynamically
    /// quantized variant (int8 activations) quantizes over the whole input tensor, so padding and
    /// batch neighbours would change the result; the shipped fp32-arithmetic variant needs no
    /// padding either. Descriptions are few (<= max classes), so the cost is small.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(texts.len());
        for t in texts {
            out.extend(self.embed_batch(&[t])?);
        }
        Ok(out)
    }

    /// Embed texts in one forward pass, padded to the longest (results depend on the batch with
    /// dynamically quantized encoders; prefer [`TextEncoder::embed`]).
    pub fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let b = self.tokenize(texts)?;
        let mut outs = run_f32(&self.plan, "text encoder", self.inputs(&b)?)?;
        let (shape, data) = outs.remove(0);
        rows("text encoder", &shape, data, b.n, self.embedding_dim)
    }

    /// The plan's inputs for a tokenized batch.
    pub fn inputs(&self, b: &TokenBatch) -> Result<TVec<TValue>> {
        let shape = [b.n, b.seq];
        let mut inputs = tvec![
            tensor("text encoder", &shape, &b.input_ids)?,
            tensor("text encoder", &shape, &b.attention_mask)?,
        ];
        if self.has_token_type_ids {
            inputs.push(tensor("text encoder", &shape, &b.token_type_ids)?);
        }
        Ok(inputs)
    }

    /// The optimised plan (for `sgps bench --profile`).
    pub fn plan(&self) -> &Plan {
        &self.plan
    }
}

/// Load `tokenizer.json` offline: refused in a build without the `minilm` feature.
#[cfg(not(feature = "minilm"))]
pub fn load_tokenizer(_path: &std::path::Path, _max_tokens: usize) -> Result<Tokenizer> {
    Err(Error::Tokenizer(NO_MINILM.into()))
}

/// No tokenizer exists in a build without the `minilm` feature.
#[cfg(not(feature = "minilm"))]
pub fn tokenize_with(_tok: &Tokenizer, _texts: &[&str]) -> Result<TokenBatch> {
    Err(Error::Tokenizer(NO_MINILM.into()))
}

/// Load `tokenizer.json` offline with truncation to `max_tokens` and no padding.
#[cfg(feature = "minilm")]
pub fn load_tokenizer(path: &std::path::Path, max_tokens: usize) -> Result<Tokenizer> {
    let mut tok = Tokenizer::from_file(path)
        .map_err(|e| Error::Tokenizer(format!("cannot load {}: {e}", path.display())))?;
    tok.with_padding(None);
    tok.with_truncation(Some(TruncationParams {
        max_length: max_tokens,
        ..Default::default()
    }))
    .map_err(|e| Error::Tokenizer(e.to_string()))?;
    Ok(tok)
}

/// Tokenize with an already configured tokenizer (see [`load_tokenizer`]).
#[cfg(feature = "minilm")]
pub fn tokenize_with(tok: &Tokenizer, texts: &[&str]) -> Result<TokenBatch> {
    let encs = texts
        .iter()
        .map(|t| tok.encode(*t, true))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let n = encs.len();
    let seq = encs
        .iter()
        .map(|e| e.get_ids().len())
        .max()
        .unwrap_or(0)
        .max(1);
    let mut b = TokenBatch {
        n,
        seq,
        input_ids: vec![0; n * seq],
        attention_mask: vec![0; n * seq],
        token_type_ids: vec![0; n * seq],
    };
    for (i, e) in encs.iter().enumerate() {
        for (j, ((id, m), tt)) in e
            .get_ids()
            .iter()
            .zip(e.get_attention_mask())
            .zip(e.get_type_ids())
            .enumerate()
        {
            b.input_ids[i * seq + j] = *id as i64;
            b.attention_mask[i * seq + j] = *m as i64;
            b.token_type_ids[i * seq + j] = *tt as i64;
        }
    }
    Ok(b)
}
