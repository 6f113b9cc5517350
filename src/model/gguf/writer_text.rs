//! The text-model GGUF of a llava-hf checkpoint, as convert_hf_to_gguf.py (`LlamaModel`)
//! writes it, its types as llama-quantize picks them (`TextTypes`).

use std::path::Path;

use serde_json::Value;

use super::encode::{tensor_bytes, GgufWriter, Meta, TextTypes};
use crate::error::{Error, Result};
use crate::gpu::WeightFormat;
use crate::model::config::LlavaConfig;
use crate::model::weights::Checkpoint;
use crate::quant::TensorRole;

/// ggml names of a decoder layer's tensors and their canonical module names, in the order the
/// converter meets them in a llava-hf checkpoint.
const LAYER: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

pub(super) fn text_file(
    model_dir: &Path,
    config: &LlavaConfig,
    checkpoint: &Checkpoint,
    types: TextTypes,
) -> Result<GgufWriter> {
    let mut file = GgufWriter::default();
    text_metadata(&mut file, model_dir, config, types)?;
    vocabulary(&mut file, model_dir, config)?;
    text_tensors(&mut file, config, checkpoint, types)?;
    Ok(file)
}

fn text_metadata(
    file: &mut GgufWriter,
    model_dir: &Path,
    config: &LlavaConfig,
    types: TextTypes,
) -> Result<()> {
    let t = &config.text;
    let u32_of = |n: usize| Meta::U32(n as u32);
    let name = model_dir
        .file_name()
        .map_or("llava".into(), |n| n.to_string_lossy().into_owned());
    file.meta("general.architecture", Meta::Str("llama".into()));
    file.meta("general.type", Meta::Str("model".into()));
    file.meta("general.name", Meta::Str(name));
    file.meta("llama.block_count", u32_of(t.num_hidden_layers));
    file.meta("llama.context_length", u32_of(t.max_position_embeddings));
    file.meta("llama.embedding_length", u32_of(t.hidden_size));
    file.meta("llama.feed_forward_length", u32_of(t.intermediate_size));
    file.meta("llama.attention.head_count", u32_of(t.num_attention_heads));
    file.meta(
        "llama.attention.head_count_kv",
        u32_of(t.num_key_value_heads),
    );
    file.meta("llama.rope.freq_base", Meta::F32(t.rope_theta as f32));
    file.meta(
        "llama.attention.layer_norm_rms_epsilon",
        Meta::F32(t.rms_norm_eps as f32),
    );
    file.meta("llama.attention.key_length", u32_of(t.head_dim));
    file.meta("llama.attention.value_length", u32_of(t.head_dim));
    file.meta("general.file_type", Meta::U32(types.file_type()));
    file.meta("llama.vocab_size", u32_of(t.vocab_size));
    file.meta("llama.rope.dimension_count", u32_of(t.head_dim));
    file.meta("general.quantization_version", Meta::U32(2));
    Ok(())
}

fn text_tensors(
    file: &mut GgufWriter,
    config: &LlavaConfig,
    checkpoint: &Checkpoint,
    types: TextTypes,
) -> Result<()> {
    let t = &config.text;
    let layers = t.num_hidden_layers;
    let mut add = |name: &str, canonical: &str, role: Option<TensorRole>, heads: Option<usize>| {
        let shape = checkpoint.tensor(canonical)?.shape;
        let format = match (role, &shape[..]) {
            (Some(role), &[_, cols]) => types.format(role, layers, cols),
            _ => WeightFormat::F32,
        };
        let (shape, bytes) = tensor_bytes(
            checkpoint,
            canonical,
            format,
            types.quantizes_f16_values(),
            heads,
        )?;
        file.tensor(name, &shape, format, bytes);
        Ok::<(), Error>(())
    };
    add(
        "token_embd.weight",
        "text.embed_tokens.weight",
        Some(TensorRole::TokenEmbedding),
        None,
    )?;
    for i in 0..layers {
        for (ggml, module) in LAYER {
            let canonical = format!("text.layers.{i}.{module}.weight");
            let name = format!("blk.{i}.{ggml}.weight");
            let (role, heads) = match ggml {
                "attn_norm" | "ffn_norm" => (None, None),
                "attn_q" => (Some(TensorRole::Other), Some(t.num_attention_heads)),
                "attn_k" => (Some(TensorRole::Other), Some(t.num_key_value_heads)),
                "attn_v" => (Some(TensorRole::AttentionValue(i)), None),
                "ffn_down" => (Some(TensorRole::FeedForwardDown(i)), None),
                _ => (Some(TensorRole::Other), None),
            };
            add(&name, &canonical, role, heads)?;
        }
    }
    add("output_norm.weight", "text.norm.weight", None, None)?;
    if checkpoint.contains_canonical("lm_head.weight") {
        add(
            "output.weight",
            "lm_head.weight",
            Some(TensorRole::Output),
            None,
        )?;
    }
    Ok(())
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::File {
            path: path.to_path_buf(),
            reason: format!("not valid JSON: {e}"),
        })
}

