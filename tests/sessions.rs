//! Sessions: a follow-up turn reuses the KV cache of the turns before it, and the image cache
//! skips the vision tower for an image seen before.
//!
//! References: without pruning, a follow-up turn must give what a fresh one-shot run of the whole
//! conversation's prompt gives (the full-prompt prefill path, which shares no state with the
//! session), whether its turns add no image, one image or two. With STAR, a text-only follow-up
//! keeps the first turn's kept visual tokens, and its KV cache holds exactly N1 − N2 fewer rows
//! in layers ≥ K than in the others (counted from the token lengths, not from the engine).
//! `tests/conversation.rs` checks STAR across turns against a PyTorch reference.

mod fixture;

use std::path::PathBuf;

use llava_wgpu::generate::{Conversation, ImageFrom, ImageInput, Session, TurnSettings};
use llava_wgpu::gpu::DType;
use llava_wgpu::prune::{Method, PruneOptions};
use llava_wgpu::text::{Message, Role, Template};
use llava_wgpu::{Engine, EngineOptions, GenerateRequest};

fn demo_dir() -> PathBuf {
    fixture::private_runtime_dir();
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/tiny-llava-shapes")
}

fn engine() -> Engine {
    Engine::load(&demo_dir(), EngineOptions::default()).expect("demo model loads")
}

/// A conversation about `image`, attached to its first message.
fn conversation(image: &str, turns: &[(Role, &str)]) -> Conversation {
    let mut messages: Vec<Message> = turns.iter().map(|&(r, t)| Message::new(r, t)).collect();
    messages[0].images = 1;
    Conversation {
        messages,
        images: vec![ImageInput::File(demo_dir().join(image))],
    }
}

fn settings(prune: PruneOptions) -> TurnSettings {
    TurnSettings {
        max_new_tokens: 6,
        ignore_eos: true,
        capture_outputs: true,
        prune,
        ..TurnSettings::default()
    }
}

