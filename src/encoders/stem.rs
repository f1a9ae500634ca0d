//! Thin-input convolutions as direct, channel-last convolutions (x86_64 with AVX2 and FMA).
//!
//! Two kinds of layer in the image encoder cost tract far more than onnxruntime (issue 19's
//! per-operator profiles, one thread, the development machine):
//!
//! - the stem, a 3x3 stride-2 convolution from the 3 colour planes to 32 channels on the full
//!   frame, plus its ReLU6 clip: tract runs it as a lazy im2col feeding a matrix product (m 32,
//!   k 27, n 12544; 1.8 ms against onnxruntime's 0.27). Its direct spatial convolution would suit
//!   the shape, but tract takes that path only for output rows of at least 128 points (these are
//!   112), and one panel of 32 output channels sends it to the lazy gather; no knob reaches either
//!   rule.
//! - the expansions of blocks 1-5, pointwise convolutions from 16-40 channels to 6 times as many,
//!   channel-last because a depthwise convolution follows: with so few input channels tract's
//!   matrix product is bound by its stores, which its AVX-512 kernels write one value at a time
//!   (block 1's, 12544 x 16 x 96: 2.05 ms against onnxruntime's 1.02).
//!
//! [`rewrite`] replaces each such layer, with the `Max(lo)` / `Min(hi)` clip after it where there
//! is one, by [`ThinConv`]: for each output row, tiles of 16 positions (4 on AVX2) by 16 output
//! channels accumulate one fused multiply-add per tap (input channel x kernel tap, in the weight
//! tensor's order) of the input value, broadcast, with the tap's 16 weights, then clip and store
//! the tile channel-last with vector stores. Convolutions (f32, NCHW, one group, at most
//! [`MAX_INPUT_CHANNELS`] input channels, any kernel, stride and explicit padding, batch 1) read a
//! zero-padded copy of their input and are followed by a move back to NCHW, which tract's
//! optimiser cancels against the next depthwise convolution's own move to channel-last (so block
//! 0's depthwise convolution runs channel-last too). Pointwise ones, in the form tract's declutter
//! leaves them (`EinSum IHW,OI->HWO`, then the bias `Add`), read their input in place and write
//! the `[h, w, o]` the graph expects. The graph is rewritten only on a CPU with AVX2 and FMA; on
//! the boards (aarch64) tract's plan is untouched. Outputs differ from tract's by float rounding
//! (the parity tests compare the embeddings with onnxruntime's; `tests` below compare the op with
//! double-precision convolutions, its vector paths with its scalar one bit for bit, and the
//! shipped encoder's embedding with tract's own).

use tract_nnef::internal::*;
use tract_nnef::tract_core::ops::binary::TypedBinOp;
use tract_nnef::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
use tract_nnef::tract_core::ops::math::{Max, Min};
use tract_nnef::tract_core::ops::nn::DataFormat;

/// Input channels above which a convolution is left to tract (the stem has 3, the expansions
/// 16-40; with every expansion taken, up to 192 input channels, the encoder ran 0.5-1 ms slower:
/// from 80 up, tract's matrix products are no longer bound by their stores).
pub const MAX_INPUT_CHANNELS: usize = 48;
/// Output channels per block: one AVX-512 register, two AVX ones.
const CB: usize = 16;
/// Output positions per tile (the most any path takes; AVX2 takes 4).
const P_MAX: usize = 16;

/// Which instructions run the tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Path {
    /// The widest this CPU runs.
    fn native() -> Path {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Path::Avx512;
            }
            if available() {
                return Path::Avx2;
            }
        }
        Path::Scalar
    }

    /// Output positions per tile: as many accumulators as the registers hold.
    fn positions(self) -> usize {
        match self {
            Path::Scalar => P_MAX,
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => 4,
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => 16,
        }
    }
}

/// A direct convolution for a thin input: see the module documentation. Its output is
/// channel-last, `[1, oh, ow, oc]`; [`rewrite`] puts the move back to NCHW after it, which tract's
/// optimiser cancels against the next depthwise convolution's own move to channel-last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinConv {
    /// input channels, height, width (batch 1, NCHW), as the loops see them: a 1x1 convolution
    /// with stride 1 and no padding sees its plane as one row
    input: [usize; 3],
    /// the input's and output's shapes as the graph has them (the same memory as the loops'
    /// NCHW input and channel-last output)
    graph_shapes: [TVec<usize>; 2],
    /// output channels, height, width
    output: [usize; 3],
    kernel: [usize; 2],
    stride: [usize; 2],
    /// padding before (top, left) and after (bottom, right)
    pad_before: [usize; 2],
    pad_after: [usize; 2],
    /// weights packed by blocks of CB output channels: [block][tap][CB], the taps in
    /// (input channel, ky, kx) order, zero for the channels past the last
    packed: Arc<Tensor>,
    /// bias padded to whole blocks
    bias: Arc<Tensor>,
    /// the clip (low, high) applied before the store, as f32 bits (the op must be `Eq`)
    clip: Option<[u32; 2]>,
}

