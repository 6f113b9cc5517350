//! Benchmarks: `llava-wgpu bench kernels` ([`kernels()`]) times the kernel families on their own;
//! `llava-wgpu bench` ([`pruning()`]) times whole requests, pruned against unpruned;
//! `llava-wgpu bench soak` ([`soak()`]) runs many varied requests and watches resident memory.
//!
//! Kernel measurements run once untimed (pipeline compilation, first touch of buffers), then
//! `repeats` times, each timed by the profiler's GPU timestamps around every dispatch (the same
//! clock as `run --profile`), and are reported by their median. The ceilings they are compared
//! with (`ceilings.rs`) are timed the same way in the same run.

pub mod ceilings;
pub mod kernels;
pub mod pruning;
pub mod serve;
pub mod soak;

pub use ceilings::{Bound, Ceilings};
pub use kernels::{kernel_sections, kernels, KernelReport, KernelResult};
pub use pruning::{
    bench_prompt, bench_visual_tokens, default_settings, load_engine, next_settings, pruning,
    select_settings, short_run, short_run_settings, timed_settings, FamilyEfficiency, Plan,
    PruningReport, Setting, SettingResult, SHORT_RUN_WIDTH,
};
pub use soak::{soak, SoakReport};

use std::time::Duration;

use crate::error::{Error, Result};
use crate::gpu::kernels::Dispatch;
use crate::gpu::{Gpu, Recorder};

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

/// The summed GPU time of `dispatches`, recorded in one submission with the profiler on.
fn time_dispatches(gpu: &Gpu, dispatches: &[Dispatch], repeats: usize) -> Result<Duration> {
    median_of_runs(repeats, || {
        gpu.start_profiling();
        let mut rec = Recorder::with_batch(gpu, usize::MAX);
        rec.dispatch_all(dispatches.iter().cloned());
        rec.finish("bench")?;
        let report = gpu
            .finish_profiling()?
            .ok_or_else(|| Error::gpu("bench", "the profiler stopped before the run ended"))?;
        Ok(Duration::from_secs_f64(report.kernel_us() / 1e6))
    })
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
