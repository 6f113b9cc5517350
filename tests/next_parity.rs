//! End-to-end parity of LLaVA-NeXT (anyres) with HF transformers on the tiny random fixtures:
//! for every recorded image (square, wide, tall, tiny, RGBA: four pinpoints) the packed image
//! features (projector output with base view, unpadded grid and image_newline rows in
//! transformers' order), the prompt length, the first logits and 16 greedy tokens, with the
//! LLaMA decoder (vicuna prompt) and the Mistral decoder ([INST] prompt).

mod next_fixture;

use llava_wgpu::gpu::{DType, WeightFormat};
use llava_wgpu::text::Template;
use llava_wgpu::{Engine, EngineOptions, GenerateRequest};

fn engine(variant: &str, format: WeightFormat) -> Engine {
    // f32 weights compare with an f32 KV cache (an f16 one rounds every key and value).
    let kv = match format {
        WeightFormat::F32 => DType::F32,
        _ => DType::F16,
    };
    let options = EngineOptions {
        weight_format: Some(format.into()),
        kv: Some(kv),
        ..EngineOptions::default()
    };
    Engine::load(&next_fixture::model_dir(variant), options).unwrap()
}

fn check(variant: &str, template: Template, format: WeightFormat, tolerance: f64) {
    let engine = engine(variant, format);
    for case in next_fixture::cases(variant) {
        let mut request = GenerateRequest::new(&case.image, &case.prompt);
        request.template = template;
        request.capture_outputs = true;
        request.max_new_tokens = case.greedy_ids.len();
        request.ignore_eos = true; // the references mask EOS (it never wins, see cases.json)
        let out = engine.generate(&request, |_| {}).unwrap();
        let label = format!("{variant} {format:?} case {}", case.index);
        let want_features =
            next_fixture::tensor(variant, &format!("case{}.image_features", case.index));
        let want_logits =
            next_fixture::tensor(variant, &format!("case{}.first_logits", case.index));
        let e_features = next_fixture::rel_l2(&out.image_features, &want_features);
        let e_logits = next_fixture::rel_l2(&out.first_logits, &want_logits);
        eprintln!(
            "{label}: image features rel L2 {e_features:.2e}, first logits rel L2 {e_logits:.2e}"
        );
        assert_eq!(
            out.prompt_tokens,
            case.input_ids.len(),
            "{label}: prompt tokens"
        );
        // Patch tokens after unpadding; the image_newline rows are not visual tokens.
        assert_eq!(
            out.visual_tokens.encoder,
            case.int("visual_tokens"),
            "{label}"
        );
        assert!(
            e_features <= tolerance,
            "{label}: image features rel L2 {e_features}"
        );
        assert!(
            e_logits <= tolerance,
            "{label}: first logits rel L2 {e_logits}"
        );
        assert_eq!(out.generated_ids, case.greedy_ids, "{label}: greedy tokens");
    }
}

#[test]
fn llama_next_f32_matches_transformers_within_5e_6() {
    check(
        next_fixture::VICUNA,
        Template::VicunaV1,
        WeightFormat::F32,
        5e-6, // measured: at most 7.3e-7
    );
}

#[test]
fn llama_next_f16_matches_transformers_within_3e_3() {
    check(
        next_fixture::VICUNA,
        Template::VicunaV1,
        WeightFormat::F16,
        3e-3, // measured: at most 6.3e-4
    );
}

#[test]
fn mistral_next_f32_matches_transformers_within_5e_6() {
    check(
        next_fixture::MISTRAL,
        Template::MistralInst,
        WeightFormat::F32,
        5e-6, // measured: at most 7.3e-7
    );
}

#[test]
fn a_next_request_compiles_no_pipeline_after_load() {
    let engine = engine(next_fixture::VICUNA, WeightFormat::F16);
    let at_load = engine.gpu.pipelines_compiled();
    for case in next_fixture::cases(next_fixture::VICUNA).iter().take(2) {
        let mut request = GenerateRequest::new(&case.image, &case.prompt);
        request.template = Template::VicunaV1;
        request.max_new_tokens = 3;
        engine.generate(&request, |_| {}).unwrap();
    }
    let compiled = engine.gpu.pipelines_compiled() - at_load;
    assert_eq!(
        compiled, 0,
        "an anyres request compiled {compiled} pipelines"
    );
}

#[test]
fn square_padding_is_refused_on_next_with_the_field_named() {
    let engine = engine(next_fixture::VICUNA, WeightFormat::F16);
    let case = &next_fixture::cases(next_fixture::VICUNA)[0];
    let mut request = GenerateRequest::new(&case.image, &case.prompt);
    request.pad_to_square = Some(true);
    let e = engine.generate(&request, |_| {}).unwrap_err().to_string();
    assert!(e.contains("pad_to_square"), "{e}");
}
