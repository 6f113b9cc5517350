//! LLaVA-NeXT checkpoints in both key layouts: the hub's (`image_newline`,
//! `language_model.model.*`, `vision_tower.vision_model.*`, ...; what the fixture has) and
//! transformers 5's `model.*` one (`model.image_newline`, `model.language_model.*`, `lm_head.*`).
//! Both must give bit-identical logits; a checkpoint without `image_newline` is a named error.

mod next_fixture;

use std::path::PathBuf;

use llava_wgpu::gpu::WeightFormat;
use llava_wgpu::text::Template;
use llava_wgpu::{Engine, EngineOptions, GenerateRequest};
use safetensors::tensor::TensorView;

struct TempModel(PathBuf);

impl Drop for TempModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The vicuna fixture with its tensors renamed by `rename` (None drops the tensor).
fn renamed(label: &str, rename: impl Fn(&str) -> Option<String>) -> TempModel {
    let src = next_fixture::model_dir(next_fixture::VICUNA);
    let dir = std::env::temp_dir().join(format!("llava-wgpu-next-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() && entry.file_name() != "model.safetensors" {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, TensorView)> = st
        .tensors()
        .into_iter()
        .filter_map(|(name, view)| rename(&name).map(|n| (n, view)))
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    TempModel(dir)
}

/// transformers 5's names.
fn newer_layout(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("language_model.model.") {
        format!("model.language_model.{rest}")
    } else if name == "language_model.lm_head.weight" {
        "lm_head.weight".into()
    } else if let Some(rest) = name.strip_prefix("vision_tower.") {
        format!("model.vision_tower.vision_model.{rest}")
    } else {
        format!("model.{name}")
    }
}

fn first_logits(dir: &std::path::Path) -> Vec<f32> {
    let options = EngineOptions {
        weight_format: Some(WeightFormat::F32.into()),
        ..Default::default()
    };
    let engine = Engine::load(dir, options).unwrap();
    let case = &next_fixture::cases(next_fixture::VICUNA)[1];
    let mut request = GenerateRequest::new(&case.image, &case.prompt);
    request.template = Template::VicunaV1;
    request.max_new_tokens = 1;
    request.capture_outputs = true;
    engine.generate(&request, |_| {}).unwrap().first_logits
}

#[test]
fn both_key_layouts_give_identical_logits() {
    let newer = renamed("newer", |n| Some(newer_layout(n)));
    let keys = std::fs::read(newer.0.join("model.safetensors")).unwrap();
    let header = String::from_utf8_lossy(&keys[..4096.min(keys.len())]).to_string();
    assert!(
        header.contains("model.image_newline"),
        "the variant renames image_newline"
    );
    let original = first_logits(&next_fixture::model_dir(next_fixture::VICUNA));
    assert_eq!(first_logits(&newer.0), original);
}

#[test]
fn a_missing_image_newline_is_a_named_error() {
    let without = renamed("no-newline", |n| {
        (n != "image_newline").then(|| n.to_string())
    });
    let e = Engine::load(&without.0, EngineOptions::default())
        .err()
        .expect("loading without image_newline must fail")
        .to_string();
    assert!(e.contains("image_newline"), "{e}");
}
