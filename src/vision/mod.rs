//! Image input: decoding, CLIP preprocessing and LLaVA-NeXT's anyres tiling.

pub mod anyres;
pub mod overlay;
pub mod preprocess;
pub mod resample;

pub use preprocess::{
    decode_image, load_image, probe_image, read_image_file, ImageProcessorConfig,
};
