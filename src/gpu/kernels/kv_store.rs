//! Appending rows to an f16 KV cache: the launcher for shaders/kv_store.wgsl and its reference.
//! (An f32 cache is appended with a plain buffer copy.)

use bytemuck::{Pod, Zeroable};
use half::f16;

use crate::error::{Error, Result};
use crate::gpu::device::Gpu;
use crate::gpu::kernels::{Dispatch, KernelCall, Shader, WorkgroupSize};
use crate::gpu::tensor::{DType, Tensor};

/// One thread per packed word.
pub const WORKGROUP: WorkgroupSize = WorkgroupSize(256);

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    words: u32,
    first_word: u32,
    _pad: [u32; 2],
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
        words: words as u32,
        first_word: (first_row * width / 2) as u32,
        _pad: [0; 2],
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
