//! The streaming-copy microkernel (shaders/copy.wgsl): the bandwidth ceiling `bench` compares
//! kernels with. Not used by any model.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::device::Gpu;
use crate::gpu::kernels::{Dispatch, KernelCall, Shader, WorkgroupSize};
use crate::gpu::tensor::{DType, Tensor};

/// Threads per workgroup, one vec4 each (WG in the shader).
pub const WORKGROUP: WorkgroupSize = WorkgroupSize(256);

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    count: u32,
    _pad: [u32; 3],
}

/// `dst = src`, for two f32 tensors of the same size, a multiple of 4 elements.
pub fn copy(gpu: &Gpu, src: &Tensor, dst: &Tensor) -> Result<Dispatch> {
    let n = src.numel();
    let f32s = src.dtype == DType::F32 && dst.dtype == DType::F32;
    if !f32s || dst.numel() != n || !n.is_multiple_of(4) || n == 0 {
        return Err(Error::shape(
            "copy",
            format!(
                "src {:?} and dst {:?} must be f32 of one size, a non-zero multiple of 4",
                src.shape, dst.shape
            ),
        ));
    }
    let vec4s = n / 4;
    let params = Params {
        count: u32::try_from(vec4s).map_err(|_| Error::shape("copy", "more than 2^32 vec4s"))?,
        _pad: [0; 3],
    };
    KernelCall::new(gpu, Shader::Copy, "copy_vec4")
        .constants(WORKGROUP.constants())
        .params(&params)
        .read(&src.buffer)
        .read_write(&dst.buffer)
        .build(
            "copy",
            format!("{} MiB", (n * 4) >> 20),
            WORKGROUP.groups_for(gpu, vec4s),
            0,
            (2 * n * 4) as u64,
        )
}
