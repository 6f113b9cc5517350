//! A vocabulary as a GGUF file stores it (`tokenizer.ggml.*`), and llama.cpp's SentencePiece
//! tokenizer over it, so that a GGUF model gets exactly the ids llama.cpp gives.
//!
//! llama.cpp's SPM tokenizer (`llm_tokenizer_spm` in src/llama-vocab.cpp) is not
//! SentencePiece's: it starts from UTF-8 characters and repeatedly merges the adjacent pair
//! whose concatenation is a token with the highest score (ties: the leftmost pair), and falls
//! back to `<0xXX>` byte tokens for characters that are no token. Special tokens (control,
//! user-defined and unknown types) are split out of the text first, longest first, and every
//! text fragment that follows one (or starts the text) gets a space in front when the vocabulary
//! asks for a space prefix. That is transformers' `legacy=True` Llama tokenizer: one token more
//! after `<image>` than `legacy=False` gives ("▁" before the newline). docs/gguf.md states the
//! rule; tests/gguf_tokenizer.rs checks ids recorded from llama.cpp's own `llama-tokenize`.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::path::PathBuf;

/// `tokenizer.ggml.token_type` (llama.h `llama_token_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    pub fn from_gguf(value: i64) -> Option<Self> {
        Some(match value {
            // 0 is llama.h's UNDEFINED, which llama.cpp treats as normal text.
            0 | 1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => return None,
        })
    }

    /// Split out of text before tokenizing (llama.cpp's special-token cache).
    fn is_special(self) -> bool {
        matches!(
            self,
            TokenType::Control | TokenType::UserDefined | TokenType::Unknown
        )
    }
}

/// Which tokenizer a vocabulary is for.
#[derive(Clone, Debug, PartialEq)]
pub enum VocabKind {
    /// `tokenizer.ggml.model` "llama": SentencePiece pieces and scores.
    Spm,
    /// "gpt2": byte-level BPE with merges and the pre-tokenizer `pre` names.
    Bpe { pre: String, merges: Vec<String> },
}

/// The vocabulary of a GGUF text model.
#[derive(Clone, Debug)]
pub struct Vocab {
    /// The file it came from (for errors).
    pub source: PathBuf,
    pub kind: VocabKind,
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub types: Vec<TokenType>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
}

/// llama.cpp's SentencePiece tokenizer over a [`Vocab`].
pub struct Spm {
    vocab: Vocab,
    ids: HashMap<String, u32>,
    /// Special tokens as split out of text, longest first: the vocabulary's control,
    /// user-defined and unknown tokens, and any placeholder given to [`Spm::new`].
    specials: Vec<(String, u32)>,
}

/// A piece of text between special tokens, or a special token.
enum Fragment {
    Text(String),
    Token(u32),
}

