//! The runtime's error type: every variant says what was wrong and what to do about it.

use std::path::PathBuf;

/// Errors of the sgps runtime (model loading, images, synthesis, classifier artifacts).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "model file {path} is missing; restore it from the release bundle or regenerate the models with `cargo xtask train`"
    )]
    ModelMissing { path: PathBuf },

    #[error(
        "model file {path} does not match models/manifest.json (sha256 {actual}, expected {expected}): it is corrupt or was tampered with; restore it from the release bundle or regenerate the models with `cargo xtask train`"
    )]
    ModelTampered {
        path: PathBuf,
        expected: String,
        actual: String,
    },

    #[error("invalid model manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },

    #[error("could not load model {path}: {reason}")]
    ModelLoad { path: PathBuf, reason: String },

    #[error("inference failed in {model}: {reason}")]
    Inference { model: String, reason: String },

    #[error("tokenizer error: {0}")]
    Tokenizer(String),

    #[error("cannot read image {path}: {reason}")]
    Image { path: PathBuf, reason: String },

    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid support set: {0}")]
    Support(String),

    #[error("invalid input: {0}")]
    Invalid(String),

    #[error(
        "classifier file {path} is corrupt or truncated ({reason}); re-synthesize it with `sgps synth`"
    )]
    ClassifierCorrupt { path: PathBuf, reason: String },

    #[error(
        "classifier file {path} has format version {found}, this sgps reads version {expected}; re-synthesize it with `sgps synth`"
    )]
    ClassifierVersion {
        path: PathBuf,
        found: u16,
        expected: u16,
    },

    #[error(
        "classifier {path} was made for encoder {made_for}; the loaded encoder is {loaded} — re-synthesize it with `sgps synth`"
    )]
    ClassifierEncoder {
        path: PathBuf,
        made_for: String,
        loaded: String,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn image(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        Error::Image {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
