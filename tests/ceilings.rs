//! The microkernels `bench` measures its ceilings with: the FMA chains against the same chains
//! computed in f64, the copy against its input.

mod common;

use common::*;
use llava_wgpu::gpu::kernels::copy::copy;
use llava_wgpu::gpu::kernels::fma::{self, FmaChain, Precision, CHAINS};
use llava_wgpu::gpu::{DType, Gpu, Recorder, Tensor};

/// Unit roundoff of the arithmetic.
fn unit_roundoff(precision: Precision) -> f64 {
    match precision {
        Precision::F32 => f64::EPSILON * 2f64.powi(29) / 2.0, // 2^-24
        Precision::F16 => 2f64.powi(-11),
    }
}

/// Starts k/64 in [-1, 1] and a chain whose m and c are multiples of 1/64: every start + j and
/// both constants are exact in f16 and f32, so the kernel and the f64 reference begin equal.
fn draw(rng: &mut TestRng, threads: usize, iterations: u32) -> (Vec<f32>, FmaChain) {
    let starts = (0..threads)
        .map(|_| (rng.index(129) as f32 - 64.0) / 64.0)
        .collect();
    let m = [0.75f32, -0.5, 0.9375, 0.0][rng.index(4)];
    let c = (rng.index(257) as f32 - 128.0) / 64.0;
    (starts, FmaChain { m, c, iterations })
}

/// Run the kernel with a poisoned output and read it back.
fn run(gpu: &Gpu, precision: Precision, starts: &[f32], chain: FmaChain) -> Vec<f32> {
    let start = Tensor::from_f32(gpu, &[starts.len()], starts, "start").unwrap();
    let out = Tensor::empty(gpu, &[starts.len() * CHAINS], DType::F32, "out").unwrap();
    out.poison(gpu);
    let mut rec = Recorder::new(gpu);
    rec.dispatch(fma::fma(gpu, precision, chain, &start, &out).unwrap());
    rec.finish("fma test").unwrap();
    gpu.read_f32(&out).unwrap()
}

/// Per element: |x_n| ≤ |x_0| + |c|/(1−|m|) =: M. Each step rounds at most twice (product and
/// sum, if the FMA is not fused), adding ≤ u(|m|M + |m|M + |c|) ≤ u(2M + |c|) to an error the
/// contraction multiplies by |m|; summed, ≤ u(2M + |c|)/(1−|m|).
fn bounds(starts: &[f32], chain: FmaChain, u: f64) -> Vec<f64> {
    let (m, c) = (chain.m.abs() as f64, chain.c.abs() as f64);
    starts
        .iter()
        .flat_map(|&s| {
            (0..CHAINS).map(move |j| {
                let big = (s as f64 + j as f64).abs() + c / (1.0 - m);
                u * (2.0 * big + c) / (1.0 - m)
            })
        })
        .collect()
}

#[test]
fn fma_chains_equal_their_f64_values_in_f32_and_f16() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    let mut precisions = vec![Precision::F32];
    if gpu.caps.shader_f16 {
        precisions.push(Precision::F16);
    }
    for precision in precisions {
        for &(threads, iterations) in &[(1, 0), (1, 1), (63, 2), (65, 7), (1000, 37), (130, 300)] {
            let (starts, chain) = draw(&mut rng, threads, iterations);
            let got = run(&gpu, precision, &starts, chain);
            let want = fma::reference(&starts, chain);
            let bound = bounds(&starts, chain, unit_roundoff(precision));
            let what = format!("{precision:?} threads={threads} {chain:?}");
            assert_within(&what, rng.seed, &got, &want, &bound);
        }
    }
}

/// The f16 entry point really computes in f16: over enough steps it loses bits an f32 chain
/// keeps, so its error exceeds the f32 bound many times over somewhere.
#[test]
fn the_f16_chain_rounds_like_f16() {
    let gpu = gpu();
    if !gpu.caps.shader_f16 {
        eprintln!("skipped: the adapter has no SHADER_F16");
        return;
    }
    let starts: Vec<f32> = (0..64).map(|k| k as f32 / 64.0 - 0.5).collect();
    let chain = FmaChain {
        m: 0.9375,
        c: 0.015625,
        iterations: 20,
    };
    let want = fma::reference(&starts, chain);
    let f32_bound = bounds(&starts, chain, unit_roundoff(Precision::F32));
    let worst = |got: Vec<f32>| {
        got.iter()
            .zip(&want)
            .zip(&f32_bound)
            .map(|((g, w), b)| (*g as f64 - w).abs() / b)
            .fold(0.0, f64::max)
    };
    let f32_ratio = worst(run(&gpu, Precision::F32, &starts, chain));
    let f16_ratio = worst(run(&gpu, Precision::F16, &starts, chain));
    assert!(f32_ratio <= 1.0, "f32 chain off by {f32_ratio} bounds");
    assert!(f16_ratio > 100.0, "f16 chain within {f16_ratio} f32 bounds");
}

#[test]
fn fma_refuses_f16_without_the_feature_and_mismatched_buffers() {
    let gpu = gpu_without_features();
    let start = Tensor::from_f32(&gpu, &[3], &[0.0; 3], "start").unwrap();
    let out = Tensor::empty(&gpu, &[3 * CHAINS], DType::F32, "out").unwrap();
    let chain = FmaChain {
        m: 0.5,
        c: 1.0,
        iterations: 4,
    };
    let err = fma::fma(&gpu, Precision::F16, chain, &start, &out).unwrap_err();
    assert!(err.to_string().contains("precision"), "{err}");
    let short = Tensor::empty(&gpu, &[3 * CHAINS - 1], DType::F32, "out").unwrap();
    let err = fma::fma(&gpu, Precision::F32, chain, &start, &short).unwrap_err();
    assert!(err.to_string().contains("fma"), "{err}");
    let divergent = FmaChain { m: 1.0, ..chain };
    let err = fma::fma(&gpu, Precision::F32, divergent, &start, &out).unwrap_err();
    assert!(err.to_string().contains("chain"), "{err}");
}

#[test]
fn copy_reproduces_its_input_bit_for_bit() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    for n in [4usize, 4 * 255, 4 * 257, 4 * 70_001] {
        let values = rng.uniform(n, -1e6, 1e6);
        let src = Tensor::from_f32(&gpu, &[n], &values, "src").unwrap();
        let dst = Tensor::empty(&gpu, &[n], DType::F32, "dst").unwrap();
        dst.poison(&gpu);
        let mut rec = Recorder::new(&gpu);
        rec.dispatch(copy(&gpu, &src, &dst).unwrap());
        rec.finish("copy test").unwrap();
        let got = gpu.read_f32(&dst).unwrap();
        let same = got
            .iter()
            .zip(&values)
            .all(|(g, v)| g.to_bits() == v.to_bits());
        assert!(same, "copy of {n} floats differs (seed {})", rng.seed);
    }
    let odd = Tensor::from_f32(&gpu, &[6], &[0.0; 6], "src").unwrap();
    let err = copy(&gpu, &odd, &odd).unwrap_err();
    assert!(err.to_string().contains("copy"), "{err}");
}
