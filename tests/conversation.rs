//! A three-turn conversation with STAR against a PyTorch reference
//! (`scripts/conversation_reference.py`, `weights/tiny-random-llava/reference/conversation.json`):
//! a text-only question, then one image, then two images in one message. Each image is pruned in
//! the turn that first prefills it: stage 1 in its own tower pass, stage 2 over that turn's image
//! rows (the two images of the last turn ranked together) scored by the turn's text after them,
//! with keys over the whole cache. The reference computes this with transformers' own decoder
//! layers and an explicit KV cache; the engine must reuse what it recorded, keep the same
//! patches, and give the same tokens and first logits.

mod fixture;

use serde_json::Value;

use llava_wgpu::generate::{Conversation, ImageFrom, ImageInput, Session, TurnSettings};
use llava_wgpu::prune::{Method, Positions, PruneOptions};
use llava_wgpu::text::{Message, Role};
use llava_wgpu::{Engine, EngineOptions};

/// The references were recorded with the kept tokens renumbered one after another (transformers
/// fed fewer image tokens), so these runs ask for contiguous positions.
fn contiguous() -> PruneOptions {
    PruneOptions {
        positions: Positions::Contiguous,
        ..PruneOptions::default()
    }
}

use fixture::usizes;

fn reference() -> Value {
    fixture::reference_json("conversation.json")
}

fn settings(reference: &Value) -> TurnSettings {
    let prune = &reference["prune"];
    let field = |name: &str| Some(prune[name].as_u64().unwrap() as usize);
    TurnSettings {
        max_new_tokens: reference["max_new_tokens"].as_u64().unwrap() as usize,
        // The reference masks EOS; it never wins here (the ids below would differ).
        ignore_eos: true,
        capture_outputs: true,
        prune: PruneOptions {
            method: Method::Star,
            stage1_keep: field("stage1_keep"),
            keep: field("keep"),
            stage2_layer: field("stage2_layer"),
            ..contiguous()
        },
        ..TurnSettings::default()
    }
}

/// A recorded turn's messages as the engine's conversation.
fn conversation(reference: &Value, turn: &Value) -> Conversation {
    let names = reference["images"].as_array().unwrap();
    let mut messages = Vec::new();
    let mut images = Vec::new();
    for m in turn["messages"].as_array().unwrap() {
        let role = match m["role"].as_str().unwrap() {
            "user" => Role::User,
            _ => Role::Assistant,
        };
        let attached = usizes(&m["images"]);
        let text = m["text"].as_str().unwrap();
        messages.push(Message::with_images(role, text, attached.len()));
        for i in attached {
            let name = names[i].as_str().unwrap();
            images.push(ImageInput::File(fixture::reference_dir().join(name)));
        }
    }
    Conversation { messages, images }
}

#[test]
fn star_across_turns_matches_the_pytorch_reference() {
    let reference = reference();
    let engine = Engine::load(&fixture::model_dir(), EngineOptions::default()).unwrap();
    let settings = settings(&reference);
    let logits_file = fixture::reference_dir().join("conversation_logits.safetensors");
    let mut session = Session::new();
    for (t, turn) in reference["turns"].as_array().unwrap().iter().enumerate() {
        let conv = conversation(&reference, turn);
        let out = engine
            .turn(&mut session, &conv, &settings, None, |_| {})
            .unwrap();
        assert_eq!(
            out.prompt_tokens,
            turn["prompt_ids"].as_array().unwrap().len()
        );
        assert_eq!(
            out.turn.reused_tokens as u64,
            turn["reused_tokens"].as_u64().unwrap(),
            "turn {t}"
        );
        let expected = fixture::token_ids(&turn["generated_ids"]);
        assert_eq!(out.generated_ids, expected, "turn {t}");
        let want = llava_wgpu_reference_logits(&logits_file, t);
        let err = fixture::rel_l2(&out.first_logits, &want);
        eprintln!("turn {t}: first logits rel. L2 {err:.2e}");
        assert!(err < 2e-3, "turn {t}: first logits rel. L2 {err}");

        let held = usizes(&turn["held_images"]).len();
        let new_images = turn["new_images"].as_array().unwrap();
        let mut sources = vec![ImageFrom::Session; held];
        sources.extend(vec![ImageFrom::Encoder; new_images.len()]);
        assert_eq!(out.turn.images, sources, "turn {t}");
        assert_eq!(out.images.len(), new_images.len(), "turn {t}");
        for (report, image) in out.images.iter().zip(new_images) {
            assert_eq!(report.index as u64, image["image"].as_u64().unwrap());
            let kept = report.kept_visual_indices.as_ref().unwrap();
            let stage1 = kept.stage1.as_ref().unwrap();
            let stage2 = kept.stage2.as_ref().unwrap();
            assert_eq!(stage1, &usizes(&image["stage1_kept"]), "turn {t} stage 1");
            assert_eq!(stage2, &usizes(&image["stage2_kept"]), "turn {t} stage 2");
            assert_eq!(report.visual_tokens.after_stage2, stage2.len());
        }
    }
}

/// Turn `t`'s recorded first-logits row.
fn llava_wgpu_reference_logits(file: &std::path::Path, t: usize) -> Vec<f32> {
    let bytes = std::fs::read(file).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = tensors.tensor(&format!("turn{t}.first_logits")).unwrap();
    bytemuck::pod_collect_to_vec(view.data())
}
