//! Shared test helpers: the device, seeded random inputs, and tolerance checks that name the seed.
#![allow(dead_code)]

#[path = "../session/mod.rs"]
mod session;

use llava_wgpu::gpu::{Gpu, GpuOptions, WeightFormat};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Every test draws fresh random inputs; the seed is printed in any failure message and can be
/// replayed with `LLAVA_TEST_SEED=<seed>`.
pub struct TestRng {
    pub seed: u64,
    pub rng: StdRng,
}

impl TestRng {
    pub fn new() -> Self {
        let seed = match std::env::var("LLAVA_TEST_SEED") {
            Ok(s) => s.parse().expect("LLAVA_TEST_SEED must be an integer"),
            Err(_) => rand::rng().random(),
        };
        Self {
            seed,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    pub fn uniform(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.rng.random_range(lo..hi)).collect()
    }

    /// Standard-normal-ish values (sum of uniforms; exact distribution does not matter).
    pub fn normal(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let s: f32 = (0..4).map(|_| self.rng.random_range(-1.0f32..1.0)).sum();
                s * 0.866 * scale
            })
            .collect()
    }

    pub fn index(&mut self, n: usize) -> usize {
        self.rng.random_range(0..n)
    }

    /// `rows` rows of `cols` weights of a block `format` as random ggml blocks: every quant
    /// and packed-scale byte random (so every bit pattern occurs), the f16 scale fields small
    /// finite values (`d` of either sign, `dmin` non-negative as ggml's quantizers write it).
    pub fn blocks(&mut self, format: WeightFormat, rows: usize, cols: usize) -> Vec<u8> {
        let layout = format.blocks().expect("a block format");
        let count = rows * cols / layout.weights;
        let mut out = vec![0u8; count * layout.bytes];
        self.rng.fill(&mut out[..]);
        // (offset of d, offset of a second f16 field and whether it is non-negative)
        let (d_at, second): (usize, Option<(usize, bool)>) = match format {
            WeightFormat::Q4_1 | WeightFormat::Q5_1 => (0, Some((2, false))),
            WeightFormat::Q4_K | WeightFormat::Q5_K => (0, Some((2, true))),
            WeightFormat::Q2_K => (80, Some((82, true))),
            WeightFormat::Q3_K => (108, None),
            WeightFormat::Q6_K => (208, None),
            _ => (0, None),
        };
        for block in out.chunks_exact_mut(layout.bytes) {
            let d = half::f16::from_f32(self.rng.random_range(-0.02f32..0.02));
            block[d_at..d_at + 2].copy_from_slice(&d.to_le_bytes());
            if let Some((at, non_negative)) = second {
                let lo = if non_negative { 0.0 } else { -0.3 };
                let v = half::f16::from_f32(self.rng.random_range(lo..0.3f32));
                block[at..at + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        out
    }
}

/// The default device (lavapipe on a machine without a GPU).
pub fn gpu() -> Gpu {
    session::private_runtime_dir();
    Gpu::new(GpuOptions::default()).expect("no GPU adapter: install mesa-vulkan-drivers")
}

/// A device with the optional features switched off, to test the fallback shader paths.
pub fn gpu_without_features() -> Gpu {
    session::private_runtime_dir();
    Gpu::new(GpuOptions {
        disable_f16: true,
        disable_subgroups: true,
        disable_timestamps: true,
        ..GpuOptions::default()
    })
    .expect("no GPU adapter")
}

/// The default device with kernels tuned as for a GPU even on a CPU adapter (the tiled matmul,
/// 4 GEMV rows per workgroup), with or without the optional features: the GPU tuning is tested
/// here too.
pub fn gpu_tuned_for_gpus(features: bool) -> Gpu {
    session::private_runtime_dir();
    Gpu::new(GpuOptions {
        disable_cpu_tuning: true,
        disable_f16: !features,
        disable_subgroups: !features,
        ..GpuOptions::default()
    })
    .expect("no GPU adapter")
}

/// A device that plans with a small storage-binding limit, forcing weights into chunks.
pub fn gpu_with_binding_limit(bytes: u64) -> Gpu {
    session::private_runtime_dir();
    Gpu::new(GpuOptions {
        max_binding_bytes: Some(bytes),
        ..GpuOptions::default()
    })
    .expect("no GPU adapter")
}

/// Whether the adapter behind `gpu` offers subgroups the kernels can use (SUBGROUP with a
/// power-of-two minimum size of at least 4), read from the adapter listing rather than from the
/// device's own decision.
pub fn adapter_offers_subgroups(gpu: &Gpu) -> bool {
    let adapter = llava_wgpu::gpu::device::list_adapters(&GpuOptions::default())
        .into_iter()
        .find(|a| a.name == gpu.info.name)
        .expect("the device's adapter is listed");
    let size = adapter.subgroup_min_size;
    adapter.subgroups && size >= 4 && size.is_power_of_two()
}

/// Assert that every one of `modules` (the variants some dispatches ran) took the subgroup path
/// if `subgroups`, else the shared-memory one.
pub fn assert_ran_path(
    what: &str,
    modules: &[llava_wgpu::gpu::kernels::ModuleKey],
    subgroups: bool,
) {
    assert!(!modules.is_empty(), "{what}: no dispatch");
    for m in modules {
        assert_eq!(m.flags.subgroups, subgroups, "{what} ran {m}");
    }
}

/// Assert `|got - want| <= bound[i]` element-wise; NaN (an unwritten, poisoned element) fails.
pub fn assert_within(what: &str, seed: u64, got: &[f32], want: &[f64], bound: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length (seed {seed})");
    let mut worst = (0usize, 0f64, 0f64);
    for i in 0..got.len() {
        let g = got[i] as f64;
        let err = (g - want[i]).abs();
        assert!(
            g.is_finite() && err <= bound[i],
            "{what}: element {i} is {g}, expected {} ± {} (seed {seed}; replay with LLAVA_TEST_SEED={seed})",
            want[i],
            bound[i]
        );
        let ratio = if bound[i] > 0.0 { err / bound[i] } else { 0.0 };
        if ratio > worst.2 {
            worst = (i, err, ratio);
        }
    }
}

/// Assert with one absolute + relative tolerance for every element.
pub fn assert_close(what: &str, seed: u64, got: &[f32], want: &[f64], abs: f64, rel: f64) {
    let bound: Vec<f64> = want.iter().map(|w| abs + rel * w.abs()).collect();
    assert_within(what, seed, got, want, &bound);
}
