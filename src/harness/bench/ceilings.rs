//! The ceilings kernels are measured against, measured in the same run and on the same clock
//! (the profiler's GPU timestamps) as the kernels: an FMA-throughput microkernel for arithmetic
//! (f32, and f16 where the device has SHADER_F16) and a streaming copy kernel for bandwidth.
//!
//! A kernel is bounded by arithmetic when its analytic intensity (flops per byte) is at least
//! the ridge point `f32 FMA rate / copy bandwidth`, else by bandwidth (the roofline model). Every
//! model kernel computes in f32 (f16 weights are unpacked to f32), so the f32 rate is the
//! arithmetic ceiling; the f16 rate is reported for what an f16 path could reach.

use serde::Serialize;

use super::{random, time_dispatches};
use crate::error::Result;
use crate::gpu::kernels::copy::copy;
use crate::gpu::kernels::fma::{self, FmaChain, Precision, CHAINS};
use crate::gpu::kernels::Dispatch;
use crate::gpu::{DType, Gpu, Tensor};

/// Threads of the FMA microkernel: enough to fill a large GPU (a few hundred thousand chains).
const FMA_THREADS: usize = 1 << 16;
/// FMAs per chain: 2^31 flops per run, about 0.1 ms on a 20 TFLOP/s GPU and tens of ms on a
/// software driver.
const FMA_ITERATIONS: u32 = 1 << 10;
/// Bytes per side of the copy (less where the storage-binding limit is smaller).
const COPY_BYTES: u64 = 64 << 20;

/// Which ceiling bounds a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Bound {
    /// Flops per byte at or above the ridge point: compared with the f32 FMA rate.
    Arithmetic,
    /// Below the ridge point: compared with the copy bandwidth.
    Bandwidth,
}

#[derive(Clone, Debug, Serialize)]
pub struct Ceilings {
    /// The f32 FMA microkernel, counting a multiply-add as 2 flops.
    pub fma_f32_gflops: f64,
    /// The f16 FMA microkernel; None without SHADER_F16.
    pub fma_f16_gflops: Option<f64>,
    /// The copy kernel, counting bytes read plus bytes written.
    pub copy_gbytes_per_s: f64,
    /// Bytes copied per side.
    pub copy_bytes: u64,
}

/// The median GFLOP/s (or GB/s, with `per = bytes`) of `dispatches`.
fn rate(
    gpu: &Gpu,
    dispatches: &[Dispatch],
    repeats: usize,
    per: fn(&Dispatch) -> u64,
) -> Result<f64> {
    let secs = time_dispatches(gpu, dispatches, repeats)?.as_secs_f64();
    let total: u64 = dispatches.iter().map(per).sum();
    Ok(total as f64 / secs / 1e9)
}

impl Ceilings {
    /// Time both microkernels, each as the median of `repeats` runs after one warm-up.
    pub fn measure(gpu: &Gpu, repeats: usize) -> Result<Self> {
        // Starts k/64 in [-1, 1]: exact in f16 as in f32, like the chain's m and c.
        let starts: Vec<f32> = (0..FMA_THREADS)
            .map(|i| (i % 129) as f32 / 64.0 - 1.0)
            .collect();
        let start = Tensor::from_f32(gpu, &[FMA_THREADS], &starts, "fma.start")?;
        let out = Tensor::empty(gpu, &[FMA_THREADS * CHAINS], DType::F32, "fma.out")?;
        let chain = FmaChain {
            m: 0.75,
            c: 0.5,
            iterations: FMA_ITERATIONS,
        };
        let flops = |d: &Dispatch| d.flops;
        let f32_run = fma::fma(gpu, Precision::F32, chain, &start, &out)?;
        let fma_f32_gflops = rate(gpu, &[f32_run], repeats, flops)?;
        let fma_f16_gflops = if gpu.caps.shader_f16 {
            let f16_run = fma::fma(gpu, Precision::F16, chain, &start, &out)?;
            Some(rate(gpu, &[f16_run], repeats, flops)?)
        } else {
            None
        };

        let copy_bytes = COPY_BYTES.min(gpu.adapter_binding_bytes) / 16 * 16;
        let n = (copy_bytes / 4) as usize;
        let src = Tensor::from_f32(gpu, &[n], &random(n, 17), "copy.src")?;
        let dst = Tensor::empty(gpu, &[n], DType::F32, "copy.dst")?;
        let copy_gbytes_per_s = rate(gpu, &[copy(gpu, &src, &dst)?], repeats, |d| d.bytes)?;
        Ok(Self {
            fma_f32_gflops,
            fma_f16_gflops,
            copy_gbytes_per_s,
            copy_bytes,
        })
    }

    /// The ceiling that bounds a kernel doing `flops` over `bytes` of memory traffic.
    pub fn bound(&self, flops: f64, bytes: f64) -> Bound {
        let ridge = self.fma_f32_gflops / self.copy_gbytes_per_s;
        if flops >= ridge * bytes {
            Bound::Arithmetic
        } else {
            Bound::Bandwidth
        }
    }

    /// A measured rate as a fraction of the ceiling `bound` names.
    pub fn fraction(&self, bound: Bound, gflops: f64, gbytes_per_s: f64) -> f64 {
        match bound {
            Bound::Arithmetic => gflops / self.fma_f32_gflops,
            Bound::Bandwidth => gbytes_per_s / self.copy_gbytes_per_s,
        }
    }

    /// The larger relative change of the f32 FMA rate and the copy bandwidth from `self` to
    /// `later` (0.3 is 30%): how far the device's speed moved between two measurements, for
    /// instance when other work started or stopped on a shared machine.
    pub fn drift(&self, later: &Ceilings) -> f64 {
        let change = |a: f64, b: f64| (b - a).abs() / a;
        change(self.fma_f32_gflops, later.fma_f32_gflops)
            .max(change(self.copy_gbytes_per_s, later.copy_gbytes_per_s))
    }

    /// One line for table headers.
    pub fn describe(&self) -> String {
        let f16 = match self.fma_f16_gflops {
            Some(g) => format!("{g:.2} GFLOP/s"),
            None => "no SHADER_F16".into(),
        };
        format!(
            "ceilings (GPU timestamps, this run): FMA f32 {:.2} GFLOP/s, FMA f16 {f16}, copy {:.2} GB/s (read + write, {} MiB)",
            self.fma_f32_gflops,
            self.copy_gbytes_per_s,
            self.copy_bytes >> 20
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ceilings(fma: f64, copy: f64) -> Ceilings {
        Ceilings {
            fma_f32_gflops: fma,
            fma_f16_gflops: None,
            copy_gbytes_per_s: copy,
            copy_bytes: 1 << 20,
        }
    }

    #[test]
    fn drift_is_the_larger_relative_change() {
        // FMA 10 → 12 is 20%, copy 2 → 1 is 50%.
        assert!((ceilings(10.0, 2.0).drift(&ceilings(12.0, 1.0)) - 0.5).abs() < 1e-12);
        // A speed-up counts like a slow-down: 4 → 5 GB/s is 25%.
        assert!((ceilings(8.0, 4.0).drift(&ceilings(8.0, 5.0)) - 0.25).abs() < 1e-12);
        assert_eq!(ceilings(3.0, 1.0).drift(&ceilings(3.0, 1.0)), 0.0);
    }
}
