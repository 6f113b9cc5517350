//! Access to the tiny random LLaVA-NeXT fixtures (weights/tiny-random-llava-next, LLaMA decoder;
//! weights/tiny-random-llava-next-mistral, Mistral decoder) and the references HF transformers
//! recorded for them (scripts/make_tiny_llava_next.py).
#![allow(dead_code)]

#[path = "../session/mod.rs"]
mod session;

use std::path::PathBuf;

use safetensors::SafeTensors;
use serde_json::Value;

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

/// One recorded image/prompt pair and its layout as transformers computed it.
pub struct Case {
    pub index: usize,
    pub image: PathBuf,
    pub prompt: String,
    pub input_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub json: Value,
}

impl Case {
    /// A list of integers from the case's JSON.
    pub fn ints(&self, key: &str) -> Vec<usize> {
        self.json[key]
            .as_array()
            .unwrap_or_else(|| panic!("cases.json: {key} is not a list"))
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect()
    }

    pub fn int(&self, key: &str) -> usize {
        self.json[key].as_u64().unwrap() as usize
    }
}

pub fn cases(variant: &str) -> Vec<Case> {
    let dir = model_dir(variant).join("reference");
    let text = std::fs::read_to_string(dir.join("cases.json")).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(index, c)| Case {
            index,
            image: dir.join(c["image"].as_str().unwrap()),
            prompt: c["prompt"].as_str().unwrap().to_string(),
            input_ids: ids(&c["input_ids"]),
            greedy_ids: ids(&c["greedy_ids"]),
            json: c.clone(),
        })
        .collect()
}

/// A float32 reference tensor, e.g. `case2.image_features`.
pub fn tensor(variant: &str, name: &str) -> Vec<f32> {
    let path = model_dir(variant).join("reference/reference.safetensors");
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("reference tensor {name} missing"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    bytemuck::pod_collect_to_vec(t.data())
}
