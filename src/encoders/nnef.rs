//! Translate the shipped ONNX models to tract's NNEF archives, for board binaries built without
//! the ONNX reader (`cargo xtask dist`). Only in builds with the `onnx` feature.

use std::path::Path;

use serde_json::Value;

use super::{ImageEncoder, TextEncoder, nnef_name};
use crate::error::{Error, Result};
use crate::manifest::{Manifest, sha256_file};
use crate::synthesizer::Synthesizer;

/// Write the NNEF archives of the image encoder `image_variant`, the text encoder `text_variant`
/// (where given: only models whose synthesizer reads the MiniLM embedding need it) and the
/// synthesizer into `out`, and return the manifest's text with every entry that named one of those
/// ONNX files now naming its archive (file, SHA-256, size). Everything else in the manifest, the
/// variants' precision included, is kept: a float16 variant is translated by tract at load, as from
/// ONNX.
pub fn translate_models(
    manifest: &Manifest,
    manifest_text: &str,
    image_variant: &str,
    text_variant: Option<&str>,
    out: &Path,
) -> Result<String> {
    let mut doc: Value = serde_json::from_str(manifest_text)
        .map_err(|e| Error::Invalid(format!("manifest.json: {e}")))?;
    std::fs::create_dir_all(out).map_err(|e| Error::ModelLoad {
        path: out.to_path_buf(),
        reason: format!("cannot create the directory: {e}"),
    })?;
    let (_, image) = manifest.image_variant(Some(image_variant))?;
    let target = out.join(nnef_name(&image.file));
    ImageEncoder::model_file(manifest, Some(image_variant))?
        .2
        .write_nnef(&target)?;
    rename_variants(&mut doc["image_encoder"]["variants"], &image.file, &target)?;
    if let Some(tv) = text_variant {
        let (_, text) = manifest.text_variant(Some(tv))?;
        let target = out.join(nnef_name(&text.file));
        TextEncoder::model_file(manifest, Some(tv))?
            .2
            .write_nnef(&target)?;
        rename_variants(&mut doc["text_encoder"]["variants"], &text.file, &target)?;
    }
    let target = out.join(nnef_name(&manifest.synthesizer.file));
    Synthesizer::model_file(manifest)?.write_nnef(&target)?;
    set_file(&mut doc["synthesizer"], &target)?;
    serde_json::to_string_pretty(&doc).map_err(|e| Error::Invalid(format!("manifest.json: {e}")))
}

/// Point every variant stored in `onnx_file` at the archive `nnef`.
fn rename_variants(variants: &mut Value, onnx_file: &str, nnef: &Path) -> Result<()> {
    let Some(map) = variants.as_object_mut() else {
        return Err(Error::Invalid(
            "manifest.json: variants is not an object".into(),
        ));
    };
    for entry in map.values_mut() {
        if entry["file"].as_str() == Some(onnx_file) {
            set_file(entry, nnef)?;
        }
    }
    Ok(())
}

fn set_file(entry: &mut Value, path: &Path) -> Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let bytes = std::fs::metadata(path)
        .map_err(|e| Error::ModelLoad {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?
        .len();
    entry["file"] = name.into();
    entry["sha256"] = sha256_file(path)?.into();
    entry["bytes"] = bytes.into();
    Ok(())
}
