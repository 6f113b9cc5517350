//! Real llava-hf directories come in several shapes: one file or an index with shards, the
//! hub key layout or transformers 5's `model.*` layout, f32, f16 or bf16 tensors. Each variant of
//! the fixture must load and give the same answer.

mod fixture;

use std::collections::BTreeMap;
use std::path::PathBuf;

use half::{bf16, f16};
use llava_wgpu::gpu::WeightFormat;
use llava_wgpu::{Engine, EngineOptions, GenerateRequest};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

struct Variant {
    dir: PathBuf,
}

impl Drop for Variant {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Copy the fixture's non-weight files and write its tensors renamed by `rename`, converted
/// to `dtype`, split into `shards` files (an index when more than one).
fn variant(name: &str, rename: impl Fn(&str) -> String, dtype: Dtype, shards: usize) -> Variant {
    let dir = std::env::temp_dir().join(format!("llava-wgpu-layout-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture::model_dir()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() && entry.file_name() != "model.safetensors" {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    let bytes = std::fs::read(fixture::model_dir().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let values: Vec<f32> = bytemuck::pod_collect_to_vec(v.data());
            let data = match dtype {
                Dtype::F32 => bytemuck::cast_slice(&values).to_vec(),
                Dtype::F16 => values
                    .iter()
                    .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                    .collect(),
                Dtype::BF16 => values
                    .iter()
                    .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                    .collect(),
                other => panic!("{other:?}"),
            };
            (rename(&n), v.shape().to_vec(), data)
        })
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let per_shard = tensors.len().div_ceil(shards);
    let mut weight_map = BTreeMap::new();
    for (s, chunk) in tensors.chunks(per_shard).enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", s + 1, shards)
        };
        let views: Vec<(String, TensorView)> = chunk
            .iter()
            .map(|(n, shape, data)| {
                (
                    n.clone(),
                    TensorView::new(dtype, shape.clone(), data).unwrap(),
                )
            })
            .collect();
        for (n, _) in &views {
            weight_map.insert(n.clone(), file.clone());
        }
        std::fs::write(
            dir.join(&file),
            safetensors::serialize(views, None).unwrap(),
        )
        .unwrap();
    }
    if shards > 1 {
        let index =
            serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": weight_map });
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
    Variant { dir }
}

/// transformers 5's names: `model.language_model.*`, `model.vision_tower.*`,
/// `model.multi_modal_projector.*`, `lm_head.weight`; and the hub's `vision_model.` infix.
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

fn hub_layout(name: &str) -> String {
    match name.strip_prefix("vision_tower.") {
        Some(rest) => format!("vision_tower.vision_model.{rest}"),
        None => name.to_string(),
    }
}

fn answer(dir: &std::path::Path) -> (Vec<f32>, Vec<u32>) {
    let options = EngineOptions {
        weight_format: Some(WeightFormat::F16.into()),
        ..Default::default()
    };
    let engine = Engine::load(dir, options).unwrap();
    let case = &fixture::cases()[2];
    let mut request = GenerateRequest::new(&case.image, &case.prompt);
    request.capture_outputs = true;
    request.max_new_tokens = 8;
    let out = engine.generate(&request, |_| {}).unwrap();
    (out.first_logits, out.generated_ids)
}

#[test]
fn shards_and_key_layouts_load_to_the_same_model() {
    let reference = answer(&fixture::model_dir());
    for (name, v) in [
        ("hub-3-shards", variant("hub", hub_layout, Dtype::F32, 3)),
        (
            "newer-2-shards",
            variant("newer", newer_layout, Dtype::F32, 2),
        ),
        (
            "newer-single",
            variant("newer1", newer_layout, Dtype::F32, 1),
        ),
    ] {
        // Same f16 weights on the GPU, same kernels: bit-identical.
        let (logits, ids) = answer(&v.dir);
        assert!(
            logits == reference.0,
            "{name}: logits differ (rel L2 {})",
            fixture::rel_l2(&logits, &reference.0)
        );
        assert_eq!(ids, reference.1, "{name}");
    }
}

#[test]
fn f16_and_bf16_checkpoints_load() {
    let reference = answer(&fixture::model_dir());
    // Matrix weights are f16 on the GPU either way; an f16 file also rounds the norm weights,
    // biases and embeddings (kept f32 from an f32 file), which moves logits by ~1e-4.
    let v = variant("f16", hub_layout, Dtype::F16, 2);
    let (logits, ids) = answer(&v.dir);
    let e = fixture::rel_l2(&logits, &reference.0);
    assert!(e < 2e-3, "f16 checkpoint: rel L2 {e}");
    assert_eq!(ids, reference.1);
    // bf16 keeps 8 bits of mantissa: logits stay within the f16 parity bound.
    let v = variant("bf16", newer_layout, Dtype::BF16, 1);
    let (logits, ids) = answer(&v.dir);
    let e = fixture::rel_l2(&logits, &reference.0);
    assert!(e < 2e-2, "bf16 checkpoint: rel L2 {e}");
    assert_eq!(ids[..4], reference.1[..4]);
}
