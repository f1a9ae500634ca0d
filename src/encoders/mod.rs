//! The ONNX encoders (image E_I, text E_T) and the shared tract loading helper.

pub mod image;
mod kernels;
pub mod text;
pub mod words;

use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use crate::error::{Error, Result};
use crate::manifest::Precision;

pub use self::image::ImageEncoder;
pub use self::text::TextEncoder;
pub use self::words::WordFeatures;

/// A runnable, optimised tract plan.
pub type Plan = Arc<TypedRunnableModel>;

/// One dimension of an input fact: a named symbol (e.g. the batch) or a fixed size.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Dim {
    Sym(&'static str),
    Fixed(usize),
}

/// Load an ONNX file with tract, declare its inputs (by name, type and shape with symbolic
/// dimensions), select its outputs by name, translate it to `precision`, optimise it and make it
/// runnable.
pub(crate) fn load_onnx(
    path: &Path,
    inputs: &[(&str, DatumType, &[Dim])],
    outputs: &[&str],
    precision: Precision,
) -> Result<Plan> {
    let err = |e: TractError| Error::ModelLoad {
        path: path.to_path_buf(),
        reason: format!("{e:#}"),
    };
    let mut model = tract_onnx::onnx().model_for_path(path).map_err(err)?;
    model
        .set_input_names(inputs.iter().map(|(n, _, _)| *n))
        .map_err(|e| Error::ModelLoad {
            path: path.to_path_buf(),
            reason: format!(
                "inputs {:?} not found ({e}); the model does not match models/manifest.json",
                inputs.iter().map(|(n, _, _)| *n).collect::<Vec<_>>()
            ),
        })?;
    for (ix, (_, dt, dims)) in inputs.iter().enumerate() {
        // Keep the model's own symbolic dimension names (e.g. `batch`, `seq`) where it declares
        // them, so they unify with the shapes annotated inside the graph.
        let declared: Vec<Option<TDim>> = model
            .input_fact(ix)
            .map(|f| f.shape.dims().map(|d| d.concretize()).collect())
            .unwrap_or_default();
        let shape: TVec<TDim> = dims
            .iter()
            .enumerate()
            .map(|(i, d)| match d {
                Dim::Sym(s) => match declared.get(i).cloned().flatten() {
                    Some(td) if td.to_i64().is_err() => td,
                    _ => model.sym(s).to_dim(),
                },
                Dim::Fixed(n) => n.to_dim(),
            })
            .collect();
        model
            .set_input_fact(ix, InferenceFact::dt_shape(*dt, shape))
            .map_err(err)?;
    }
    model
        .select_outputs_by_name(outputs.iter().copied())
        .map_err(|e| Error::ModelLoad {
            path: path.to_path_buf(),
            reason: format!(
                "outputs {outputs:?} not found ({e}); the model does not match models/manifest.json"
            ),
        })?;
    let typed = if precision == Precision::F16 {
        let mut typed = model
            .into_typed()
            .and_then(|m| m.into_decluttered())
            .map_err(err)?;
        let f16 = tract_onnx::tract_core::transform::get_transform("f32_to_f16")
            .map_err(err)?
            .ok_or_else(|| Error::ModelLoad {
                path: path.to_path_buf(),
                reason: "this tract has no f32_to_f16 transform".into(),
            })?;
        f16.transform(&mut typed).map_err(err)?;
        typed.into_optimized()
    } else {
        model.into_optimized()
    };
    let plan = typed.and_then(|m| m.into_runnable()).map_err(err)?;
    Ok(plan)
}

/// Cast float inputs to the float type the plan's inputs declare (float16 for a
/// [`Precision::F16`] plan); other inputs pass unchanged.
pub(crate) fn conform_inputs(
    plan: &Plan,
    what: &str,
    inputs: TVec<TValue>,
) -> Result<TVec<TValue>> {
    inputs
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let want = plan
                .model()
                .input_fact(i)
                .map(|f| f.datum_type)
                .unwrap_or(t.datum_type());
            if want == t.datum_type() || !want.is_float() || !t.datum_type().is_float() {
                return Ok(t);
            }
            t.cast_to_dt(want)
                .map(|c| c.into_owned().into_tvalue())
                .map_err(|e| Error::Inference {
                    model: what.to_string(),
                    reason: format!("{e:#}"),
                })
        })
        .collect()
}

/// Run a plan and return its outputs as (shape, data) f32 pairs.
pub(crate) fn run_f32(
    plan: &Plan,
    what: &str,
    inputs: TVec<TValue>,
) -> Result<Vec<(Vec<usize>, Vec<f32>)>> {
    let err = |e: TractError| Error::Inference {
        model: what.to_string(),
        reason: format!("{e:#}"),
    };
    let outs = plan.run(inputs).map_err(err)?;
    outs.iter()
        .map(|t| {
            let t = t.cast_to::<f32>().map_err(err)?;
            let v = t.to_plain_array_view::<f32>().map_err(err)?;
            Ok((v.shape().to_vec(), v.iter().copied().collect()))
        })
        .collect()
}

/// Make a tensor from a shape and data, mapping tract errors.
pub(crate) fn tensor<T: Datum + Copy>(what: &str, shape: &[usize], data: &[T]) -> Result<TValue> {
    Tensor::from_shape(shape, data)
        .map(|t| t.into_tvalue())
        .map_err(|e| Error::Inference {
            model: what.to_string(),
            reason: format!("{e:#}"),
        })
}

/// Split a row-major `[n, d]` buffer into rows, checking the shape.
pub(crate) fn rows(
    what: &str,
    shape: &[usize],
    data: Vec<f32>,
    n: usize,
    d: usize,
) -> Result<Vec<Vec<f32>>> {
    if shape != [n, d] {
        return Err(Error::Inference {
            model: what.to_string(),
            reason: format!("output shape {shape:?}, expected [{n}, {d}] per the manifest"),
        });
    }
    Ok(data.chunks(d).map(|c| c.to_vec()).collect())
}

/// L2-normalise in place (no-op on a zero vector).
pub fn l2_normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}
