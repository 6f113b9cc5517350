//! `tokenizer.json` through the `tokenizers` crate, BOS handled as transformers handles it, or a
//! GGUF file's vocabulary tokenized as llama.cpp does (`vocab.rs`, `bpe.rs`); and the `<image>`
//! placeholder expanded to one id per visual token.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::text::bpe;
use crate::text::vocab::{Spm, Vocab, VocabKind};

/// Which implementation tokenizes.
enum Backend {
    /// transformers' tokenizer.json: BOS added unless its post-processor already did.
    Hf(Tokenizer),
    /// A GGUF BPE vocabulary, as a tokenizers tokenizer: BOS always added when the vocabulary
    /// asks for it, as llama.cpp does (even before a BOS written in the text).
    Bpe(Tokenizer),
    /// A GGUF SentencePiece vocabulary, as llama.cpp tokenizes it.
    Spm(Box<Spm>),
}

pub struct TextTokenizer {
    backend: Backend,
    path: PathBuf,
    pub bos_id: Option<u32>,
    /// Whether the checkpoint wants BOS (tokenizer_config.json `add_bos_token`, default true for
    /// LLaMA); added only if the tokenizer.json post-processor has not already added it.
    pub add_bos: bool,
    pub image_token: String,
    pub image_token_id: u32,
}

/// A prompt as ids, with where each image's rows sit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedPrompt {
    /// Ids with each placeholder expanded to its image's rows of the image token id.
    pub ids: Vec<u32>,
    /// The images' rows in `ids`, in order.
    pub images: Vec<ImageSpan>,
}

/// The rows one image takes in a prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageSpan {
    /// Index of its first row.
    pub start: usize,
    pub len: usize,
}

impl ImageSpan {
    /// One past its last row.
    pub fn end(&self) -> usize {
        self.start + self.len
    }
}

impl EncodedPrompt {
    /// Ids after the last image (all of them when there is none): the text that scores stage 2.
    pub fn text_after_images(&self) -> usize {
        self.ids.len() - self.images.last().map_or(0, ImageSpan::end)
    }

    /// Ids that are not image rows.
    pub fn text_tokens(&self) -> usize {
        self.ids.len() - self.images.iter().map(|s| s.len).sum::<usize>()
    }

    /// Shorten image `index` to its first `len` rows (dropping its last ones), moving the
    /// images after it up.
    pub fn shrink_image(&mut self, index: usize, len: usize) {
        let span = self.images[index];
        let dropped = span.len - len;
        self.ids.drain(span.end() - dropped..span.end());
        self.images[index].len = len;
        for later in &mut self.images[index + 1..] {
            later.start -= dropped;
        }
    }
}

