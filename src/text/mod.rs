//! Text in and out: the tokenizer (tokenizer.json, or a GGUF file's vocabulary tokenized as
//! llama.cpp does) and the chat templates.

mod bpe;
pub mod template;
pub mod tokenizer;
pub mod vocab;

pub use template::{Message, Role, Template};
pub use tokenizer::{EncodedPrompt, ImageSpan, StreamDecoder, TextTokenizer};
