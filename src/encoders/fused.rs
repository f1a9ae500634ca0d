//! A fusion tract's optimiser does not make: the clip after a depthwise convolution.
//!
//! tract folds a ReLU6 clip into the matrix products it follows (the 1x1 convolutions), but
//! after a depthwise convolution it stays a separate `OptBinChain(Max+Min)` node, which reads the
//! convolution's output and writes the clipped one: 16 such nodes in the image encoder, 0.85 ms
//! of its ~19 ms at one thread on the development machine (issue 19's profile), about 0.35 ns per
//! value where an in-cache pass costs a tenth of that. [`depthwise_clips`] replaces each such pair
//! in an optimised graph by [`ClipAfter`]: the same depthwise operator, evaluated as before,
//! then the clip applied in place on its fresh output while it is still in cache. The values are
//! those of the two nodes (`max` then `min`, value for value), so the outputs are bit-identical.

use tract_nnef::internal::*;
use tract_nnef::tract_core::ops::binary::OptBinChain;
use tract_nnef::tract_core::ops::math::{Max, Min};

/// An operator followed by a clip to `[lo, hi]` on its single output, in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClipAfter {
    inner: Box<dyn TypedOp>,
    /// low and high bounds, as f32 bits (the op must be `Eq`)
    bounds: [u32; 2],
}

impl ClipAfter {
    fn clip(&self, values: &mut [f32]) {
        let [lo, hi] = self.bounds.map(f32::from_bits);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: the CPU has AVX
            return unsafe { clip_avx(values, lo, hi) };
        }
        clip_plain(values, lo, hi);
    }
}

/// `max(lo)` then `min(hi)`, value for value (finite values: the two nodes' results exactly).
fn clip_plain(values: &mut [f32], lo: f32, hi: f32) {
    for v in values {
        *v = v.max(lo).min(hi);
    }
}

/// [`clip_plain`] eight values a step.
///
/// # Safety
/// The CPU must have AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn clip_avx(values: &mut [f32], lo: f32, hi: f32) {
    use std::arch::x86_64::*;
    let mut chunks = values.chunks_exact_mut(8);
    // SAFETY: each chunk is 8 values; unaligned loads and stores
    unsafe {
        let (l, h) = (_mm256_set1_ps(lo), _mm256_set1_ps(hi));
        for c in &mut chunks {
            let v = _mm256_loadu_ps(c.as_ptr());
            _mm256_storeu_ps(c.as_mut_ptr(), _mm256_min_ps(_mm256_max_ps(v, l), h));
        }
    }
    clip_plain(chunks.into_remainder(), lo, hi);
}

impl Op for ClipAfter {
    fn name(&self) -> StaticName {
        format!("{}+Clip", self.inner.name()).into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let mut info = self.inner.info()?;
        info.push(format!("clip {:?}", self.bounds.map(f32::from_bits)));
        Ok(info)
    }

    fn validation(&self) -> Validation {
        self.inner.validation()
    }

    fn as_typed(&self) -> Option<&dyn TypedOp> {
        Some(self)
    }
}

impl EvalOp for ClipAfter {
    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        Ok(Some(self.eval(&EvalContext::out_of_plan(), inputs)?))
    }

    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let mut out = self.inner.eval(ctx, inputs)?;
        ensure!(
            out.len() == 1,
            "{} gave {} outputs",
            self.inner.name(),
            out.len()
        );
        // the operator's own fresh output: unshared, so this takes it without a copy
        let mut t = out.remove(0).into_tensor();
        self.clip(t.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?);
        Ok(tvec!(t.into_tvalue()))
    }
}

impl TypedOp for ClipAfter {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.inner.output_facts(inputs)
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        self.inner.cost(inputs)
    }

    fn as_op(&self) -> &dyn Op {
        self
    }

    fn as_op_mut(&mut self) -> &mut dyn Op {
        self
    }
}

/// The constant f32 scalar at `outlet`, if it is one.
pub(super) fn const_scalar(model: &TypedModel, outlet: OutletId) -> Option<f32> {
    let k = model.outlet_fact(outlet).ok()?.konst.clone()?;
    (k.len() == 1 && k.datum_type() == f32::datum_type())
        .then(|| k.cast_to_scalar::<f32>().ok())
        .flatten()
}

