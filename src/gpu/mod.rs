//! The GPU runtime: device choice, tensors, the kernel set, recording and readback.

pub mod device;
pub mod kernels;
pub mod profiler;
pub mod readback;
pub mod recorder;
pub mod tensor;

pub use device::{BackendChoice, Capabilities, Gpu, GpuOptions};
pub use kernels::Dispatch;
pub use recorder::Recorder;
pub use tensor::{DType, Tensor, Weight, WeightFormat};
