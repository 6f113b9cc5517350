//! Harnesses around the engine, behind `llava-wgpu bench`, `eval` and `memory`: they drive it
//! the way any library user does, and nothing else in the crate depends on them.

pub mod bench;
pub mod eval;
pub mod memory;
pub mod plot;
pub mod roofline;
pub mod stats;