impl ThinConv {
    fn taps(&self) -> usize {
        self.input[0] * self.kernel[0] * self.kernel[1]
    }

    fn padded_height(&self) -> usize {
        self.input[1] + self.pad_before[0] + self.pad_after[0]
    }

    /// Width of a padded input row: what the last tile reads, whole tiles of P_MAX positions.
    fn padded_width(&self) -> usize {
        (self.output[2].div_ceil(P_MAX) * P_MAX - 1) * self.stride[1] + self.kernel[1]
    }

    /// The zero-padded input: [channel][padded row][padded_width].
    fn padded(&self, x: &[f32]) -> Vec<f32> {
        let [c_in, h, w] = self.input;
        let (hp, wp) = (self.padded_height(), self.padded_width());
        let (top, left) = (self.pad_before[0], self.pad_before[1]);
        let mut out = vec![0f32; c_in * hp * wp];
        for c in 0..c_in {
            for y in 0..h {
                let n = w.min(wp - left);
                out[(c * hp + y + top) * wp + left..][..n]
                    .copy_from_slice(&x[(c * h + y) * w..][..n]);
            }
        }
        out
    }

    /// Where tap `t`'s input for output row `oy`, position 0, is in the padded input.
    fn tap_offset(&self, t: usize, oy: usize) -> usize {
        let [kh, kw] = self.kernel;
        let (c, ky, kx) = (t / (kh * kw), t / kw % kh, t % kw);
        (c * self.padded_height() + oy * self.stride[0] + ky) * self.padded_width() + kx
    }

    /// The convolution of `x` (NCHW, batch 1) into `out` (channel-last, [oh][ow][oc]).
    fn run(&self, x: &[f32], out: &mut [f32], path: Path) {
        // a pointwise convolution over whole tiles reads its input in place
        let whole = self.kernel == [1, 1]
            && self.stride == [1, 1]
            && self.pad_before == [0, 0]
            && self.pad_after == [0, 0]
            && self.input[1] == 1
            && self.input[2].is_multiple_of(P_MAX);
        let copy;
        let pad: &[f32] = if whole {
            x
        } else {
            copy = self.padded(x);
            &copy
        };
        let [c_out, oh, ow] = self.output;
        let (taps, sx, np) = (self.taps(), self.stride[1], path.positions());
        let packed = f32s(&self.packed).expect("f32 weights");
        let bias = f32s(&self.bias).expect("f32 bias");
        let (lo, hi) = match self.clip {
            Some([lo, hi]) => (f32::from_bits(lo), f32::from_bits(hi)),
            None => (f32::NEG_INFINITY, f32::INFINITY),
        };
        let mut offsets = vec![0usize; taps];
        let mut tile = [0f32; CB * P_MAX];
        for oy in 0..oh {
            for (t, o) in offsets.iter_mut().enumerate() {
                *o = self.tap_offset(t, oy);
            }
            for x0 in (0..ow).step_by(np) {
                let base = x0 * sx;
                for (block, w) in packed.chunks_exact(taps * CB).enumerate() {
                    let b = &bias[block * CB..][..CB];
                    let (positions, channels) = (np.min(ow - x0), CB.min(c_out - block * CB));
                    let at = (oy * ow + x0) * c_out + block * CB;
                    // a whole tile goes straight to the output, a partial one through `tile`
                    let full = positions == np && channels == CB;
                    let (dst, stride) = if full {
                        (&mut out[at..], c_out)
                    } else {
                        (&mut tile[..], CB)
                    };
                    let t = Tile {
                        pad,
                        offsets: &offsets,
                        base,
                        sx,
                        w,
                        bias: b,
                        lo,
                        hi,
                    };
                    match path {
                        Path::Scalar => t.scalar(dst, stride, np),
                        // SAFETY: Path::native chose these only where the CPU has them
                        #[cfg(target_arch = "x86_64")]
                        Path::Avx2 => unsafe { t.avx2(dst, stride) },
                        #[cfg(target_arch = "x86_64")]
                        Path::Avx512 => unsafe { t.avx512(dst, stride) },
                    }
                    if !full {
                        for p in 0..positions {
                            out[at + p * c_out..][..channels]
                                .copy_from_slice(&tile[p * CB..][..channels]);
                        }
                    }
                }
            }
        }
    }
}

/// One tile's inputs: positions `sx` apart from `pad[offsets[t] + base]` for each tap `t`, the
/// block's weights `[tap][CB]` and bias, and the clip.
struct Tile<'a> {
    pad: &'a [f32],
    offsets: &'a [usize],
    base: usize,
    sx: usize,
    w: &'a [f32],
    bias: &'a [f32],
    lo: f32,
    hi: f32,
}

