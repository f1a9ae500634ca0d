//! The encoders (image E_I, text E_T) and the shared tract loading helper.
//!
//! Models are read from ONNX (the files in `models/`, with the `onnx` cargo feature, on by
//! default) or from tract's NNEF archive (`*.nnef.tar`, which `cargo xtask dist` writes for the
//! boards from the ONNX files: a board binary built without the ONNX reader is ~6 MB smaller).
//! Both go through the same typed, decluttered graph, so they run the same plan.

mod fused;
pub mod image;
mod kernels;
#[cfg(feature = "onnx")]
pub mod nnef;
pub mod stem;
pub mod text;
pub mod words;

use std::path::PathBuf;
use std::sync::Arc;

use tract_nnef::prelude::*;

use crate::error::{Error, Result};
use crate::manifest::Precision;

pub use self::image::ImageEncoder;
pub use self::text::TextEncoder;
pub use self::words::WordFeatures;

/// A runnable, optimised tract plan.
pub type Plan = Arc<TypedRunnableModel>;

/// One dimension of an input fact: a named symbol (e.g. the batch) or a fixed size.
#[derive(Debug, Clone, Copy)]
// the symbol's name is read only by the ONNX reader (an NNEF graph names its own symbols)
#[cfg_attr(not(feature = "onnx"), allow(dead_code))]
pub(crate) enum Dim {
    Sym(&'static str),
    Fixed(usize),
}

/// File-name suffix of the NNEF archives `cargo xtask dist` writes for boards.
pub const NNEF_SUFFIX: &str = ".nnef.tar";

/// True when `file` names an NNEF archive (or an unpacked `*.nnef` directory) rather than ONNX.
pub fn is_nnef(file: &str) -> bool {
    file.ends_with(NNEF_SUFFIX) || file.ends_with(".nnef")
}

/// The NNEF file name for an ONNX model file (`image_encoder.onnx` -> `image_encoder.nnef.tar`).
pub fn nnef_name(onnx_file: &str) -> String {
    format!(
        "{}{NNEF_SUFFIX}",
        onnx_file.strip_suffix(".onnx").unwrap_or(onnx_file)
    )
}

/// A model file with the inputs (name, type, shape) and outputs the runtime uses it with.
pub(crate) struct ModelFile<'a> {
    pub path: PathBuf,
    pub inputs: Vec<(&'a str, DatumType, Vec<Dim>)>,
    pub outputs: Vec<&'a str>,
    pub precision: Precision,
}

impl ModelFile<'_> {
    fn load_err(&self, e: TractError) -> Error {
        Error::ModelLoad {
            path: self.path.clone(),
            reason: format!("{e:#}"),
        }
    }

    fn input_names(&self) -> Vec<&str> {
        self.inputs.iter().map(|(n, _, _)| *n).collect()
    }

    /// The typed, decluttered graph, from ONNX or NNEF by the file's name.
    pub(crate) fn typed(&self) -> Result<TypedModel> {
        let name = self.path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if is_nnef(name) {
            self.typed_from_nnef()
        } else {
            self.typed_from_onnx()
        }
    }

    #[cfg(not(feature = "onnx"))]
    fn typed_from_onnx(&self) -> Result<TypedModel> {
        Err(Error::ModelLoad {
            path: self.path.clone(),
            reason: "this sgps was built without the ONNX reader (cargo feature `onnx`) and reads \
                     only NNEF models (*.nnef.tar): install the release bundle `cargo xtask dist` \
                     makes for the board, which carries them, or use a build with default features"
                .into(),
        })
    }

