//! The FMA-throughput microkernel (shaders/fma.wgsl): the arithmetic ceiling `bench` compares
//! kernels with. Not used by any model.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::device::Gpu;
use crate::gpu::kernels::{Dispatch, KernelCall, Shader, WorkgroupSize};
use crate::gpu::tensor::{DType, Tensor};

/// Threads per workgroup (WG in the shader).
pub const WORKGROUP: WorkgroupSize = WorkgroupSize(64);

/// Independent FMA chains per thread (four vec4 accumulators in the shader).
pub const CHAINS: usize = 16;

/// The arithmetic the chains run in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    F32,
    /// Native f16 (`enable f16;`): needs SHADER_F16.
    F16,
}

/// The chain every thread runs: `x <- fma(x, m, c)`, `iterations` times.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FmaChain {
    pub m: f32,
    pub c: f32,
    pub iterations: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    count: u32,
    iterations: u32,
    m: f32,
    c: f32,
}

/// Run `chain` on `CHAINS` values per thread, one thread per element of `start` ([threads],
/// f32); thread i's chain j starts at `start[i] + j` and ends in `out[i * CHAINS + j]`.
pub fn fma(
    gpu: &Gpu,
    precision: Precision,
    chain: FmaChain,
    start: &Tensor,
    out: &Tensor,
) -> Result<Dispatch> {
    let threads = start.numel();
    if start.dtype != DType::F32 || out.dtype != DType::F32 || out.numel() != threads * CHAINS {
        return Err(Error::shape(
            "fma",
            format!(
                "start {:?} and out {:?} must be f32 with out = start × {CHAINS}",
                start.shape, out.shape
            ),
        ));
    }
    if threads == 0 || threads > u32::MAX as usize / CHAINS {
        return Err(Error::shape(
            "fma",
            format!(
                "{threads} threads: need 1 to {}",
                u32::MAX as usize / CHAINS
            ),
        ));
    }
    let bounded = chain.m.abs() < 1.0; // false for NaN
    if !bounded || !chain.c.is_finite() {
        return Err(Error::argument(
            "chain",
            format!(
                "m = {} must satisfy |m| < 1 and c = {} be finite, so the chain stays bounded",
                chain.m, chain.c
            ),
        ));
    }
    let entry = match precision {
        Precision::F32 => "fma_f32",
        Precision::F16 if gpu.caps.shader_f16 => "fma_f16",
        Precision::F16 => return Err(Error::argument(
            "precision",
            "f16 arithmetic needs SHADER_F16, which this device does not have (or it was disabled)",
        )),
    };
    let params = Params {
        count: threads as u32,
        iterations: chain.iterations,
        m: chain.m,
        c: chain.c,
    };
    let fmas = threads as u64 * CHAINS as u64 * chain.iterations as u64;
    KernelCall::new(gpu, Shader::Fma, entry)
        .constants(WORKGROUP.constants())
        .params(&params)
        .read(&start.buffer)
        .read_write(&out.buffer)
        .build(
            entry,
            format!("threads={threads} iterations={}", chain.iterations),
            WORKGROUP.groups_for(gpu, threads),
            2 * fmas,
            (threads * 4 + threads * CHAINS * 4) as u64,
        )
}

/// The chains of [`fma`] in f64: `start[i] + j`, then `x <- x·m + c` `iterations` times.
pub fn reference(start: &[f32], chain: FmaChain) -> Vec<f64> {
    let (m, c) = (chain.m as f64, chain.c as f64);
    start
        .iter()
        .flat_map(|&s| {
            (0..CHAINS).map(move |j| {
                let mut x = s as f64 + j as f64;
                for _ in 0..chain.iterations {
                    x = x * m + c;
                }
                x
            })
        })
        .collect()
}