impl Tile<'_> {
    /// The bounds every tile relies on, for `np` positions written `stride` apart in `dst`.
    fn check(&self, np: usize, dst: &[f32], stride: usize) {
        assert!(
            self.offsets
                .iter()
                .all(|o| o + self.base + (np - 1) * self.sx < self.pad.len())
        );
        assert!(self.w.len() >= self.offsets.len() * CB && self.bias.len() >= CB);
        assert!(dst.len() >= (np - 1) * stride + CB);
    }

    /// `np` positions, CB channels each, one multiply-add per tap in tap order (the arithmetic
    /// of the vector tiles, lane for lane), written `stride` apart in `dst`.
    fn scalar(&self, dst: &mut [f32], stride: usize, np: usize) {
        self.check(np, dst, stride);
        for p in 0..np {
            let acc = &mut dst[p * stride..][..CB];
            acc.copy_from_slice(&self.bias[..CB]);
            for (t, &off) in self.offsets.iter().enumerate() {
                let x = self.pad[off + self.base + p * self.sx];
                for (a, k) in acc.iter_mut().zip(&self.w[t * CB..][..CB]) {
                    *a = x.mul_add(*k, *a);
                }
            }
            for v in acc {
                *v = v.max(self.lo).min(self.hi);
            }
        }
    }

    /// 4 positions, each CB channels in two AVX registers.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(&self, dst: &mut [f32], stride: usize) {
        use std::arch::x86_64::*;
        const NP: usize = 4;
        self.check(NP, dst, stride);
        // SAFETY: bounds checked above; unaligned loads and stores throughout.
        unsafe {
            let bias = self.bias.as_ptr();
            let b = [_mm256_loadu_ps(bias), _mm256_loadu_ps(bias.add(8))];
            let mut acc = [b; NP];
            let xp = self.pad.as_ptr().add(self.base);
            for (t, &off) in self.offsets.iter().enumerate() {
                let k0 = _mm256_loadu_ps(self.w.as_ptr().add(t * CB));
                let k1 = _mm256_loadu_ps(self.w.as_ptr().add(t * CB + 8));
                for (p, a) in acc.iter_mut().enumerate() {
                    let x = _mm256_broadcast_ss(&*xp.add(off + p * self.sx));
                    a[0] = _mm256_fmadd_ps(x, k0, a[0]);
                    a[1] = _mm256_fmadd_ps(x, k1, a[1]);
                }
            }
            let (lo, hi) = (_mm256_set1_ps(self.lo), _mm256_set1_ps(self.hi));
            for (p, a) in acc.iter().enumerate() {
                // max then min, as the clip's Max and Min ops
                let d = dst.as_mut_ptr().add(p * stride);
                _mm256_storeu_ps(d, _mm256_min_ps(_mm256_max_ps(a[0], lo), hi));
                _mm256_storeu_ps(d.add(8), _mm256_min_ps(_mm256_max_ps(a[1], lo), hi));
            }
        }
    }

    /// 16 positions, each CB channels in one AVX-512 register.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(&self, dst: &mut [f32], stride: usize) {
        use std::arch::x86_64::*;
        const NP: usize = 16;
        self.check(NP, dst, stride);
        // SAFETY: bounds checked above; unaligned loads and stores throughout.
        unsafe {
            let mut acc = [_mm512_loadu_ps(self.bias.as_ptr()); NP];
            let xp = self.pad.as_ptr().add(self.base);
            for (t, &off) in self.offsets.iter().enumerate() {
                let k = _mm512_loadu_ps(self.w.as_ptr().add(t * CB));
                for (p, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(*xp.add(off + p * self.sx)), k, *a);
                }
            }
            let (lo, hi) = (_mm512_set1_ps(self.lo), _mm512_set1_ps(self.hi));
            for (p, a) in acc.iter().enumerate() {
                let d = dst.as_mut_ptr().add(p * stride);
                _mm512_storeu_ps(d, _mm512_min_ps(_mm512_max_ps(*a, lo), hi));
            }
        }
    }
}

/// A dense f32 tensor's values.
fn f32s(t: &Tensor) -> TractResult<&[f32]> {
    t.try_as_plain_ram()?.as_slice::<f32>()
}

/// Whether this CPU runs the vector path (and so whether [`rewrite`] touches a graph).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Op for ThinConv {
    fn name(&self) -> StaticName {
        "SgpsThinConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "input {:?} output {:?} kernel {:?} stride {:?} clip {:?}",
            self.input,
            self.output,
            self.kernel,
            self.stride,
            self.clip.map(|c| c.map(f32::from_bits))
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    fn as_typed(&self) -> Option<&dyn TypedOp> {
        Some(self)
    }
}

impl EvalOp for ThinConv {
    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        Ok(Some(self.eval(&EvalContext::out_of_plan(), inputs)?))
    }

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let [want, out_shape] = &self.graph_shapes;
        ensure!(
            x.shape() == &want[..],
            "SgpsThinConv expects {want:?}, got {:?}",
            x.shape()
        );
        // SAFETY: every value is written by `run` (all channels, rows and points)
        let mut out = unsafe { Tensor::uninitialized::<f32>(out_shape)? };
        self.run(
            f32s(&x)?,
            out.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?,
            Path::native(),
        );
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for ThinConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 && inputs[0].datum_type == f32::datum_type());
        Ok(tvec!(f32::fact(&*self.graph_shapes[1])))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let [oc, oh, ow] = self.output;
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            (oc * oh * ow * self.taps()).to_dim()
        )))
    }

    fn as_op(&self) -> &dyn Op {
        self
    }

    fn as_op_mut(&mut self) -> &mut dyn Op {
        self
    }
}