/// The whole conversation as one raw prompt, answered by a one-shot run.
fn one_shot(engine: &Engine, conv: &Conversation, s: &TurnSettings) -> llava_wgpu::GenerateOutput {
    let images = conv
        .images
        .iter()
        .map(|image| match image {
            ImageInput::File(path) => path.clone(),
            ImageInput::Bytes { .. } => unreachable!("files only"),
        })
        .collect();
    let text = Template::LlavaHf
        .render_conversation(&conv.messages, "<image>")
        .unwrap();
    let mut request = GenerateRequest::with_images(images, text);
    request.template = Template::Raw;
    request.max_new_tokens = s.max_new_tokens;
    request.ignore_eos = s.ignore_eos;
    request.capture_outputs = true;
    request.prune = s.prune.clone();
    engine.generate(&request, |_| {}).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn unpruned() -> PruneOptions {
    PruneOptions {
        method: Method::None,
        ..PruneOptions::default()
    }
}

#[test]
fn unpruned_follow_up_equals_a_one_shot_run_of_the_whole_conversation() {
    let engine = engine();
    let s = settings(unpruned());
    let mut session = Session::new();
    let first = conversation("example1.png", &[(Role::User, "Which shape is green?")]);
    let a1 = engine.turn(&mut session, &first, &s, None, |_| {}).unwrap();
    assert_eq!(a1.turn.images, [ImageFrom::Encoder]);
    let follow = conversation(
        "example1.png",
        &[
            (Role::User, "Which shape is green?"),
            (Role::Assistant, a1.text.trim()),
            (Role::User, "Which color does the cross have?"),
        ],
    );
    let a2 = engine
        .turn(&mut session, &follow, &s, None, |_| {})
        .unwrap();
    assert_eq!(a2.turn.images, [ImageFrom::Session]);
    assert!(
        a2.turn.reused_tokens >= a1.prompt_tokens,
        "reused {} of a first prompt of {}",
        a2.turn.reused_tokens,
        a1.prompt_tokens
    );
    let fresh = one_shot(&engine, &follow, &s);
    assert_eq!(a2.prompt_tokens, fresh.prompt_tokens);
    assert_eq!(a2.generated_ids, fresh.generated_ids);
    // Same math in a different order (one prefill vs cached prefix + appended rows).
    let diff = max_abs_diff(&a2.first_logits, &fresh.first_logits);
    assert!(diff < 2e-3, "first-token logits differ by {diff}");

    // A third turn keeps going; a conversation that drops the first question cannot.
    let third = conversation(
        "example1.png",
        &[
            (Role::User, "Which shape is green?"),
            (Role::Assistant, a1.text.trim()),
            (Role::User, "Which color does the cross have?"),
            (Role::Assistant, a2.text.trim()),
            (Role::User, "How many objects are in the image?"),
        ],
    );
    let a3 = engine.turn(&mut session, &third, &s, None, |_| {}).unwrap();
    let fresh3 = one_shot(&engine, &third, &s);
    assert_eq!(a3.generated_ids, fresh3.generated_ids);
    assert!(a3.turn.reused_tokens > a2.turn.reused_tokens);
    // An edited first question reuses the prefix it shares (unpruned, the image rows too).
    let other = conversation("example1.png", &[(Role::User, "How many objects?")]);
    let edited = engine.turn(&mut session, &other, &s, None, |_| {}).unwrap();
    assert_eq!(edited.turn.images, [ImageFrom::Session]);
    assert!(edited.turn.reused_tokens > engine.config.image_tokens());
    assert!(edited.turn.reused_tokens < a1.prompt_tokens);
    assert_eq!(
        edited.generated_ids,
        one_shot(&engine, &other, &s).generated_ids
    );
}

/// A text-only question, then one image, then two more in one message: every turn equals a
/// one-shot run of the whole conversation so far.
#[test]
fn text_only_and_multi_image_turns_equal_one_shot_runs() {
    let engine = engine();
    let s = settings(unpruned());
    let mut session = Session::new();
    let mut messages = vec![Message::new(Role::User, "What can you see?")];
    let mut images = Vec::new();
    let image = |name: &str| ImageInput::File(demo_dir().join(name));
    let mut expected_sources = Vec::new();
    let steps = [
        ("Which color does the cross have?", vec!["example1.png"]),
        (
            "Which shape is green?",
            vec!["example2.png", "example3.png"],
        ),
    ];
    for step in 0..=steps.len() {
        let conv = Conversation {
            messages: messages.clone(),
            images: images.clone(),
        };
        let out = engine.turn(&mut session, &conv, &s, None, |_| {}).unwrap();
        let fresh = one_shot(&engine, &conv, &s);
        assert_eq!(out.prompt_tokens, fresh.prompt_tokens);
        assert_eq!(
            out.generated_ids,
            fresh.generated_ids,
            "{} images",
            images.len()
        );
        let diff = max_abs_diff(&out.first_logits, &fresh.first_logits);
        assert!(diff < 2e-3, "first-token logits differ by {diff}");
        assert_eq!(out.turn.images, expected_sources);
        let Some((question, new_images)) = steps.get(step) else {
            break;
        };
        messages.push(Message::new(Role::Assistant, out.text.trim()));
        messages.push(Message::with_images(
            Role::User,
            *question,
            new_images.len(),
        ));
        images.extend(new_images.iter().map(|n| image(n)));
        expected_sources = vec![ImageFrom::Session; expected_sources.len()];
        expected_sources.extend(vec![ImageFrom::Encoder; new_images.len()]);
    }
    assert_eq!(session.images(), 3);
}

#[test]
fn star_follow_up_keeps_the_first_turns_visual_tokens() {
    let engine = engine();
    let n0 = engine.config.image_tokens();
    let layers = engine.config.text.num_hidden_layers;
    let (n1, n2, k) = (n0 - 20, 30, 2);
    let s = settings(PruneOptions {
        method: Method::Star,
        stage1_keep: Some(n1),
        keep: Some(n2),
        stage2_layer: Some(k),
        ..PruneOptions::default()
    });
    let mut session = Session::new();
    let first = conversation("example2.png", &[(Role::User, "Which shape is green?")]);
    let a1 = engine.turn(&mut session, &first, &s, None, |_| {}).unwrap();
    let follow = conversation(
        "example2.png",
        &[
            (Role::User, "Which shape is green?"),
            (Role::Assistant, a1.text.trim()),
            (Role::User, "How many objects are in the image?"),
        ],
    );
    let a2 = engine
        .turn(&mut session, &follow, &s, None, |_| {})
        .unwrap();
    assert_eq!(a2.turn.images, [ImageFrom::Session]);
    let stage2 = a1.kept_visual_indices.as_ref().unwrap().stage2.as_ref();
    assert_eq!(stage2.unwrap().len(), n2);
    // The follow-up prefills no image: it reports none, and its cache keeps the first turn's.
    assert!(a2.images.is_empty() && a2.kept_visual_indices.is_none());
    assert_eq!(a2.visual_tokens.after_stage2, 0);
    // The cache holds the conversation's ids minus the last generated one (never fed back),
    // with N1 − N2 rows fewer in layers ≥ K.
    let width = engine.config.text.num_key_value_heads * engine.config.text.head_dim;
    let held = a2.prompt_tokens + a2.generated_ids.len() - 1;
    let rows = k * held + (layers - k) * (held - (n1 - n2));
    let element_bytes = match engine.kv_dtype {
        DType::F16 => 2,
        _ => 4,
    };
    assert_eq!(a2.kv_cache_bytes, (rows * width * 2 * element_bytes) as u64);
}

#[test]
fn a_new_conversation_about_a_seen_image_skips_the_vision_tower() {
    let engine = engine();
    let s = settings(PruneOptions {
        method: Method::Star,
        ..PruneOptions::default()
    });
    let q = conversation("example3.png", &[(Role::User, "What is in the image?")]);
    let mut first = Session::new();
    let a = engine.turn(&mut first, &q, &s, None, |_| {}).unwrap();
    assert_eq!(a.turn.images, [ImageFrom::Encoder]);
    let mut second = Session::new();
    let b = engine.turn(&mut second, &q, &s, None, |_| {}).unwrap();
    assert_eq!(b.turn.images, [ImageFrom::Cache]);
    assert_eq!(a.generated_ids, b.generated_ids);
    assert_eq!(a.first_logits, b.first_logits);
    // The same bytes from memory hit the same entry.
    let bytes = std::fs::read(demo_dir().join("example3.png")).unwrap();
    let from_memory = Conversation {
        images: vec![ImageInput::Bytes {
            bytes: bytes.into(),
            source: "upload".into(),
        }],
        ..q.clone()
    };
    let c = engine
        .turn(&mut Session::new(), &from_memory, &s, None, |_| {})
        .unwrap();
    assert_eq!(c.turn.images, [ImageFrom::Cache]);
    // Other pruning settings change the projector output: a separate entry.
    let other = settings(unpruned());
    let d = engine
        .turn(&mut Session::new(), &q, &other, None, |_| {})
        .unwrap();
    assert_eq!(d.turn.images, [ImageFrom::Encoder]);
    // A one-shot run never uses the cache (its timings measure the vision tower).
    let one = one_shot(&engine, &q, &s);
    assert_eq!(one.turn.images, [ImageFrom::Encoder]);
    assert_eq!(one.generated_ids, a.generated_ids);
}

/// Another image where the session held one: the cache is cut before it and the new image
/// is encoded; the text before it is reused. A limit on images is an error before any work.
#[test]
fn another_image_at_the_same_place_is_encoded_and_the_limit_holds() {
    let engine = engine();
    let s = settings(PruneOptions::default());
    let mut session = Session::new();
    let first = conversation("example1.png", &[(Role::User, "Which shape is green?")]);
    engine.turn(&mut session, &first, &s, None, |_| {}).unwrap();
    let swapped = conversation(
        "example2.png",
        &[
            (Role::User, "Which shape is green?"),
            (Role::Assistant, "square"),
            (Role::User, "And here?"),
        ],
    );
    let out = engine
        .turn(&mut session, &swapped, &s, None, |_| {})
        .unwrap();
    assert_eq!(out.turn.images, [ImageFrom::Encoder]);
    // "USER: " before the image placeholder: BOS and a few text ids, no image row.
    assert!(out.turn.reused_tokens > 0 && out.turn.reused_tokens < 10);
    assert_eq!(
        out.generated_ids,
        one_shot(&engine, &swapped, &s).generated_ids
    );

    let limited = TurnSettings {
        max_images: 1,
        ..s.clone()
    };
    let mut two = conversation("example1.png", &[(Role::User, "Compare.")]);
    two.messages[0].images = 2;
    two.images
        .push(ImageInput::File(demo_dir().join("example2.png")));
    let err = engine
        .turn(&mut Session::new(), &two, &limited, None, |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("max_images") && err.contains("2 images"),
        "{err}"
    );
}

#[test]
fn cancelling_stops_before_the_next_token() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let engine = engine();
    let s = TurnSettings {
        max_new_tokens: 20,
        ..settings(PruneOptions::default())
    };
    let cancel = AtomicBool::new(false);
    let mut pieces = 0;
    let conv = conversation("example1.png", &[(Role::User, "What is in the image?")]);
    let out = engine
        .turn(&mut Session::new(), &conv, &s, Some(&cancel), |_| {
            pieces += 1;
            cancel.store(true, Ordering::Relaxed);
        })
        .unwrap();
    // The first piece of text set the flag: no token after it was decoded.
    assert_eq!(out.stop_reason, "cancelled");
    assert_eq!(pieces, 1);
    assert!(out.generated_ids.len() < 20);
    let text = engine.tokenizer.decode(&out.generated_ids).unwrap();
    assert!(!text.is_empty());
}
