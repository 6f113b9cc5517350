//! Text in and out: the tokenizer and the chat templates.

pub mod template;
pub mod tokenizer;

pub use template::{Message, Role, Template};
pub use tokenizer::{EncodedPrompt, StreamDecoder, TextTokenizer};