/// For an `OptBinChain(Max+Min)` node with scalar bounds reading a depthwise convolution's f32
/// output that nothing else reads: (the convolution's node, the clip's bounds).
fn candidate(model: &TypedModel, node: &TypedNode) -> Option<(usize, [f32; 2])> {
    let chain = node.op_as::<OptBinChain>()?;
    let [max, min] = &chain.steps[..] else {
        return None;
    };
    if !max.binop.is::<Max>() || !min.binop.is::<Min>() || node.inputs.len() != 3 {
        return None;
    }
    let (lo, hi) = (
        const_scalar(model, node.inputs[1])?,
        const_scalar(model, node.inputs[2])?,
    );
    let src = node.inputs[0];
    let conv = model.node(src.node);
    let fact = model.outlet_fact(src).ok()?;
    if conv.op.name() != "DepthWiseConv"
        || conv.outputs.len() != 1
        || fact.datum_type != f32::datum_type()
        || model.outlet_successors(src).len() != 1
        || model.outputs.contains(&src)
        || model.outlet_fact(OutletId::new(node.id, 0)).ok()?.shape != fact.shape
        || lo > hi
    {
        return None;
    }
    Some((conv.id, [lo, hi]))
}

/// Fuse every clip that follows a depthwise convolution in an optimised graph (see the module
/// documentation); returns how many. Only on x86_64, where it was measured: the boards' aarch64
/// plans (whose instruction counts the manifest records) stay tract's own.
pub fn depthwise_clips(model: &mut TypedModel) -> TractResult<usize> {
    if !cfg!(target_arch = "x86_64") {
        return Ok(0);
    }
    let found: Vec<(usize, usize, [f32; 2])> = model
        .nodes()
        .iter()
        .filter_map(|n| candidate(model, n).map(|(conv, b)| (n.id, conv, b)))
        .collect();
    for &(clip, conv, [lo, hi]) in &found {
        let node = model.node(conv);
        let mut patch = TypedModelPatch::new("sgps depthwise clip");
        let inputs = node
            .inputs
            .iter()
            .map(|i| patch.tap_model(model, *i))
            .collect::<TractResult<TVec<_>>>()?;
        let op = ClipAfter {
            inner: node.op.clone(),
            bounds: [lo.to_bits(), hi.to_bits()],
        };
        let y = patch.wire_node(format!("{}.clip", node.name), op, &inputs)?[0];
        patch.shunt_outside(model, OutletId::new(clip, 0), y)?;
        patch.obliterate(clip)?;
        patch.obliterate(conv)?;
        patch.apply(model)?;
    }
    Ok(found.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped image encoder: every depthwise convolution's clip is fused (16 of them, none
    /// left as a separate node), and the fused plan's embedding equals the unfused one's bit for
    /// bit on a real capture-sized input.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_encoders_depthwise_clips_fuse_without_changing_a_bit() {
        let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let manifest = crate::manifest::Manifest::load(&models).expect("models/manifest.json");
        let (_, _, file) = crate::encoders::ImageEncoder::model_file(&manifest, None).unwrap();
        let optimised = file.typed().unwrap().into_optimized().unwrap();
        let depthwise = |m: &TypedModel| {
            m.nodes()
                .iter()
                .filter(|n| n.op.name() == "DepthWiseConv")
                .count()
        };
        let chains = |m: &TypedModel| {
            m.nodes()
                .iter()
                .filter(|n| n.op_is::<OptBinChain>())
                .count()
        };
        let mut fused = optimised.clone();
        let n = depthwise_clips(&mut fused).unwrap();
        assert_eq!(
            n,
            depthwise(&optimised),
            "every depthwise convolution has its clip fused"
        );
        assert!(
            n >= 16,
            "EfficientNet-Lite0 has 16 depthwise convolutions: {n}"
        );
        let plan_fused = fused.into_runnable().unwrap();
        assert_eq!(
            plan_fused
                .model()
                .nodes()
                .iter()
                .filter(|n| n.op_is::<ClipAfter>())
                .count(),
            n
        );
        assert!(chains(plan_fused.model()) + n <= chains(&optimised));
        let plan = optimised.into_runnable().unwrap();
        let x: Vec<f32> = (0..3 * 224 * 224)
            .map(|i| ((i as f32) * 0.013).sin() * 2.0)
            .collect();
        let input = tensor1(&x).into_shape(&[1, 3, 224, 224]).unwrap();
        let a = plan.run(tvec!(input.clone().into_tvalue())).unwrap();
        let b = plan_fused.run(tvec!(input.into_tvalue())).unwrap();
        let (a, b) = (
            a[0].to_plain_array_view::<f32>().unwrap(),
            b[0].to_plain_array_view::<f32>().unwrap(),
        );
        assert_eq!(a.shape(), b.shape());
        assert!(
            a.iter()
                .zip(b.iter())
                .all(|(x, y)| x.to_bits() == y.to_bits())
        );
    }
}
