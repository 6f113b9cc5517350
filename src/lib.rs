//! llava-wgpu: LLaVA vision-language inference in WGSL compute shaders through wgpu, with STAR
//! two-stage visual-token pruning. See `DESIGN.md` in the repository for the architecture.

pub mod error;
pub mod generate;
pub mod gpu;
pub mod harness;
pub mod model;
pub mod prune;
pub mod sample;
pub mod text;
pub mod vision;

pub use error::{Error, Result};
pub use generate::{GenerateOutput, GenerateRequest};
pub use model::llava::{Engine, EngineOptions};