/// A candidate merge of two adjacent symbols (llama.cpp's `llm_bigram_spm`).
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The heap pops the greatest: the highest score, then the leftmost pair.
impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// A run of text in the working string: `start..start + len` bytes, linked to its neighbours.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl Spm {
    /// The tokenizer of `vocab`, with `extra_specials` (text, id) split out of text like the
    /// vocabulary's own special tokens (the `<image>` placeholder of a vocabulary without one).
    pub fn new(vocab: Vocab, extra_specials: &[(&str, u32)]) -> Self {
        let mut ids = HashMap::with_capacity(vocab.tokens.len());
        for (id, token) in vocab.tokens.iter().enumerate() {
            // llama.cpp's token_to_id map: the last of equal texts wins.
            ids.insert(token.clone(), id as u32);
        }
        let mut specials: Vec<(String, u32)> = vocab
            .tokens
            .iter()
            .zip(&vocab.types)
            .enumerate()
            .filter(|(_, (token, ty))| ty.is_special() && !token.is_empty())
            .map(|(id, (token, _))| (token.clone(), id as u32))
            .collect();
        for &(text, id) in extra_specials {
            if !ids.contains_key(text) {
                specials.push((text.to_string(), id));
            }
        }
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        Self {
            vocab,
            ids,
            specials,
        }
    }

    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    /// The ids of `text`, with BOS (and EOS) as the vocabulary asks when `add_special`.
    pub fn encode(&self, text: &str, add_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if add_special && self.vocab.add_bos {
            out.extend(self.vocab.bos);
        }
        let mut prev_special = true;
        for fragment in self.partition(text) {
            match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(raw) => {
                    let mut text = String::with_capacity(raw.len() + 3);
                    if self.vocab.add_space_prefix && prev_special {
                        text.push(' ');
                    }
                    text.push_str(&raw);
                    self.tokenize_piece(&text.replace(' ', "\u{2581}"), &mut out);
                    prev_special = false;
                }
            }
        }
        if add_special && self.vocab.add_eos {
            out.extend(self.vocab.eos);
        }
        out
    }

    /// `text` cut at every occurrence of a special token, longest tokens first
    /// (`tokenizer_st_partition`).
    fn partition(&self, text: &str) -> Vec<Fragment> {
        let mut fragments = vec![Fragment::Text(text.to_string())];
        for (special, id) in &self.specials {
            let mut next = Vec::with_capacity(fragments.len());
            for fragment in fragments {
                let Fragment::Text(raw) = fragment else {
                    next.push(fragment);
                    continue;
                };
                let mut rest = raw.as_str();
                while let Some(at) = rest.find(special.as_str()) {
                    if at > 0 {
                        next.push(Fragment::Text(rest[..at].to_string()));
                    }
                    next.push(Fragment::Token(*id));
                    rest = &rest[at + special.len()..];
                }
                if !rest.is_empty() {
                    next.push(Fragment::Text(rest.to_string()));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// One escaped text fragment (`llm_tokenizer_spm_session::tokenize`).
    fn tokenize_piece(&self, text: &str, out: &mut Vec<u32>) {
        let mut symbols: Vec<Symbol> = text
            .char_indices()
            .enumerate()
            .map(|(i, (start, c))| Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: Some(i + 1),
            })
            .collect();
        if let Some(last) = symbols.last_mut() {
            last.next = None;
        }
        let mut queue = BinaryHeap::new();
        for i in 1..symbols.len() {
            self.push_bigram(text, &symbols, Some(i - 1), Some(i), &mut queue);
        }
        while let Some(bigram) = queue.pop() {
            let (left, right) = (symbols[bigram.left], symbols[bigram.right]);
            // Stale: one side was merged away, or grew since the pair was queued.
            if left.len == 0 || right.len == 0 || left.len + right.len != bigram.size {
                continue;
            }
            symbols[bigram.left].len += right.len;
            symbols[bigram.right].len = 0;
            symbols[bigram.left].next = right.next;
            if let Some(next) = right.next {
                symbols[next].prev = Some(bigram.left);
            }
            self.push_bigram(text, &symbols, left.prev, Some(bigram.left), &mut queue);
            self.push_bigram(text, &symbols, Some(bigram.left), right.next, &mut queue);
        }
        let mut at = (!symbols.is_empty()).then_some(0);
        while let Some(i) = at {
            let s = symbols[i];
            self.resegment(&text[s.start..s.start + s.len], out);
            at = s.next;
        }
    }

    fn push_bigram(
        &self,
        text: &str,
        symbols: &[Symbol],
        left: Option<usize>,
        right: Option<usize>,
        queue: &mut BinaryHeap<Bigram>,
    ) {
        let (Some(left), Some(right)) = (left, right) else {
            return;
        };
        let (l, r) = (symbols[left], symbols[right]);
        let merged = &text[l.start..r.start + r.len];
        if let Some(&id) = self.ids.get(merged) {
            queue.push(Bigram {
                left,
                right,
                score: self.vocab.scores[id as usize],
                size: merged.len(),
            });
        }
    }

    /// A final symbol: its token, or its bytes as `<0xXX>` tokens. Every merged symbol is a
    /// token, so only single characters fall back to bytes.
    fn resegment(&self, piece: &str, out: &mut Vec<u32>) {
        if let Some(&id) = self.ids.get(piece) {
            out.push(id);
            return;
        }
        for byte in piece.bytes() {
            let hex = format!("<0x{byte:02X}>");
            let single = (byte as char).to_string();
            let id = self
                .ids
                .get(&hex)
                .or_else(|| byte.is_ascii().then(|| self.ids.get(&single)).flatten())
                .copied()
                .or(self.vocab.unk);
            out.extend(id);
        }
    }

    /// Text of `ids` as llama.cpp's `detokenize` gives it without special tokens: pieces with
    /// "▁" as spaces, byte tokens as bytes, control, unknown and unused tokens dropped, and the
    /// space prefix removed from the first token's piece, unless the ids start with BOS (which
    /// is dropped then, and the space kept).
    /// The bytes token `id` stands for in text ("▁" is a space, a byte token its byte, a
    /// control token nothing); None past the vocabulary.
    pub fn piece_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let token = self.vocab.tokens.get(id as usize)?;
        Some(match self.vocab.types[id as usize] {
            TokenType::Normal => token.replace('\u{2581}', " ").into_bytes(),
            TokenType::UserDefined => token.clone().into_bytes(),
            TokenType::Byte => byte_of(token).map(|b| vec![b]).unwrap_or_default(),
            TokenType::Control | TokenType::Unknown | TokenType::Unused => Vec::new(),
        })
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        let mut first = self.vocab.add_space_prefix;
        let mut ids = ids;
        if self.vocab.add_bos && self.vocab.bos.is_some() && ids.first() == self.vocab.bos.as_ref()
        {
            ids = &ids[1..];
            first = false;
        }
        for &id in ids {
            let Some(piece) = self.piece_bytes(id) else {
                continue;
            };
            let piece = if first {
                piece.strip_prefix(b" ").unwrap_or(&piece).to_vec()
            } else {
                piece
            };
            first = false;
            bytes.extend(piece);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// The byte a `<0xXX>` token stands for.
pub(crate) fn byte_of(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(tokens: &[(&str, f32, TokenType)]) -> Vocab {
        Vocab {
            source: PathBuf::from("test"),
            kind: VocabKind::Spm,
            tokens: tokens.iter().map(|t| t.0.to_string()).collect(),
            scores: tokens.iter().map(|t| t.1).collect(),
            types: tokens.iter().map(|t| t.2).collect(),
            bos: Some(1),
            eos: Some(2),
            unk: Some(0),
            add_bos: true,
            add_eos: false,
            add_space_prefix: true,
        }
    }

    /// A hand-made vocabulary whose merges are decided by score, not by position.
    #[test]
    fn merges_follow_scores_then_position_and_bytes_fall_back() {
        use TokenType::*;
        let spm = Spm::new(
            vocab(&[
                ("<unk>", 0.0, Unknown),
                ("<s>", 0.0, Control),
                ("</s>", 0.0, Control),
                ("\u{2581}", -1.0, Normal),
                ("a", -1.0, Normal),
                ("b", -1.0, Normal),
                ("ab", -5.0, Normal),
                ("\u{2581}a", -3.0, Normal),
                ("<0x0A>", 0.0, Byte),
                ("<image>", 0.0, UserDefined),
            ]),
            &[],
        );
        // "▁ab": "▁a" (−3) beats "ab" (−5); then "▁a"+"b" is no token.
        assert_eq!(spm.encode("ab", true), [1, 7, 5]);
        // The newline has no piece: its byte token. After a special token, a space prefix.
        assert_eq!(spm.encode("a<image>\n", false), [7, 9, 3, 8]);
        assert_eq!(spm.decode(&[7, 5, 8]), "ab\n");
    }
}
