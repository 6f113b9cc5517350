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

    // The checkpoint says what it holds: it loads without a weight format, as stored.
    let described = first_case(&Engine::load(&out.0, EngineOptions::default()).unwrap());
    assert_eq!(described.0, at_load.0);
    // Asking for another format is refused before anything loads, saying what the file holds.
    for other in [WeightFormat::F16, WeightFormat::Q4_0] {
        let err = load(&out.0, other).err().unwrap().to_string();
        assert!(
            err.starts_with("invalid argument weight_format")
                && err.contains(&format!("{} was asked for", other.name()))
                && err.contains("as q8_0 blocks"),
            "{err}"
        );
    }
}

/// `llava-wgpu memory` on every checkpoint `quantize` writes (safetensors q8_0 / q4_0, GGUF
/// f16 / q8_0 / q4_0 / q4_k_m): it measures without `--weights` and with the stored format, and
/// refuses another format naming what the file holds. Quantized weights take fewer bytes than
/// the f16 checkpoint's.
#[test]
fn memory_measures_every_format_quantize_writes() {
    let binary = env!("CARGO_BIN_EXE_llava-wgpu");
    let weights_bytes = |args: &[&str]| -> u64 {
        let out = std::process::Command::new(binary)
            .arg("memory")
            .args(args)
            .arg("--json")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "memory {args:?}: {stderr}");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json["rows"][0]["stats"]["live"]["weights"]
            .as_u64()
            .unwrap()
    };
    let model = fixture::model_dir();
    let f16 = weights_bytes(&["--model", model.to_str().unwrap()]);
    let cases = [
        ("safetensors", "q8_0"),
        ("safetensors", "q4_0"),
        ("gguf", "f16"),
        ("gguf", "q8_0"),
        ("gguf", "q4_0"),
        ("gguf", "q4_k_m"),
    ];
    for (file_format, weights) in cases {
        let out = TempDir::new(&format!("memory-{file_format}-{weights}"));
        let status = std::process::Command::new(binary)
            .args(["quantize", "--model", model.to_str().unwrap(), "--out"])
            .arg(&out.0)
            .args(["--format", file_format, "--weights", weights])
            .output()
            .unwrap();
        assert!(status.status.success(), "{status:?}");
        let dir = out.0.to_str().unwrap();
        let bytes = weights_bytes(&["--model", dir]);
        if weights != "f16" {
            assert!(bytes < f16, "{file_format} {weights}: {bytes} >= {f16}");
        }
        if file_format == "safetensors" {
            assert_eq!(
                weights_bytes(&["--model", dir, "--weights", weights]),
                bytes
            );
            let refused = std::process::Command::new(binary)
                .args(["memory", "--model", dir, "--weights", "f16"])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&refused.stderr);
            assert!(!refused.status.success());
            assert!(
                stderr.contains("invalid argument --weights")
                    && stderr.contains(&format!("as {weights} blocks")),
                "{stderr}"
            );
        }
    }
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
