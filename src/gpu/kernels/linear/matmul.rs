//! `Y = X·Wᵀ (+ bias) (+ Y)`: the launcher for shaders/matmul.wgsl. The CPU reference is
//! `linear::reference`.

use bytemuck::{Pod, Zeroable};

use super::{check_linear, chunk_layout, flag_constants, flags_for};
use crate::error::Result;
use crate::gpu::device::Gpu;
use crate::gpu::kernels::{Constants, Dispatch, KernelCall, Shader};
use crate::gpu::tensor::{Tensor, Weight, WeightFormat};

/// How matmul.wgsl tiles the output (its TILE_M, TILE_N, TILE_K and THREADS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulTiling {
    /// Output rows per workgroup.
    pub tile_m: u32,
    /// Output columns per workgroup.
    pub tile_n: u32,
    /// Reduction steps staged through workgroup memory at a time.
    pub tile_k: u32,
    /// Threads per workgroup.
    pub threads: u32,
}

/// The tiling every matmul uses. The shader's per-thread work is unrolled for it: an 8×8 grid
/// of threads, each owning 8×8 outputs, and tile loads sized for 64 threads (see
/// `shader_structure_matches_the_tiling`).
pub const TILING: MatmulTiling = MatmulTiling {
    tile_m: 64,
    tile_n: 64,
    tile_k: 32,
    threads: 64,
};

impl MatmulTiling {
    pub fn constants(&self) -> Constants {
        Constants::new(&[
            ("TILE_M", self.tile_m),
            ("TILE_N", self.tile_n),
            ("TILE_K", self.tile_k),
            ("THREADS", self.threads),
        ])
        .with(flag_constants())
    }
}

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
    scales: u32,
    _pad: [u32; 3],
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
    let entry = match w.format {
        WeightFormat::F16 => "matmul_f16",
        WeightFormat::F32 => "matmul_f32",
        WeightFormat::Q8_0 => "matmul_q8_0",
        WeightFormat::Q4_0 => "matmul_q4_0",
    };
    let flags = flags_for(w, accumulate);
    // Without a bias the bias slot is bound to X (read-only twice is allowed) and never read.
    let bias = w.bias.as_ref().map_or(&x.buffer, |b| &b.buffer);
    let m_tiles = m.div_ceil(TILING.tile_m as usize) as u32;
    w.chunks
        .iter()
        .map(|chunk| {
            let (w_stride, scales) = chunk_layout(w, chunk.rows);
            let params = Params {
                m: m as u32,
                n: chunk.rows as u32,
                k: k as u32,
                w_stride,
                x_stride: k as u32,
                y_stride: n_total as u32,
                col_offset: chunk.first_row as u32,
                flags,
                scales,
                _pad: [0; 3],
            };
            let n_tiles = chunk.rows.div_ceil(TILING.tile_n as usize) as u32;
            let flops = 2 * (m * chunk.rows * k) as u64;
            let bytes = (m * k * 4 + chunk.rows * w.format.row_bytes(k)) as u64
                + (m * chunk.rows * 4) as u64 * if accumulate { 2 } else { 1 };
            KernelCall::new(gpu, Shader::Matmul, entry)
                .constants(TILING.constants())
                .params(&params)
                .read(&x.buffer)
                .read(&chunk.buffer)
                .read(bias)
                .read_write(&y.buffer)
                .build(
                    entry,
                    format!("M={m} N={} K={k}", chunk.rows),
                    [n_tiles, m_tiles, 1],
                    flops,
                    bytes,
                )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// matmul.wgsl hard-codes how the tiling splits over threads; these are its assumptions.
    #[test]
    fn shader_structure_matches_the_tiling() {
        let MatmulTiling {
            tile_m,
            tile_n,
            tile_k,
            threads,
        } = TILING;
        // An 8×8 grid of threads (tx = tid % 8, ty = tid / 8), each owning 8 rows × 8 columns.
        assert_eq!(threads, 8 * 8);
        assert_eq!((tile_m, tile_n), (8 * 8, 8 * 8));
        // load_x_tile: TILE_K × TILE_M/4 vec4, 8 per thread.
        assert_eq!(tile_k * tile_m / 4, 8 * threads);
        // load_w_tile_f16: one (row quad, 8-half group) unit per thread.
        assert_eq!((tile_n / 4) * (tile_k / 8), threads);
        // load_w_tile_q8_0 / q4_0: one block per K step, one (row quad, quarter) unit per thread.
        assert_eq!(tile_k, 32);
        assert_eq!((tile_n / 4) * 4, threads);
        // load_w_tile_f32: (row quad, 4-float group) units, two per thread.
        assert_eq!((tile_n / 4) * (tile_k / 4), 2 * threads);
    }
}
