//! LayerNorm and RMSNorm over rows: the launchers for shaders/norm.wgsl and CPU references.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::device::Gpu;
use crate::gpu::kernels::{
    check_lanes, grid, Dispatch, KernelCall, Shader, WorkgroupSize, LANE_WIDTH,
};
use crate::gpu::tensor::{DType, Tensor};

/// Threads per row (one workgroup per row; WG in the shader).
pub const WORKGROUP: WorkgroupSize = WorkgroupSize(256);

/// Rows per workgroup of the lanes entry points (LANE_ROWS in the shader).
pub const LANE_ROWS: usize = 8;

/// Which entry points of norm.wgsl run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormLayout {
    /// `layer_norm` / `rms_norm`: 256 threads per row, a tree reduction in workgroup memory.
    Workgroup,
    /// `layer_norm_lanes` / `rms_norm_lanes`: one 8-lane subgroup per row reducing with
    /// subgroupAdd, no barrier. For drivers that run shaders on CPU SIMD lanes.
    Lanes,
}

impl NormLayout {
    /// `Lanes` on a CPU adapter whose subgroups hold the 8 lanes, `Workgroup` anywhere else
    /// (the rule of `MatmulLayout::for_device`).
    pub fn for_device(gpu: &Gpu) -> Self {
        if gpu.caps.prefers_lanes(LANE_WIDTH) {
            NormLayout::Lanes
        } else {
            NormLayout::Workgroup
        }
    }

    /// Workgroups for `rows` rows: one per row, or one per [`LANE_ROWS`] rows.
    fn workgroups(self, rows: usize) -> usize {
        match self {
            NormLayout::Workgroup => rows,
            NormLayout::Lanes => rows.div_ceil(LANE_ROWS),
        }
    }

    fn entry(self, op: Norm) -> &'static str {
        match (self, op) {
            (NormLayout::Workgroup, Norm::Layer) => "layer_norm",
            (NormLayout::Workgroup, Norm::Rms) => "rms_norm",
            (NormLayout::Lanes, Norm::Layer) => "layer_norm_lanes",
            (NormLayout::Lanes, Norm::Rms) => "rms_norm_lanes",
        }
    }
}

/// The two normalisations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Norm {
    Layer,
    Rms,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    eps: f32,
    _pad: u32,
}

fn check(
    op: &str,
    x: &Tensor,
    gamma: &Tensor,
    beta: Option<&Tensor>,
    y: &Tensor,
) -> Result<(usize, usize)> {
    let (rows, cols) = x.rows_cols();
    let beta_ok = beta.is_none_or(|b| b.numel() == cols && b.dtype == DType::F32);
    // All f32: a u32 tensor would be read as float bits (found by tests/fuzz launchers).
    let f32s = [x, gamma, y].iter().all(|t| t.dtype == DType::F32);
    if y.shape != x.shape || gamma.numel() != cols || !beta_ok || !f32s {
        return Err(Error::shape(
            op,
            format!(
                "x {:?}, weight {:?}, bias {:?}, y {:?} must be f32 of matching widths",
                x.shape,
                gamma.shape,
                beta.map(|b| b.shape.clone()),
                y.shape
            ),
        ));
    }
    Ok((rows, cols))
}

/// Tensors in binding order: x, gamma, beta, y.
fn launch(
    gpu: &Gpu,
    (layout, op): (NormLayout, Norm),
    [x, gamma, beta, y]: [&Tensor; 4],
    eps: f32,
    (rows, cols): (usize, usize),
) -> Result<Dispatch> {
    let params = Params {
        rows: rows as u32,
        cols: cols as u32,
        eps,
        _pad: 0,
    };
    if layout == NormLayout::Lanes {
        check_lanes(gpu, "norm")?;
    }
    let entry = layout.entry(op);
    KernelCall::new(gpu, Shader::Norm, entry)
        .constants(WORKGROUP.constants())
        .params(&params)
        .read(&x.buffer)
        .read(&gamma.buffer)
        .read(&beta.buffer)
        .read_write(&y.buffer)
        .build(
            entry,
            format!("rows={rows} cols={cols}"),
            grid(
                layout.workgroups(rows) as u32,
                gpu.limits.max_compute_workgroups_per_dimension,
            ),
            (rows * cols * 8) as u64,
            (rows * cols * 8 + cols * 8) as u64,
        )
}

/// `y = (x − mean) / sqrt(var + eps) · gamma + beta` per row (`y` must not alias `x`).
pub fn layer_norm(
    gpu: &Gpu,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    y: &Tensor,
    eps: f32,
) -> Result<Dispatch> {
    layer_norm_in(gpu, NormLayout::for_device(gpu), x, gamma, beta, y, eps)
}

/// [`layer_norm`] with the layout the caller chooses (tests and `bench kernels` run both).
pub fn layer_norm_in(
    gpu: &Gpu,
    layout: NormLayout,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    y: &Tensor,
    eps: f32,
) -> Result<Dispatch> {
    let dims = check("layer_norm", x, gamma, Some(beta), y)?;
    launch(gpu, (layout, Norm::Layer), [x, gamma, beta, y], eps, dims)
}

/// `y = x / sqrt(mean(x²) + eps) · gamma` per row (`y` must not alias `x`).
pub fn rms_norm(gpu: &Gpu, x: &Tensor, gamma: &Tensor, y: &Tensor, eps: f32) -> Result<Dispatch> {
    rms_norm_in(gpu, NormLayout::for_device(gpu), x, gamma, y, eps)
}

/// [`rms_norm`] with the layout the caller chooses.
pub fn rms_norm_in(
    gpu: &Gpu,
    layout: NormLayout,
    x: &Tensor,
    gamma: &Tensor,
    y: &Tensor,
    eps: f32,
) -> Result<Dispatch> {
    let dims = check("rms_norm", x, gamma, None, y)?;
    // The shader's unused beta slot is bound to gamma.
    launch(gpu, (layout, Norm::Rms), [x, gamma, gamma, y], eps, dims)
}

/// CPU reference for LayerNorm in f64.
pub fn layer_norm_reference(
    x: &[f32],
    cols: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
) -> Vec<f64> {
    x.chunks(cols)
        .flat_map(|row| {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
            let inv = 1.0 / (var + eps).sqrt();
            row.iter()
                .enumerate()
                .map(move |(c, &v)| (v as f64 - mean) * inv * gamma[c] as f64 + beta[c] as f64)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// CPU reference for RMSNorm in f64.
pub fn rms_norm_reference(x: &[f32], cols: usize, gamma: &[f32], eps: f64) -> Vec<f64> {
    x.chunks(cols)
        .flat_map(|row| {
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cols as f64;
            let inv = 1.0 / (ms + eps).sqrt();
            row.iter()
                .enumerate()
                .map(move |(c, &v)| v as f64 * inv * gamma[c] as f64)
                .collect::<Vec<_>>()
        })
        .collect()
}