    /// Read the ONNX file, declare its inputs (by name, type and shape with symbolic dimensions)
    /// and select its outputs by name.
    #[cfg(feature = "onnx")]
    fn typed_from_onnx(&self) -> Result<TypedModel> {
        use tract_onnx::prelude::{Framework as _, InferenceFact, InferenceModelExt as _};
        use tract_onnx::tract_hir::infer::Factoid;
        let err = |e: TractError| self.load_err(e);
        let mut model = tract_onnx::onnx().model_for_path(&self.path).map_err(err)?;
        model
            .set_input_names(self.input_names())
            .map_err(|e| Error::ModelLoad {
                path: self.path.clone(),
                reason: format!(
                    "inputs {:?} not found ({e}); the model does not match models/manifest.json",
                    self.input_names()
                ),
            })?;
        for (ix, (_, dt, dims)) in self.inputs.iter().enumerate() {
            // Keep the model's own symbolic dimension names (e.g. `batch`, `seq`) where it
            // declares them, so they unify with the shapes annotated inside the graph.
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
            .select_outputs_by_name(self.outputs.iter().copied())
            .map_err(|e| self.outputs_not_found(e))?;
        model
            .into_typed()
            .and_then(|m| m.into_decluttered())
            .map_err(err)
    }

    fn outputs_not_found(&self, e: TractError) -> Error {
        Error::ModelLoad {
            path: self.path.clone(),
            reason: format!(
                "outputs {:?} not found ({e}); the model does not match models/manifest.json",
                self.outputs
            ),
        }
    }

    /// Read an NNEF archive written by [`ModelFile::write_nnef`] and check that its inputs are
    /// the ones the manifest names, with their types and fixed sizes.
    fn typed_from_nnef(&self) -> Result<TypedModel> {
        let mut model = nnef_framework()
            .model_for_path(&self.path)
            .map_err(|e| self.load_err(e))?;
        let mismatch = |what: String| Error::ModelLoad {
            path: self.path.clone(),
            reason: format!("{what}; the model does not match models/manifest.json"),
        };
        let have: Vec<String> = model
            .input_outlets()
            .map_err(|e| self.load_err(e))?
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        if have.len() != self.inputs.len()
            || self
                .inputs
                .iter()
                .any(|(n, _, _)| !have.iter().any(|h| h == n))
        {
            return Err(mismatch(format!(
                "inputs are {have:?}, expected {:?}",
                self.input_names()
            )));
        }
        model
            .set_input_names(self.input_names())
            .map_err(|e| self.load_err(e))?;
        for (ix, (name, dt, dims)) in self.inputs.iter().enumerate() {
            let fact = model.input_fact(ix).map_err(|e| self.load_err(e))?;
            let fixed_ok = fact.rank() == dims.len()
                && dims.iter().zip(fact.shape.iter()).all(|(d, have)| match d {
                    Dim::Fixed(n) => have.to_i64().ok() == Some(*n as i64),
                    Dim::Sym(_) => true,
                });
            if fact.datum_type != *dt || !fixed_ok {
                return Err(mismatch(format!(
                    "input {name} is {fact:?}, expected {dt:?} of shape {dims:?}"
                )));
            }
        }
        model
            .select_outputs_by_name(self.outputs.iter().copied())
            .map_err(|e| self.outputs_not_found(e))?;
        model.into_decluttered().map_err(|e| self.load_err(e))
    }

    /// Translate to the plan's precision, optimise and make runnable.
    pub fn load(&self) -> Result<Plan> {
        let err = |e: TractError| self.load_err(e);
        let mut typed = self.typed()?;
        if self.precision == Precision::F16 {
            let f16 = tract_nnef::tract_core::transform::get_transform("f32_to_f16")
                .map_err(err)?
                .ok_or_else(|| Error::ModelLoad {
                    path: self.path.clone(),
                    reason: "this tract has no f32_to_f16 transform".into(),
                })?;
            f16.transform(&mut typed).map_err(err)?;
        } else {
            // the image encoder's stem as a direct convolution where the CPU runs it (x86_64)
            stem::rewrite(&mut typed).map_err(err)?;
        }
        let mut optimised = typed.into_optimized().map_err(err)?;
        fused::depthwise_clips(&mut optimised).map_err(err)?;
        optimised.into_runnable().map_err(err)
    }

    /// Write the typed, decluttered graph (at the file's own precision: a float16 translation
    /// happens at load) as an NNEF archive at `out`, through a temporary file.
    #[cfg(feature = "onnx")]
    pub fn write_nnef(&self, out: &std::path::Path) -> Result<()> {
        let mut typed = self.typed()?;
        nnef_serializable(&mut typed).map_err(|e| self.load_err(e))?;
        let tmp = out.with_extension("tmp");
        let io = |e: std::io::Error| Error::ModelLoad {
            path: out.to_path_buf(),
            reason: format!("cannot write the NNEF archive: {e}"),
        };
        let file = std::fs::File::create(&tmp).map_err(io)?;
        let file = nnef_framework()
            .write_to_tar(&typed, std::io::BufWriter::new(file))
            .map_err(|e| Error::ModelLoad {
                path: self.path.clone(),
                reason: format!("cannot translate to NNEF: {e:#}"),
            })?;
        file.into_inner()
            .map_err(|e| io(e.into_error()))?
            .sync_all()
            .map_err(io)?;
        std::fs::rename(&tmp, out).map_err(io)
    }
}

/// tract's NNEF reader and writer, plus the `sgps` registry: serializers tract 0.23 lacks for ops
/// its ONNX translation makes (`GeluExact`, fused from the MiniLM encoder's Erf chain). An archive
/// that uses one says `extension tract_registry sgps`.
fn nnef_framework() -> tract_nnef::framework::Nnef {
    let mut sgps = tract_nnef::internal::Registry::new("sgps");
    sgps.register_unit_element_wise(
        "sgps_gelu_exact",
        &tract_nnef::tract_core::ops::nn::GeluExact {},
    );
    tract_nnef::nnef().with_registry(sgps)
}

/// Rewrite the ops of a decluttered graph that tract's NNEF writer has no serializer for as core
/// ops computing the same values: `DequantizeLinear` of the int8 embedding tables (after their
/// Gather) becomes cast to f32, minus the zero point, times the scale, exactly as tract evaluates it.
#[cfg(feature = "onnx")]
fn nnef_serializable(model: &mut TypedModel) -> TractResult<()> {
    use tract_nnef::tract_core::ops::cast::cast;
    use tract_nnef::tract_core::ops::change_axes::wire_with_rank_broadcast;
    use tract_nnef::tract_core::ops::math;
    use tract_nnef::tract_core::ops::quant::DequantizeLinearF32;
    let mut changed = false;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(dq) = node.op_as::<DequantizeLinearF32>() else {
            continue;
        };
        let (name, input, scale, zero_point) =
            (node.name.clone(), node.inputs[0], dq.scale, dq.zero_point);
        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(model, input)?;
        let x = patch.wire_node(format!("{name}.cast"), cast(f32::datum_type()), &[x])?[0];
        let zp = patch.add_const(format!("{name}.zero_point"), tensor0(zero_point as f32))?;
        let x =
            wire_with_rank_broadcast(format!("{name}.sub"), &mut patch, math::sub(), &[x, zp])?[0];
        let s = patch.add_const(format!("{name}.scale"), tensor0(scale))?;
        let y =
            wire_with_rank_broadcast(format!("{name}.mul"), &mut patch, math::mul(), &[x, s])?[0];
        patch.shunt_outside(model, id.into(), y)?;
        patch.apply(model)?;
        changed = true;
    }
    if changed {
        model.declutter()?;
    }
    Ok(())
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
