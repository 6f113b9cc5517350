//! A GGUF file's vocabulary gives the ids llama.cpp gives, recorded from llama.cpp's own
//! `llama-tokenize` (and text from its `llama_detokenize`) by scripts/tokenizer_fixtures.py:
//! a SentencePiece BPE model trained with the `sentencepiece` package (`spm.gguf`), the same
//! vocabulary with the flat scores llama.cpp's converter writes for tokenizer.json-only
//! checkpoints (`spm_flat.gguf`), and a byte-level BPE with the LLaMA-3 and the default
//! pre-tokenizers (`bpe.gguf`, `bpe_default.gguf`), over awkward texts: runs of spaces,
//! newlines, digits, non-ASCII, byte fallback, special tokens in every position.

use std::collections::HashMap;
use std::path::PathBuf;

use llava_wgpu::model::gguf::file::GgufFile;
use llava_wgpu::model::gguf::metadata;
use llava_wgpu::text::TextTokenizer;
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixture/tokenizers")
}

fn cases() -> Value {
    let text = std::fs::read_to_string(fixture_dir().join("cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The tokenizer of each fixture file, with the placeholder id past the vocabulary as the
/// engine gives one to a vocabulary without `<image>`.
fn tokenizers() -> HashMap<String, TextTokenizer> {
    ["spm.gguf", "spm_flat.gguf", "bpe.gguf", "bpe_default.gguf"]
        .into_iter()
        .map(|name| {
            let file = GgufFile::open(&fixture_dir().join(name)).unwrap();
            let vocab = metadata::vocab(&file).unwrap();
            let image = vocab
                .tokens
                .iter()
                .position(|t| t == "<image>")
                .unwrap_or(vocab.tokens.len()) as u32;
            (
                name.to_string(),
                TextTokenizer::from_vocab(vocab, image).unwrap(),
            )
        })
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap() as u32)
        .collect()
}

/// The engine parses special tokens written in text, as llama.cpp does by default; every such
/// case, with and without BOS, gives llama.cpp's ids.
#[test]
fn ids_match_llama_cpp_on_awkward_text() {
    let tokenizers = tokenizers();
    let cases = cases();
    let mut checked = HashMap::<String, usize>::new();
    let mut failures = Vec::new();
    for case in cases["cases"].as_array().unwrap() {
        if !case["parse_special"].as_bool().unwrap() {
            continue;
        }
        let file = case["file"].as_str().unwrap();
        let text = case["text"].as_str().unwrap();
        let bos = case["bos"].as_bool().unwrap();
        let want = ids(&case["llama_cpp_ids"]);
        let got = tokenizers[file].encode(text, bos).unwrap();
        if got != want {
            failures.push(format!(
                "{file} {text:?} bos={bos}: got {got:?}, llama.cpp {want:?}"
            ));
        }
        *checked.entry(file.to_string()).or_default() += 1;
    }
    assert!(
        failures.is_empty(),
        "{} cases differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    for file in ["spm.gguf", "spm_flat.gguf", "bpe.gguf", "bpe_default.gguf"] {
        assert!(
            checked.get(file).copied().unwrap_or(0) > 50,
            "{file}: {checked:?}"
        );
    }
}

/// Decoding drops control and unused tokens, turns byte tokens into bytes and "▁" into
/// spaces, and removes the first piece's space prefix unless the ids start with BOS, as
/// `llama_detokenize(remove_special = true, unparse_special = false)` does.
#[test]
fn text_matches_llama_cpps_detokenizer() {
    let tokenizers = tokenizers();
    let cases = cases();
    let mut checked = 0;
    for entry in cases["detokenize"].as_array().unwrap() {
        let remove = entry["remove_special"].as_bool().unwrap();
        let unparse = entry["unparse_special"].as_bool().unwrap();
        let (Some(text), true, false) = (entry["text"].as_str(), remove, unparse) else {
            continue;
        };
        let file = entry["file"].as_str().unwrap();
        if !file.starts_with("spm") {
            continue; // BPE text goes through the tokenizers crate's byte-level decoder.
        }
        let got = tokenizers[file].decode(&ids(&entry["ids"])).unwrap();
        assert_eq!(got, text, "{file} {}: ids {}", entry["what"], entry["ids"]);
        checked += 1;
    }
    assert!(checked > 20, "only {checked} detokenize cases");
}

/// docs/gguf.md's rule: llama.cpp's SentencePiece ids equal transformers' `legacy=True`
/// tokenizer of the same model (recorded beside them), except where a text fragment (the text
/// between special tokens) already starts with a space or "▁", where llama.cpp adds its "▁"
/// anyway and transformers does not.
#[test]
fn llama_cpp_equals_transformers_legacy_but_for_leading_spaces() {
    let specials = ["<unk>", "<s>", "</s>", "<image>", "<pad>"];
    let cases = cases();
    let mut checked = 0;
    for case in cases["cases"].as_array().unwrap() {
        let hf = &case["hf_legacy_ids"];
        if case["file"] != "spm.gguf" || hf.is_null() || case["parse_special"] != true {
            continue;
        }
        let mut text = case["text"].as_str().unwrap().to_string();
        for special in specials {
            text = text.replace(special, "\0");
        }
        let leading_space = text
            .split('\0')
            .any(|f| f.starts_with(' ') || f.starts_with('\u{2581}'));
        let same = ids(hf) == ids(&case["llama_cpp_ids"]);
        assert_eq!(same, !leading_space, "{:?}: {case}", case["text"]);
        checked += 1;
    }
    assert!(checked > 50, "{checked} cases");
}
