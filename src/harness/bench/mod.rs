//! Benchmarks: `llava-wgpu bench kernels` ([`kernels()`]) times the kernel families on their own;
//! `llava-wgpu bench` ([`pruning()`]) times whole requests, pruned against unpruned.
//!
//! Every measurement runs once untimed (pipeline compilation, first touch of buffers), then
//! `repeats` times as a whole submission (wall clock from submit to the GPU going idle), and is
//! reported by its median.

pub mod kernels;
pub mod pruning;

pub use kernels::{kernels, matmul_peak, KernelReport, KernelResult};
pub use pruning::{
    bench_prompt, default_settings, load_engine, pruning, FamilyEfficiency, PruningReport, Setting,
    SettingResult,
};

use std::time::{Duration, Instant};

use crate::error::Result;
use crate::gpu::kernels::Dispatch;
use crate::gpu::{Gpu, MemoryKind, Recorder};

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn median_f64(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `run` once to warm up, then the median of `repeats` runs.
fn median_of_runs(repeats: usize, run: impl Fn() -> Result<Duration>) -> Result<Duration> {
    run()?;
    let samples = (0..repeats.max(1))
        .map(|_| run())
        .collect::<Result<Vec<_>>>()?;
    Ok(median(samples))
}

fn time_dispatches(gpu: &Gpu, dispatches: &[Dispatch], repeats: usize) -> Result<Duration> {
    median_of_runs(repeats, || {
        let start = Instant::now();
        let mut rec = Recorder::with_batch(gpu, usize::MAX);
        rec.dispatch_all(dispatches.iter().cloned());
        rec.finish("bench")?;
        Ok(start.elapsed())
    })
}

/// Copy bandwidth between two device buffers of `bytes` each, counting bytes read plus written.
fn copy_bandwidth(gpu: &Gpu, bytes: u64, repeats: usize) -> Result<f64> {
    let make = |label| {
        let descriptor = wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes,
            usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        };
        gpu.create_buffer(&descriptor, MemoryKind::Scratch)
    };
    let (src, dst) = (make("copy_src"), make("copy_dst"));
    let t = median_of_runs(repeats, || {
        let start = Instant::now();
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&src, 0, &dst, 0, bytes);
        gpu.queue.submit([enc.finish()]);
        gpu.wait("copy bandwidth")?;
        Ok(start.elapsed())
    })?;
    Ok(2.0 * bytes as f64 / t.as_secs_f64() / 1e9)
}

/// `n` values in [-1, 1) from a cheap deterministic generator: benchmark inputs only need to be
/// non-trivial.
fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}
