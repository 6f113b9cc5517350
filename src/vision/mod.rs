//! Image input: decoding and CLIP preprocessing.

pub mod overlay;
pub mod preprocess;
pub mod resample;

pub use preprocess::{decode_image, load_image, read_image_file, ImageProcessorConfig};
