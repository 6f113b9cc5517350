//! Fused attention (being written on the `attention` branch; this stub keeps the API compiling).

use crate::error::{Error, Result};
use crate::gpu::device::Gpu;
use crate::gpu::kernels::Dispatch;
use crate::gpu::tensor::Tensor;

pub struct AttentionShape {
    pub q_rows: usize,
    pub kv_rows: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub causal: bool,
}

pub struct ScoreOutput<'a> {
    pub q_start: usize,
    pub q_end: usize,
    pub partials: &'a Tensor,
    pub scores: &'a Tensor,
}

pub fn score_partials_len(shape: &AttentionShape) -> usize {
    shape.kv_rows
}

#[allow(clippy::too_many_arguments)]
pub fn attention(
    _gpu: &Gpu,
    _shape: &AttentionShape,
    _scale: f32,
    _q: &Tensor,
    _k: &Tensor,
    _v: &Tensor,
    _out: &Tensor,
    _scores: Option<ScoreOutput>,
) -> Result<Vec<Dispatch>> {
    Err(Error::argument("attention", "not implemented yet"))
}
