//! `LlavaConfig::parse` on arbitrary text, arbitrary JSON and mutations of the fixture's
//! config.json: `Ok` with a self-consistent config, or an error naming the file (and the field).

use std::path::Path;

use llava_wgpu::model::config::FeatureSelect;
use llava_wgpu::model::LlavaConfig;
use proptest::prelude::*;
use serde_json::Value;

use crate::support::{cases, json, model_dir, number, regex};

/// Every key the reader looks at, at any depth.
const FIELDS: &[&str] = &[
    "model_type",
    "text_config",
    "vision_config",
    "vocab_size",
    "image_token_index",
    "image_token_id",
    "vision_feature_layer",
    "vision_feature_select_strategy",
    "projector_hidden_act",
    "multimodal_projector_bias",
    "tie_word_embeddings",
    "dtype",
    "torch_dtype",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_type",
    "rope_scaling",
    "max_position_embeddings",
    "bos_token_id",
    "eos_token_id",
    "image_size",
    "patch_size",
    "num_channels",
    "layer_norm_eps",
    "llava",
    "llama",
    "clip_vision_model",
    "default",
    "full",
    "gelu",
    "silu",
    "quick_gelu",
];

/// The numbers the engine sizes buffers and dispatches with: (object, key).
const SIZES: &[(&str, &str)] = &[
    ("text_config", "hidden_size"),
    ("text_config", "num_attention_heads"),
    ("text_config", "num_key_value_heads"),
    ("text_config", "head_dim"),
    ("text_config", "vocab_size"),
    ("vision_config", "hidden_size"),
    ("vision_config", "num_attention_heads"),
    ("vision_config", "image_size"),
    ("vision_config", "patch_size"),
    ("vision_config", "num_hidden_layers"),
    ("", "vision_feature_layer"),
    ("", "image_token_index"),
];

const PATH: &str = "fuzz/config.json";

fn real_config() -> Value {
    let text = std::fs::read_to_string(model_dir().join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Parse, and check what either outcome promises.
fn check(text: &str, json: Option<&Value>) -> Result<(), TestCaseError> {
    match LlavaConfig::parse(text, Path::new(PATH)) {
        Ok(c) => consistent(&c, json),
        Err(e) => {
            let e = e.to_string();
            prop_assert!(e.starts_with(PATH), "error does not name the file: {e}");
            Ok(())
        }
    }
}

/// What the engine relies on in a config the reader accepted.
fn consistent(c: &LlavaConfig, json: Option<&Value>) -> Result<(), TestCaseError> {
    let (t, v) = (&c.text, &c.vision);
    prop_assert!(t.num_attention_heads > 0 && t.num_key_value_heads > 0 && t.head_dim > 0);
    prop_assert_eq!(t.num_attention_heads % t.num_key_value_heads, 0);
    prop_assert!(v.num_attention_heads > 0 && v.hidden_size % v.num_attention_heads == 0);
    prop_assert!(v.patch_size > 0 && v.image_size % v.patch_size == 0);
    prop_assert!((c.image_token_index as usize) < t.vocab_size);
    for eps in [t.rms_norm_eps, t.rope_theta, v.layer_norm_eps] {
        prop_assert!(eps.is_finite() && eps > 0.0);
    }
    // Derived sizes must be representable (the GPU indexes with u32).
    let grid = v.image_size / v.patch_size;
    let tokens = grid.checked_mul(grid).and_then(|n| n.checked_add(1));
    prop_assert!(
        tokens.is_some_and(|n| n <= u32::MAX as usize),
        "{}x{} patches of an image of {} accepted",
        grid,
        grid,
        v.image_size
    );
    let layers = c.vision_layers_to_run();
    prop_assert!(
        (1..=v.num_hidden_layers).contains(&layers),
        "{layers} layers"
    );
    let extra = usize::from(c.vision_feature_select_strategy == FeatureSelect::Full);
    prop_assert_eq!(c.image_tokens(), grid * grid + extra);
    // Ids are read as written, never truncated to 32 bits.
    if let Some(json) = json {
        let written = json
            .get("image_token_index")
            .or_else(|| json.get("image_token_id"))
            .and_then(Value::as_u64);
        if let Some(n) = written {
            prop_assert_eq!(c.image_token_index as u64, n);
        }
        if let Some(n) = json["text_config"]["eos_token_id"].as_u64() {
            prop_assert_eq!(&t.eos_token_id, &vec![n as u32]);
            prop_assert!(n <= u32::MAX as u64, "eos id {n} accepted");
        }
    }
    Ok(())
}

/// One edit of a JSON object: remove a key or set it, at some depth.
#[derive(Clone, Debug)]
enum Edit {
    Remove(Vec<String>),
    Set(Vec<String>, Value),
}

/// Paths to every existing key of the real config, and to every known field inside each of its
/// objects (so an edit may also add a field the file omits).
fn paths(root: &Value) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let objects: [&[&str]; 4] = [
        &[],
        &["text_config"],
        &["vision_config"],
        &["text_config", "rope_parameters"],
    ];
    for object in objects {
        let prefix: Vec<String> = object.iter().map(|s| s.to_string()).collect();
        let mut node = root;
        for k in object {
            node = &node[*k];
        }
        let existing = node.as_object().into_iter().flat_map(|m| m.keys().cloned());
        let known = FIELDS.iter().map(|s| s.to_string());
        for key in existing.chain(known) {
            let mut path = prefix.clone();
            path.push(key);
            out.push(path);
        }
    }
    out
}

fn value_for_config() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => number(),
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => prop::sample::select(FIELDS).prop_map(Value::from),
        1 => json(FIELDS),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    let all = paths(&real_config());
    let path = prop::sample::select(all);
    prop_oneof![
        1 => path.clone().prop_map(Edit::Remove),
        3 => (path, value_for_config()).prop_map(|(p, v)| Edit::Set(p, v)),
    ]
}

