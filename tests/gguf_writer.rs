//! `llava-wgpu quantize --format gguf` writes what llama.cpp's tools write: compared with the
//! fixture pairs made by convert_hf_to_gguf.py, the legacy mmproj converter and llama-quantize
//! itself (scripts/gguf_fixtures.py), every tensor has the same name, type, dimensions and
//! bytes (Q4_K_M's Q4_K, Q6_K, Q5_0 and Q8_0 blocks included), and every metadata key the same
//! type and value, but `general.name` (the converter title-cases the directory name) and
//! `general.size_label`. The engine loads a written pair back to the fixture's answers.

#[path = "session/mod.rs"]
mod session;

use std::path::{Path, PathBuf};

use llava_wgpu::gpu::WeightFormat;
use llava_wgpu::model::gguf::file::GgufFile;
use llava_wgpu::model::gguf::writer::{write_pair, TextTypes};
use llava_wgpu::{Engine, EngineOptions, GenerateRequest};

fn weights(model: &str) -> PathBuf {
    session::private_runtime_dir();
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("weights")
        .join(model)
}

/// A scratch directory under the target directory, emptied first.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Keys whose values are cosmetic: how gguf-py names and sizes the model.
const COSMETIC: [&str; 2] = ["general.name", "general.size_label"];

fn assert_same_file(ours: &Path, theirs: &Path) {
    let (a, b) = (
        GgufFile::open(ours).unwrap(),
        GgufFile::open(theirs).unwrap(),
    );
    let what = theirs.display();
    for key in &b.keys {
        if COSMETIC.contains(&key.as_str()) {
            continue;
        }
        assert_eq!(a.get(key), b.get(key), "{what}: metadata '{key}'");
    }
    for key in &a.keys {
        assert!(
            COSMETIC.contains(&key.as_str()) || b.get(key).is_some(),
            "{what}: extra key '{key}'"
        );
    }
    assert_eq!(a.tensors.len(), b.tensors.len(), "{what}: tensor count");
    for t in &b.tensors {
        let ours = a
            .tensor(&t.name)
            .unwrap_or_else(|| panic!("{what}: no tensor '{}'", t.name));
        assert_eq!(
            (ours.format, &ours.dims),
            (t.format, &t.dims),
            "{what}: '{}'",
            t.name
        );
        assert!(
            a.bytes(ours) == b.bytes(t),
            "{what}: '{}' bytes differ",
            t.name
        );
    }
}

#[test]
fn written_pairs_equal_llama_cpps_files() {
    let cases = [
        ("tiny-random-llava", TextTypes::F16, "f16"),
        ("tiny-random-llava", TextTypes::Q8_0, "q8_0"),
        ("tiny-random-llava", TextTypes::Q4KM, "q4_k_m"),
        ("tiny-llava-shapes", TextTypes::Q4KM, "q4_k_m"),
    ];
    for (model, types, variant) in cases {
        let out = scratch(&format!("gguf-writer-{model}-{variant}"));
        let report = write_pair(&weights(model), &out, types, WeightFormat::F16).unwrap();
        let fixture = weights(model).join("gguf").join(variant);
        assert_same_file(
            &report.text,
            &fixture.join(format!("ggml-model-{variant}.gguf")),
        );
        assert_same_file(&report.mmproj, &fixture.join("mmproj-model-f16.gguf"));
    }
}

/// A written Q4_K_M pair with a Q8_0 mmproj loads and answers the demo's question.
#[test]
fn written_pair_loads_back_and_answers() {
    let out = scratch("gguf-writer-answers");
    write_pair(
        &weights("tiny-llava-shapes"),
        &out,
        TextTypes::Q4KM,
        WeightFormat::Q8_0,
    )
    .unwrap();
    let mmproj = GgufFile::open(&out.join("mmproj-model-q8_0.gguf")).unwrap();
    assert!(mmproj
        .tensors
        .iter()
        .any(|t| t.format == WeightFormat::Q8_0));
    let engine = Engine::load(&out, EngineOptions::default()).unwrap();
    assert_eq!(engine.weight_labels[0], "gguf q4_k+q5_0+q6_k+q8_0");
    let image = weights("tiny-llava-shapes").join("example1.png");
    let request = GenerateRequest::new(image, "Which color does the cross have?");
    let out = engine.generate(&request, |_| {}).unwrap();
    assert_eq!(out.text.trim(), "white");
}
