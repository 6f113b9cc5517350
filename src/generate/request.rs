//! What a caller asks for: one question about some images, or none ([`GenerateRequest`]), or one
//! turn of a conversation ([`Conversation`] and [`TurnSettings`]), with decoding and pruning
//! settings.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::Result;
use crate::prune::PruneOptions;
use crate::sample::SamplingParams;
use crate::text::{Message, Role, Template};
use crate::vision::read_image_file;

/// The most images a conversation may hold unless a request says otherwise.
pub const DEFAULT_MAX_IMAGES: usize = 8;

/// One question about the images in `images` (any number, none for a text-only question).
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// Image files, in the order their placeholders open the question.
    pub images: Vec<PathBuf>,
    pub prompt: String,
    pub template: Template,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Report the top-N log-probabilities of each generated step.
    pub logprobs: Option<usize>,
    /// Pad the image to a square with the mean colour before resizing (original LLaVA eval);
    /// None: the model's default ([`crate::Engine::pads_by_default`]: GGUF LLaVA-1.5 pads, as
    /// llama.cpp and the original LLaVA do; llava-hf checkpoints crop, as their processor does).
    pub pad_to_square: Option<bool>,
    /// Keep generating past EOS (benchmarks and parity tests).
    pub ignore_eos: bool,
    /// Visual-token pruning (docs/pruning.md).
    pub prune: PruneOptions,
    /// Copy the projector output and the first logits row back into the output (parity
    /// checks). Off by default: for 7B the projector output alone is a 9 MB readback.
    pub capture_outputs: bool,
    /// The most images the conversation may hold.
    pub max_images: usize,
    /// A system message before the question.
    pub system: Option<String>,
}

impl GenerateRequest {
    /// A question about one image.
    pub fn new(image: impl Into<PathBuf>, prompt: impl Into<String>) -> Self {
        Self::with_images(vec![image.into()], prompt)
    }

    /// A question about `images` (none: answered by the language model alone).
    pub fn with_images(images: Vec<PathBuf>, prompt: impl Into<String>) -> Self {
        Self {
            images,
            prompt: prompt.into(),
            template: Template::LlavaHf,
            max_new_tokens: 64,
            sampling: SamplingParams::default(),
            logprobs: None,
            pad_to_square: None,
            ignore_eos: false,
            prune: PruneOptions::default(),
            capture_outputs: false,
            max_images: DEFAULT_MAX_IMAGES,
            system: None,
        }
    }

    /// The request as the first turn of a conversation.
    pub fn conversation(&self) -> Conversation {
        let question = Message::with_images(Role::User, self.prompt.clone(), self.images.len());
        let system = self.system.iter().map(|s| Message::new(Role::System, s));
        Conversation {
            messages: system.chain(std::iter::once(question)).collect(),
            images: self.images.iter().cloned().map(ImageInput::File).collect(),
        }
    }

    pub fn settings(&self) -> TurnSettings {
        TurnSettings {
            template: self.template,
            max_new_tokens: self.max_new_tokens,
            sampling: self.sampling,
            logprobs: self.logprobs,
            pad_to_square: self.pad_to_square,
            ignore_eos: self.ignore_eos,
            prune: self.prune.clone(),
            capture_outputs: self.capture_outputs,
            max_images: self.max_images,
        }
    }
}

/// Where a conversation's image comes from.
#[derive(Clone, Debug)]
pub enum ImageInput {
    File(PathBuf),
    /// Encoded image bytes (an upload or a data URL); `source` names them in errors.
    Bytes {
        bytes: Arc<[u8]>,
        source: PathBuf,
    },
}

impl ImageInput {
    /// The encoded bytes (read from disk for a file, within the size limit).
    pub fn bytes(&self) -> Result<Arc<[u8]>> {
        match self {
            ImageInput::File(path) => Ok(read_image_file(path)?.into()),
            ImageInput::Bytes { bytes, .. } => Ok(bytes.clone()),
        }
    }

    /// What errors about the image name.
    pub fn source(&self) -> &Path {
        match self {
            ImageInput::File(path) => path,
            ImageInput::Bytes { source, .. } => source,
        }
    }
}

/// A conversation: every message so far, the last one the user's, and its images in the order
/// their placeholders appear (each message's `images` count says how many open it).
#[derive(Clone, Debug)]
pub struct Conversation {
    pub messages: Vec<Message>,
    pub images: Vec<ImageInput>,
}

impl Conversation {
    /// A conversation with no image.
    pub fn text_only(messages: Vec<Message>) -> Self {
        Self {
            messages,
            images: Vec::new(),
        }
    }
}

/// How one turn is answered: everything a request sets besides the conversation. A session's
/// follow-up turns must keep the template, padding and pruning of its first turn.
#[derive(Clone, Debug)]
pub struct TurnSettings {
    pub template: Template,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub logprobs: Option<usize>,
    /// None: the model's default (see [`GenerateRequest::pad_to_square`]).
    pub pad_to_square: Option<bool>,
    pub ignore_eos: bool,
    pub prune: PruneOptions,
    pub capture_outputs: bool,
    /// The most images the conversation may hold (a clear error past it, before any work).
    pub max_images: usize,
}

impl Default for TurnSettings {
    fn default() -> Self {
        GenerateRequest::with_images(Vec::new(), "").settings()
    }
}