fn apply(root: &mut Value, edit: &Edit) {
    let (path, value) = match edit {
        Edit::Remove(p) => (p, None),
        Edit::Set(p, v) => (p, Some(v.clone())),
    };
    let (last, parents) = path.split_last().unwrap();
    let mut node = root;
    for k in parents {
        match node.get_mut(k.as_str()) {
            Some(next) => node = next,
            None => return,
        }
    }
    if let Some(object) = node.as_object_mut() {
        match value {
            Some(v) => object.insert(last.clone(), v),
            None => object.remove(last),
        };
    }
}

proptest! {
    #![proptest_config(cases(4000))]

    #[test]
    fn arbitrary_text_is_refused_by_name(text in regex(".{0,200}")) {
        check(&text, None)?;
    }

    #[test]
    fn arbitrary_json_is_read_or_refused_by_name(v in json(FIELDS)) {
        check(&v.to_string(), Some(&v))?;
    }

    #[test]
    fn mutated_fixture_configs_are_read_or_refused_by_name(
        edits in prop::collection::vec(edit(), 1..5)
    ) {
        let mut root = real_config();
        for e in &edits {
            apply(&mut root, e);
        }
        check(&root.to_string(), Some(&root))?;
    }

    /// Sizes and head counts replaced a few at a time (the rest as in the fixture), so that
    /// inconsistent combinations are reached often.
    #[test]
    fn sizes_and_head_counts_are_consistent_when_accepted(
        values in prop::collection::vec(prop::option::weighted(0.3, number()), SIZES.len()),
    ) {
        let mut root = real_config();
        for ((object, key), value) in SIZES.iter().zip(values) {
            if let Some(v) = value {
                let node = if object.is_empty() { &mut root } else { &mut root[*object] };
                node[*key] = v;
            }
        }
        check(&root.to_string(), Some(&root))?;
    }
}

#[test]
fn the_fixture_config_passes_the_checks() {
    let root = real_config();
    let c = LlavaConfig::parse(&root.to_string(), Path::new(PATH)).unwrap();
    consistent(&c, Some(&root)).unwrap();
}