/// The tokenizer keys, from tokenizer.json (a byte-fallback BPE, LLaMA's), with the scores a
/// SentencePiece BPE model of the same vocabulary has (docs/gguf.md: convert_hf_to_gguf.py
/// would write −1000 for every token of a checkpoint without tokenizer.model, which makes
/// llama.cpp merge leftmost pairs first): a merged token scores minus its merge's rank, single
/// characters below every merge, bytes and special tokens 0, added tokens −1000.
fn vocabulary(file: &mut GgufWriter, model_dir: &Path, config: &LlavaConfig) -> Result<()> {
    let path = model_dir.join("tokenizer.json");
    let fail = |reason: String| Error::File {
        path: path.clone(),
        reason,
    };
    let json = read_json(&path)?.ok_or_else(|| fail("tokenizer.json not found".into()))?;
    let model = &json["model"];
    if model["type"] != "BPE" || model["byte_fallback"] != true {
        return Err(fail(
            "only LLaMA's byte-fallback BPE tokenizers can be written as a GGUF vocabulary".into(),
        ));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| fail("model.vocab is not an object".into()))?;
    let mut tokens = vec![String::new(); vocab.len()];
    for (text, id) in vocab {
        let slot = id.as_u64().and_then(|i| tokens.get_mut(i as usize));
        *slot.ok_or_else(|| fail(format!("token {text:?} has id {id}")))? = text.clone();
    }
    let ranks = merge_ranks(model).map_err(fail)?;
    let config_json = read_json(&model_dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
    let added: Vec<(usize, String, bool)> = json["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| {
            let id = t["id"].as_u64()? as usize;
            Some((id, t["content"].as_str()?.to_string(), t["special"] == true))
        })
        .collect();
    let base = tokens.len();
    for (id, content, _) in &added {
        if *id >= base {
            tokens.resize(id + 1, String::new());
            tokens[*id] = content.clone();
        }
    }
    let id_of = |key: &str| -> Option<u32> {
        let text = config_json[key].as_str()?;
        tokens.iter().position(|t| t == text).map(|i| i as u32)
    };
    let [bos, eos, unk, pad] = ["bos_token", "eos_token", "unk_token", "pad_token"].map(id_of);
    let special: Vec<u32> = [bos, eos, unk, pad]
        .into_iter()
        .flatten()
        .chain(added.iter().filter(|a| a.2).map(|a| a.0 as u32))
        .collect();
    let (scores, types) = scores_and_types(&tokens, base, &ranks, &special);
    file.meta("tokenizer.ggml.model", Meta::Str("llama".into()));
    file.meta("tokenizer.ggml.pre", Meta::Str("default".into()));
    file.meta("tokenizer.ggml.tokens", Meta::Strs(tokens));
    file.meta("tokenizer.ggml.scores", Meta::F32s(scores));
    file.meta("tokenizer.ggml.token_type", Meta::I32s(types));
    let t = &config.text;
    let ids = [
        ("tokenizer.ggml.bos_token_id", bos.or(t.bos_token_id)),
        (
            "tokenizer.ggml.eos_token_id",
            eos.or(t.eos_token_id.first().copied()),
        ),
        ("tokenizer.ggml.unknown_token_id", unk),
        ("tokenizer.ggml.padding_token_id", pad),
    ];
    for (key, id) in ids {
        if let Some(id) = id {
            file.meta(key, Meta::U32(id));
        }
    }
    let add_bos = config_json["add_bos_token"].as_bool().unwrap_or(true);
    file.meta("tokenizer.ggml.add_bos_token", Meta::Bool(add_bos));
    file.meta("tokenizer.ggml.add_sep_token", Meta::Bool(false));
    if let Some(template) = chat_template(model_dir, &config_json)? {
        file.meta("tokenizer.chat_template", Meta::Str(template));
    }
    Ok(())
}

/// Merged token text → 1-based rank of the merge that makes it.
fn merge_ranks(
    model: &Value,
) -> std::result::Result<std::collections::HashMap<String, usize>, String> {
    let merges = model["merges"]
        .as_array()
        .ok_or("model.merges is not a list")?;
    let mut ranks = std::collections::HashMap::new();
    for (rank, merge) in merges.iter().enumerate() {
        let merged = match merge {
            Value::String(s) => s.replacen(' ', "", 1),
            Value::Array(pair) => pair.iter().filter_map(Value::as_str).collect(),
            other => return Err(format!("merge {other} is neither \"a b\" nor [a, b]")),
        };
        ranks.entry(merged).or_insert(rank + 1);
    }
    Ok(ranks)
}

/// Scores and GGUF token types (1 normal, 3 control, 4 user-defined, 6 byte).
fn scores_and_types(
    tokens: &[String],
    base: usize,
    ranks: &std::collections::HashMap<String, usize>,
    special: &[u32],
) -> (Vec<f32>, Vec<i32>) {
    let is_byte = |t: &str| t.len() == 6 && t.starts_with("<0x") && t.ends_with('>');
    let mut singles = 0usize;
    let mut scores = Vec::with_capacity(tokens.len());
    let mut types = Vec::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        let special = special.contains(&(id as u32));
        let (score, ty) = if id >= base {
            (-1000.0, if special { 3 } else { 4 })
        } else if is_byte(token) {
            (0.0, 6)
        } else if special {
            (0.0, 3)
        } else if let Some(&rank) = ranks.get(token) {
            (-(rank as f32), 1)
        } else {
            singles += 1;
            (-((ranks.len() + singles) as f32), 1)
        };
        scores.push(score);
        types.push(ty);
    }
    (scores, types)
}

/// The checkpoint's chat template, where `gguf.SpecialVocab` looks for it.
fn chat_template(model_dir: &Path, config_json: &Value) -> Result<Option<String>> {
    if let Some(t) = config_json["chat_template"].as_str() {
        return Ok(Some(t.to_string()));
    }
    let jinja = model_dir.join("chat_template.jinja");
    if jinja.exists() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| Error::File {
                path: jinja,
                reason: e.to_string(),
            });
    }
    Ok(read_json(&model_dir.join("chat_template.json"))?
        .and_then(|j| j["chat_template"].as_str().map(str::to_string)))
}
