//! llava-wgpu: LLaVA vision-language inference in WGSL compute shaders through wgpu, with STAR
//! two-stage visual-token pruning.
//!
//! `ARCHITECTURE.md` in the repository maps the data flow from image to text (a file per step),
//! where pruning touches the forward pass, the order the modules import in, and how a kernel is
//! added. `docs/pruning.md` is the pruning contract the code implements.

pub mod error;
pub mod generate;
pub mod gpu;
pub mod harness;
pub mod model;
pub mod prune;
pub mod quant;
pub mod sample;
pub mod serve;
pub mod text;
pub mod vision;

pub use error::{Error, Result};
pub use generate::{GenerateOutput, GenerateRequest};
pub use model::llava::{Engine, EngineOptions};
