//! The scheduler, one file per step of a request:
//!
//! 1. `prepare` (here): load and preprocess the image, render and tokenize the prompt, turn the
//!    pruning options into a [`Plan`], gather the prompt's token embeddings;
//! 2. `image.rs`: vision tower → stage 1 (or another before-projector selection) → projector;
//! 3. `prefill.rs`: the prompt through the decoder, stage 2 at layer K, the first logits;
//! 4. `decode.rs`: sampling, streamed text, one decoder step per token;
//! 5. `output.rs`: what the request returns (`--json`).

mod decode;
mod image;
mod output;
mod prefill;

use std::path::PathBuf;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::model::llava::Engine;
use crate::prune::cost::prefill_macs;
use crate::prune::{Plan, PruneOptions};
use crate::sample::{Sampler, SamplingParams};
use crate::text::{EncodedPrompt, Template};
use crate::vision::load_image;

use decode::TokenPicker;
pub use output::{
    Flops, GenerateOutput, KeptIndices, MemoryReport, Timings, TokenLogprob, VisualTokens,
};
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
    /// Visual-token pruning (STAR.md).
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

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// A request checked, tokenized and planned: what the GPU passes need.
pub(crate) struct PreparedRequest {
    /// The preprocessed image, [3, S, S].
    pixels: Vec<f32>,
    plan: Plan,
    /// Prompt ids with the N1 image tokens the language model receives.
    prompt: EncodedPrompt,
    /// Token embeddings of `prompt` [prompt length, d]; the image rows stay zero until the
    /// projector output is copied over them on the GPU.
    embeddings: Vec<f32>,
    /// Tokens to generate at most: the request's limit, capped by the context.
    max_new: usize,
}

impl Engine {
    /// Answer `request`, calling `on_text` with each new piece of text as it is decoded.
    pub fn generate(
        &self,
        request: &GenerateRequest,
        mut on_text: impl FnMut(&str),
    ) -> Result<GenerateOutput> {
        let total = Instant::now();
        let t0 = Instant::now();
        let input = self.prepare(request)?;
        let preprocess_ms = ms(t0);
        self.gpu.profile_host_stage("preprocess", preprocess_ms);

        let t1 = Instant::now();
        let image = self.encode_image(&input.pixels, &input.plan)?;
        let vision_ms = ms(t1);

        let prefill_start = Instant::now();
        let sampler = Sampler::new(request.sampling);
        // The logits row is read only when the host samples from it or a caller asked for it;
        // greedy decoding reads just the argmax id.
        let host_samples = !sampler.is_greedy() || request.logprobs.is_some();
        let mut state = self.prefill(&input, &image, !host_samples)?;
        let first_logits = if host_samples || request.capture_outputs {
            self.gpu.read_f32(&state.buffers.logits)?
        } else {
            Vec::new()
        };
        let image_features = if request.capture_outputs {
            self.gpu.read_f32(&image.embeddings)?
        } else {
            Vec::new()
        };
        let kept_visual_indices = self.kept_indices(&input, image.kept.clone(), &state)?;

        let mut picker = TokenPicker {
            sampler,
            host_samples,
            logprobs: request.logprobs,
            on_text: &mut on_text,
        };
        let first = first_logits.clone();
        let decoded = self.decode(
            request,
            &input,
            &mut state,
            &mut picker,
            first,
            prefill_start,
        )?;

        let kv_cache_bytes = state.cache.used_bytes();
        let decoded_steps = decoded.ids.len().saturating_sub(1);
        Ok(GenerateOutput {
            text: self.tokenizer.decode(&decoded.ids)?,
            generated_ids: decoded.ids,
            prompt_tokens: input.prompt.ids.len(),
            visual_tokens: VisualTokens {
                encoder: input.plan.n0,
                after_stage1: input.plan.n1(),
                after_stage2: input.plan.n2(),
            },
            kept_visual_indices,
            kv_cache_bytes,
            timings_ms: Timings {
                load: self.load_ms,
                preprocess: preprocess_ms,
                vision: vision_ms,
                prefill: decoded.prefill_ms,
                decode: decoded.decode_ms,
                total: ms(total),
            },
            decode_tokens_per_second: per_second(decoded_steps, decoded.decode_ms),
            flops: self.prefill_flops(&input),
            stop_reason: decoded.stop_reason,
            logprobs: decoded.logprobs,
            memory: MemoryReport {
                weights_bytes: self.weight_bytes,
                kv_cache_bytes,
                kv_cache_allocated_bytes: state.cache.allocated_bytes(),
                activation_bytes: image.activation_bytes + state.activation_bytes(),
            },
            first_logits,
            image_features,
        })
    }

