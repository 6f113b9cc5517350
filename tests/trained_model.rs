//! The trained demo model (weights/tiny-llava-shapes) on the committed slice of its held-out set
//! (weights/shapes-heldout, seeds the training never used): the engine must give the answers HF
//! transformers gave (recorded by scripts/hf_answers.py) and reach the 90% accuracy.

mod session;

use std::path::PathBuf;

use llava_wgpu::harness::eval::{self, normalise};
use llava_wgpu::{Engine, EngineOptions, GenerateRequest};

/// The repository root; every test here starts from it, so it also sets the Mesa runtime
/// directory (see tests/session).
fn root() -> PathBuf {
    session::private_runtime_dir();
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn hf_answers() -> Vec<String> {
    let path = root().join("weights/shapes-heldout/hf_answers.jsonl");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["hf_answer"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn trained_model_answers_like_transformers_and_reaches_90_percent() {
    let engine = Engine::load(
        &root().join("weights/tiny-llava-shapes"),
        EngineOptions::default(),
    )
    .unwrap();
    let examples = eval::read_jsonl(&root().join("weights/shapes-heldout/heldout.jsonl")).unwrap();
    let reference = hf_answers();
    assert_eq!(reference.len(), examples.len());
    assert!(examples.len() >= 100, "the committed subset is too small");

    let (mut correct, mut same_as_hf) = (0, 0);
    let mut disagreements = Vec::new();
    for (i, (ex, hf)) in examples.iter().zip(&reference).enumerate() {
        let mut request = GenerateRequest::new(&ex.image, &ex.question);
        request.max_new_tokens = 6; // as scripts/hf_answers.py
        let out = engine.generate(&request, |_| {}).unwrap();
        correct += usize::from(normalise(&out.text) == normalise(&ex.answer));
        if normalise(&out.text) == normalise(hf) {
            same_as_hf += 1;
        } else {
            disagreements.push(format!(
                "#{i} {:?}: engine {:?}, HF {hf:?}",
                ex.question, out.text
            ));
        }
    }
    let n = examples.len() as f64;
    // Both compute in f32 from the same f16 weights; only a near-tie may flip an answer.
    assert!(
        same_as_hf as f64 >= 0.98 * n,
        "{same_as_hf}/{n} answers equal HF's: {disagreements:#?}"
    );
    assert!(
        correct as f64 >= 0.9 * n,
        "unpruned accuracy {correct}/{n} is below 90%"
    );
}

/// The README's first command: `run` with no `--model` answers about a shipped example image with
/// the demo model and its default pruning, from the repository root.
#[test]
fn run_without_a_model_uses_the_demo_model_and_answers() {
    let examples =
        std::fs::read_to_string(root().join("weights/tiny-llava-shapes/examples.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(examples.lines().next().unwrap()).unwrap();
    let image = format!(
        "weights/tiny-llava-shapes/{}",
        first["image"].as_str().unwrap()
    );
    let question = first["question"].as_str().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llava-wgpu"))
        .current_dir(root())
        .args(["run", "--image", &image, "--prompt", question, "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        normalise(json["text"].as_str().unwrap()),
        normalise(first["answer"].as_str().unwrap()),
        "{question}"
    );
    // The default is STAR with docs/pruning.md's budgets: N1 = floor(196 * 0.9), N2 = round(196 / 9).
    let visual = &json["visual_tokens"];
    assert_eq!(
        (
            visual["encoder"].as_u64(),
            visual["after_stage1"].as_u64(),
            visual["after_stage2"].as_u64()
        ),
        (Some(196), Some(176), Some(22)),
        "{json}"
    );
    // The JSON says what ran: the pruning with its resolved budgets (K = 2 of the demo's 4
    // layers, docs/pruning.md), multiply-adds by their name, the KV bytes once, timings to the
    // microsecond and whether the total holds the load.
    assert_eq!(
        json["prune"],
        serde_json::json!({"method": "star", "stage1_keep": 176, "stage1_score": "attention", "keep": 22, "stage2_layer": 2, "positions": "original"})
    );
    let macs = &json["prefill_macs"];
    assert!(macs["prefill"].as_u64().unwrap() < macs["prefill_unpruned"].as_u64().unwrap());
    assert!(json.get("flops").is_none() && json["memory"].get("kv_cache_bytes").is_none());
    assert!(json["kv_cache_bytes"].as_u64().unwrap() > 0);
    let timings = json["timings_ms"].as_object().unwrap();
    assert_eq!(timings["total_includes_load"], false);
    for (name, ms) in timings.iter().filter(|(_, v)| v.is_f64()) {
        let micro = ms.as_f64().unwrap() * 1e3;
        assert!((micro - micro.round()).abs() < 1e-6, "{name} = {ms} ms");
    }
    assert!(json["images"].as_array().unwrap().len() == 1);
}
