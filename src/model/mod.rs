//! The model: configuration, checkpoint tensors, and one module per Hugging Face module.

pub mod clip;
pub mod config;
pub mod gguf;
pub mod image_cache;
pub mod llama;
pub mod llava;
pub mod loader;
pub mod norm;
pub mod presets;
pub mod projector;
pub mod quantize;
pub mod stored;
pub mod weights;

pub use config::LlavaConfig;
pub use weights::Checkpoint;
