//! `quantize` writes a checkpoint that loads without requantizing and answers exactly as
//! quantizing at load does; its layout is ggml's blocks plus metadata; bad quantized files get
//! errors naming the tensor.

mod fixture;

use std::path::{Path, PathBuf};

use llava_wgpu::gpu::WeightFormat;
use llava_wgpu::model::quantize::write_checkpoint;
use llava_wgpu::model::weights::{FORMAT_KEY, QUANTIZED_KEY};
use llava_wgpu::{quant, Engine, EngineOptions, GenerateRequest};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("llava-wgpu-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load(dir: &Path, format: WeightFormat) -> llava_wgpu::Result<Engine> {
    let options = EngineOptions {
        weight_format: Some(format.into()),
        ..Default::default()
    };
    Engine::load(dir, options)
}

fn first_case(engine: &Engine) -> (Vec<f32>, Vec<u32>) {
    let case = &fixture::cases()[0];
    let mut request = GenerateRequest::new(&case.image, &case.prompt);
    request.capture_outputs = true;
    request.max_new_tokens = 6;
    request.ignore_eos = true;
    let out = engine.generate(&request, |_| {}).unwrap();
    (out.first_logits, out.generated_ids)
}

#[test]
fn quantized_checkpoint_loads_as_stored_and_matches_load_time_quantization() {
    let out = TempDir::new("quantize-q8");
    let report = write_checkpoint(&fixture::model_dir(), &out.0, WeightFormat::Q8_0).unwrap();
    // 4 layers × 6 projections with 64-wide rows + lm_head; down_proj rows (150) stay float.
    assert_eq!(report.quantized, 4 * 6 + 1, "{report}");
    assert_eq!(report.kept.len(), 4, "{report}");
    for file in ["config.json", "tokenizer.json", "preprocessor_config.json"] {
        assert!(out.0.join(file).is_file(), "{file} not copied");
    }

    // The file holds ggml blocks of the original values, and says so in its metadata.
    let written = std::fs::read(out.0.join("model.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&written).unwrap();
    let extra = meta.metadata().as_ref().unwrap();
    assert_eq!(extra[FORMAT_KEY], "q8_0");
    let shapes: serde_json::Value = serde_json::from_str(&extra[QUANTIZED_KEY]).unwrap();
    let name = "language_model.model.layers.1.self_attn.q_proj.weight";
    assert_eq!(shapes[name], serde_json::json!([64, 64]));
    let st = SafeTensors::deserialize(&written).unwrap();
    let stored = st.tensor(name).unwrap();
    assert_eq!(
        (stored.dtype(), stored.shape()),
        (Dtype::U8, &[64, 2 * 34][..])
    );
    let original = std::fs::read(fixture::model_dir().join("model.safetensors")).unwrap();
    let original = SafeTensors::deserialize(&original).unwrap();
    let values: Vec<f32> = bytemuck::pod_collect_to_vec(original.tensor(name).unwrap().data());
    assert_eq!(
        stored.data(),
        quant::quantize(WeightFormat::Q8_0, &values).unwrap()
    );

    // Loading the stored blocks computes exactly what quantizing at load computes.
    let at_load = first_case(&load(&fixture::model_dir(), WeightFormat::Q8_0).unwrap());
    let stored = first_case(&load(&out.0, WeightFormat::Q8_0).unwrap());
    assert_eq!(stored.1, at_load.1);
    assert_eq!(stored.0, at_load.0, "first logits differ bit for bit");

    // Asking for another format names the tensor and the format it needs.
    let err = load(&out.0, WeightFormat::F16).err().unwrap().to_string();
    assert!(err.contains("q_proj") && err.contains("q8_0"), "{err}");
    let err = load(&out.0, WeightFormat::Q4_0).err().unwrap().to_string();
    assert!(err.contains("q_proj") && err.contains("q8_0"), "{err}");
}

/// Rewrite a quantized checkpoint with one tensor's bytes cut short (its recorded shape kept).
fn truncate_tensor(dir: &Path, victim: &str, keep: usize) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let extra = meta.metadata().clone();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, TensorView)> = st.tensors();
    for (name, view) in tensors.iter_mut() {
        if name == victim {
            let data = &view.data()[..keep * view.shape()[1]];
            *view = TensorView::new(Dtype::U8, vec![keep, view.shape()[1]], data).unwrap();
        }
    }
    let out = safetensors::serialize(tensors, extra).unwrap();
    std::fs::write(&path, out).unwrap();
}

#[test]
fn a_block_count_that_does_not_match_the_shape_is_an_error_naming_the_tensor() {
    let out = TempDir::new("quantize-bad");
    write_checkpoint(&fixture::model_dir(), &out.0, WeightFormat::Q4_0).unwrap();
    let victim = "language_model.model.layers.2.mlp.up_proj.weight";
    truncate_tensor(&out.0, victim, 100);
    let err = load(&out.0, WeightFormat::Q4_0).err().unwrap().to_string();
    assert!(err.contains(victim) && err.contains("blocks"), "{err}");
}

#[test]
fn quantize_refuses_to_overwrite_a_checkpoint() {
    let err = write_checkpoint(
        &fixture::model_dir(),
        &fixture::model_dir(),
        WeightFormat::Q4_0,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("already holds a checkpoint"), "{err}");
}
