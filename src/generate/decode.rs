//! The decode loop: pick a token (greedy on the GPU, or sampled on the host from the logits),
//! stream its text, stop at EOS or the limit, and run the decoder on it for the next one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::gpu::kernels::sample as gpu_sample;
use crate::gpu::Recorder;
use crate::model::llava::Engine;
use crate::sample::{top_logprobs, Sampler};
use crate::text::StreamDecoder;

use super::output::{ms, TokenLogprob};
use super::prefill::Prefilled;
use super::prepare::PreparedRequest;
use super::request::TurnSettings;

/// What the decode loop produced.
pub(super) struct Decoded {
    pub ids: Vec<u32>,
    /// Leading `ids` that went through the decoder (their keys and values are in the cache):
    /// all of them, but the last when the token limit stopped the loop.
    pub fed: usize,
    pub stop_reason: String,
    pub logprobs: Option<Vec<Vec<TokenLogprob>>>,
    /// From the start of prefill to the first token's arrival.
    pub prefill_ms: f64,
    /// From the first token's arrival to the last one's (0 with fewer than two tokens).
    pub decode_ms: f64,
    /// Per decoder step, the host's microseconds before the GPU had the step's work: the token's
    /// embedding row and position uploaded, every dispatch recorded (bind groups and uniform
    /// blocks created) and submitted.
    pub host_us: Vec<f64>,
}

/// How the next token is chosen.
pub(super) struct TokenPicker<'a> {
    pub sampler: Sampler,
    /// Read the logits row and sample on the host (sampling or log-probabilities asked for);
    /// otherwise the GPU's argmax id is read back.
    pub host_samples: bool,
    pub logprobs: Option<usize>,
    pub on_text: &'a mut dyn FnMut(&str),
    /// Checked before every token: once set, the loop stops (`stop_reason` "cancelled").
    pub cancel: Option<&'a AtomicBool>,
}

impl<'a> TokenPicker<'a> {
    /// The picker `settings` ask for: the host samples when it must (sampling, log-probs).
    pub fn new(
        settings: &TurnSettings,
        on_text: &'a mut dyn FnMut(&str),
        cancel: Option<&'a AtomicBool>,
    ) -> Self {
        let sampler = Sampler::new(settings.sampling);
        Self {
            // The logits row is read only when the host samples from it; greedy decoding reads
            // just the GPU's argmax id.
            host_samples: !sampler.is_greedy() || settings.logprobs.is_some(),
            sampler,
            logprobs: settings.logprobs,
            on_text,
            cancel,
        }
    }
}

impl Engine {
    /// Generate up to `input.max_new` tokens after prefill, at the positions after the
    /// conversation's prompt; `first_logits` is the logits row prefill left (read only when the
    /// host samples).
    pub(super) fn decode(
        &self,
        settings: &TurnSettings,
        input: &PreparedRequest,
        state: &mut Prefilled,
        picker: &mut TokenPicker,
        first_logits: Vec<f32>,
        prefill_start: Instant,
    ) -> Result<Decoded> {
        let (first_position, max_new) = (input.next_position, input.max_new);
        let mut out = Decoded {
            ids: Vec::new(),
            fed: 0,
            stop_reason: "max_new_tokens".into(),
            logprobs: picker.logprobs.map(|_| Vec::new()),
            prefill_ms: 0.0,
            decode_ms: 0.0,
            host_us: Vec::new(),
        };
        let mut stream = StreamDecoder::new();
        let mut logits = first_logits;
        // Decode time runs from the first token's arrival (the end of prefill) to the last one.
        let mut decode_start = Instant::now();
        for step in 0..max_new {
            if picker.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                out.stop_reason = "cancelled".into();
                break;
            }
            if step > 0 && picker.host_samples {
                logits = self.gpu.read_f32(&state.buffers.logits)?;
            }
            let next = self.pick(state, picker, &logits, &mut out.logprobs)?;
            if step == 0 {
                out.prefill_ms = ms(prefill_start);
                decode_start = Instant::now();
            }
            if !settings.ignore_eos && self.config.text.eos_token_id.contains(&next) {
                out.stop_reason = "eos".into();
                break;
            }
            out.ids.push(next);
            let piece = stream.push(&self.tokenizer, next)?;
            if !piece.is_empty() {
                (picker.on_text)(&piece);
            }
            if step + 1 == max_new {
                break;
            }
            // The new token sits at the position after the prompt as it entered the language
            // model (before stage 2), as if nothing had been dropped.
            let host_us =
                self.decode_step(state, next, first_position + step, !picker.host_samples)?;
            out.host_us.push(host_us);
            out.fed += 1;
        }
        if max_new == 0 {
            out.prefill_ms = ms(prefill_start);
        }
        if out.ids.len() > 1 {
            out.decode_ms = ms(decode_start);
        }
        Ok(out)
    }

    /// The next token: sampled from `logits` on the host, or the GPU's argmax read back.
    fn pick(
        &self,
        state: &Prefilled,
        picker: &mut TokenPicker,
        logits: &[f32],
        logprobs: &mut Option<Vec<Vec<TokenLogprob>>>,
    ) -> Result<u32> {
        if !picker.host_samples {
            let id = self.gpu.read_u32(&state.next_token)?[0];
            if id as usize >= self.config.text.vocab_size {
                return Err(no_token());
            }
            return Ok(id);
        }
        if let (Some(n), Some(list)) = (picker.logprobs, logprobs.as_mut()) {
            list.push(
                top_logprobs(logits, n)
                    .into_iter()
                    .map(|(id, logprob)| TokenLogprob { id, logprob })
                    .collect(),
            );
        }
        picker.sampler.sample(logits).ok_or_else(no_token)
    }

    /// Run token `id` at `position` through the decoder, leaving its logits (and, with
    /// `gpu_argmax`, the greedy next id) for the next step. Returns the host's microseconds
    /// until the step was submitted ([`Decoded::host_us`]).
    fn decode_step(
        &self,
        state: &mut Prefilled,
        id: u32,
        position: usize,
        gpu_argmax: bool,
    ) -> Result<f64> {
        let start = Instant::now();
        let gpu = &self.gpu;
        let b = &state.buffers;
        b.hidden.write_f32(gpu, &self.embed(&[id])?)?;
        b.positions.write_u32(gpu, &[position as u32])?;
        let mut rec = Recorder::new(gpu);
        rec.set_stage("decode");
        let layers = 0..self.llama.layers.len();
        let cache = &mut state.cache;
        self.llama
            .forward_layers(&mut rec, b, 1, cache, layers, None)?;
        self.llama.logits(&mut rec, b, 0)?;
        if gpu_argmax {
            rec.dispatch(gpu_sample::argmax(gpu, &b.logits, 0, &state.next_token, 0)?);
        }
        rec.submit();
        let host_us = start.elapsed().as_secs_f64() * 1e6;
        rec.finish("decode")?;
        Ok(host_us)
    }
}

/// Both pickers (the GPU argmax and the host sampler) find no token when every logit is NaN.
fn no_token() -> Error {
    Error::gpu(
        "sampling",
        "the logits row holds no number (every value is NaN)",
    )
}
