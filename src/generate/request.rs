//! What a caller asks for: one question about one image, with decoding and pruning settings.

use std::path::PathBuf;

use crate::prune::PruneOptions;
use crate::sample::SamplingParams;
use crate::text::Template;

/// One question about one image.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub image: PathBuf,
    pub prompt: String,
    pub template: Template,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Report the top-N log-probabilities of each generated step.
    pub logprobs: Option<usize>,
    /// Pad the image to a square with the mean colour before resizing (original LLaVA eval).
    pub pad_to_square: bool,
    /// Keep generating past EOS (benchmarks and parity tests).
    pub ignore_eos: bool,
    /// Visual-token pruning (docs/pruning.md).
    pub prune: PruneOptions,
    /// Copy the projector output and the first logits row back into the output (parity
    /// checks). Off by default: for 7B the projector output alone is a 9 MB readback.
    pub capture_outputs: bool,
}

impl GenerateRequest {
    pub fn new(image: impl Into<PathBuf>, prompt: impl Into<String>) -> Self {
        Self {
            image: image.into(),
            prompt: prompt.into(),
            template: Template::LlavaHf,
            max_new_tokens: 64,
            sampling: SamplingParams::default(),
            logprobs: None,
            pad_to_square: false,
            ignore_eos: false,
            prune: PruneOptions::default(),
            capture_outputs: false,
        }
    }
}
