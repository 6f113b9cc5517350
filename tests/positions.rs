//! Selections before the projector with the kept image tokens at their patches' own RoPE
//! positions (`Positions::Original`), against a PyTorch reference with explicit position ids
//! (`scripts/positions_reference.py`, `weights/tiny-random-llava/reference/positions.json`):
//! FasterVLM keeping 10 of 36 patches both ways (the two differ), and STAR with original
//! positions, whose stage 2 then scores differently. f32 weights and KV cache, so every greedy
//! token must match and the first logits to f32 precision.

mod fixture;

use serde_json::Value;

use llava_wgpu::prune::{Method, Positions, PruneOptions};
use llava_wgpu::{Engine, GenerateOutput};

use fixture::usizes;

fn reference() -> Value {
    fixture::reference_json("positions.json")
}

fn logits(case: usize, method: &str) -> Vec<f32> {
    let name = format!("case{case}.{method}.first_logits");
    fixture::tensor_in("positions_logits.safetensors", &name)
}

fn run(engine: &Engine, case: &fixture::Case, prune: PruneOptions) -> GenerateOutput {
    fixture::run_pruned(engine, case, prune, 8)
}

/// The engine's answer against one recorded method: generated ids, first logits. The reference
/// masks EOS, so the ids are compared up to the engine's first EOS (it keeps going past it).
fn check(engine: &Engine, out: &GenerateOutput, recorded: &Value, case: usize, method: &str) {
    let ids = fixture::token_ids(&recorded["generated_ids"]);
    let what = format!("case {case} {method}");
    fixture::assert_ids_until_eos(engine, &out.generated_ids, &ids, &what);
    let err = fixture::rel_l2(&out.first_logits, &logits(case, method));
    eprintln!("case {case} {method}: first logits rel. L2 {err:.2e}");
    assert!(
        err < 1e-4,
        "case {case} {method}: first logits rel. L2 {err}"
    );
}

#[test]
fn kept_tokens_at_their_original_positions_match_the_pytorch_reference() {
    let reference = reference();
    let budgets = &reference["budgets"];
    let budget = |name: &str| Some(budgets[name].as_u64().unwrap() as usize);
    let engine = fixture::engine_f32();
    let cases = fixture::cases();
    let mut differ = 0usize;
    for recorded in reference["cases"].as_array().unwrap() {
        let i = recorded["index"].as_u64().unwrap() as usize;
        let case = &cases[i];
        let methods = &recorded["methods"];
        for (method, positions) in [
            ("fastervlm_original", Positions::Original),
            ("fastervlm_contiguous", Positions::Contiguous),
        ] {
            let prune = PruneOptions {
                method: Method::Fastervlm,
                keep: budget("fastervlm_keep"),
                positions,
                ..PruneOptions::default()
            };
            let out = run(&engine, case, prune);
            let kept = out.kept_visual_indices.as_ref().unwrap().stage1.clone();
            assert_eq!(kept.unwrap(), usizes(&methods[method]["kept"]), "case {i}");
            check(&engine, &out, &methods[method], i, method);
        }
        let star = PruneOptions {
            method: Method::Star,
            stage1_keep: budget("N1"),
            keep: budget("N2"),
            stage2_layer: budget("K"),
            positions: Positions::Original,
            ..PruneOptions::default()
        };
        let out = run(&engine, case, star);
        let kept = out.kept_visual_indices.as_ref().unwrap();
        let recorded_star = &methods["star_original"];
        assert_eq!(
            kept.stage1.clone().unwrap(),
            usizes(&recorded_star["stage1_kept"])
        );
        assert_eq!(
            kept.stage2.clone().unwrap(),
            usizes(&recorded_star["stage2_kept"])
        );
        check(&engine, &out, recorded_star, i, "star_original");
        differ += usize::from(recorded["original_vs_contiguous_generated_ids_differ"] == true);
    }
    // The reference shows the two numberings answer differently (4 of its 5 cases).
    assert!(differ >= 1);
}
