//! Rotary position embedding (HF rotate-half convention): the launcher for shaders/rope.wgsl,
//! the cos/sin table it reads, and a CPU reference.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::device::Gpu;
use crate::gpu::kernels::{Dispatch, KernelCall, Shader, WorkgroupSize};
use crate::gpu::memory::MemoryKind;
use crate::gpu::tensor::{DType, Tensor};

/// Threads per workgroup, one per rotated pair (WG in the shader).
pub const WORKGROUP: WorkgroupSize = WorkgroupSize(256);

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    rows: u32,
    heads: u32,
    head_dim: u32,
    table_rows: u32,
}

/// The angles transformers uses: `inv_freq[i] = 1 / theta^(2i/D)` in f32, angle = f32(pos) ·
/// inv_freq[i] rounded to f32 (as torch's f32 matmul does).
pub fn angle(theta: f64, head_dim: usize, position: usize, i: usize) -> f32 {
    let exponent = (2 * i) as f32 / head_dim as f32;
    let inv_freq = 1.0f32 / (theta.powf(exponent as f64) as f32);
    position as f32 * inv_freq
}

/// cos/sin for every (position, i < D/2), on the GPU.
pub struct RopeTable {
    pub table: Tensor,
    pub positions: usize,
    pub head_dim: usize,
    pub theta: f64,
}

impl RopeTable {
    pub fn new(gpu: &Gpu, theta: f64, head_dim: usize, positions: usize) -> Result<Self> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) || positions == 0 {
            return Err(Error::argument(
                "rope",
                format!(
                    "head_dim {head_dim} must be even and positive, positions {positions} positive"
                ),
            ));
        }
        let half = head_dim / 2;
        let mut data = Vec::with_capacity(positions * head_dim);
        for pos in 0..positions {
            for i in 0..half {
                let a = angle(theta, head_dim, pos, i) as f64;
                data.push(a.cos() as f32);
                data.push(a.sin() as f32);
            }
        }
        let table = Tensor::from_f32_as(
            gpu,
            &[positions, half, 2],
            &data,
            "rope_table",
            MemoryKind::Weights,
        )?;
        Ok(Self {
            table,
            positions,
            head_dim,
            theta,
        })
    }
}

/// Rotate `x [T, heads·D]` in place; `positions [T]` (u32) gives each row's position. The ids are
/// not checked here (they are on the GPU): callers keep them below `table.positions`
/// (generate/prepare.rs caps prompt + new tokens at the context); the shader clamps larger ones.
pub fn rope(
    gpu: &Gpu,
    x: &Tensor,
    heads: usize,
    positions: &Tensor,
    table: &RopeTable,
) -> Result<Dispatch> {
    let (rows, cols) = x.rows_cols();
    let d = table.head_dim;
    let dtypes = x.dtype == DType::F32 && positions.dtype == DType::U32;
    if cols != heads * d || positions.numel() < rows || !dtypes {
        return Err(Error::shape(
            "rope",
            format!(
                "x {:?} is not f32 [T, {heads}·{d}] or positions {:?} is not u32 with T rows or more",
                x.shape, positions.shape
            ),
        ));
    }
    let params = Params {
        rows: rows as u32,
        heads: heads as u32,
        head_dim: d as u32,
        table_rows: table.positions as u32,
    };
    let threads = rows * heads * d / 2;
    KernelCall::new(gpu, Shader::Rope, "rope")
        .constants(WORKGROUP.constants())
        .params(&params)
        .read(&positions.buffer)
        .read(&table.table.buffer)
        .read_write(&x.buffer)
        .build(
            "rope",
            format!("T={rows} H={heads} D={d}"),
            WORKGROUP.groups_for(gpu, threads),
            (threads * 6) as u64,
            (rows * cols * 8 + threads * 8 + rows * 4) as u64,
        )
}

/// CPU reference: rotate-half RoPE in f64 from the formula, angle = pos / theta^(2i/D), sharing
/// nothing with the table. It differs from the engine (and transformers), which round the
/// angle's factors to f32; [`reference_bound`] bounds the difference.
pub fn reference(
    x: &[f32],
    heads: usize,
    head_dim: usize,
    positions: &[u32],
    theta: f64,
) -> Vec<f64> {
    let half = head_dim / 2;
    let mut out: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for (row, &pos) in positions.iter().enumerate() {
        for h in 0..heads {
            let base = (row * heads + h) * head_dim;
            for i in 0..half {
                let a = pos as f64 * theta.powf(-((2 * i) as f64) / head_dim as f64);
                let (x1, x2) = (x[base + i] as f64, x[base + i + half] as f64);
                out[base + i] = x1 * a.cos() - x2 * a.sin();
                out[base + i + half] = x2 * a.cos() + x1 * a.sin();
            }
        }
    }
    out
}

/// Per element, how far the engine's rotation may be from [`reference`]. The f32 angle has
/// relative error ≤ (ln(theta)·e + 4)·u (u = 2^-24): the f32 exponent e = 2i/D is off by
/// ≤ u·e, which scales theta^e by ≤ ln(theta)·e·u, plus the power, reciprocal, position and
/// product roundings. A rotation by an angle off by δ moves (x1, x2) by ≤ (|x1| + |x2|)·δ; the
/// f32 cos/sin and the shader's two products and sum add ≤ 4u·(|x1| + |x2|).
pub fn reference_bound(
    x: &[f32],
    heads: usize,
    head_dim: usize,
    positions: &[u32],
    theta: f64,
) -> Vec<f64> {
    let u = 2f64.powi(-24);
    let half = head_dim / 2;
    let mut out = vec![0.0; x.len()];
    for (row, &pos) in positions.iter().enumerate() {
        for h in 0..heads {
            let base = (row * heads + h) * head_dim;
            for i in 0..half {
                let e = (2 * i) as f64 / head_dim as f64;
                let a = pos as f64 * theta.powf(-e);
                let delta = a * (theta.ln() * e + 4.0) * u;
                let size = (x[base + i] as f64).abs() + (x[base + i + half] as f64).abs();
                let bound = size * (delta + 4.0 * u);
                out[base + i] = bound;
                out[base + i + half] = bound;
            }
        }
    }
    out
}
