//! Adaptive budgets (docs/pruning.md "Adaptive budgets"): per image, the fewest visual tokens
//! whose scores reach a share P of the image's total, in stage 2 (`--keep-mass`) and in STAR's
//! stage 1 (`--stage1-keep-mass`).
//!
//! Against transformers: `scripts/positions_reference.py` recorded STAR's stage-2 scores
//! (original positions, N1 = 32, K = 2) and its top-10 kept set, chosen with no near-tie at
//! the 10th score. Here P is set halfway between the cumulative shares of the 9 and the 10
//! best recorded scores, so the rule must keep exactly that top 10; and an adaptive run must
//! equal the fixed run of the same count bit for bit (the same rows dropped the same way).

mod fixture;

use serde_json::Value;

use llava_wgpu::gpu::DType;
use llava_wgpu::prune::{Method, Positions, PruneOptions};
use llava_wgpu::{Engine, EngineOptions, GenerateOutput, GenerateRequest};

fn reference() -> Value {
    fixture::reference_json("positions.json")
}

fn recorded_scores(case: usize) -> Vec<f64> {
    let name = format!("case{case}.star_original.stage2_scores");
    let scores = fixture::tensor_in("positions_logits.safetensors", &name);
    scores.into_iter().map(f64::from).collect()
}

/// The share of the total that the `count` largest scores hold.
fn share_of_largest(scores: &[f64], count: usize) -> f64 {
    let mut sorted = scores.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    sorted[..count].iter().sum::<f64>() / scores.iter().sum::<f64>()
}

fn run(engine: &Engine, case: &fixture::Case, prune: PruneOptions) -> GenerateOutput {
    fixture::run_pruned(engine, case, prune, 6)
}

fn star(n1: usize, k: usize) -> PruneOptions {
    PruneOptions {
        method: Method::Star,
        stage1_keep: Some(n1),
        stage2_layer: Some(k),
        positions: Positions::Original,
        ..PruneOptions::default()
    }
}

fn kept(out: &GenerateOutput) -> Vec<usize> {
    out.kept_visual_indices.clone().unwrap().stage2.unwrap()
}

