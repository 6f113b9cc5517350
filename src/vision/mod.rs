//! Image input: decoding and CLIP preprocessing.

pub mod overlay;
pub mod preprocess;
pub mod resample;

pub use preprocess::{load_image, ImageProcessorConfig};