impl TextTokenizer {
    pub fn load(model_dir: &Path, image_token_id: u32, bos_id: Option<u32>) -> Result<Self> {
        let path = model_dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::File {
                path,
                reason: "tokenizer.json not found".into(),
            });
        }
        let mut tokenizer = Tokenizer::from_file(&path).map_err(|e| Error::File {
            path: path.clone(),
            reason: format!("cannot load the tokenizer: {e}"),
        })?;
        without_word_cache(&mut tokenizer);
        let config_path = model_dir.join("tokenizer_config.json");
        let config: serde_json::Value = std::fs::read_to_string(&config_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null);
        let add_bos = config
            .get("add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        let image_token = tokenizer
            .id_to_token(image_token_id)
            .ok_or_else(|| Error::File {
                path: path.clone(),
                reason: format!(
                    "the image token id {image_token_id} from config.json is not in the vocabulary"
                ),
            })?;
        Ok(Self {
            backend: Backend::Hf(tokenizer),
            path,
            bos_id,
            add_bos,
            image_token,
            image_token_id,
        })
    }

    /// The tokenizer of a GGUF vocabulary, tokenizing as llama.cpp does. `image_token_id` is
    /// the `<image>` token's id, or an id past the vocabulary when it has none: the placeholder
    /// is then split out of the prompt like a special token.
    pub fn from_vocab(vocab: Vocab, image_token_id: u32) -> Result<Self> {
        let image = ("<image>", image_token_id);
        let path = vocab.source.clone();
        let (bos_id, add_bos) = (vocab.bos, vocab.add_bos);
        let backend = match vocab.kind {
            VocabKind::Spm => Backend::Spm(Box::new(Spm::new(vocab, &[image]))),
            VocabKind::Bpe { .. } => {
                let mut tokenizer = bpe::tokenizer(&vocab, &[image])?;
                without_word_cache(&mut tokenizer);
                Backend::Bpe(tokenizer)
            }
        };
        Ok(Self {
            backend,
            path,
            bos_id,
            add_bos,
            image_token: image.0.into(),
            image_token_id,
        })
    }

    /// A word-level tokenizer for synthetic benchmark models: `<unk>` = 0, `<s>` = 1, `</s>` = 2,
    /// `<image>` = `image_token_id`, and the word `t{i}` for every other id.
    pub fn synthetic(vocab_size: usize, image_token_id: u32) -> Result<Self> {
        let mut vocab = serde_json::Map::new();
        for id in 0..vocab_size as u32 {
            let word = match id {
                0 => "<unk>".to_string(),
                1 => "<s>".to_string(),
                2 => "</s>".to_string(),
                i if i == image_token_id => "<image>".to_string(),
                i => format!("t{i}"),
            };
            vocab.insert(word, id.into());
        }
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [{"id": image_token_id, "content": "<image>", "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
        });
        let path = PathBuf::from("synthetic tokenizer");
        let tokenizer: Tokenizer = json.to_string().parse().map_err(|e| Error::File {
            path: path.clone(),
            reason: format!("cannot build: {e}"),
        })?;
        Ok(Self {
            backend: Backend::Hf(tokenizer),
            path,
            bos_id: Some(1),
            add_bos: true,
            image_token: "<image>".into(),
            image_token_id,
        })
    }

    pub fn vocab_size(&self) -> usize {
        match &self.backend {
            Backend::Hf(t) | Backend::Bpe(t) => t.get_vocab_size(true),
            Backend::Spm(spm) => spm.vocab().tokens.len(),
        }
    }

    /// The ids of `text`; with `add_special`, with BOS where the checkpoint wants it (added
    /// only if the tokenizer's own post-processor has not). Special tokens written in the text
    /// are parsed.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let (tokenizer, always_bos) = match &self.backend {
            Backend::Spm(spm) => return Ok(spm.encode(text, add_special)),
            Backend::Hf(tokenizer) => (tokenizer, false),
            Backend::Bpe(tokenizer) => (tokenizer, true),
        };
        let encoding = tokenizer
            .encode(text, add_special)
            .map_err(|e| Error::File {
                path: self.path.clone(),
                reason: format!("cannot tokenize the prompt: {e}"),
            })?;
        let mut ids: Vec<u32> = encoding.get_ids().to_vec();
        if self.add_bos && add_special {
            if let Some(bos) = self.bos_id {
                if always_bos || ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// Tokenize `text` and expand its image placeholders, in order, to `image_rows[i]` ids
    /// each. The placeholders must be as many as the images.
    pub fn encode_with_images(&self, text: &str, image_rows: &[usize]) -> Result<EncodedPrompt> {
        self.expand_images(&self.encode(text, true)?, image_rows)
    }

    /// `raw` ids (one placeholder id per image) with placeholder `i` expanded to `image_rows[i]`
    /// ids. The placeholders must be as many as the images.
    pub fn expand_images(&self, raw: &[u32], image_rows: &[usize]) -> Result<EncodedPrompt> {
        let placeholders = raw.iter().filter(|&&id| id == self.image_token_id).count();
        if placeholders != image_rows.len() {
            return Err(Error::argument(
                "prompt",
                format!(
                    "the prompt holds {placeholders} image placeholder(s) {} after templating, for {} image(s)",
                    self.image_token,
                    image_rows.len()
                ),
            ));
        }
        let total_rows: usize = image_rows.iter().sum();
        let mut ids = Vec::with_capacity(raw.len() + total_rows);
        let mut images = Vec::with_capacity(image_rows.len());
        let mut rows = image_rows.iter();
        for &id in raw {
            if id != self.image_token_id {
                ids.push(id);
                continue;
            }
            let len = *rows.next().expect("counted above");
            images.push(ImageSpan {
                start: ids.len(),
                len,
            });
            ids.extend(std::iter::repeat_n(self.image_token_id, len));
        }
        Ok(EncodedPrompt { ids, images })
    }

    /// [`encode_with_images`](Self::encode_with_images) for a prompt with exactly one image.
    pub fn encode_with_image(&self, text: &str, image_tokens: usize) -> Result<EncodedPrompt> {
        self.encode_with_images(text, &[image_tokens])
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.backend {
            Backend::Spm(spm) => Ok(spm.decode(ids)),
            Backend::Hf(tokenizer) | Backend::Bpe(tokenizer) => {
                tokenizer.decode(ids, true).map_err(|e| Error::File {
                    path: self.path.clone(),
                    reason: format!("cannot decode ids: {e}"),
                })
            }
        }
    }

    pub fn token_text(&self, id: u32) -> Option<String> {
        match &self.backend {
            Backend::Spm(spm) => spm.vocab().tokens.get(id as usize).cloned(),
            Backend::Hf(tokenizer) | Backend::Bpe(tokenizer) => tokenizer.id_to_token(id),
        }
    }

    /// The bytes token `id` stands for in decoded text, whatever the vocabulary writes: a
    /// SentencePiece "▁" is a space, a byte-fallback token `<0xE2>` its byte, a byte-level BPE
    /// piece the bytes GPT-2's alphabet maps it back to. Special tokens are their own text.
    /// (OpenAI's logprob `token` and `bytes`.) Empty past the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let (tokenizer, byte_level) = match &self.backend {
            Backend::Spm(spm) => return spm.piece_bytes(id).unwrap_or_default(),
            Backend::Bpe(tokenizer) => (tokenizer, true),
            Backend::Hf(tokenizer) => (
                tokenizer,
                matches!(
                    tokenizer.get_decoder(),
                    Some(tokenizers::DecoderWrapper::ByteLevel(_))
                ),
            ),
        };
        let Some(piece) = tokenizer.id_to_token(id) else {
            return Vec::new();
        };
        if let Some(byte) = crate::text::vocab::byte_of(&piece) {
            return vec![byte];
        }
        if byte_level {
            return piece.chars().map(byte_level_byte).collect();
        }
        piece.replace('\u{2581}', " ").into_bytes()
    }
}