/// The constant scalar operand of a binary node, if the other operand is `from`.
fn scalar_operand(model: &TypedModel, node: &TypedNode, from: OutletId) -> Option<f32> {
    let [a, b] = node.inputs[..] else { return None };
    let other = if a == from {
        b
    } else if b == from {
        a
    } else {
        return None;
    };
    super::fused::const_scalar(model, other)
}

/// The only node reading `outlet`, if exactly one does and the outlet is not a model output.
fn sole_successor(model: &TypedModel, outlet: OutletId) -> Option<&TypedNode> {
    if model.outputs.contains(&outlet) {
        return None;
    }
    let succ = &model.outlet_successors(outlet);
    let [one] = succ[..] else { return None };
    Some(model.node(one.node))
}

/// A `ThinConv` for `node`, if it is a convolution the op covers (with its constant weights and
/// bias), and the clip node after it (whose output the op's replaces) when there is one.
fn conv_candidate(model: &TypedModel, node: &TypedNode) -> Option<(ThinConv, usize)> {
    let conv = node.op_as::<Conv>()?;
    let spec = &conv.pool_spec;
    if conv.q_params.is_some()
        || conv.group != 1
        || conv.kernel_fmt != KernelFormat::OIHW
        || spec.data_format != DataFormat::NCHW
        || spec.kernel_shape.len() != 2
        || spec.input_channels > MAX_INPUT_CHANNELS
        || spec
            .dilations
            .as_ref()
            .is_some_and(|d| d.iter().any(|&d| d != 1))
        || node.inputs.len() != 3
    {
        return None;
    }
    let PaddingSpec::Explicit(before, after) = &spec.padding else {
        return None;
    };
    let xf = model.outlet_fact(node.inputs[0]).ok()?;
    let shape = xf.shape.as_concrete()?;
    if xf.datum_type != f32::datum_type() || shape.len() != 4 || shape[0] != 1 {
        return None;
    }
    let wf = model.outlet_fact(node.inputs[1]).ok()?.konst.clone()?;
    let bf = model.outlet_fact(node.inputs[2]).ok()?.konst.clone()?;
    let of = model.outlet_fact(OutletId::new(node.id, 0)).ok()?;
    let oshape = of.shape.as_concrete()?;
    let (c_in, c_out) = (spec.input_channels, spec.output_channels);
    let [kh, kw] = [spec.kernel_shape[0], spec.kernel_shape[1]];
    let strides = spec.strides.clone().unwrap_or_else(|| tvec!(1, 1));
    if wf.shape() != [c_out, c_in, kh, kw]
        || wf.datum_type() != f32::datum_type()
        || bf.datum_type() != f32::datum_type()
        || (bf.len() != c_out && bf.len() != 1)
        || oshape != [1, c_out, oshape[2], oshape[3]]
        || strides.len() != 2
        || strides[0] == 0
        || strides[1] == 0
    {
        return None;
    }
    let w = f32s(&wf).ok()?;
    let b = f32s(&bf).ok()?;
    let taps = c_in * kh * kw;
    let (packed, bias) = pack(w, b, c_out, taps);
    let mut op = ThinConv {
        input: [shape[1], shape[2], shape[3]],
        graph_shapes: [shape.into(), tvec!(1, oshape[2], oshape[3], c_out)],
        output: [c_out, oshape[2], oshape[3]],
        kernel: [kh, kw],
        stride: [strides[0], strides[1]],
        pad_before: [before[0], before[1]],
        pad_after: [after[0], after[1]],
        packed,
        bias,
        clip: None,
    };
    // the output geometry tract computed must be the one the op's loops assume
    let span = |i: usize, k: usize, s: usize, b: usize, a: usize| {
        (i + b + a).checked_sub(k).map(|v| v / s + 1)
    };
    if span(op.input[1], kh, op.stride[0], before[0], after[0]) != Some(op.output[1])
        || span(op.input[2], kw, op.stride[1], before[1], after[1]) != Some(op.output[2])
        || shape[1] != c_in
    {
        return None;
    }
    // a pointwise convolution reads and writes its plane as one row: whole tiles of positions
    // run across image rows instead of stopping at each row's end
    if [kh, kw] == [1, 1]
        && op.stride == [1, 1]
        && op.pad_before == [0, 0]
        && op.pad_after == [0, 0]
    {
        op.input = [c_in, 1, shape[2] * shape[3]];
        op.output = [c_out, 1, oshape[2] * oshape[3]];
    }
    let (clip, last) = clip_after(model, OutletId::new(node.id, 0));
    op.clip = clip;
    Some((op, last))
}

