//! Appending rows to the KV cache: the launchers for shaders/kv_store.wgsl and its reference.
//! Prefill appends to an f16 cache with [`store_f16`] (an f32 cache with a plain buffer copy);
//! the replayed decode step appends at the row its step counter names with [`store_at_step`].

use bytemuck::{Pod, Zeroable};
use half::f16;

use crate::error::{Error, Result};
use crate::gpu::device::Gpu;
use crate::gpu::kernels::{Dispatch, KernelCall, Shader, WorkgroupSize};
use crate::gpu::tensor::{DType, Tensor};

/// One thread per pair of values.
pub const WORKGROUP: WorkgroupSize = WorkgroupSize(256);

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    pairs: u32,
    first_word: u32,
    row_words: u32,
    _pad: u32,
}

/// Write the f32 rows of `src [rows, width]` as halves into rows `first_row..` of the f16
/// `cache [capacity, width]` (width even: two halves per word).
pub fn store_f16(gpu: &Gpu, src: &Tensor, cache: &Tensor, first_row: usize) -> Result<Dispatch> {
    let (rows, width) = src.rows_cols();
    let (capacity, cache_width) = cache.rows_cols();
    if src.dtype != DType::F32
        || cache.dtype != DType::F16
        || width != cache_width
        || width % 2 != 0
        || first_row + rows > capacity
    {
        return Err(Error::shape(
            "kv_store_f16",
            format!(
                "f32 rows {:?} must have the even width of the f16 cache {:?} and fit it from row {first_row}",
                src.shape, cache.shape
            ),
        ));
    }
    let words = rows * width / 2;
    let params = Params {
        pairs: words as u32,
        first_word: (first_row * width / 2) as u32,
        row_words: (width / 2) as u32,
        _pad: 0,
    };
    KernelCall::new(gpu, Shader::KvStore, "store_f16")
        .constants(WORKGROUP.constants())
        .params(&params)
        .read(&src.buffer)
        .read_write(&cache.buffer)
        .build(
            "kv_store_f16",
            format!("rows={rows} width={width}"),
            WORKGROUP.groups_for(gpu, words),
            0,
            (words * 12) as u64,
        )
}

/// Write the one f32 row `src [1, width]` into row `first_row + step[0]` of `cache` (f32, or
/// f16 halves packed two per word), where `step` is the decode loop's counter on the GPU. The
/// caller keeps that row inside the cache's capacity (the kernel does not know the step).
pub fn store_at_step(
    gpu: &Gpu,
    src: &Tensor,
    cache: &Tensor,
    first_row: usize,
    step: &Tensor,
) -> Result<Dispatch> {
    let (rows, width) = src.rows_cols();
    let (capacity, cache_width) = cache.rows_cols();
    if src.dtype != DType::F32
        || !matches!(cache.dtype, DType::F16 | DType::F32)
        || rows != 1
        || width != cache_width
        || width % 2 != 0
        || first_row >= capacity
        || step.dtype != DType::U32
    {
        return Err(Error::shape(
            "kv_store_step",
            format!(
                "one f32 row {:?} must have the even width of the cache {:?} {:?}, start inside \
                 it (row {first_row}), and a u32 step counter ({:?})",
                src.shape, cache.dtype, cache.shape, step.dtype
            ),
        ));
    }
    let row_words = width * cache.dtype.bytes() / 4;
    let params = Params {
        pairs: (width / 2) as u32,
        first_word: (first_row * row_words) as u32,
        row_words: row_words as u32,
        _pad: 0,
    };
    let (entry, kernel) = match cache.dtype {
        DType::F16 => ("store_f16_step", "kv_store_f16_step"),
        _ => ("store_f32_step", "kv_store_f32_step"),
    };
    KernelCall::new(gpu, Shader::KvStore, entry)
        .constants(WORKGROUP.constants())
        .params(&params)
        .read(&src.buffer)
        .read_write(&cache.buffer)
        .read(&step.buffer)
        .build(
            kernel,
            format!("width={width}"),
            WORKGROUP.groups_for(gpu, width / 2),
            0,
            (width * (4 + cache.dtype.bytes()) + 4) as u64,
        )
}

/// The words the kernel writes for `values`: each pair rounded to halves (nearest even), the
/// even element in the low 16 bits.
pub fn reference(values: &[f32]) -> Vec<u32> {
    values
        .chunks(2)
        .map(|pair| {
            let lo = f16::from_f32(pair[0]).to_bits() as u32;
            let hi = f16::from_f32(pair[1]).to_bits() as u32;
            lo | (hi << 16)
        })
        .collect()
}
