//! Group means of rows (shaders/merge_rows.wgsl): what a selection before the projector runs
//! when it merges the patches it drops into the ones it keeps (docs/pruning.md, "Merging the
//! dropped patches"), and its f64 reference.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::device::Gpu;
use crate::gpu::kernels::{grid, Dispatch, KernelCall, Shader, WorkgroupSize};
use crate::gpu::tensor::{DType, Tensor};

/// Threads per workgroup (WG in the shader): one group row per workgroup, a vec4 per thread.
pub const WORKGROUP: WorkgroupSize = WorkgroupSize(64);

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    groups: u32,
    width4: u32,
    src_rows: u32,
    _pad: u32,
}

/// The u32 list `merge_rows` reads for `groups` (each a list of source rows): the `groups + 1`
/// offsets, then every group's members in order.
pub fn group_list(groups: &[Vec<usize>]) -> Result<Vec<u32>> {
    let word = |what: &str, v: usize| {
        u32::try_from(v).map_err(|_| Error::shape("merge_rows", format!("{what} {v} > 2^32")))
    };
    let mut list =
        Vec::with_capacity(groups.len() + 1 + groups.iter().map(Vec::len).sum::<usize>());
    let mut offset = 0;
    list.push(0);
    for members in groups {
        offset += members.len();
        list.push(word("member offset", offset)?);
    }
    for &row in groups.iter().flatten() {
        list.push(word("row", row)?);
    }
    Ok(list)
}

/// `dst[g, :] = mean(src[m, :] for m in group g)` for the `groups` groups `list` describes (see
/// [`group_list`]): f32 rows of a width that is a multiple of 4.
pub fn merge_rows(
    gpu: &Gpu,
    src: &Tensor,
    list: &Tensor,
    groups: usize,
    dst: &Tensor,
) -> Result<Dispatch> {
    let width = *src.shape.last().unwrap_or(&0);
    let src_rows = src.numel() / width.max(1);
    let fits = src.dtype == DType::F32
        && dst.dtype == DType::F32
        && list.dtype == DType::U32
        && width > 0
        && width.is_multiple_of(4)
        && dst.shape.last() == Some(&width)
        && dst.numel() >= groups * width
        && list.numel() > groups;
    if !fits {
        return Err(Error::shape(
            "merge_rows",
            format!(
                "src {:?} {:?} and dst {:?} {:?} must be f32 rows of one width (a multiple of 4) \
                 with room for {groups} groups; the list ({} words, u32) holds {groups} + 1 offsets",
                src.shape,
                src.dtype,
                dst.shape,
                dst.dtype,
                list.numel()
            ),
        ));
    }
    let to_u32 = |v: usize| u32::try_from(v).map_err(|_| Error::shape("merge_rows", "> 2^32"));
    let params = Params {
        groups: to_u32(groups)?,
        width4: to_u32(width / 4)?,
        src_rows: to_u32(src_rows)?,
        _pad: 0,
    };
    let rows_read = list.numel().saturating_sub(groups + 1);
    KernelCall::new(gpu, Shader::Merge, "merge_rows")
        .constants(WORKGROUP.constants())
        .params(&params)
        .read(&list.buffer)
        .read(&src.buffer)
        .read_write(&dst.buffer)
        .build(
            "merge_rows",
            format!("groups={groups} rows={rows_read} width={width}"),
            grid(
                to_u32(groups.max(1))?,
                gpu.limits.max_compute_workgroups_per_dimension,
            ),
            (rows_read * width) as u64,
            4 * ((rows_read + groups) * width) as u64,
        )
}

/// f64 reference: the mean of each group's rows of `src` (rows of `width`), as f32; a row past
/// `src` counts as zeros and an empty group gives zeros, as in the shader.
pub fn merge_reference(src: &[f32], width: usize, groups: &[Vec<usize>]) -> Vec<f32> {
    let rows = src.len() / width;
    let mut out = Vec::with_capacity(groups.len() * width);
    for members in groups {
        for c in 0..width {
            let sum: f64 = members
                .iter()
                .filter(|&&m| m < rows)
                .map(|&m| f64::from(src[m * width + c]))
                .sum();
            out.push((sum / members.len().max(1) as f64) as f32);
        }
    }
    out
}
