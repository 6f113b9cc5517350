//! The prompt formats LLaVA-1.5 and LLaVA-NeXT checkpoints were trained with.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The text that precedes `USER:` in the original LLaVA-1.5 (vicuna_v1) conversation format.
pub const VICUNA_SYSTEM: &str =
    "A chat between a curious human and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the human's questions.";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Template {
    /// `USER: <image>\n{prompt} ASSISTANT:` (the llava-hf model cards and chat template).
    #[default]
    LlavaHf,
    /// The original LLaVA-1.5 `vicuna_v1` format: the system sentence, then the llava-hf turn.
    VicunaV1,
    /// `[INST] <image>\n{prompt} [/INST]`: llava-v1.6-mistral-7b-hf's chat template (Mistral
    /// instruct). The vicuna NeXT checkpoints use `VicunaV1`.
    MistralInst,
    /// The prompt exactly as given (it must contain `<image>` itself).
    Raw,
}

impl Template {
    pub const ALL: [Template; 4] = [
        Template::LlavaHf,
        Template::VicunaV1,
        Template::MistralInst,
        Template::Raw,
    ];

    /// The name the command line uses.
    pub fn name(self) -> &'static str {
        match self {
            Template::LlavaHf => "llava-hf",
            Template::VicunaV1 => "vicuna-v1",
            Template::MistralInst => "mistral-inst",
            Template::Raw => "raw",
        }
    }

    /// The full prompt text with one `<image>` placeholder.
    pub fn render(self, prompt: &str, image_token: &str) -> String {
        match self {
            Template::LlavaHf => format!("USER: {image_token}\n{prompt} ASSISTANT:"),
            Template::VicunaV1 => {
                format!("{VICUNA_SYSTEM} USER: {image_token}\n{prompt} ASSISTANT:")
            }
            Template::MistralInst => format!("[INST] {image_token}\n{prompt} [/INST]"),
            Template::Raw => prompt.to_string(),
        }
    }
}

impl FromStr for Template {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == text)
            .ok_or_else(|| {
                Error::argument(
                    "template",
                    format!("'{text}' is not one of llava-hf, vicuna-v1, mistral-inst, raw"),
                )
            })
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_place_the_image_before_the_question() {
        assert_eq!(
            Template::LlavaHf.render("What is this?", "<image>"),
            "USER: <image>\nWhat is this? ASSISTANT:"
        );
        let v = Template::VicunaV1.render("Q", "<image>");
        assert!(v.starts_with("A chat between") && v.ends_with("USER: <image>\nQ ASSISTANT:"));
        assert_eq!(
            Template::MistralInst.render("Q", "<image>"),
            "[INST] <image>\nQ [/INST]"
        );
    }
}
