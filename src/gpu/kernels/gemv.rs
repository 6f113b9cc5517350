//! `y = W·x (+ bias) (+ y)` for a single row: the launcher for shaders/gemv.wgsl. The CPU
//! reference is `matmul::reference` with `m = 1`.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::device::Gpu;
use crate::gpu::kernels::matmul::{FLAG_ACCUMULATE, FLAG_BIAS};
use crate::gpu::kernels::{grid, Dispatch, KernelCall};
use crate::gpu::tensor::{Tensor, Weight, WeightFormat};

/// Output rows per workgroup (ROWS in the shader).
pub const ROWS_PER_WORKGROUP: usize = 4;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    k: u32,
    w_stride: u32,
    x_offset: u32,
    col_offset: u32,
    flags: u32,
    y_offset: u32,
    _pad: u32,
}

/// Multiply row `x_row` of `x [M, K]` by `wᵀ`, writing row `y_row` of `y [*, N]`. One dispatch
/// per row-chunk of `w`.
pub fn gemv(
    gpu: &Gpu,
    x: &Tensor,
    x_row: usize,
    w: &Weight,
    y: &Tensor,
    y_row: usize,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    let (x_rows, k) = x.rows_cols();
    let (y_rows, n_total) = y.rows_cols();
    if k != w.k || n_total != w.n || x_row >= x_rows || y_row >= y_rows {
        return Err(Error::shape(
            "gemv",
            format!(
                "row {x_row} of X {:?} · {}ᵀ [{}, {}] into row {y_row} of Y {:?}",
                x.shape, w.name, w.n, w.k, y.shape
            ),
        ));
    }
    let entry = match w.format {
        WeightFormat::F16 => "gemv_f16",
        WeightFormat::F32 => "gemv_f32",
    };
    let w_stride = (w.row_stride * w.format.bytes_per_element() / 4) as u32;
    let mut flags = if accumulate { FLAG_ACCUMULATE } else { 0 };
    if w.bias.is_some() {
        flags |= FLAG_BIAS;
    }
    let bias = w.bias.as_ref().map_or(&x.buffer, |b| &b.buffer);
    let kernel = if gpu.caps.subgroups {
        if w.format == WeightFormat::F16 {
            "gemv_f16_subgroup"
        } else {
            "gemv_f32_subgroup"
        }
    } else {
        entry
    };
    w.chunks
        .iter()
        .map(|chunk| {
            let params = Params {
                n: chunk.rows as u32,
                k: k as u32,
                w_stride,
                x_offset: (x_row * k) as u32,
                col_offset: chunk.first_row as u32,
                flags,
                y_offset: (y_row * n_total) as u32,
                _pad: 0,
            };
            let groups = chunk.rows.div_ceil(ROWS_PER_WORKGROUP) as u32;
            let bytes = (k * 4 + chunk.rows * k * w.format.bytes_per_element()) as u64
                + (chunk.rows * 4) as u64 * if accumulate { 2 } else { 1 };
            KernelCall::new(gpu, "gemv", entry)
                .params(&params)
                .read(&x.buffer)
                .read(&chunk.buffer)
                .read(bias)
                .read_write(&y.buffer)
                .build(
                    kernel,
                    format!("N={} K={k}", chunk.rows),
                    grid(groups, gpu.limits.max_compute_workgroups_per_dimension),
                    2 * (chunk.rows * k) as u64,
                    bytes,
                )
        })
        .collect()
}
