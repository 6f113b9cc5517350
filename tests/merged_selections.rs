//! Selections before the projector that merge the patches they drop (`--merge`,
//! docs/pruning.md, "Merging the dropped patches") against the PyTorch reference
//! `scripts/merge_reference.py` records (`weights/tiny-random-llava/reference/merge.json`):
//! FasterVLM and STAR, kept sets, greedy tokens and first logits, f32 weights and KV cache.

mod fixture;

use llava_wgpu::prune::{Method, PruneOptions};
use llava_wgpu::{Engine, GenerateOutput};
use serde_json::Value;

use fixture::usizes;

fn recorded_logits(case: usize, method: &str) -> Vec<f32> {
    let name = format!("case{case}.{method}.first_logits");
    fixture::tensor_in("merge_logits.safetensors", &name)
}

/// The engine's merged run against the recorded one (ids up to the engine's first EOS, first
/// logits to f32 precision), and against the same selection unmerged, which must differ.
fn check(engine: &Engine, runs: [&GenerateOutput; 2], recorded: &Value, what: (usize, &str)) {
    let ([out, unmerged], (case, method)) = (runs, what);
    let engine_ids = fixture::token_ids(&recorded["generated_ids"]);
    let label = format!("case {case} {method}");
    fixture::assert_ids_until_eos(engine, &out.generated_ids, &engine_ids, &label);
    let err = fixture::rel_l2(&out.first_logits, &recorded_logits(case, method));
    let moved = fixture::rel_l2(&unmerged.first_logits, &out.first_logits);
    eprintln!("{label}: first logits rel. L2 {err:.2e} (unmerged differs by {moved:.2e})");
    assert!(err < 1e-5, "{label}: first logits rel. L2 {err}");
    assert!(
        moved > 100.0 * err,
        "{label}: merging changed nothing measurable"
    );
}

#[test]
fn merged_selections_match_the_pytorch_reference() {
    let reference = fixture::reference_json("merge.json");
    let budget = |name: &str| Some(reference["budgets"][name].as_u64().unwrap() as usize);
    let engine = fixture::engine_f32();
    let cases = fixture::cases();
    for recorded in reference["cases"].as_array().unwrap() {
        let i = recorded["index"].as_u64().unwrap() as usize;
        let case = &cases[i];
        let methods = &recorded["methods"];
        let fastervlm = PruneOptions {
            method: Method::Fastervlm,
            keep: budget("fastervlm_keep"),
            ..PruneOptions::default()
        };
        let star = PruneOptions {
            method: Method::Star,
            stage1_keep: budget("N1"),
            keep: budget("N2"),
            stage2_layer: budget("K"),
            ..PruneOptions::default()
        };
        for (method, prune) in [("fastervlm_merge", fastervlm), ("star_merge", star)] {
            let recorded = &methods[method];
            let merged = PruneOptions {
                merge: true,
                ..prune.clone()
            };
            let out = fixture::run_pruned(&engine, case, merged, 8);
            let unmerged = fixture::run_pruned(&engine, case, prune, 8);
            let kept = out.kept_visual_indices.clone().unwrap();
            let (stage1, stage2) = match method {
                "star_merge" => ("stage1_kept", Some("stage2_kept")),
                _ => ("kept", None),
            };
            assert_eq!(kept.stage1.unwrap(), usizes(&recorded[stage1]), "case {i}");
            if let Some(key) = stage2 {
                assert_eq!(kept.stage2.unwrap(), usizes(&recorded[key]), "case {i}");
            }
            check(&engine, [&out, &unmerged], recorded, (i, method));
        }
    }
}
