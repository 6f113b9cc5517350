//! GGUF pairs made as llama.cpp's tools make them (scripts/gguf_fixtures.py: the text model as
//! convert_hf_to_gguf.py writes it, the mmproj as the legacy LLaVA converter writes it, Q4_K_M
//! by llama-quantize itself) answer with transformers' outputs: the projector output, the first
//! logits and 16 greedy tokens, with the prompt tokenized as llama.cpp tokenizes it. The
//! references are transformers fed the files' own tensors (dequantized for quantized files), so
//! F32 and F16 files must match to f32 precision and quantized ones to the kernels' rounding.
//!
//! The same references show that llama.cpp's LLaVA image path would fail these bounds: one
//! vision layer fewer (22 of 23 for LLaVA-1.5-7B) and the class token placed after the patches
//! are both recorded, and both are far outside them.

#[allow(dead_code)]
#[path = "reference/mod.rs"]
mod reference;
#[path = "session/mod.rs"]
mod session;

use std::path::PathBuf;

use llava_wgpu::gpu::DType;
use llava_wgpu::{Engine, EngineOptions, GenerateOutput, GenerateRequest};
use reference::{ids, rel_l2};
use serde_json::Value;

/// weights/<model>: its GGUF pairs are in gguf/<variant>/, their references in gguf/.
fn model_dir(model: &str) -> PathBuf {
    session::private_runtime_dir();
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("weights")
        .join(model)
}

fn cases(model: &str) -> Vec<Value> {
    let path = model_dir(model).join("gguf/cases.json");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json["cases"].as_array().unwrap().clone()
}

fn reference(model: &str, name: &str) -> Vec<f32> {
    let path = model_dir(model).join("gguf/reference.safetensors");
    reference::read_tensor(&path, name)
}

/// The pair `model`/gguf/`variant`, given as its directory, with an f32 KV cache.
fn engine(model: &str, variant: &str) -> Engine {
    let options = EngineOptions {
        kv: Some(DType::F32),
        ..EngineOptions::default()
    };
    Engine::load(&model_dir(model).join("gguf").join(variant), options).unwrap()
}

fn generate(engine: &Engine, model: &str, case: &Value, pad: Option<bool>) -> GenerateOutput {
    let image = model_dir(model).join(case["image"].as_str().unwrap());
    let mut request = GenerateRequest::new(image, case["prompt"].as_str().unwrap());
    request.template = engine.template;
    request.pad_to_square = pad;
    request.capture_outputs = true;
    request.max_new_tokens = 16;
    request.ignore_eos = true;
    engine.generate(&request, |_| {}).unwrap()
}

/// The prompt's ids, as the engine tokenizes the templated prompt with `image_tokens` rows.
fn prompt_ids(engine: &Engine, prompt: &str, image_tokens: usize) -> Vec<u32> {
    let text = engine
        .template
        .render(prompt, &engine.tokenizer.image_token);
    engine
        .tokenizer
        .encode_with_image(&text, image_tokens)
        .unwrap()
        .ids
}

/// Every case of `model`'s `variant` within `bound` (relative L2 of the projector output and
/// of the first logits), with llama.cpp's prompt ids and the reference's greedy tokens.
fn check_variant(model: &str, variant: &str, bound: f64) {
    let engine = engine(model, variant);
    for (i, case) in cases(model).iter().enumerate() {
        let out = generate(&engine, model, case, None);
        let key = format!("case{i}.{variant}");
        let features = rel_l2(
            &out.image_features,
            &reference(model, &format!("{key}.image_features")),
        );
        let logits = rel_l2(
            &out.first_logits,
            &reference(model, &format!("{key}.first_logits")),
        );
        eprintln!(
            "{model} {variant} case {i}: projector rel L2 {features:.2e}, logits {logits:.2e}"
        );
        assert!(
            features < bound,
            "{model} {variant} case {i}: projector rel L2 {features}"
        );
        assert!(
            logits < bound,
            "{model} {variant} case {i}: logits rel L2 {logits}"
        );
        let want_ids = ids(&case["input_ids"]);
        let image_tokens = case["image_tokens"].as_u64().unwrap() as usize;
        assert_eq!(
            prompt_ids(&engine, case["prompt"].as_str().unwrap(), image_tokens),
            want_ids,
            "{model} case {i}: prompt ids (llama-tokenize's)"
        );
        assert_eq!(out.prompt_tokens, want_ids.len());
        // The reference masks EOS at every step; the engine generates it and goes on, so the
        // tokens agree up to the engine's first EOS.
        let eos = &engine.config.text.eos_token_id;
        let until = out
            .generated_ids
            .iter()
            .position(|id| eos.contains(id))
            .unwrap_or(out.generated_ids.len());
        let want = ids(&case["variants"][variant]["greedy_ids"]);
        assert_eq!(
            out.generated_ids[..until],
            want[..until],
            "{model} {variant} case {i}: greedy tokens"
        );
    }
}

