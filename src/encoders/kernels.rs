//! A channel-inner depthwise kernel for x86_64, registered in tract's kernel inventory.
//!
//! tract-linalg ships a channel-inner depthwise kernel (`depthwise_c`) for aarch64 only; on
//! x86_64 its channel-last depthwise convolutions fall back to a plain loop compiled for the
//! baseline instruction set (SSE2). tract chooses its kernels from a registry that any crate of
//! the program may add to (`inventory`, tract's own mechanism: every kernel of tract-linalg is
//! submitted the same way), keyed by function, architecture and required instruction set. This
//! module submits one for x86_64 with AVX, which tract picks only on a CPU that has AVX.
//!
//! With a channel-inner kernel present, tract's optimiser also moves depthwise convolutions to
//! channel-last by itself (`Conv::suggested_axis_changes`), as it already did on aarch64: the
//! image encoder's 14x14 and 7x7 planes and its strided convolutions, which tract's channel-first
//! path runs nearly scalar on x86_64, become runs of contiguous channels. Measured with
//! `sgps bench` (issue 19's note): fp32 image encoder 2.26x -> 1.58x onnxruntime at 1 thread.
//!
//! The arithmetic is tract's scalar loop's, in the same order: the bias, then for each tap one
//! multiply and one add (no fused multiply-add, as in tract's own x86_64 depthwise kernel), so an
//! output is bit-identical to the one the plain loop gives.

/// Channel-inner depthwise convolution: for each of `len` output positions `i` and each channel
/// `c` below `channels`, `output[i * out_stride + c] = bias[c] + sum over taps t of
/// kernel[tap_indices[t] * k_stride + c] * input[i * in_stride + offsets[t] + c]`, the taps
/// added in order. tract-linalg's `DepthwiseCF32` contract.
///
/// # Safety
/// Every input, kernel and bias value named above must be readable and every output value
/// writable; the CPU must support AVX (tract calls it only where it does).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn depthwise_c_f32(
    input: *const f32,
    output: *mut f32,
    kernel: *const f32,
    tap_indices: &[usize],
    offsets: &[isize],
    bias: *const f32,
    channels: usize,
    k_stride: usize,
    len: usize,
    in_stride: isize,
    out_stride: isize,
) {
    use std::arch::x86_64::*;
    // SAFETY: every pointer below stays within what the contract makes readable / writable.
    unsafe {
        for i in 0..len {
            let iptr = input.offset(i as isize * in_stride);
            let optr = output.offset(i as isize * out_stride);
            let mut c = 0usize;
            // 32 channels at a time: four independent 8-lane sums per tap
            while c + 32 <= channels {
                let mut a0 = _mm256_loadu_ps(bias.add(c));
                let mut a1 = _mm256_loadu_ps(bias.add(c + 8));
                let mut a2 = _mm256_loadu_ps(bias.add(c + 16));
                let mut a3 = _mm256_loadu_ps(bias.add(c + 24));
                for (&kix, &off) in tap_indices.iter().zip(offsets) {
                    let k = kernel.add(kix * k_stride + c);
                    let x = iptr.offset(off).add(c);
                    a0 = _mm256_add_ps(a0, _mm256_mul_ps(_mm256_loadu_ps(k), _mm256_loadu_ps(x)));
                    a1 = _mm256_add_ps(
                        a1,
                        _mm256_mul_ps(_mm256_loadu_ps(k.add(8)), _mm256_loadu_ps(x.add(8))),
                    );
                    a2 = _mm256_add_ps(
                        a2,
                        _mm256_mul_ps(_mm256_loadu_ps(k.add(16)), _mm256_loadu_ps(x.add(16))),
                    );
                    a3 = _mm256_add_ps(
                        a3,
                        _mm256_mul_ps(_mm256_loadu_ps(k.add(24)), _mm256_loadu_ps(x.add(24))),
                    );
                }
                _mm256_storeu_ps(optr.add(c), a0);
                _mm256_storeu_ps(optr.add(c + 8), a1);
                _mm256_storeu_ps(optr.add(c + 16), a2);
                _mm256_storeu_ps(optr.add(c + 24), a3);
                c += 32;
            }
            while c + 8 <= channels {
                let mut a = _mm256_loadu_ps(bias.add(c));
                for (&kix, &off) in tap_indices.iter().zip(offsets) {
                    let k = _mm256_loadu_ps(kernel.add(kix * k_stride + c));
                    let x = _mm256_loadu_ps(iptr.offset(off).add(c));
                    a = _mm256_add_ps(a, _mm256_mul_ps(k, x));
                }
                _mm256_storeu_ps(optr.add(c), a);
                c += 8;
            }
            while c < channels {
                let mut sum = *bias.add(c);
                for (&kix, &off) in tap_indices.iter().zip(offsets) {
                    sum += *kernel.add(kix * k_stride + c) * *iptr.offset(off).add(c);
                }
                *optr.add(c) = sum;
                c += 1;
            }
        }
    }
}

