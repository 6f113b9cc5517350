//! Attention for one replayed decode step: the launcher for shaders/attention_decode.wgsl. The
//! query is one row per head and the cache length is read on the GPU from the decode loop's
//! step counter, so one recorded dispatch serves every token. Its reference is attention.rs's
//! [`reference`](super::attention::reference) with one causal query row (the last position sees
//! every key).

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::device::Gpu;
use crate::gpu::kernels::{Constants, Dispatch, KernelCall, Shader};
use crate::gpu::tensor::{DType, Tensor};

/// Threads per workgroup (one workgroup per query head; one key per thread per tile).
pub const WORKGROUP: u32 = 64;

/// The constants for heads of `head_dim` values and K/V of element type `kv`.
pub fn constants(head_dim: usize, kv: DType) -> Constants {
    Constants::new(&[
        ("WG", WORKGROUP),
        ("HEAD_DIM", head_dim as u32),
        ("KV_F16", u32::from(kv == DType::F16)),
    ])
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    kv_base: u32,
    heads: u32,
    kv_heads: u32,
    group: u32,
    scale_log2: f32,
    _pad: [u32; 3],
}

/// The heads of one decode step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeHeads {
    pub heads: usize,
    pub kv_heads: usize,
    /// A multiple of 4.
    pub head_dim: usize,
}

/// `o [1, H·D] = attention(q [1, H·D])` over the first `kv_base + step[0] + 1` rows of the
/// cache `k`, `v [C, Hkv·D]`: the step's own key is the last of them. The caller keeps that
/// count within the cache's capacity.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode(
    gpu: &Gpu,
    heads: DecodeHeads,
    scale: f32,
    kv_base: usize,
    step: &Tensor,
    [q, k, v, o]: [&Tensor; 4],
) -> Result<Dispatch> {
    let DecodeHeads {
        heads: h,
        kv_heads,
        head_dim: d,
    } = heads;
    let valid = kv_heads > 0
        && h % kv_heads == 0
        && d % 4 == 0
        && q.dtype == DType::F32
        && o.dtype == DType::F32
        && q.numel() >= h * d
        && o.numel() >= h * d
        && k.dtype == v.dtype
        && matches!(k.dtype, DType::F32 | DType::F16)
        && k.rows_cols().1 == kv_heads * d
        && v.shape == k.shape
        && kv_base < k.rows_cols().0
        && step.dtype == DType::U32;
    if !valid {
        return Err(Error::shape(
            "attention_decode",
            format!(
                "{heads:?} with q {:?}, k {:?} {:?}, v {:?}, o {:?}, {kv_base} cached rows and \
                 a {:?} step counter",
                q.shape, k.dtype, k.shape, v.shape, o.shape, step.dtype
            ),
        ));
    }
    let params = Params {
        kv_base: kv_base as u32,
        heads: h as u32,
        kv_heads: kv_heads as u32,
        group: (h / kv_heads) as u32,
        scale_log2: scale * std::f32::consts::LOG2_E,
        _pad: [0; 3],
    };
    // Per step: the whole cache of the group's heads is read for each query head (from cache
    // after the first), which the analytic bytes count once.
    let capacity = k.rows_cols().0;
    KernelCall::new(gpu, Shader::AttentionDecode, "attention_decode")
        .constants(constants(d, k.dtype))
        .params(&params)
        .read(&step.buffer)
        .read(&q.buffer)
        .read(&k.buffer)
        .read(&v.buffer)
        .read_write(&o.buffer)
        .build(
            "attention_decode",
            format!("H={h} Hkv={kv_heads} D={d} C={capacity}"),
            [h as u32, 1, 1],
            0,
            (8 * h * d) as u64,
        )
}
