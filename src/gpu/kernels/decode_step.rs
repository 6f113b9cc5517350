//! The decode loop's step counter on the GPU: the launcher for shaders/decode_step.wgsl.
//! Every replayed step ends with [`advance`], so the next step's kernels (the KV append, the
//! decode attention, RoPE through the position id) find their row without the host.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::device::Gpu;
use crate::gpu::kernels::{Dispatch, KernelCall, Shader};
use crate::gpu::tensor::{DType, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    first_position: u32,
    _pad: [u32; 3],
}

/// `step[0] += 1; positions[0] = first_position + step[0]`.
pub fn advance(
    gpu: &Gpu,
    step: &Tensor,
    positions: &Tensor,
    first_position: usize,
) -> Result<Dispatch> {
    if step.dtype != DType::U32
        || positions.dtype != DType::U32
        || first_position > u32::MAX as usize
    {
        return Err(Error::shape(
            "decode_advance",
            format!(
                "the step counter ({:?}) and positions ({:?}) must be u32, the first position \
                 ({first_position}) 32-bit",
                step.dtype, positions.dtype
            ),
        ));
    }
    let params = Params {
        first_position: first_position as u32,
        _pad: [0; 3],
    };
    KernelCall::new(gpu, Shader::DecodeStep, "advance")
        .params(&params)
        .read_write(&step.buffer)
        .read_write(&positions.buffer)
        .build("decode_advance", String::new(), [1, 1, 1], 0, 12)
}
