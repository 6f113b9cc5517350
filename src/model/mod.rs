//! The model: configuration, checkpoint tensors, and one module per Hugging Face module.

pub mod config;
pub mod weights;

pub use config::LlavaConfig;
pub use weights::Checkpoint;
