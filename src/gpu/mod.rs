//! The GPU runtime: device choice, tensors, the kernel set, recording and readback.
//!
//! Imports point one way, each module using only those listed before it:
//!
//! 1. `shaders`: the WGSL sources, their variants and the preprocessor (no device);
//! 2. `pipelines`: the module and pipeline cache (needs only a `wgpu::Device`);
//! 3. `profiler`: timing records and reports (takes wgpu handles, not a `Gpu`);
//! 4. `device`: adapter choice and the `Gpu` context, which owns a pipeline cache and the
//!    active profiler;
//! 5. `tensor`, then `readback`: buffers with shapes, and reading them back;
//! 6. `kernels`: the launchers, which turn tensors into `Dispatch`es;
//! 7. `recorder`: records dispatches into passes and submits them (timing them if profiling).

pub mod device;
pub mod kernels;
pub mod pipelines;
pub mod profiler;
pub mod readback;
pub mod recorder;
pub mod shaders;
pub mod tensor;

pub use device::{BackendChoice, Capabilities, Gpu, GpuOptions};
pub use kernels::Dispatch;
pub use recorder::Recorder;
pub use tensor::{DType, Tensor, Weight, WeightFormat};
