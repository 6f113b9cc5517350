//! The scheduler: one request from image and prompt to text, one file per step.
//!
//! 1. `prepare.rs`: load and preprocess the image, render and tokenize the prompt, turn the
//!    pruning options into a [`Plan`](crate::prune::Plan), gather the token embeddings;
//! 2. `image.rs`: vision tower → stage 1 (or another before-projector selection) → projector;
//! 3. `prefill.rs`: the prompt through the decoder, stage 2 at layer K, the first logits;
//! 4. `decode.rs`: sampling, streamed text, one decoder step per token;
//! 5. `output.rs`: what the request returns (`--json`).
//!
//! `request.rs` holds what a caller asks for. Pruning follows `docs/pruning.md`.

mod anyres;
mod decode;
mod image;
mod output;
mod prefill;
mod prepare;
mod request;

use std::time::Instant;

use crate::error::Result;
use crate::gpu::Tensor;
use crate::model::llava::Engine;
use crate::prune::cost::prefill_macs;
use crate::sample::Sampler;

use decode::TokenPicker;
use image::EncodedImage;
use output::ms;
pub use output::{
    Flops, GenerateOutput, KeptIndices, MemoryReport, Timings, TokenLogprob, VisualTokens,
};
use prefill::Prefilled;
use prepare::PreparedRequest;
pub use request::GenerateRequest;

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
        let image = match &input.anyres {
            Some(layout) => self.encode_anyres_image(&input.pixels, layout)?,
            None => self.encode_image(&input.pixels, &input.plan)?,
        };
        let vision_ms = ms(t1);

        let prefill_start = Instant::now();
        let sampler = Sampler::new(request.sampling);
        // The logits row is read only when the host samples from it or a caller asked for it;
        // greedy decoding reads just the argmax id.
        let host_samples = !sampler.is_greedy() || request.logprobs.is_some();
        let mut state = self.prefill(&input, &image, !host_samples)?;
        let first_logits = self.read_if(
            host_samples || request.capture_outputs,
            &state.buffers.logits,
        )?;
        let image_features = self.read_if(request.capture_outputs, &image.embeddings)?;
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
            visual_tokens: match &input.anyres {
                // NeXT: the patch tokens that reach the language model; newlines are no
                // visual tokens (docs/pruning.md).
                Some(layout) => VisualTokens {
                    encoder: layout.visual_tokens(),
                    after_stage1: layout.visual_tokens(),
                    after_stage2: layout.visual_tokens(),
                },
                None => VisualTokens::of(&input.plan),
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
            memory: self.memory_report(&image, &state),
            first_logits,
            image_features,
        })
    }

    /// The f32 contents of `tensor` when `wanted` (an empty vector otherwise): readbacks that
    /// only some requests need stay off the others' path.
    fn read_if(&self, wanted: bool, tensor: &Tensor) -> Result<Vec<f32>> {
        if wanted {
            self.gpu.read_f32(tensor)
        } else {
            Ok(Vec::new())
        }
    }

    /// GPU bytes allocated for this request and the model.
    fn memory_report(&self, image: &EncodedImage, state: &Prefilled) -> MemoryReport {
        MemoryReport {
            weights_bytes: self.weight_bytes,
            kv_cache_bytes: state.cache.used_bytes(),
            kv_cache_allocated_bytes: state.cache.allocated_bytes(),
            activation_bytes: image.activation_bytes + state.activation_bytes(),
        }
    }

    /// Kept visual tokens per stage as indices into the original patch grid (None when no
    /// pruning ran). `stage1` comes from the image pass; stage 2's kept prompt rows are read
    /// back and mapped through stage 1's selection.
    fn kept_indices(
        &self,
        input: &PreparedRequest,
        stage1: Option<Vec<usize>>,
        state: &Prefilled,
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
        let (widths, layers) = (text.layer_widths(), text.num_hidden_layers);
        let plan = &input.plan;
        let text_tokens = input.prompt.ids.len() - plan.n1();
        Flops {
            prefill: prefill_macs(&plan.tokens_per_layer(text_tokens, layers), &widths),
            prefill_unpruned: prefill_macs(&vec![text_tokens + plan.n0; layers], &widths),
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