/// [`depthwise_c_f32`] with AVX-512 registers: 64 channels at a time (four 16-lane sums per tap),
/// then 16, and the rest through the AVX kernel. The same arithmetic in the same order, so the
/// outputs are the plain loop's, bit for bit. tract prefers it on a CPU with AVX-512F (its
/// registry ranks a routine by the instruction set it needs).
///
/// # Safety
/// As [`depthwise_c_f32`]; the CPU must support AVX-512F (and so AVX).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn depthwise_c_f32_avx512(
    input: *const f32,
    output: *mut f32,
    kernel: *const f32,
    tap_indices: &[usize],
    offsets: &[isize],
    bias: *const f32,
    channels: usize,
    k_stride: usize,
    len: usize,
    in_stride: isize,
    out_stride: isize,
) {
    use std::arch::x86_64::*;
    let wide = channels / 16 * 16;
    // SAFETY: every pointer below stays within what the contract makes readable / writable.
    unsafe {
        for i in 0..len {
            let iptr = input.offset(i as isize * in_stride);
            let optr = output.offset(i as isize * out_stride);
            let mut c = 0usize;
            while c + 64 <= channels {
                let mut a = [
                    _mm512_loadu_ps(bias.add(c)),
                    _mm512_loadu_ps(bias.add(c + 16)),
                    _mm512_loadu_ps(bias.add(c + 32)),
                    _mm512_loadu_ps(bias.add(c + 48)),
                ];
                for (&kix, &off) in tap_indices.iter().zip(offsets) {
                    let k = kernel.add(kix * k_stride + c);
                    let x = iptr.offset(off).add(c);
                    for (j, a) in a.iter_mut().enumerate() {
                        let p = _mm512_mul_ps(
                            _mm512_loadu_ps(k.add(16 * j)),
                            _mm512_loadu_ps(x.add(16 * j)),
                        );
                        *a = _mm512_add_ps(*a, p);
                    }
                }
                for (j, a) in a.iter().enumerate() {
                    _mm512_storeu_ps(optr.add(c + 16 * j), *a);
                }
                c += 64;
            }
            while c + 16 <= channels {
                let mut a = _mm512_loadu_ps(bias.add(c));
                for (&kix, &off) in tap_indices.iter().zip(offsets) {
                    let k = _mm512_loadu_ps(kernel.add(kix * k_stride + c));
                    let x = _mm512_loadu_ps(iptr.offset(off).add(c));
                    a = _mm512_add_ps(a, _mm512_mul_ps(k, x));
                }
                _mm512_storeu_ps(optr.add(c), a);
                c += 16;
            }
            debug_assert_eq!(c, wide);
        }
        if wide < channels {
            // the last channels (fewer than 16) of every position, by the AVX kernel
            depthwise_c_f32(
                input.add(wide),
                output.add(wide),
                kernel.add(wide),
                tap_indices,
                offsets,
                bias.add(wide),
                channels - wide,
                k_stride,
                len,
                in_stride,
                out_stride,
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
inventory::submit! {
    tract_linalg::routines::Routine {
        func: tract_linalg::routines::Func::DepthwiseC,
        arch: Some(tract_linalg::isa::Arch::X86_64),
        isa: tract_linalg::isa::IsaReq::ANY.needing(&[
            tract_linalg::isa::Isa::X86_64Avx,
            tract_linalg::isa::Isa::X86_64Avx512f,
        ]),
        boost: 0,
        round_trip: false,
        factory: tract_linalg::routines::RoutineFactory::DepthwiseCF32 {
            name: "sgps_x86_64_avx512_depthwise_c_f32",
            run: depthwise_c_f32_avx512,
        },
    }
}

#[cfg(target_arch = "x86_64")]
inventory::submit! {
    tract_linalg::routines::Routine {
        func: tract_linalg::routines::Func::DepthwiseC,
        arch: Some(tract_linalg::isa::Arch::X86_64),
        isa: tract_linalg::isa::IsaReq::ANY.needing(&[tract_linalg::isa::Isa::X86_64Avx]),
        boost: 0,
        round_trip: false,
        factory: tract_linalg::routines::RoutineFactory::DepthwiseCF32 {
            name: "sgps_x86_64_avx_depthwise_c_f32",
            run: depthwise_c_f32,
        },
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// Whether the CPU has AVX; without it tract never selects the kernel and the tests skip,
    /// saying so (under `CI=true` they fail instead: CI machines are expected to have it).
    fn has_avx() -> bool {
        let avx = std::arch::is_x86_feature_detected!("avx");
        if !avx {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "this CPU has no AVX"
            );
            eprintln!("skipped: this CPU has no AVX, so tract never selects the kernel");
        }
        avx
    }

    /// The kernels this CPU runs: the AVX one, and the AVX-512 one where the CPU has AVX-512F
    /// (said when it does not; CI machines may lack it).
    fn kernels() -> Vec<(&'static str, tract_linalg::routines::DepthwiseCF32)> {
        let mut k: Vec<(&'static str, tract_linalg::routines::DepthwiseCF32)> =
            vec![("avx", depthwise_c_f32)];
        if std::arch::is_x86_feature_detected!("avx512f") {
            k.push(("avx512", depthwise_c_f32_avx512));
        } else {
            eprintln!("no AVX-512F on this CPU: its kernel is not compared here");
        }
        k
    }

    /// tract's plain loop, written out: bias, then each tap's product added in order.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        input: &[f32],
        base: usize,
        kernel: &[f32],
        taps: &[usize],
        offsets: &[isize],
        bias: &[f32],
        channels: usize,
        k_stride: usize,
        len: usize,
        in_stride: isize,
        out_stride: usize,
    ) -> Vec<f32> {
        let mut out = vec![f32::NAN; (len.max(1) - 1) * out_stride + channels];
        for i in 0..len {
            for c in 0..channels {
                let mut sum = bias[c];
                for (&t, &off) in taps.iter().zip(offsets) {
                    let x = input[(base as isize + i as isize * in_stride + off) as usize + c];
                    sum += kernel[t * k_stride + c] * x;
                }
                out[i * out_stride + c] = sum;
            }
        }
        out
    }

    #[test]
    fn matches_tracts_plain_loop_bit_for_bit() {
        if !has_avx() {
            return;
        }
        for &(channels, taps_n, len, in_stride) in &[
            (1usize, 9usize, 3usize, 1isize),
            (7, 9, 5, 2),
            (8, 25, 4, 1),
            (33, 9, 6, 2),
            (96, 9, 7, 2),
            (144, 25, 3, 3),
            (1152, 25, 2, 1),
        ] {
            let k_stride = channels + 3;
            let out_stride = channels + 1;
            let taps: Vec<usize> = (0..taps_n).rev().collect();
            let offsets: Vec<isize> = (0..taps_n as isize)
                .map(|t| (t - 4) * 2 * channels as isize)
                .collect();
            let base = 8 * channels + 16;
            let reach = offsets.iter().copied().max().unwrap().max(0) as usize;
            let n_in = base + (len - 1) * in_stride as usize * channels + reach + channels + 16;
            let input: Vec<f32> = (0..n_in).map(|i| ((i as f32) * 0.37).sin()).collect();
            let kernel: Vec<f32> = (0..taps_n * k_stride)
                .map(|i| ((i as f32) * 0.11).cos())
                .collect();
            let bias: Vec<f32> = (0..channels).map(|c| c as f32 * 0.01 - 0.3).collect();
            // the kernel's in_stride is per output position in elements: one position is `channels`
            let stride = in_stride * channels as isize;
            let want = reference(
                &input, base, &kernel, &taps, &offsets, &bias, channels, k_stride, len, stride,
                out_stride,
            );
            for (name, kernel_fn) in kernels() {
                let mut got = vec![f32::NAN; want.len()];
                unsafe {
                    kernel_fn(
                        input.as_ptr().add(base),
                        got.as_mut_ptr(),
                        kernel.as_ptr(),
                        &taps,
                        &offsets,
                        bias.as_ptr(),
                        channels,
                        k_stride,
                        len,
                        stride,
                        out_stride as isize,
                    );
                }
                for (ix, (w, g)) in want.iter().zip(&got).enumerate() {
                    assert!(
                        w.to_bits() == g.to_bits() || (w.is_nan() && g.is_nan()),
                        "{name}: channels {channels}, taps {taps_n}: element {ix} is {g}, the plain loop gives {w}"
                    );
                }
            }
        }
    }

    /// tract picks this kernel on this machine (AVX present), and with a channel-inner kernel
    /// its optimiser moves the shipped image encoder's depthwise convolutions channel-last (as it
    /// does on aarch64): without the kernel it keeps them all channel-first.
    #[test]
    fn tract_selects_the_kernel_and_runs_the_image_encoder_channel_last() {
        use tract_nnef::tract_core::ops::cnn::Conv;
        if !has_avx() {
            return;
        }
        let run = tract_linalg::routines::depthwise_c_f32().expect("a depthwise_c kernel");
        let (_, widest) = *kernels().last().unwrap();
        assert!(
            std::ptr::fn_addr_eq(run, widest),
            "tract picks the widest kernel the CPU runs"
        );
        let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let manifest = crate::manifest::Manifest::load(&models).expect("models/manifest.json");
        let (_, _, file) = crate::encoders::ImageEncoder::model_file(&manifest, None).unwrap();
        let model = file.typed().unwrap();
        let (mut last, mut all) = (0, 0);
        for node in model.nodes() {
            let Some(conv) = node.op_as::<Conv>() else {
                continue;
            };
            if conv.group > 1 && conv.group == conv.input_channels() {
                all += 1;
                last += usize::from(conv.pool_spec.data_format.c_is_last());
            }
        }
        assert!(
            all >= 10,
            "EfficientNet-Lite has depthwise convolutions: {all}"
        );
        // the first one, on the full-size plane beside the NCHW input, may stay channel-first
        assert!(
            last + 1 >= all,
            "{last} of {all} depthwise convolutions channel-last"
        );
    }
}
