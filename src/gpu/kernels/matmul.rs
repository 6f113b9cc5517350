//! `Y = X·Wᵀ (+ bias) (+ Y)`: the launcher for shaders/matmul.wgsl and its CPU reference.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::device::Gpu;
use crate::gpu::kernels::{Dispatch, KernelCall};
use crate::gpu::tensor::{Tensor, Weight, WeightFormat};

pub const TILE_M: usize = 64;
pub const TILE_N: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    w_stride: u32,
    x_stride: u32,
    y_stride: u32,
    col_offset: u32,
    flags: u32,
}

pub(crate) const FLAG_BIAS: u32 = 1;
pub(crate) const FLAG_ACCUMULATE: u32 = 2;

/// Check `x [M, K]`, `w [N, K]`, `y [M, N]` and return (M, N, K).
pub(crate) fn check_linear(
    op: &str,
    x: &Tensor,
    w: &Weight,
    y: &Tensor,
) -> Result<(usize, usize, usize)> {
    let (m, k) = x.rows_cols();
    let (ym, yn) = y.rows_cols();
    if k != w.k || ym != m || yn != w.n {
        return Err(Error::shape(
            op,
            format!(
                "X {:?} · {}ᵀ [{}, {}] does not give Y {:?}",
                x.shape, w.name, w.n, w.k, y.shape
            ),
        ));
    }
    Ok((m, w.n, k))
}

/// One dispatch per row-chunk of `w`. `accumulate` adds the product to what `y` holds (a fused
/// residual connection).
pub fn matmul(
    gpu: &Gpu,
    x: &Tensor,
    w: &Weight,
    y: &Tensor,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    let (m, n_total, k) = check_linear("matmul", x, w, y)?;
    let (entry, kernel) = match w.format {
        WeightFormat::F16 => ("matmul_f16", "matmul_f16"),
        WeightFormat::F32 => ("matmul_f32", "matmul_f32"),
    };
    let w_stride = (w.row_stride * w.format.bytes_per_element() / 4) as u32;
    let mut flags = if accumulate { FLAG_ACCUMULATE } else { 0 };
    if w.bias.is_some() {
        flags |= FLAG_BIAS;
    }
    // Without a bias the bias slot is bound to X (read-only twice is allowed) and never read.
    let bias = w.bias.as_ref().map_or(&x.buffer, |b| &b.buffer);
    let m_tiles = m.div_ceil(TILE_M) as u32;
    w.chunks
        .iter()
        .map(|chunk| {
            let params = Params {
                m: m as u32,
                n: chunk.rows as u32,
                k: k as u32,
                w_stride,
                x_stride: k as u32,
                y_stride: n_total as u32,
                col_offset: chunk.first_row as u32,
                flags,
            };
            let n_tiles = chunk.rows.div_ceil(TILE_N) as u32;
            let flops = 2 * (m * chunk.rows * k) as u64;
            let bytes = (m * k * 4 + chunk.rows * k * w.format.bytes_per_element()) as u64
                + (m * chunk.rows * 4) as u64 * if accumulate { 2 } else { 1 };
            KernelCall::new(gpu, "matmul", entry)
                .params(&params)
                .read(&x.buffer)
                .read(&chunk.buffer)
                .read(bias)
                .read_write(&y.buffer)
                .build(
                    kernel,
                    format!("M={m} N={} K={k}", chunk.rows),
                    [n_tiles, m_tiles, 1],
                    flops,
                    bytes,
                )
        })
        .collect()
}

/// `Y = X·Wᵀ` choosing the kernel by shape: gemv for a single row, tiled matmul otherwise.
pub fn linear(
    gpu: &Gpu,
    x: &Tensor,
    w: &Weight,
    y: &Tensor,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    let (m, _, _) = check_linear("linear", x, w, y)?;
    if m == 1 {
        super::gemv::gemv(gpu, x, 0, w, y, 0, accumulate)
    } else {
        matmul(gpu, x, w, y, accumulate)
    }
}

/// CPU reference in f64: `y[m][n] = Σ_k x[m][k]·w[n][k] + bias[n] + y_in[m][n]`.
/// `w` must hold the values the GPU sees (round through f16 first for f16 weights).
pub fn reference(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    y_in: Option<&[f32]>,
) -> Vec<f64> {
    let mut y = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for t in 0..k {
                s += x[i * k + t] as f64 * w[j * k + t] as f64;
            }
            if let Some(b) = bias {
                s += b[j] as f64;
            }
            if let Some(y0) = y_in {
                s += y0[i * n + j] as f64;
            }
            y[i * n + j] = s;
        }
    }
    y
}

/// The values an f16 weight holds on the GPU.
pub fn round_to_f16(values: &[f32]) -> Vec<f32> {
    values
        .iter()
        .map(|&v| half::f16::from_f32(v).to_f32())
        .collect()
}
