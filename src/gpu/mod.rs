//! The GPU runtime: device choice, tensors, the kernel set, recording and readback.
//!
//! Imports point one way, each module using only those listed before it:
//!
//! 1. `shaders`: the WGSL sources, their variants and the preprocessor (no device); `format`:
//!    the weight formats (float types and ggml's block types) and their layouts;
//! 2. `pipelines`: the module and pipeline cache (needs only a `wgpu::Device`); `disk_cache`: the
//!    driver's compiled pipelines persisted between runs;
//! 3. `memory`: the allocation tracker every buffer is created through (takes a `wgpu::Device`);
//! 4. `profiler`: timing records and reports (takes wgpu handles, not a `Gpu`);
//! 5. `device`: adapter choice and the `Gpu` context, which owns a pipeline cache and the
//!    active profiler;
//! 6. `tensor`, then `readback`: buffers with shapes, and reading them back;
//! 7. `kernels`: the launchers, which turn tensors into `Dispatch`es;
//! 8. `recorder`: records dispatches into passes and submits them (timing them if profiling).

pub mod device;
pub mod disk_cache;
pub mod format;
pub mod kernels;
pub mod memory;
pub mod pipelines;
pub mod profiler;
pub mod readback;
pub mod recorder;
pub mod shaders;
pub mod tensor;

pub use device::{BackendChoice, Capabilities, Gpu, GpuOptions};
pub use kernels::Dispatch;
pub use memory::{BytesByKind, GpuBuffer, MemoryKind, MemoryStats};
pub use recorder::Recorder;
pub use tensor::{DType, Tensor, Weight, WeightFormat};