/// Turn off a BPE model's word cache. It keeps every word it tokenizes (up to 10,000): with a
/// SentencePiece-style pre-tokenizer that does not split, a "word" is a whole prompt segment, so
/// a server's cache grew by kilobytes per request until it was full (found with heaptrack on
/// `bench serve`'s soak: 3.4 KB per request). Prompts rarely repeat, so it saved little.
fn without_word_cache(tokenizer: &mut Tokenizer) {
    if let tokenizers::ModelWrapper::BPE(bpe) = tokenizer.get_model() {
        let mut bpe = bpe.clone();
        bpe.resize_cache(0);
        tokenizer.with_model(bpe);
    }
}

/// The byte GPT-2's byte-level alphabet writes as `c`: printable bytes stand for themselves,
/// the others were moved to U+0100 onwards in byte order. A char outside the alphabet (an
/// added token's text) keeps its UTF-8 bytes' first.
fn byte_level_byte(c: char) -> u8 {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let code = c as u32;
    if code < 256 && printable(code) {
        return code as u8;
    }
    // The n-th non-printable byte (in byte order) became U+0100 + n.
    let mut n = 256;
    for b in 0..=255u32 {
        if !printable(b) {
            if n == code {
                return b as u8;
            }
            n += 1;
        }
    }
    c.to_string().as_bytes()[0]
}

/// Turns a growing list of generated ids into text increments: decodes the whole tail each step
/// and emits only what is new and complete (no dangling partial UTF-8 from byte-fallback tokens).
pub struct StreamDecoder {
    ids: Vec<u32>,
    emitted: String,
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self {
            ids: Vec::new(),
            emitted: String::new(),
        }
    }

    /// Add one token; returns the new text to print (possibly empty).
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = tokenizer.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') || !text.starts_with(&self.emitted) {
            return Ok(String::new());
        }
        let new = text[self.emitted.len()..].to_string();
        self.emitted = text;
        Ok(new)
    }

    /// Everything decoded so far.
    pub fn text(&self) -> &str {
        &self.emitted
    }
}
