//! `LLAVA_WGPU_DISABLE` switches optional features off: the device reports them off and the
//! kernels' dispatches run the fallback variants. One test in its own binary, because it sets a
//! process-wide environment variable.

mod common;

use common::*;
use llava_wgpu::gpu::kernels::{linear::gemv, sample};
use llava_wgpu::gpu::{DType, GpuOptions, Recorder, Tensor, Weight, WeightFormat};

#[test]
fn the_disable_variable_selects_the_fallback_paths() {
    // Set before any device is opened in this binary.
    std::env::set_var(
        llava_wgpu::gpu::device::ENV_DISABLE,
        "subgroups, f16,timestamps",
    );
    let gpu = gpu();
    assert!(!gpu.caps.subgroups && !gpu.caps.shader_f16 && !gpu.caps.timestamps);
    assert!(!gpu.features.contains(wgpu::Features::SUBGROUP));
    assert!(!gpu.features.contains(wgpu::Features::SHADER_F16));

    let mut rng = TestRng::new();
    let (n, k) = (37, 131);
    let w = rng.uniform(n * k, -1.0, 1.0);
    let x = rng.uniform(k, -1.0, 1.0);
    let weight = Weight::from_f32(&gpu, "w", n, k, &w, WeightFormat::F32).unwrap();
    let xt = Tensor::from_f32(&gpu, &[1, k], &x, "x").unwrap();
    let yt = Tensor::empty(&gpu, &[1, n], DType::F32, "y").unwrap();
    let ids = Tensor::empty(&gpu, &[1], DType::U32, "ids").unwrap();
    yt.poison(&gpu);
    let mut dispatches = gemv::gemv(&gpu, &xt, 0, &weight, &yt, 0, false).unwrap();
    dispatches.push(sample::argmax(&gpu, &yt, 0, &ids, 0).unwrap());
    for d in &dispatches {
        assert!(
            !d.module.flags.subgroups && !d.module.flags.f16,
            "{} ran {}",
            d.kernel,
            d.module
        );
    }
    let mut rec = Recorder::new(&gpu);
    rec.dispatch_all(dispatches);
    rec.finish("fallback paths").unwrap();
    let want: Vec<f64> = (0..n)
        .map(|j| (0..k).map(|t| x[t] as f64 * w[j * k + t] as f64).sum())
        .collect();
    let got = gpu.read_f32(&yt).unwrap();
    assert_close("gemv without subgroups", rng.seed, &got, &want, 1e-5, 1e-5);
    let best = (0..n).max_by(|&a, &b| got[a].total_cmp(&got[b]).then(b.cmp(&a)));
    assert_eq!(gpu.read_u32(&ids).unwrap(), vec![best.unwrap() as u32]);

    // An unknown name is an argument error naming the variable.
    std::env::set_var(llava_wgpu::gpu::device::ENV_DISABLE, "warp-drive");
    let err = GpuOptions::default().with_env().unwrap_err();
    assert!(err.to_string().contains("LLAVA_WGPU_DISABLE"), "{err}");
}