/// The clip right after `outlet`, if there is one: `Max(lo)` then `Min(hi)` with scalar bounds,
/// each the only reader of what it reads; with the node whose output the clip's is. Otherwise
/// (None, the outlet's node).
fn clip_after(model: &TypedModel, outlet: OutletId) -> (Option<[u32; 2]>, usize) {
    let found = || {
        let max = sole_successor(model, outlet)?;
        let lo = scalar_operand(model, max, outlet)?;
        let min = sole_successor(model, OutletId::new(max.id, 0))?;
        let hi = scalar_operand(model, min, OutletId::new(max.id, 0))?;
        let same = model.outlet_fact(OutletId::new(min.id, 0)).ok()?.shape
            == model.outlet_fact(outlet).ok()?.shape;
        (max.op_as::<TypedBinOp>()?.0.is::<Max>()
            && min.op_as::<TypedBinOp>()?.0.is::<Min>()
            && same
            && lo <= hi)
            .then_some(([lo.to_bits(), hi.to_bits()], min.id))
    };
    match found() {
        Some((bounds, last)) => (Some(bounds), last),
        None => (None, outlet.node),
    }
}

/// Weights `[c_out][taps]` and bias (one value or `c_out`) packed by blocks of CB channels.
fn pack(w: &[f32], b: &[f32], c_out: usize, taps: usize) -> (Arc<Tensor>, Arc<Tensor>) {
    let blocks = c_out.div_ceil(CB);
    let mut packed = vec![0f32; blocks * taps * CB];
    let mut bias = vec![0f32; blocks * CB];
    for o in 0..c_out {
        let (block, i) = (o / CB, o % CB);
        for t in 0..taps {
            packed[(block * taps + t) * CB + i] = w[o * taps + t];
        }
        bias[o] = if b.len() == 1 { b[0] } else { b[o] };
    }
    (Arc::new(tensor1(&packed)), Arc::new(tensor1(&bias)))
}

/// A pointwise convolution as tract's declutter leaves it when the next operator is
/// channel-last: `EinSum IHW,OI->HWO` of a `[c, h, w]` input and constant `[o, c]` weights,
/// then the bias `Add` of a constant `[1, 1, o]` (and a clip, where there is one). The op reads
/// the plane as one row and writes `[h, w, o]` itself, so no move is needed after it.
fn pointwise_candidate(model: &TypedModel, node: &TypedNode) -> Option<(ThinConv, usize)> {
    use tract_nnef::tract_core::ops::einsum::EinSum;
    let op = node.op_as::<EinSum>()?;
    if op.q_params.is_some()
        || op.operating_dt != f32::datum_type()
        || op.axes.to_string() != "IHW,OI->HWO"
    {
        return None;
    }
    let [x, wk] = node.inputs[..] else {
        return None;
    };
    let xf = model.outlet_fact(x).ok()?;
    let &[c_in, h, w] = xf.shape.as_concrete()? else {
        return None;
    };
    let wt = model.outlet_fact(wk).ok()?.konst.clone()?;
    let &[c_out, wc] = wt.shape() else {
        return None;
    };
    if xf.datum_type != f32::datum_type()
        || wt.datum_type() != f32::datum_type()
        || wc != c_in
        || c_in > MAX_INPUT_CHANNELS
    {
        return None;
    }
    let out = OutletId::new(node.id, 0);
    let add = sole_successor(model, out)?;
    if !add
        .op_as::<TypedBinOp>()?
        .0
        .is::<tract_nnef::tract_core::ops::math::Add>()
    {
        return None;
    }
    let [a, b] = add.inputs[..] else { return None };
    let other = if a == out {
        b
    } else if b == out {
        a
    } else {
        return None;
    };
    let bias = model.outlet_fact(other).ok()?.konst.clone()?;
    let add_fact = model.outlet_fact(OutletId::new(add.id, 0)).ok()?;
    if bias.datum_type() != f32::datum_type()
        || bias.shape() != [1, 1, c_out]
        || add_fact.shape != model.outlet_fact(out).ok()?.shape
    {
        return None;
    }
    let (packed, bias) = pack(f32s(&wt).ok()?, f32s(&bias).ok()?, c_out, c_in);
    let (clip, last) = clip_after(model, OutletId::new(add.id, 0));
    let op = ThinConv {
        input: [c_in, 1, h * w],
        graph_shapes: [tvec!(c_in, h, w), tvec!(h, w, c_out)],
        output: [c_out, 1, h * w],
        kernel: [1, 1],
        stride: [1, 1],
        pad_before: [0, 0],
        pad_after: [0, 0],
        packed,
        bias,
        clip,
    };
    Some((op, last))
}

