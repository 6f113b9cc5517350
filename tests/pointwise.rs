//! Norms, RoPE and activations against f64 CPU references.

mod common;

use common::*;
use llava_wgpu::gpu::kernels::activation::{self, Activation};
use llava_wgpu::gpu::kernels::norm::NormLayout;
use llava_wgpu::gpu::kernels::{norm, rope};
use llava_wgpu::gpu::{DType, Gpu, Recorder, Tensor};

/// Both layouts (one workgroup of 256 threads per row, one 8-lane subgroup per row) on the
/// default device, and the lanes layout's fallback on a device without subgroups.
#[test]
fn layer_norm_and_rms_norm_match_cpu() {
    let devices = [(gpu(), NormLayout::Workgroup), (gpu(), NormLayout::Lanes)];
    for (gpu, layout) in devices
        .into_iter()
        .chain([(gpu_without_features(), NormLayout::Lanes)])
    {
        check_norms(&gpu, layout);
    }
}

fn check_norms(gpu: &Gpu, layout: NormLayout) {
    let mut rng = TestRng::new();
    for &(rows, cols) in &[(1, 1), (1, 7), (37, 64), (577, 129), (3, 4096), (2, 1000)] {
        // A large common offset makes the one-pass variance formula fail; the kernel must not.
        let offset = rng.uniform(1, -50.0, 50.0)[0];
        let x: Vec<f32> = rng
            .uniform(rows * cols, -2.0, 2.0)
            .iter()
            .map(|v| v + offset)
            .collect();
        let gamma = rng.uniform(cols, 0.5, 1.5);
        let beta = rng.uniform(cols, -1.0, 1.0);
        let xt = Tensor::from_f32(gpu, &[rows, cols], &x, "x").unwrap();
        let gt = Tensor::from_f32(gpu, &[cols], &gamma, "gamma").unwrap();
        let bt = Tensor::from_f32(gpu, &[cols], &beta, "beta").unwrap();
        let y_ln = Tensor::empty(gpu, &[rows, cols], DType::F32, "ln").unwrap();
        let y_rms = Tensor::empty(gpu, &[rows, cols], DType::F32, "rms").unwrap();
        y_ln.poison(gpu);
        y_rms.poison(gpu);
        let mut rec = Recorder::new(gpu);
        rec.dispatch(norm::layer_norm_in(gpu, layout, &xt, &gt, &bt, &y_ln, 1e-5).unwrap());
        rec.dispatch(norm::rms_norm_in(gpu, layout, &xt, &gt, &y_rms, 1e-6).unwrap());
        rec.finish("norm test").unwrap();
        // LayerNorm output is O(1) whatever the offset; f32 rounding of x itself (|x| ≤ 52,
        // ulp 4e-6) divided by a std of ~1 bounds the error at ~1e-5.
        let want = norm::layer_norm_reference(&x, cols, &gamma, &beta, 1e-5);
        let what = format!("{layout:?} layer_norm {rows}x{cols}");
        assert_close(
            &what,
            rng.seed,
            &gpu.read_f32(&y_ln).unwrap(),
            &want,
            2e-5,
            2e-5,
        );
        let want = norm::rms_norm_reference(&x, cols, &gamma, 1e-6);
        let what = format!("{layout:?} rms_norm {rows}x{cols}");
        assert_close(
            &what,
            rng.seed,
            &gpu.read_f32(&y_rms).unwrap(),
            &want,
            1e-6,
            1e-5,
        );
    }
}

#[test]
fn rope_matches_cpu_with_explicit_positions() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    for &(rows, heads, d, theta) in &[
        (1, 1, 2, 10000.0),
        (37, 4, 16, 10000.0),
        (5, 2, 128, 500000.0),
        (64, 3, 24, 10000.0),
    ] {
        let table = rope::RopeTable::new(&gpu, theta, d, 4096).unwrap();
        let x = rng.uniform(rows * heads * d, -1.0, 1.0);
        // Positions are arbitrary (pruned sequences skip some), including late ones.
        let positions: Vec<u32> = (0..rows).map(|_| rng.index(4096) as u32).collect();
        let xt = Tensor::from_f32(&gpu, &[rows, heads * d], &x, "x").unwrap();
        let pt = Tensor::from_u32(&gpu, &[rows], &positions, "pos").unwrap();
        let mut rec = Recorder::new(&gpu);
        rec.dispatch(rope::rope(&gpu, &xt, heads, &pt, &table).unwrap());
        rec.finish("rope test").unwrap();
        let want = rope::reference(&x, heads, d, &positions, theta);
        let bound = rope::reference_bound(&x, heads, d, &positions, theta);
        let what = format!("rope T={rows} H={heads} D={d}");
        assert_within(&what, rng.seed, &gpu.read_f32(&xt).unwrap(), &want, &bound);
    }
}

#[test]
fn rope_rejects_a_row_width_that_is_not_heads_times_head_dim() {
    let gpu = gpu();
    let table = rope::RopeTable::new(&gpu, 10000.0, 16, 8).unwrap();
    let x = Tensor::from_f32(&gpu, &[2, 30], &[0.0; 60], "x").unwrap();
    let pos = Tensor::from_u32(&gpu, &[2], &[0, 1], "pos").unwrap();
    assert!(rope::rope(&gpu, &x, 2, &pos, &table).is_err());
    assert!(rope::RopeTable::new(&gpu, 10000.0, 15, 8).is_err());
}

#[test]
fn activations_match_cpu() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    for n in [1usize, 255, 257, 70_001] {
        for act in [Activation::QuickGelu, Activation::Gelu] {
            let mut x = rng.uniform(n, -8.0, 8.0);
            x[0] = 0.0;
            let xt = Tensor::from_f32(&gpu, &[n], &x, "x").unwrap();
            let mut rec = Recorder::new(&gpu);
            rec.dispatch(activation::activate(&gpu, act, &xt).unwrap());
            rec.finish("activation test").unwrap();
            let want: Vec<f64> = x.iter().map(|&v| act.reference(v as f64)).collect();
            // exp() in f32 and the 1.5e-7 erf polynomial: absolute error ≤ ~1e-6 for |x| ≤ 8.
            let what = format!("{act:?} n={n}");
            assert_close(
                &what,
                rng.seed,
                &gpu.read_f32(&xt).unwrap(),
                &want,
                2e-6,
                2e-6,
            );
        }
    }
}

#[test]
fn silu_mul_matches_cpu() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    for &(rows, width) in &[(1, 1), (1, 150), (37, 75), (600, 344)] {
        let gu = rng.uniform(rows * 2 * width, -6.0, 6.0);
        let gt = Tensor::from_f32(&gpu, &[rows, 2 * width], &gu, "gate_up").unwrap();
        let out = Tensor::empty(&gpu, &[rows, width], DType::F32, "out").unwrap();
        out.poison(&gpu);
        let mut rec = Recorder::new(&gpu);
        rec.dispatch(activation::silu_mul(&gpu, &gt, &out).unwrap());
        rec.finish("silu test").unwrap();
        let want = activation::silu_mul_reference(&gu, width);
        let what = format!("silu_mul {rows}x{width}");
        assert_close(
            &what,
            rng.seed,
            &gpu.read_f32(&out).unwrap(),
            &want,
            2e-6,
            2e-6,
        );
    }
    let bad = Tensor::empty(&gpu, &[2, 5], DType::F32, "bad").unwrap();
    let out = Tensor::empty(&gpu, &[2, 3], DType::F32, "out").unwrap();
    assert!(activation::silu_mul(&gpu, &bad, &out).is_err());
}
