//! Residual add: the launcher for shaders/elementwise.wgsl (the reference is plain `+`).

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::device::Gpu;
use crate::gpu::kernels::{Dispatch, KernelCall, Shader, WorkgroupSize};
use crate::gpu::tensor::Tensor;

/// Threads per workgroup, one per element (WG in the shader).
pub const WORKGROUP: WorkgroupSize = WorkgroupSize(256);

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    count: u32,
    _pad: [u32; 3],
}

/// `a += b` element-wise (same shape).
pub fn add_in_place(gpu: &Gpu, a: &Tensor, b: &Tensor) -> Result<Dispatch> {
    if a.shape != b.shape {
        return Err(Error::shape(
            "add",
            format!("{:?} + {:?}", a.shape, b.shape),
        ));
    }
    let n = a.numel();
    KernelCall::new(gpu, Shader::Elementwise, "add_in_place")
        .constants(WORKGROUP.constants())
        .params(&Params {
            count: n as u32,
            _pad: [0; 3],
        })
        .read_write(&a.buffer)
        .read(&b.buffer)
        .build(
            "add",
            format!("n={n}"),
            WORKGROUP.groups_for(gpu, n),
            n as u64,
            (n * 12) as u64,
        )
}