#[test]
fn adaptive_stage2_keeps_the_smallest_set_reaching_the_share() {
    let reference = reference();
    let budget = |name: &str| reference["budgets"][name].as_u64().unwrap() as usize;
    let (n1, n2, k) = (budget("N1"), budget("N2"), budget("K"));
    let engine = fixture::engine_f32();
    let cases = fixture::cases();
    for recorded in reference["cases"].as_array().unwrap() {
        let i = recorded["index"].as_u64().unwrap() as usize;
        let scores = recorded_scores(i);
        let mass = (share_of_largest(&scores, n2 - 1) + share_of_largest(&scores, n2)) / 2.0;
        let adaptive = run(
            &engine,
            &cases[i],
            PruneOptions {
                keep_mass: Some(mass),
                ..star(n1, k)
            },
        );
        let want: Vec<usize> = recorded["methods"]["star_original"]["stage2_kept"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(kept(&adaptive), want, "case {i}: share {mass:.4}");
        assert_eq!(adaptive.visual_tokens.after_stage2, n2);
        let fixed = run(
            &engine,
            &cases[i],
            PruneOptions {
                keep: Some(n2),
                ..star(n1, k)
            },
        );
        assert_eq!(adaptive.generated_ids, fixed.generated_ids, "case {i}");
        assert_eq!(adaptive.first_logits, fixed.first_logits, "case {i}");
        assert_eq!(adaptive.prefill_macs.prefill, fixed.prefill_macs.prefill);
    }
}

/// The floor and the cap bound what the share asks for; every image of a turn is measured
/// against its own total.
#[test]
fn floor_cap_and_several_images() {
    let engine = Engine::load(&fixture::model_dir(), EngineOptions::default()).unwrap();
    let cases = fixture::cases();
    let with = |mass: f64, floor: Option<usize>, keep: Option<usize>| PruneOptions {
        keep_mass: Some(mass),
        keep_floor: floor,
        keep,
        ..star(32, 2)
    };
    let everything = run(&engine, &cases[0], with(1.0, None, None));
    assert_eq!(
        everything.visual_tokens.after_stage2, 32,
        "P = 1 keeps all N1"
    );
    let capped = run(&engine, &cases[0], with(1.0, None, Some(7)));
    assert_eq!(capped.visual_tokens.after_stage2, 7);
    let floored = run(&engine, &cases[0], with(1e-6, Some(5), None));
    assert_eq!(floored.visual_tokens.after_stage2, 5);
    // Two images in one message: each keeps its own smallest set; the counts add up.
    let mut request = GenerateRequest::with_images(
        vec![cases[0].image.clone(), cases[1].image.clone()],
        &cases[0].prompt,
    );
    request.max_new_tokens = 2;
    request.prune = with(0.5, None, None);
    let out = engine.generate(&request, |_| {}).unwrap();
    let each: Vec<usize> = out
        .images
        .iter()
        .map(|i| i.visual_tokens.after_stage2)
        .collect();
    assert!(each.iter().all(|&n| (1..32).contains(&n)), "{each:?}");
    assert_eq!(out.visual_tokens.after_stage2, each.iter().sum::<usize>());
}

/// Adaptive stage 1 against transformers: `make_tiny_llava.py` recorded CLIP's stage-1 scores
/// (`case{i}.clip_attention_scores`, CLS first) and the top-32 patches (`stage1_kept`, no
/// near-tie at the 32nd). With P halfway between the shares of the 31 and the 32 best patch
/// scores, the image pass must keep exactly those 32, and the run must equal the fixed
/// `stage1_keep = 32` run bit for bit (the prompt shrinks to the rows kept).
#[test]
fn adaptive_stage1_keeps_the_smallest_set_reaching_the_share() {
    let engine = fixture::engine_f32();
    for case in fixture::cases() {
        let want = case.ints("stage1_kept");
        let n1 = want.len();
        let scores = fixture::tensor(&format!("case{}.clip_attention_scores", case.index));
        let patches: Vec<f64> = scores[1..].iter().map(|&s| f64::from(s)).collect();
        let mass = (share_of_largest(&patches, n1 - 1) + share_of_largest(&patches, n1)) / 2.0;
        let stage2 = PruneOptions {
            method: Method::Star,
            keep: Some(7),
            stage2_layer: Some(2),
            ..PruneOptions::default()
        };
        let adaptive = run(
            &engine,
            &case,
            PruneOptions {
                stage1_keep_mass: Some(mass),
                ..stage2.clone()
            },
        );
        let kept = adaptive
            .kept_visual_indices
            .clone()
            .unwrap()
            .stage1
            .unwrap();
        assert_eq!(kept, want, "case {}: share {mass:.4}", case.index);
        assert_eq!(adaptive.visual_tokens.after_stage1, n1);
        let fixed = run(
            &engine,
            &case,
            PruneOptions {
                stage1_keep: Some(n1),
                ..stage2
            },
        );
        assert_eq!(adaptive.prompt_tokens, fixed.prompt_tokens);
        assert_eq!(adaptive.generated_ids, fixed.generated_ids);
        assert_eq!(adaptive.first_logits, fixed.first_logits);
        assert_eq!(
            adaptive.kept_visual_indices.unwrap().stage2,
            fixed.kept_visual_indices.unwrap().stage2
        );
    }
}

/// A follow-up turn keeps what the adaptive stages of the first turn kept: its cache holds the
/// conversation's rows with N1 − N2 fewer in layers ≥ K, N1 and N2 being the counts the first
/// turn reported (not the caps).
#[test]
fn a_follow_up_keeps_the_adaptive_counts_of_the_first_turn() {
    use llava_wgpu::generate::{Conversation, ImageFrom, ImageInput, Session, TurnSettings};
    use llava_wgpu::text::{Message, Role};
    let engine = Engine::load(&fixture::model_dir(), EngineOptions::default()).unwrap();
    let case = &fixture::cases()[0];
    let k = 2;
    let settings = TurnSettings {
        max_new_tokens: 4,
        ignore_eos: true,
        prune: PruneOptions {
            stage1_keep_mass: Some(0.8),
            keep_mass: Some(0.5),
            ..star(36, k)
        },
        ..TurnSettings::default()
    };
    let mut messages = vec![Message::with_images(Role::User, &case.prompt, 1)];
    let images = vec![ImageInput::File(case.image.clone())];
    let mut session = Session::new();
    let conv = |messages: &[Message]| Conversation {
        messages: messages.to_vec(),
        images: images.clone(),
    };
    let first = engine
        .turn(&mut session, &conv(&messages), &settings, None, |_| {})
        .unwrap();
    let (n1, n2) = (
        first.visual_tokens.after_stage1,
        first.visual_tokens.after_stage2,
    );
    assert!(n2 < n1 && n1 < 36, "both stages adapted: {n1} > {n2}");
    messages.push(Message::new(Role::Assistant, first.text.trim()));
    messages.push(Message::new(Role::User, "And then?"));
    let second = engine
        .turn(&mut session, &conv(&messages), &settings, None, |_| {})
        .unwrap();
    assert_eq!(second.turn.images, [ImageFrom::Session]);
    let text = &engine.config.text;
    let width = text.num_key_value_heads * text.head_dim;
    let held = second.prompt_tokens + second.generated_ids.len() - 1;
    let rows = k * held + (text.num_hidden_layers - k) * (held - (n1 - n2));
    let element_bytes = if engine.kv_dtype == DType::F16 { 2 } else { 4 };
    assert_eq!(
        second.kv_cache_bytes,
        (rows * width * 2 * element_bytes) as u64
    );
}
