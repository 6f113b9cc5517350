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

    /// The format a Jinja chat template (a GGUF file's `tokenizer.chat_template`) renders,
    /// recognised by the text it writes, the way llama.cpp recognises templates without running
    /// them: `[INST]` is Mistral's instruct format; a role written in capitals before a colon
    /// (`USER: `, or llava-hf's `message['role'].upper() + ': '`) with `ASSISTANT` is LLaVA's
    /// format, with the vicuna system sentence if the template holds it. Anything else falls
    /// back to LLaVA-1.5's llava-hf format.
    pub fn recognise(jinja: &str) -> Self {
        let lavalike =
            jinja.contains("ASSISTANT") && (jinja.contains("USER") || jinja.contains(".upper()"));
        if jinja.contains("[INST]") {
            Template::MistralInst
        } else if lavalike && jinja.contains("A chat between a curious") {
            Template::VicunaV1
        } else {
            Template::LlavaHf
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

/// Who said a message of a conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One message of a conversation: its text and how many images open it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub text: String,
    /// Images attached to the message: one placeholder each, before the text (as llava-hf's
    /// chat template renders them). The raw template ignores it (its text holds placeholders).
    pub images: usize,
}

impl Message {
    /// A message with no image.
    pub fn new(role: Role, text: impl Into<String>) -> Self {
        Self::with_images(role, text, 0)
    }

    /// A message that opens with `images` images.
    pub fn with_images(role: Role, text: impl Into<String>, images: usize) -> Self {
        Self {
            role,
            text: text.into(),
            images,
        }
    }

    /// `image_token` followed by a newline once per image, as the message's text starts.
    fn placeholders(&self, image_token: &str) -> String {
        format!("{image_token}\n").repeat(self.images)
    }
}

impl Template {
    /// A whole conversation, each message's image placeholders at its start, and the assistant
    /// prefix the next answer follows. For one user message with one image this is exactly
    /// [`Template::render`]; a message with no image has no placeholder (a text-only turn). The
    /// llava-hf form follows the checkpoints' `chat_template.jinja` (`ROLE: ` before every
    /// non-system message, `<image>\n` per image first, a space after every text); vicuna-v1
    /// ends an assistant answer with `</s>` as the original LLaVA conversations do. `raw` takes
    /// one user message holding its placeholders itself. mistral-inst wraps each user message
    /// in `[INST] … [/INST]` and ends each answer with `</s>` (Mistral's instruct format; system
    /// messages are not part of it and are dropped).
    pub fn render_conversation(self, messages: &[Message], image_token: &str) -> Result<String> {
        if self == Template::Raw {
            return match messages {
                [Message {
                    role: Role::User,
                    text,
                    ..
                }] => Ok(text.clone()),
                _ => Err(Error::argument(
                    "template",
                    "the raw template takes exactly one user message; use llava-hf or vicuna-v1 for a conversation",
                )),
            };
        }
        if self == Template::MistralInst {
            return Ok(mistral_conversation(messages, image_token));
        }
        let mut out = String::new();
        if self == Template::VicunaV1 {
            out.push_str(VICUNA_SYSTEM);
            out.push(' ');
        }
        for message in messages {
            match message.role {
                Role::System => {}
                Role::User => out.push_str("USER: "),
                Role::Assistant => out.push_str("ASSISTANT: "),
            }
            out.push_str(&message.placeholders(image_token));
            out.push_str(&message.text);
            if message.role == Role::Assistant && self == Template::VicunaV1 {
                out.push_str("</s>");
            } else {
                out.push(' ');
            }
        }
        out.push_str("ASSISTANT:");
        Ok(out)
    }
}

/// Mistral instruct: `[INST] {images}{question} [/INST] {answer}</s>[INST] …`.
fn mistral_conversation(messages: &[Message], image_token: &str) -> String {
    let mut out = String::new();
    for message in messages {
        match message.role {
            Role::System => {}
            Role::User => {
                out.push_str("[INST] ");
                out.push_str(&message.placeholders(image_token));
                out.push_str(&message.text);
                out.push_str(" [/INST]");
            }
            Role::Assistant => {
                out.push(' ');
                out.push_str(&message.text);
                out.push_str("</s>");
            }
        }
    }
    out
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

    /// The chat templates the shipped llava-hf fixtures carry, as a GGUF converter copies them.
    #[test]
    fn chat_templates_are_recognised() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/weights/");
        let read = |dir: &str| {
            std::fs::read_to_string(format!("{root}{dir}/chat_template.jinja")).unwrap()
        };
        assert_eq!(
            Template::recognise(&read("tiny-random-llava")),
            Template::LlavaHf
        );
        assert_eq!(
            Template::recognise(&read("tiny-random-llava-next-mistral")),
            Template::MistralInst
        );
        assert_eq!(
            Template::recognise(&read("tiny-random-llava-next")),
            Template::VicunaV1
        );
        assert_eq!(Template::recognise("{{ messages }}"), Template::LlavaHf);
    }

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

    #[test]
    fn one_user_message_renders_as_the_single_turn_prompt() {
        for template in Template::ALL {
            let prompt = if template == Template::Raw {
                "<image> Q"
            } else {
                "Q"
            };
            let messages = [Message::with_images(Role::User, prompt, 1)];
            assert_eq!(
                template.render_conversation(&messages, "<image>").unwrap(),
                template.render(prompt, "<image>")
            );
        }
    }

    #[test]
    fn follow_up_turns_extend_the_first_prompt() {
        let messages = [
            Message::with_images(Role::User, "Q1", 1),
            Message::new(Role::Assistant, "A1"),
            Message::new(Role::User, "Q2"),
        ];
        let text = Template::LlavaHf
            .render_conversation(&messages, "<image>")
            .unwrap();
        // As transformers renders chat_template.jinja for the same messages.
        assert_eq!(text, "USER: <image>\nQ1 ASSISTANT: A1 USER: Q2 ASSISTANT:");
        let mistral = Template::MistralInst
            .render_conversation(&messages, "<image>")
            .unwrap();
        assert_eq!(
            mistral,
            "[INST] <image>\nQ1 [/INST] A1</s>[INST] Q2 [/INST]"
        );
        assert!(Template::Raw
            .render_conversation(&messages, "<image>")
            .is_err());
    }

    #[test]
    fn text_only_and_multi_image_turns_place_one_placeholder_per_image() {
        let messages = [
            Message::new(Role::User, "Hi"),
            Message::new(Role::Assistant, "Hello"),
            Message::with_images(Role::User, "Compare", 2),
        ];
        let text = Template::LlavaHf
            .render_conversation(&messages, "<image>")
            .unwrap();
        // As transformers renders llava-hf's chat_template.jinja for the same content list.
        assert_eq!(
            text,
            "USER: Hi ASSISTANT: Hello USER: <image>\n<image>\nCompare ASSISTANT:"
        );
        let mistral = Template::MistralInst
            .render_conversation(&messages, "<image>")
            .unwrap();
        assert_eq!(
            mistral,
            "[INST] Hi [/INST] Hello</s>[INST] <image>\n<image>\nCompare [/INST]"
        );
    }
}
