//! A GGUF `gpt2` vocabulary (byte-level BPE) as a `tokenizers` tokenizer: the merges as ranked,
//! the pre-tokenizer regexes llama.cpp runs for the vocabulary's `tokenizer.ggml.pre` name
//! (src/llama-vocab.cpp, `llm_tokenizer_bpe`), applied in sequence as llama.cpp applies them,
//! then the GPT-2 byte-to-unicode mapping; control, user-defined and unknown tokens are split
//! out of text first.

use serde_json::{json, Value};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::text::vocab::{TokenType, Vocab, VocabKind};

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The regexes llama.cpp splits text with for the pre-tokenizer `pre`, and whether whole
/// words that are tokens skip the merges (`ignore_merges`).
fn pre_tokenizer(pre: &str) -> Option<(Vec<&'static str>, bool)> {
    Some(match pre {
        "default" => (
            vec![r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe" => {
            (vec![LLAMA3], true)
        }
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" => (vec![QWEN2], false),
        "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "roberta-bpe" => (vec![GPT2], false),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" => {
            (vec![r"\p{N}", GPT2], false)
        }
        "falcon" => (
            vec![r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"],
            false,
        ),
        _ => return None,
    })
}

/// The tokenizer of a BPE `vocab`, with `extra_specials` added as special tokens.
pub fn tokenizer(vocab: &Vocab, extra_specials: &[(&str, u32)]) -> Result<Tokenizer> {
    let VocabKind::Bpe { pre, merges } = &vocab.kind else {
        return Err(Error::argument("vocab", "not a BPE vocabulary"));
    };
    let fail = |reason: String| Error::File {
        path: vocab.source.clone(),
        reason,
    };
    let (regexes, ignore_merges) = pre_tokenizer(pre).ok_or_else(|| {
        fail(format!(
            "metadata 'tokenizer.ggml.pre' is '{pre}', a pre-tokenizer this engine does not know"
        ))
    })?;
    let mut splits: Vec<Value> = regexes
        .iter()
        .map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}))
        .collect();
    splits.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}));
    let vocab_map: serde_json::Map<String, Value> = vocab
        .tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), json!(id)))
        .collect();
    let mut added: Vec<Value> = vocab
        .tokens
        .iter()
        .zip(&vocab.types)
        .enumerate()
        .filter(|(_, (_, ty))| {
            matches!(
                ty,
                TokenType::Control | TokenType::UserDefined | TokenType::Unknown
            )
        })
        .map(|(id, (content, _))| added_token(id as u32, content))
        .collect();
    for &(content, id) in extra_specials {
        if !vocab.tokens.iter().any(|t| t == content) {
            added.push(added_token(id, content));
        }
    }
    let merges: Vec<Value> = merges.iter().map(|m| json!(m)).collect();
    let json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": splits},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": ignore_merges, "vocab": vocab_map, "merges": merges,
        },
    });
    json.to_string().parse().map_err(|e| {
        fail(format!(
            "cannot build the BPE tokenizer from its metadata: {e}"
        ))
    })
}

fn added_token(id: u32, content: &str) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false,
           "rstrip": false, "normalized": false, "special": true})
}
