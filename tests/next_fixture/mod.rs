//! Access to the tiny random LLaVA-NeXT fixtures (weights/tiny-random-llava-next, LLaMA decoder;
//! weights/tiny-random-llava-next-mistral, Mistral decoder) and the references HF transformers
//! recorded for them (scripts/make_tiny_llava_next.py).
#![allow(dead_code)]

#[path = "../reference/mod.rs"]
mod reference;
#[path = "../session/mod.rs"]
mod session;
#[allow(unused_imports)]
pub use reference::{read_tensor, rel_l2, Case};

use std::path::PathBuf;

/// The decoder variants the fixture script builds.
pub const VICUNA: &str = "tiny-random-llava-next";
pub const MISTRAL: &str = "tiny-random-llava-next-mistral";

/// A fixture's model directory (and the Mesa runtime directory, as tests/fixture does).
pub fn model_dir(variant: &str) -> PathBuf {
    session::private_runtime_dir();
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("weights")
        .join(variant)
}

pub fn cases(variant: &str) -> Vec<Case> {
    reference::read_cases(&model_dir(variant).join("reference"))
}

/// A float32 reference tensor, e.g. `case2.image_features`.
pub fn tensor(variant: &str, name: &str) -> Vec<f32> {
    let path = model_dir(variant).join("reference/reference.safetensors");
    reference::read_tensor(&path, name)
}