/// F32 and F16 files hold exactly the values transformers computes with: f32 precision.
/// Measured on lavapipe: rel L2 ≤ 5.9e-7 (F32) and ≤ 6.7e-7 (F16); the bound leaves ~7×.
#[test]
fn f32_and_f16_pairs_match_transformers_to_f32_precision() {
    for variant in ["f32", "f16"] {
        check_variant("tiny-random-llava", variant, 5e-6);
    }
}

/// Q8_0, and llama-quantize's Q4_K_M (at these widths: Q5_0, Q8_0 and F16 tensors): the
/// kernels compute with exactly what the blocks stand for, so f32 precision holds here too.
/// Measured: rel L2 ≤ 6.6e-7.
#[test]
fn quantized_pairs_match_transformers_fed_their_dequantized_weights() {
    for variant in ["q8_0", "q4_k_m"] {
        check_variant("tiny-random-llava", variant, 5e-6);
    }
}

/// The trained demo model as llama.cpp users run it: Q4_K_M text (Q4_K, Q6_K, Q5_0, Q8_0
/// tensors) and an F16 mmproj; and it still answers its questions. Measured: rel L2 ≤ 7.0e-7.
#[test]
fn demo_model_q4_k_m_matches_transformers_and_answers() {
    check_variant("tiny-llava-shapes", "q4_k_m", 5e-6);
    let engine = engine("tiny-llava-shapes", "q4_k_m");
    for case in cases("tiny-llava-shapes") {
        let out = generate(&engine, "tiny-llava-shapes", &case, None);
        let answer = case["answer"].as_str().unwrap();
        assert!(
            out.text.trim().starts_with(answer),
            "{} → {:?}, expected {answer}",
            case["prompt"],
            out.text
        );
    }
}

/// LLaVA-NeXT from a GGUF pair: grid pinpoints, spatial_unpad and image_newline from the
/// mmproj, the anyres code path of llava-hf checkpoints.
#[test]
fn next_pair_matches_transformers() {
    check_variant("tiny-random-llava-next", "f16", 5e-6);
}

/// GGUF LLaVA-1.5 pads to a square by default (as the original LLaVA and llama.cpp do);
/// `pad_to_square = Some(false)` (`--no-pad`) gives the llava-hf processor's centre crop.
#[test]
fn no_pad_gives_the_centre_crop() {
    let model = "tiny-random-llava";
    let engine = engine(model, "f32");
    assert!(engine.pads_by_default);
    let case = &cases(model)[2];
    let out = generate(&engine, model, case, Some(false));
    let want = reference(model, "case2.f32.first_logits_no_pad");
    let err = rel_l2(&out.first_logits, &want);
    assert!(err < 5e-6, "no-pad logits rel L2 {err}");
    let padded = reference(model, "case2.f32.first_logits");
    assert!(
        rel_l2(&out.first_logits, &padded) > 1e-3,
        "padding made no difference"
    );
}

/// What llama.cpp's LLaVA graph computes instead (recorded with transformers): features from
/// one stored layer fewer, and the class token after the patches (each patch with its
/// neighbour's position embedding). Each is at least 1000× the parity bound away from the
/// correct outputs, which the engine matches: a test of the bound, so that either behaviour
/// would fail parity.
#[test]
fn llama_cpps_vision_bugs_would_fail_parity() {
    let model = "tiny-random-llava";
    let engine = engine(model, "f32");
    for (i, case) in cases(model).iter().enumerate() {
        let out = generate(&engine, model, case, None);
        for bug in ["llamacpp_22_layers", "llamacpp_cls_last"] {
            let wrong = reference(model, &format!("case{i}.{bug}.first_logits"));
            let err = rel_l2(&out.first_logits, &wrong);
            assert!(err > 1000.0 * 5e-6, "case {i}: {bug} is only {err} away");
        }
    }
}
