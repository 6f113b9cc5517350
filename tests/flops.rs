//! The cost model (`prune::cost`, the `flops` of `--json` and every "theoretical" speedup) against
//! an independent count: the analytic flops each kernel launcher attaches to the dispatches it
//! records, read from the profiler's trace of a real request on the demo model
//! (weights/tiny-llava-shapes: d = 256, 8 query heads and 4 key/value heads of 32, so k_proj and
//! v_proj are half as wide as q_proj and o_proj).
//!
//! What is summed: the dispatches of the profiler's "prefill" stage, which holds the decoder
//! layers and nothing else (the projector and the vision tower have their own stages; the final
//! norm and `lm_head`, which run on the last row only and are not in the cost model, are in
//! "first token"; stage 2's select and gathers are in "stage 2").
//!
//! - `matmul_*`: q, k, v, o, gate+up and down projections of every layer. The launcher counts
//!   2·M·N·K flops per dispatch, i.e. 2 × the multiply-adds, so MACs = flops / 2 exactly.
//! - `attention` (causal, Tq = Tk = n in prefill): the launcher counts 4·D·H flops per visible
//!   (query, key) pair, i.e. 2 × the MACs of QKᵀ and PV over the n(n+1)/2 pairs of the causal
//!   triangle: flops = 2·q·n(n+1) with q = H·D. The cost model charges attention as the full n²
//!   square, 2n²·q MACs. Twice the triangle is the square plus the diagonal twice, so the model's
//!   term is exactly flops − 2·q·n.
//! - `attention_scored` (layer K−1 with stage 2 or FastV): the same main pass plus a scoring
//!   pass that recomputes QKᵀ for the scored query rows a..b, counted by the launcher at 2·D·H per
//!   visible pair of those rows (Σ_{i=a}^{b−1} (i+1) pairs, causal). That pass is an overhead of
//!   pruning, not part of the layer, and is subtracted before the rule above.
//! - Not in the cost model, and not summed: RMSNorm, RoPE, SiLU·mul and the score reduction
//!   (O(n·d) elementwise work). The test fails on any other kernel in the stage.
//!
//! The two counts must then agree exactly.

use std::path::PathBuf;

use llava_wgpu::prune::{Method, PruneOptions};
use llava_wgpu::{Engine, EngineOptions, GenerateOutput, GenerateRequest};
use serde_json::Value;

// kv_store_f16 only converts the new keys and values to halves for the cache: no MACs.
const NOT_COUNTED: [&str; 6] = [
    "rms_norm",
    "rms_norm_lanes",
    "rope",
    "silu_mul",
    "attention_scores_reduce",
    "kv_store_f16",
];

fn demo_engine() -> Engine {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/tiny-llava-shapes");
    Engine::load(&dir, EngineOptions::default()).unwrap()
}

/// `key=value` from a launcher's shape string, e.g. `Tq=` of `Tq=40 Tk=40 H=8 …`.
fn field(shape: &str, key: &str) -> u64 {
    let rest = &shape[shape
        .find(key)
        .unwrap_or_else(|| panic!("{key} in {shape}"))
        + key.len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().unwrap()
}

/// The cost model's multiply-adds for one attention dispatch of the trace, and its query count.
fn attention_macs(name: &str, shape: &str, flops: u64) -> (u64, u64) {
    let (n, kv_rows) = (field(shape, "Tq="), field(shape, "Tk="));
    let (heads, d) = (field(shape, "H="), field(shape, "D="));
    assert_eq!(n, kv_rows, "prefill attends from an empty cache: {shape}");
    assert!(shape.contains(" causal"), "{shape}");
    let mut main = flops;
    if name.ends_with("_scored") {
        let (a, b) = (field(shape, "scores q="), field(shape, ".."));
        let pairs: u64 = (a..b).map(|i| i + 1).sum();
        main -= 2 * d * heads * pairs;
    }
    let q = heads * d;
    (main - 2 * q * n, n)
}

/// Run `prune` on the first example with the profiler on; return the output, the multiply-adds
/// counted from the launchers' flops, and the token count each layer's attention saw.
fn measured(engine: &Engine, prune: PruneOptions) -> (GenerateOutput, u64, Vec<u64>) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/tiny-llava-shapes");
    let mut request = GenerateRequest::new(
        root.join("example1.png"),
        "Which color does the cross have?",
    );
    request.max_new_tokens = 1;
    request.prune = prune;
    engine.gpu.start_profiling();
    let out = engine.generate(&request, |_| {}).unwrap();
    let report = engine.gpu.finish_profiling().unwrap().unwrap();
    let trace = report.chrome_trace();
    let (mut macs, mut tokens) = (0u64, Vec::new());
    for e in trace["traceEvents"].as_array().unwrap() {
        if e["cat"] != "kernel" || e["args"]["stage"] != "prefill" {
            continue;
        }
        let name = e["name"].as_str().unwrap();
        let shape = e["args"]["shape"].as_str().unwrap();
        let flops = e["args"]["flops"].as_u64().unwrap();
        match name {
            // Either matmul layout (tiled, or lanes on a CPU adapter), any weight format.
            m if m.starts_with("matmul_") => {
                assert_eq!(flops % 2, 0);
                macs += flops / 2;
            }
            "attention" | "attention_scored" | "attention_lanes" | "attention_lanes_scored" => {
                let (m, n) = attention_macs(name, shape, flops);
                macs += m;
                tokens.push(n);
            }
            other => assert!(NOT_COUNTED.contains(&other), "{other} ({shape}) in prefill"),
        }
    }
    (out, macs, tokens)
}

fn value(out: &GenerateOutput, key: &str) -> u64 {
    let json: Value = serde_json::to_value(out).unwrap();
    json["prefill_macs"][key].as_u64().unwrap()
}

#[test]
fn cost_model_equals_the_launchers_flops_of_the_prefill() {
    let engine = demo_engine();
    let layers = engine.config.text.num_hidden_layers;
    let (none, unpruned, tokens) = measured(&engine, PruneOptions::default());
    assert_eq!(tokens, vec![none.prompt_tokens as u64; layers]);
    assert_eq!(value(&none, "prefill"), unpruned);
    assert_eq!(value(&none, "prefill_unpruned"), unpruned);

    let settings = [
        PruneOptions {
            method: Method::Star,
            stage1_keep: Some(150),
            keep: Some(40),
            stage2_layer: Some(2),
            ..Default::default()
        },
        PruneOptions {
            method: Method::Fastv,
            keep: Some(40),
            ..Default::default()
        },
    ];
    for prune in settings {
        let label = format!("{:?}", prune.method);
        let (out, macs, tokens) = measured(&engine, prune);
        // Layers 0 and 1 see the text and N1 visual tokens, layers 2 and 3 the text and N2 = 40.
        let text = (none.prompt_tokens - 196) as u64;
        let n1 = if label == "Star" { 150 } else { 196 };
        assert_eq!(
            tokens,
            vec![text + n1, text + n1, text + 40, text + 40],
            "{label}"
        );
        assert_eq!(value(&out, "prefill"), macs, "{label}");
        assert_eq!(value(&out, "prefill_unpruned"), unpruned, "{label}");
    }
}
