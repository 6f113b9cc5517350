//! DART and DivPrune (docs/pruning.md, "DART and DivPrune") against the PyTorch reference of
//! `scripts/dart_divprune_reference.py` (`weights/tiny-random-llava/reference/dart_divprune.json`):
//! transformers' decoder layers on the tiny fixture with the rows dropped before layer K (DART)
//! or before layer 0 (DivPrune), the selections computed in NumPy (f64). The engine runs with
//! f32 weights and KV cache, so kept sets and greedy tokens must match exactly and the first
//! logits to f32 precision. The reference chose its budget (N2 = 8, K = 2) so that no greedy
//! decision of either selection is closer than 5e-4 (relative), far above f32 rounding.

mod fixture;

use serde_json::Value;

use llava_wgpu::prune::{divprune, Method, PruneOptions};
use llava_wgpu::{Engine, GenerateOutput};

use fixture::usizes;

fn reference() -> Value {
    fixture::reference_json("dart_divprune.json")
}

fn recorded_tensor(name: &str) -> Vec<f32> {
    fixture::tensor_in("dart_divprune_logits.safetensors", name)
}

fn run(engine: &Engine, case: &fixture::Case, prune: PruneOptions) -> GenerateOutput {
    fixture::run_pruned(engine, case, prune, 8)
}

/// Kept patches, greedy ids (up to the engine's first EOS: the reference masks EOS) and first
/// logits of one method on one case.
fn check(engine: &Engine, out: &GenerateOutput, recorded: &Value, what: &str) {
    let kept = out.kept_visual_indices.as_ref().unwrap();
    assert_eq!(
        kept.stage1, None,
        "{what}: no selection before the projector"
    );
    assert_eq!(
        kept.stage2.clone().unwrap(),
        usizes(&recorded["kept"]),
        "{what}"
    );
    let ids = fixture::token_ids(&recorded["generated_ids"]);
    fixture::assert_ids_until_eos(engine, &out.generated_ids, &ids, what);
    let (case, method) = what.split_once(' ').unwrap();
    let reference = recorded_tensor(&format!("{case}.{method}.first_logits"));
    let err = fixture::rel_l2(&out.first_logits, &reference);
    eprintln!("{what}: first logits rel. L2 {err:.2e}");
    assert!(err < 1e-4, "{what}: first logits rel. L2 {err}");
}

#[test]
fn dart_and_divprune_match_the_pytorch_reference() {
    let reference = reference();
    let keep = reference["budgets"]["keep"].as_u64().map(|k| k as usize);
    let layer = reference["budgets"]["dart_layer"]
        .as_u64()
        .map(|k| k as usize);
    let engine = fixture::engine_f32();
    let cases = fixture::cases();
    for recorded in reference["cases"].as_array().unwrap() {
        let i = recorded["index"].as_u64().unwrap() as usize;
        let methods = &recorded["methods"];
        let dart = PruneOptions {
            method: Method::Dart,
            keep,
            stage2_layer: layer,
            ..PruneOptions::default()
        };
        let out = run(&engine, &cases[i], dart);
        check(&engine, &out, &methods["dart"], &format!("case{i} dart"));
        let divprune = PruneOptions {
            method: Method::Divprune,
            keep,
            ..PruneOptions::default()
        };
        let out = run(&engine, &cases[i], divprune);
        check(
            &engine,
            &out,
            &methods["divprune"],
            &format!("case{i} divprune"),
        );
    }
}

/// The host half of DivPrune alone, on the reference's own features with an f64 Gram matrix:
/// a mismatch here points at the greedy rule rather than at the GPU's Gram matrix.
#[test]
fn divprune_greedy_rule_matches_numpy_on_the_recorded_features() {
    let reference = reference();
    let keep = reference["budgets"]["keep"].as_u64().unwrap() as usize;
    for recorded in reference["cases"].as_array().unwrap() {
        let i = recorded["index"].as_u64().unwrap() as usize;
        let features = recorded_tensor(&format!("case{i}.divprune.features"));
        let n = recorded["n0"].as_u64().unwrap() as usize;
        let gram = llava_wgpu::prune::gram_of(&features, features.len() / n);
        let all: Vec<usize> = (0..n).collect();
        let kept = divprune::select(&gram, n, &all, keep);
        assert_eq!(
            kept,
            usizes(&recorded["methods"]["divprune"]["kept"]),
            "case {i}"
        );
    }
}