/// Replace every convolution [`ThinConv`] covers (and its clip) in a typed, decluttered f32
/// graph; returns how many. Does nothing where [`available`] is false.
pub fn rewrite(model: &mut TypedModel) -> TractResult<usize> {
    if !available() {
        return Ok(0);
    }
    // (node, op, the node whose output the op's replaces, whether the graph wants NCHW back)
    let found: Vec<(usize, ThinConv, usize, bool)> = model
        .nodes()
        .iter()
        .filter_map(|n| {
            let conv = conv_candidate(model, n).map(|(op, last)| (n.id, op, last, true));
            conv.or_else(|| pointwise_candidate(model, n).map(|(op, last)| (n.id, op, last, false)))
        })
        .collect();
    for (id, op, last, to_nchw) in &found {
        let mut patch = TypedModelPatch::new("sgps thin conv");
        let node = model.node(*id);
        let x = patch.tap_model(model, node.inputs[0])?;
        let name = format!("{}.sgps_thin", node.name);
        let mut y = patch.wire_node(name.clone(), op.clone(), &[x])?[0];
        if *to_nchw {
            // back to NCHW for the graph; the optimiser cancels it where the next op goes
            // channel-last
            y = patch.wire_node(format!("{name}.to_nchw"), AxisOp::Move(3, 1), &[y])?[0];
        }
        patch.shunt_outside(model, OutletId::new(*last, 0), y)?;
        patch.apply(model)?;
    }
    // the patches left the replaced nodes as dummies; drop them (tract's optimiser, which runs
    // next, declutters the graph itself)
    model.compact()?;
    Ok(found.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Max(0)` then `Min(6)` after `y`, as tract's ONNX reader translates a ReLU6 `Clip`.
    fn wire_relu6(model: &mut TypedModel, y: OutletId, rank: usize) -> OutletId {
        let lo = tensor0(0f32).broadcast_into_rank(rank).unwrap();
        let hi = tensor0(6f32).broadcast_into_rank(rank).unwrap();
        let (lo, hi) = (
            model.add_const("lo", lo).unwrap(),
            model.add_const("hi", hi).unwrap(),
        );
        let y = model
            .wire_node("max", TypedBinOp(Box::new(Max), None), &[y, lo])
            .unwrap()[0];
        model
            .wire_node("min", TypedBinOp(Box::new(Min), None), &[y, hi])
            .unwrap()[0]
    }

    /// A random convolution with the stem's geometry (or another), as a one-node graph, its
    /// input and a double-precision reference output.
    fn conv_case(
        c_in: usize,
        c_out: usize,
        hw: [usize; 2],
        k: [usize; 2],
        s: [usize; 2],
        pad: ([usize; 2], [usize; 2]),
        clip: bool,
    ) -> (TypedModel, Tensor, Vec<f64>, [usize; 3]) {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        };
        let w: Vec<f32> = (0..c_out * c_in * k[0] * k[1]).map(|_| rnd()).collect();
        let b: Vec<f32> = (0..c_out).map(|_| rnd()).collect();
        let x: Vec<f32> = (0..c_in * hw[0] * hw[1]).map(|_| rnd()).collect();
        let mut model = TypedModel::default();
        let src = model
            .add_source("x", f32::fact([1, c_in, hw[0], hw[1]]))
            .unwrap();
        let wk = model
            .add_const(
                "w",
                tensor1(&w).into_shape(&[c_out, c_in, k[0], k[1]]).unwrap(),
            )
            .unwrap();
        let bk = model.add_const("b", tensor1(&b)).unwrap();
        let spec = tract_nnef::tract_core::ops::cnn::PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: tvec!(k[0], k[1]),
            padding: PaddingSpec::Explicit(tvec!(pad.0[0], pad.0[1]), tvec!(pad.1[0], pad.1[1])),
            dilations: None,
            strides: Some(tvec!(s[0], s[1])),
            input_channels: c_in,
            output_channels: c_out,
        };
        let conv = Conv {
            pool_spec: spec,
            kernel_fmt: KernelFormat::OIHW,
            group: 1,
            q_params: None,
        };
        let mut y = model.wire_node("conv", conv, &[src, wk, bk]).unwrap()[0];
        if clip {
            y = wire_relu6(&mut model, y, 4);
        }
        model.select_output_outlets(&[y]).unwrap();
        let oh = (hw[0] + pad.0[0] + pad.1[0] - k[0]) / s[0] + 1;
        let ow = (hw[1] + pad.0[1] + pad.1[1] - k[1]) / s[1] + 1;
        let mut reference = vec![0f64; c_out * oh * ow];
        for o in 0..c_out {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = b[o] as f64;
                    for c in 0..c_in {
                        for ky in 0..k[0] {
                            for kx in 0..k[1] {
                                let (iy, ix) = (
                                    (oy * s[0] + ky) as isize - pad.0[0] as isize,
                                    (ox * s[1] + kx) as isize - pad.0[1] as isize,
                                );
                                if iy < 0 || ix < 0 || iy >= hw[0] as isize || ix >= hw[1] as isize
                                {
                                    continue;
                                }
                                let xv = x[(c * hw[0] + iy as usize) * hw[1] + ix as usize] as f64;
                                acc += xv * w[((o * c_in + c) * k[0] + ky) * k[1] + kx] as f64;
                            }
                        }
                    }
                    reference[(o * oh + oy) * ow + ox] =
                        if clip { acc.clamp(0.0, 6.0) } else { acc };
                }
            }
        }
        let input = tensor1(&x).into_shape(&[1, c_in, hw[0], hw[1]]).unwrap();
        (model, input, reference, [c_out, oh, ow])
    }

    fn run(model: TypedModel, input: &Tensor) -> Vec<f32> {
        let plan = model.into_optimized().unwrap().into_runnable().unwrap();
        let out = plan.run(tvec!(input.clone().into_tvalue())).unwrap();
        f32s(&out[0]).unwrap().to_vec()
    }

    /// Without AVX2 + FMA the graph is never rewritten; say so, and fail under CI=true (CI
    /// machines are expected to have them).
    fn has_simd() -> bool {
        if available() {
            return true;
        }
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: this x86_64 CPU lacks AVX2/FMA, the stem rewrite is untested"
        );
        eprintln!("skipped: the CPU lacks AVX2/FMA, so the stem rewrite never applies here");
        false
    }

    /// The stem's geometry (3 -> 32, 3x3, stride 2, TF-style padding after only, ReLU6) and
    /// others (odd widths, stride 1 and 3, symmetric padding, channels not a multiple of four,
    /// no clip): the rewritten graph holds one ThinConv and nothing of the convolution or clip,
    /// and its output is the convolution's to float rounding.
    #[test]
    fn rewritten_convolutions_compute_the_convolution() {
        if !has_simd() {
            return;
        }
        let cases = [
            (3, 32, [224, 224], [3, 3], [2, 2], ([0, 0], [1, 1]), true),
            (3, 30, [37, 45], [3, 3], [2, 2], ([1, 1], [1, 1]), true),
            (1, 5, [20, 33], [5, 3], [1, 1], ([2, 1], [2, 1]), false),
            (4, 8, [31, 50], [3, 5], [3, 2], ([0, 2], [0, 2]), true),
        ];
        for (c_in, c_out, hw, k, s, pad, clip) in cases {
            let (mut model, input, reference, _) = conv_case(c_in, c_out, hw, k, s, pad, clip);
            assert_eq!(rewrite(&mut model).unwrap(), 1);
            let ops: Vec<String> = model
                .nodes()
                .iter()
                .map(|n| n.op.name().to_string())
                .collect();
            assert!(ops.iter().any(|o| o == "SgpsThinConv"), "{ops:?}");
            assert!(
                !ops.iter()
                    .any(|o| o.contains("Conv") && o != "SgpsThinConv"),
                "{ops:?}"
            );
            assert!(
                !ops.iter().any(|o| o.contains("Max") || o.contains("Min")),
                "{ops:?}"
            );
            let got = run(model, &input);
            assert_eq!(got.len(), reference.len());
            for (g, r) in got.iter().zip(&reference) {
                assert!(
                    (*g as f64 - r).abs() <= 1e-4 * (1.0 + r.abs()),
                    "{g} vs {r}"
                );
            }
        }
    }

    /// A pointwise convolution as tract's declutter leaves it before a channel-last operator
    /// (EinSum IHW,OI->HWO, bias Add, clip): rewritten to one ThinConv, with the
    /// convolution's values; without the bias Add it is left to tract.
    #[test]
    fn pointwise_convolutions_compute_the_convolution() {
        use tract_nnef::tract_core::ops::einsum::EinSum;
        use tract_nnef::tract_core::ops::math::Add;
        if !has_simd() {
            return;
        }
        let (c, o, h, w) = (24, 40, 6, 16);
        let val = |i: usize, f: f32| ((i as f32) * f).sin() * 2.0;
        let x: Vec<f32> = (0..c * h * w).map(|i| val(i, 0.37)).collect();
        let k: Vec<f32> = (0..o * c).map(|i| val(i, 0.11)).collect();
        let b: Vec<f32> = (0..o).map(|i| val(i, 0.7)).collect();
        for with_bias in [true, false] {
            let mut model = TypedModel::default();
            let src = model.add_source("x", f32::fact([c, h, w])).unwrap();
            let kk = model
                .add_const("k", tensor1(&k).into_shape(&[o, c]).unwrap())
                .unwrap();
            let op = EinSum::new("IHW,OI->HWO".parse().unwrap(), f32::datum_type());
            let mut y = model.wire_node("pw", op, &[src, kk]).unwrap()[0];
            if with_bias {
                let bb = model
                    .add_const("b", tensor1(&b).into_shape(&[1, 1, o]).unwrap())
                    .unwrap();
                y = model
                    .wire_node("add", TypedBinOp(Box::new(Add), None), &[y, bb])
                    .unwrap()[0];
            }
            y = wire_relu6(&mut model, y, 3);
            model.select_output_outlets(&[y]).unwrap();
            if !with_bias {
                assert_eq!(
                    rewrite(&mut model).unwrap(),
                    0,
                    "no bias Add: not the declutter's pattern"
                );
                continue;
            }
            assert_eq!(rewrite(&mut model).unwrap(), 1);
            let input = tensor1(&x).into_shape(&[c, h, w]).unwrap();
            let got = run(model, &input);
            for p in 0..h * w {
                for q in 0..o {
                    let mut acc = b[q] as f64;
                    for i in 0..c {
                        acc += x[i * h * w + p] as f64 * k[q * c + i] as f64;
                    }
                    let want = acc.clamp(0.0, 6.0);
                    let g = got[p * o + q] as f64;
                    assert!(
                        (g - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{g} vs {want}"
                    );
                }
            }
        }
    }

    /// The vector path and the scalar one do the same arithmetic in the same order.
    #[test]
    fn vector_and_scalar_paths_agree_bit_for_bit() {
        if !has_simd() {
            return;
        }
        let (model, input, _, [oc, oh, ow]) =
            conv_case(3, 40, [61, 70], [3, 3], [2, 2], ([0, 0], [1, 1]), true);
        let node = model.nodes().iter().find(|n| n.op_is::<Conv>()).unwrap();
        let (op, _) = conv_candidate(&model, node).unwrap();
        let x = f32s(&input).unwrap();
        let mut scalar = vec![0f32; oc * oh * ow];
        op.run(x, &mut scalar, Path::Scalar);
        let mut paths = vec![Path::Avx2];
        if Path::native() == Path::Avx512 {
            paths.push(Path::Avx512);
        } else {
            eprintln!("no AVX-512 on this CPU: its path is not compared here");
        }
        for path in paths {
            let mut v = vec![f32::NAN; oc * oh * ow];
            op.run(x, &mut v, path);
            assert!(
                v.iter()
                    .zip(&scalar)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{path:?}"
            );
        }
    }

    /// The shipped image encoder's stem is the one convolution rewritten, clip included, and the
    /// plan the runtime loads runs it (the parity tests compare that plan's embeddings with
    /// onnxruntime's).
    #[test]
    fn the_shipped_encoder_loads_with_its_stem_rewritten() {
        if !has_simd() {
            return;
        }
        let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let manifest = crate::manifest::Manifest::load(&models).expect("models/manifest.json");
        let (_, _, file) = crate::encoders::ImageEncoder::model_file(&manifest, None).unwrap();
        let original = file.typed().unwrap();
        let mut model = original.clone();
        // the stem and the expansions of blocks 1-5 (16, 24, 24, 40, 40 input channels)
        assert_eq!(rewrite(&mut model).unwrap(), 6);
        let thin: Vec<&ThinConv> = model
            .nodes()
            .iter()
            .filter_map(|n| n.op_as::<ThinConv>())
            .collect();
        assert_eq!(thin.len(), 6);
        assert_eq!(
            (thin[0].input, thin[0].output),
            ([3, 224, 224], [32, 112, 112])
        );
        assert_eq!(
            thin.iter().map(|t| t.input[0]).collect::<Vec<_>>(),
            [3, 16, 24, 24, 40, 40]
        );
        assert!(
            thin.iter()
                .all(|t| t.clip.map(|c| c.map(f32::from_bits)) == Some([0.0, 6.0]))
        );
        let plan = file.load().unwrap();
        assert_eq!(
            plan.model()
                .nodes()
                .iter()
                .filter(|n| n.op_is::<ThinConv>())
                .count(),
            6
        );
        // and the embedding is tract's own to float rounding
        let x: Vec<f32> = (0..3 * 224 * 224)
            .map(|i| ((i as f32) * 0.013).sin() * 2.0)
            .collect();
        let input = tensor1(&x).into_shape(&[1, 3, 224, 224]).unwrap();
        let a = run(original, &input);
        let b = f32s(&plan.run(tvec!(input.into_tvalue())).unwrap()[0])
            .unwrap()
            .to_vec();
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            a.iter().zip(&b).all(|(a, b)| (a - b).abs() <= 1e-4 * scale),
            "max {scale}"
        );
    }

    /// What the op does not cover stays with tract: grouped, wide-input or dilated convolutions.
    #[test]
    fn other_convolutions_are_left_alone() {
        if !has_simd() {
            return;
        }
        let (mut model, ..) = conv_case(64, 16, [20, 20], [3, 3], [1, 1], ([1, 1], [1, 1]), true);
        assert_eq!(rewrite(&mut model).unwrap(), 0, "64 input channels");
        let (mut model, ..) = conv_case(3, 16, [20, 20], [3, 3], [1, 1], ([1, 1], [1, 1]), true);
        let conv = model.nodes().iter().find(|n| n.op_is::<Conv>()).unwrap().id;
        let op = model.node_mut(conv).op_as_mut::<Conv>().unwrap();
        op.pool_spec.dilations = Some(tvec!(2, 2));
        assert_eq!(rewrite(&mut model).unwrap(), 0, "dilated");
    }
}
