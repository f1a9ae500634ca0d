//! Channel-last depthwise convolutions: a layout change tract makes on its own only in part.
//!
//! The ONNX encoders are channel-first (NCHW). tract runs a channel-first depthwise convolution one
//! channel plane at a time and vectorises a plane's rows only at stride 1; the 14x14 and 7x7
//! planes of EfficientNet's last stages give its vectors almost nothing to fill, so half of the
//! image encoder's time went to depthwise convolutions. Channel-last, every output position is a
//! run of contiguous channel values for any stride and plane size.
//!
//! tract's optimiser asks for that layout itself only on hosts with a channel-inner depthwise
//! kernel (aarch64), and even there the change must reach back to the model's input, which the
//! optimiser keeps locked, so it is refused. [`channels_last_depthwise`] puts a pair of inverse
//! transposes behind the input, then asks tract to move each depthwise convolution's channel axis
//! last: the change propagates through the graph (tract's own `change_axes`, the same rewrite its
//! optimiser applies) and stops at that pair, so the model keeps its NCHW input and one transpose
//! remains. Every output value is computed with the same arithmetic in the same order: the
//! results are bit-identical (tested in `tests/parity.rs`).

use std::collections::HashSet;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::change_axes::{AxisChange, AxisOp};
use tract_onnx::tract_core::ops::cnn::Conv;
use tract_onnx::tract_core::optim::change_axes::change_axes;

/// Is `conv` a channel-first depthwise convolution (one group per channel)?
fn channel_first_depthwise(conv: &Conv) -> bool {
    conv.group > 1
        && conv.group == conv.input_channels()
        && conv.group == conv.output_channels()
        && !conv.pool_spec.data_format.c_is_last()
}

/// Move every depthwise convolution of `model` (decluttered, 4-d NCHW input) to channel-last.
/// Returns how many depthwise convolutions are channel-last afterwards; a model without depthwise
/// convolutions is left as it is. tract's next declutter (the first step of `into_optimized`) may
/// move the input transpose down past the first few layers, where the planes are large and the
/// stride 1, so channel-first is as fast there: those it turns back.
pub(crate) fn channels_last_depthwise(model: &mut TypedModel) -> TractResult<usize> {
    let has_depthwise = model
        .nodes()
        .iter()
        .any(|n| n.op_as::<Conv>().is_some_and(channel_first_depthwise));
    if !has_depthwise || model.inputs.len() != 1 || model.input_fact(0)?.rank() != 4 {
        return Ok(0);
    }
    // NCHW -> NHWC -> NCHW behind the input: the propagated change ends on the second transpose.
    let source = model.input_outlets()?[0];
    let mut patch = TypedModelPatch::default();
    let tap = patch.tap_model(model, source)?;
    let to_last = patch.wire_node("channels_last.in", AxisOp::Move(1, 3), &[tap])?;
    let back = patch.wire_node("channels_last.back", AxisOp::Move(3, 1), &to_last)?;
    patch.shunt_outside(model, source, back[0])?;
    patch.apply(model)?;
    let mut refused: HashSet<usize> = HashSet::new();
    loop {
        let locked: Vec<OutletId> = model
            .output_outlets()?
            .iter()
            .chain(model.input_outlets()?)
            .copied()
            .collect();
        let mut changed = false;
        for node in model.nodes() {
            let Some(conv) = node.op_as::<Conv>() else {
                continue;
            };
            if !channel_first_depthwise(conv) || refused.contains(&node.id) {
                continue;
            }
            let rank = model.outlet_fact(node.inputs[0])?.rank();
            let c_axis = usize::from(conv.pool_spec.data_format.has_n());
            let change = AxisChange {
                outlet: node.inputs[0],
                op: AxisOp::Move(c_axis, rank - 1),
            };
            match change_axes(model, &change, &locked, &[], &mut Default::default())? {
                Some((patch, _)) => {
                    patch.apply(model)?;
                    changed = true;
                    break;
                }
                None => {
                    refused.insert(node.id);
                }
            }
        }
        if !changed {
            break;
        }
    }
    Ok(model
        .nodes()
        .iter()
        .filter(|n| {
            n.op_as::<Conv>().is_some_and(|c| {
                c.group > 1 && c.group == c.input_channels() && c.pool_spec.data_format.c_is_last()
            })
        })
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifest;

    fn decluttered_image_encoder() -> TypedModel {
        let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let manifest = Manifest::load(&models).expect("the shipped models/manifest.json");
        let (_, entry) = manifest.image_variant(None).unwrap();
        let path = manifest.verified_path(&entry.file, &entry.sha256).unwrap();
        let [h, w] = manifest.image_encoder.input_size;
        let mut model = tract_onnx::onnx().model_for_path(path).unwrap();
        model
            .set_input_fact(0, f32::fact([1, 3, h, w]).into())
            .unwrap();
        model.into_typed().unwrap().into_decluttered().unwrap()
    }

    /// The shipped image encoder: every convolution ends channel-last, the model still takes
    /// NCHW, and its embedding is the channel-first plan's to the bit.
    #[test]
    fn the_image_encoder_runs_channel_last_with_the_same_results() {
        let first = decluttered_image_encoder();
        let mut last = first.clone();
        let depthwise = first
            .nodes()
            .iter()
            .filter(|n| n.op_as::<Conv>().is_some_and(channel_first_depthwise))
            .count();
        assert!(
            depthwise >= 10,
            "EfficientNet-Lite has depthwise convolutions: {depthwise}"
        );
        let moved = channels_last_depthwise(&mut last).unwrap();
        assert_eq!(moved, depthwise, "every depthwise convolution channel-last");
        assert_eq!(last.input_fact(0).unwrap(), first.input_fact(0).unwrap());
        // what the optimiser keeps: every strided or small-plane depthwise convolution (the ones
        // tract cannot vectorise channel-first) stays channel-last
        let last = last.into_decluttered().unwrap();
        for node in last.nodes() {
            let Some(conv) = node.op_as::<Conv>() else {
                continue;
            };
            let fact = last.outlet_fact(node.inputs[0]).unwrap();
            let shape = conv
                .pool_spec
                .data_format
                .shape(fact.shape.as_concrete().unwrap().to_vec())
                .unwrap();
            let strided = conv.pool_spec.strides().iter().any(|s| *s > 1);
            let small = shape.hw_dims().iter().any(|d| *d < 32);
            if conv.group > 1 && (strided || small) {
                assert!(
                    conv.pool_spec.data_format.c_is_last(),
                    "{} is channel-first",
                    node.name
                );
            }
        }
        let shape = first
            .input_fact(0)
            .unwrap()
            .shape
            .as_concrete()
            .unwrap()
            .to_vec();
        let n: usize = shape.iter().product();
        // a deterministic, image-like input in the preprocessed range
        let data: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        let input = Tensor::from_shape(&shape, &data).unwrap();
        let run = |m: TypedModel| {
            let plan = m.into_optimized().unwrap().into_runnable().unwrap();
            let out = plan.run(tvec!(input.clone().into())).unwrap();
            out[0]
                .to_plain_array_view::<f32>()
                .unwrap()
                .iter()
                .copied()
                .collect::<Vec<f32>>()
        };
        let (a, b) = (run(first), run(last));
        assert_eq!(a.len(), b.len());
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-6,
            "channel-last changed the embedding by {worst}"
        );
    }
}