    /// Preprocess the image, tokenize the prompt with N1 image tokens, plan the pruning and
    /// gather the text embeddings.
    fn prepare(&self, request: &GenerateRequest) -> Result<PreparedRequest> {
        let image = load_image(&request.image)?;
        let pixels = self
            .image_processor
            .preprocess(&image, request.pad_to_square);
        let n0 = self.config.image_tokens();
        let text = request
            .template
            .render(&request.prompt, &self.tokenizer.image_token);
        // The plan needs the text after the image, which tokenizing with N0 tokens tells.
        let probe = self.tokenizer.encode_with_image(&text, n0)?;
        let text_after_image = probe.ids.len() - probe.image_start - n0;
        let layers = self.config.text.num_hidden_layers;
        let plan = request.prune.plan(n0, layers, text_after_image)?;
        let n1 = plan.n1();
        let prompt = self.tokenizer.encode_with_image(&text, n1)?;
        let prompt_len = prompt.ids.len();
        let context = self.config.text.max_position_embeddings;
        if prompt_len >= context {
            return Err(Error::argument(
                "prompt",
                format!("the prompt takes {prompt_len} tokens ({n1} of them visual), the model's context is {context}"),
            ));
        }
        let embeddings = self.prompt_embeddings(&prompt)?;
        Ok(PreparedRequest {
            pixels,
            plan,
            max_new: request.max_new_tokens.min(context - prompt_len),
            prompt,
            embeddings,
        })
    }

    /// Token embeddings of the prompt, with zero rows where the image goes.
    fn prompt_embeddings(&self, prompt: &EncodedPrompt) -> Result<Vec<f32>> {
        let dt = self.config.text.hidden_size;
        let image_id = self.tokenizer.image_token_id;
        // Image placeholders are looked up as id 0 (any valid row), then zeroed.
        let ids: Vec<u32> = prompt
            .ids
            .iter()
            .map(|&id| if id == image_id { 0 } else { id })
            .collect();
        let mut embeddings = self.embed(&ids)?;
        let image_rows = prompt.image_start..prompt.image_start + prompt.image_tokens;
        embeddings[image_rows.start * dt..image_rows.end * dt].fill(0.0);
        Ok(embeddings)
    }

    /// Kept visual tokens per stage as indices into the original patch grid (None when no
    /// pruning ran). `stage1` comes from the image pass; stage 2's kept prompt rows are read
    /// back and mapped through stage 1's selection.
    fn kept_indices(
        &self,
        input: &PreparedRequest,
        stage1: Option<Vec<usize>>,
        state: &prefill::Prefilled,
    ) -> Result<Option<KeptIndices>> {
        let plan = &input.plan;
        if plan.before_projector.is_none() && plan.stage2.is_none() {
            return Ok(None);
        }
        let image_rows = input.prompt.image_start..input.prompt.image_start + plan.n1();
        let stage2 = match &state.stage2_rows {
            Some(rows) => Some(
                self.gpu
                    .read_u32(rows)?
                    .iter()
                    .map(|&r| r as usize)
                    .filter(|r| image_rows.contains(r))
                    .map(|r| {
                        let local = r - image_rows.start;
                        stage1.as_ref().map_or(local, |s| s[local])
                    })
                    .collect(),
            ),
            None => None,
        };
        Ok(Some(KeptIndices { stage1, stage2 }))
    }

    /// Theoretical prefill multiply-adds of the decoder, as run and without pruning.
    fn prefill_flops(&self, input: &PreparedRequest) -> Flops {
        let text = &self.config.text;
        let (d, m, layers) = (
            text.hidden_size,
            text.intermediate_size,
            text.num_hidden_layers,
        );
        let plan = &input.plan;
        let text_tokens = input.prompt.ids.len() - plan.n1();
        Flops {
            prefill: prefill_macs(&plan.tokens_per_layer(text_tokens, layers), d, m),
            prefill_unpruned: prefill_macs(&vec![text_tokens + plan.n0; layers], d, m),
        }
    }
}

/// Events per second over `ms` milliseconds (0 when no time passed).
fn per_second(events: usize, ms: f64) -> f64 {
    if ms > 0.0 {
        events as f64 / (ms / 1e3)
    } else {
        0.0
    }
}
