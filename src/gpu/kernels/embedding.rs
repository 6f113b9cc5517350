//! One embedding row gathered on the GPU by a token id the GPU holds: the launcher for
//! shaders/embedding.wgsl and its reference. The decode loop uses it so that the argmax's id
//! feeds the next step without a trip through the host.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::device::Gpu;
use crate::gpu::kernels::linear::{chunk_layout, format_constant, kernel_name};
use crate::gpu::kernels::{Dispatch, KernelCall, Shader, WorkgroupSize};
use crate::gpu::tensor::{DType, Tensor, Weight};

/// Threads per workgroup, one per unit of 32 values of the row.
pub const WORKGROUP: WorkgroupSize = WorkgroupSize(64);

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    rows: u32,
    k: u32,
    w_stride: u32,
    scales: u32,
    first_row: u32,
    id_index: u32,
    _pad: [u32; 2],
}

/// Write row `ids[id_index]` of the embedding `table [V, k]` into the first `k` values of the
/// f32 tensor `out`, dequantized. One dispatch per chunk of the table; an id outside `[0, V)`
/// writes nothing.
pub fn embed_row(
    gpu: &Gpu,
    table: &Weight,
    ids: &Tensor,
    id_index: usize,
    out: &Tensor,
) -> Result<Vec<Dispatch>> {
    let k = table.k;
    if ids.dtype != DType::U32 || id_index >= ids.numel() {
        return Err(Error::shape(
            "embed_row",
            format!(
                "ids[{id_index}] must be an element of a u32 tensor, got {:?} {:?}",
                ids.dtype, ids.shape
            ),
        ));
    }
    if out.dtype != DType::F32 || out.numel() < k {
        return Err(Error::shape(
            "embed_row",
            format!(
                "out must be an f32 tensor of at least {k} values for '{}', got {:?} {:?}",
                table.name, out.dtype, out.shape
            ),
        ));
    }
    let units = k.div_ceil(32);
    table
        .chunks
        .iter()
        .map(|chunk| {
            let (w_stride, scales) = chunk_layout(chunk, k);
            let params = Params {
                rows: chunk.rows as u32,
                k: k as u32,
                w_stride,
                scales,
                first_row: chunk.first_row as u32,
                id_index: id_index as u32,
                _pad: [0; 2],
            };
            KernelCall::new(gpu, Shader::Embedding, "embed_row")
                .constants(WORKGROUP.constants().with(format_constant(chunk.format)))
                .params(&params)
                .read(&ids.buffer)
                .read(&chunk.buffer)
                .read_write(&out.buffer)
                .build(
                    kernel_name("embed_row", chunk.format, ""),
                    format!("rows={} K={k}", chunk.rows),
                    WORKGROUP.groups_for(gpu, units),
                    0,
                    (chunk.format.row_bytes(k) + 4 * k) as u64,
                )
        })
        .collect()
}

/// CPU reference: row `id` of the table `values [V, k]` as the GPU sees it (round through f16
/// or dequantize first), or `None` for an id outside the table (the kernel writes nothing).
pub fn reference(values: &[f32], k: usize, id: u32) -> Option<Vec<f32>> {
    let start = (id as usize).checked_mul(k)?;
    values.get(start..start + k).map(<[f32]>::to_vec)
}
