//! Greedy sampling on the GPU: the launcher for shaders/sample.wgsl and its CPU reference.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::device::Gpu;
use crate::gpu::kernels::{Dispatch, KernelCall, Shader, WorkgroupSize};
use crate::gpu::tensor::{DType, Tensor};

/// What [`argmax`] writes for a row whose logits are all NaN: no valid token id, so the host
/// must reject it instead of decoding it.
pub const NO_INDEX: u32 = u32::MAX;

/// Threads of the one workgroup per row (WG in the shader; a power of two for its tree).
pub const WORKGROUP: WorkgroupSize = WorkgroupSize(256);

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    v: u32,
    row_offset: u32,
    out_offset: u32,
    _pad: u32,
}

/// Write the index of the largest logit of row `row` of `logits [rows, V]` into
/// `out[out_offset]` (a u32 tensor, e.g. the generated-ids buffer). Ties go to the lower index,
/// NaN logits are ignored, and a row of only NaN gives [`NO_INDEX`]. One workgroup.
pub fn argmax(
    gpu: &Gpu,
    logits: &Tensor,
    row: usize,
    out: &Tensor,
    out_offset: usize,
) -> Result<Dispatch> {
    let (rows, v) = logits.rows_cols();
    if logits.dtype != DType::F32 || v == 0 {
        return Err(Error::shape(
            "argmax",
            format!(
                "logits must be a non-empty f32 [rows, V] tensor, got {:?} {:?}",
                logits.dtype, logits.shape
            ),
        ));
    }
    if row >= rows {
        return Err(Error::argument(
            "row",
            format!("row {row} of logits with {rows} rows"),
        ));
    }
    if out.dtype != DType::U32 || out_offset >= out.numel() {
        return Err(Error::shape(
            "argmax",
            format!(
                "out[{out_offset}] must be an element of a u32 tensor, got {:?} {:?}",
                out.dtype, out.shape
            ),
        ));
    }
    let last = (row + 1) * v;
    if last > u32::MAX as usize || out_offset > u32::MAX as usize {
        return Err(Error::shape(
            "argmax",
            format!(
                "logits {:?} are too large for 32-bit indexing",
                logits.shape
            ),
        ));
    }
    let params = Params {
        v: v as u32,
        row_offset: (row * v) as u32,
        out_offset: out_offset as u32,
        _pad: 0,
    };
    let kernel = if gpu.caps.subgroups {
        "argmax_subgroup"
    } else {
        "argmax"
    };
    KernelCall::new(gpu, Shader::Sample, "argmax")
        .constants(WORKGROUP.constants())
        .params(&params)
        .read(&logits.buffer)
        .read_write(&out.buffer)
        .build(
            kernel,
            format!("V={v}"),
            [1, 1, 1],
            v as u64,
            4 * v as u64 + 4,
        )
}

/// CPU reference: the index of the largest non-NaN value (the first one on ties), or `None` when
/// every value is NaN (or the row is empty).
pub fn argmax_reference(row: &[f32]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &x) in row.iter().enumerate() {
        if x.is_nan() {
            continue;
        }
        if best.is_none_or(|b| x > row[b]) {
            best = Some(i);
        }
    }
    best
}
