//! The decode loop: pick a token (greedy on the GPU, or sampled on the host from the logits),
//! stream its text, stop at EOS or the limit, and run the decoder on it for the next one.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::gpu::kernels::Dispatch;
use crate::gpu::readback::PendingRead;
use crate::gpu::{GpuBuffer, Recorder, Tensor};
use crate::model::llama::DecodeState;
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
    /// Per decoder step, the host thread's CPU microseconds to give the GPU the step's work: the
    /// step's dispatches (built once per request) recorded into a command buffer and submitted,
    /// with the host's sampled token written first when the host samples. CPU time, not wall
    /// time: a driver may block the submit until the previous step is done.
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

/// Decode steps the GPU may run ahead of the host's reading of their tokens: the host streams
/// each token's text while the next ones compute, and at most this many steps run past an EOS.
pub const READ_LAG: usize = 3;

/// The tokens a decode loop has taken, and the checks every one of them passes.
struct TokenLoop<'p, 'a> {
    picker: &'p mut TokenPicker<'a>,
    out: Decoded,
    stream: StreamDecoder,
    max_new: usize,
    ignore_eos: bool,
    prefill_start: Instant,
    decode_start: Instant,
}

impl TokenLoop<'_, '_> {
    /// Take the next token: false when the loop stops before it (cancelled, EOS) or after it
    /// (the token limit).
    fn take(&mut self, engine: &Engine, next: u32) -> Result<bool> {
        if self
            .picker
            .cancel
            .is_some_and(|c| c.load(Ordering::Relaxed))
        {
            self.out.stop_reason = "cancelled".into();
            return Ok(false);
        }
        if self.out.ids.is_empty() {
            self.out.prefill_ms = ms(self.prefill_start);
            self.decode_start = Instant::now();
        }
        if !self.ignore_eos && engine.config.text.eos_token_id.contains(&next) {
            self.out.stop_reason = "eos".into();
            return Ok(false);
        }
        self.out.ids.push(next);
        let piece = self.stream.push(&engine.tokenizer, next)?;
        if !piece.is_empty() {
            (self.picker.on_text)(&piece);
        }
        Ok(self.out.ids.len() < self.max_new)
    }
}

impl Engine {
    /// Generate up to `input.max_new` tokens after prefill, at the positions after the
    /// conversation's prompt; `first_logits` is the logits row prefill left (read only when the
    /// host samples). Every decoder step replays one set of dispatches built here
    /// ([`crate::model::llama::Llama::decode_plan`]).
    pub(super) fn decode(
        &self,
        settings: &TurnSettings,
        input: &PreparedRequest,
        state: &mut Prefilled,
        picker: &mut TokenPicker,
        first_logits: Vec<f32>,
        prefill_start: Instant,
    ) -> Result<Decoded> {
        let host_samples = picker.host_samples;
        let mut tokens = TokenLoop {
            out: Decoded {
                ids: Vec::new(),
                fed: 0,
                stop_reason: "max_new_tokens".into(),
                logprobs: picker.logprobs.map(|_| Vec::new()),
                prefill_ms: 0.0,
                decode_ms: 0.0,
                host_us: Vec::new(),
            },
            picker,
            stream: StreamDecoder::new(),
            max_new: input.max_new,
            ignore_eos: settings.ignore_eos,
            prefill_start,
            decode_start: Instant::now(),
        };
        if input.max_new > 0 {
            let free = state.cache.free_rows();
            // Built only when a step can run: one token needs none, and a full cache none fits.
            // The counter (held here) lives as long as the plan that reads it.
            let replay = (input.max_new > 1 && free > 0)
                .then(|| self.decode_plan(state, input.next_position, host_samples))
                .transpose()?;
            let plan = replay.as_ref().map_or(&[][..], |(_, plan)| plan);
            if host_samples || self.llama.embed_tokens.is_none() {
                self.decode_one_by_one(&mut tokens, state, plan, free, first_logits)?;
            } else {
                self.decode_greedy(&mut tokens, state, plan, free)?;
            }
            state.cache.count_appended(tokens.out.fed);
        }
        let mut out = tokens.out;
        if input.max_new == 0 {
            out.prefill_ms = ms(prefill_start);
        }
        if out.ids.len() > 1 {
            out.decode_ms = ms(tokens.decode_start);
        }
        Ok(out)
    }

    /// The replayed step's dispatches for a loop starting at `first_position`, after the token
    /// prefill left in `state.next_token`, and the state they read.
    fn decode_plan(
        &self,
        state: &Prefilled,
        first_position: usize,
        host_samples: bool,
    ) -> Result<(DecodeState, Vec<Arc<Dispatch>>)> {
        let gpu = &self.gpu;
        let b = &state.buffers;
        let token = state.next_token.clone();
        let loop_state = DecodeState::new(gpu, token, &b.positions, first_position)?;
        let plan = self
            .llama
            .decode_plan(gpu, b, &state.cache, &loop_state, !host_samples)?;
        Ok((loop_state, plan.into_iter().map(Arc::new).collect()))
    }

    /// Greedy decoding with the ids on the GPU: each step's argmax feeds the next step's
    /// embedding, the host submits up to [`READ_LAG`] steps ahead and reads each id back as
    /// its step completes, and stops submitting at EOS, the limit or a cancel.
    fn decode_greedy(
        &self,
        tokens: &mut TokenLoop,
        state: &Prefilled,
        plan: &[Arc<Dispatch>],
        free_rows: usize,
    ) -> Result<()> {
        let gpu = &self.gpu;
        let first = self.checked_id(gpu.read_u32(&state.next_token)?[0])?;
        if !tokens.take(self, first)? {
            return Ok(());
        }
        // Step s feeds token s and computes token s + 1; the last token is never fed.
        let steps = tokens.max_new - 1;
        let slots: Vec<_> = (0..READ_LAG).map(|_| gpu.staging_buffer(4)).collect();
        let mut pending = VecDeque::with_capacity(READ_LAG);
        let mut submitted = 0;
        loop {
            while submitted < steps && pending.len() < READ_LAG {
                if submitted >= free_rows {
                    if pending.is_empty() {
                        return Err(cache_full(free_rows));
                    }
                    break;
                }
                let slot = &slots[submitted % READ_LAG];
                let start = thread_cpu_us();
                let index = self.submit_step(plan, Some((&state.next_token, slot)));
                pending.push_back(PendingRead::start(slot, 4, index));
                tokens.out.host_us.push(thread_cpu_us() - start);
                submitted += 1;
            }
            let Some(read) = pending.pop_front() else {
                return Ok(());
            };
            let id = self.checked_id(read.wait(gpu)?[0])?;
            tokens.out.fed += 1;
            if !tokens.take(self, id)? {
                return Ok(());
            }
        }
    }

    /// Decoding with the host in every step: a host sampler (temperature, top-p,
    /// log-probabilities) picks each token from the logits row read back, or the GPU's argmax
    /// is read back when the embedding table is on the host only; the token (or, without the
    /// table on the GPU, its embedding row) is written to the GPU and the step replayed.
    fn decode_one_by_one(
        &self,
        tokens: &mut TokenLoop,
        state: &Prefilled,
        plan: &[Arc<Dispatch>],
        free_rows: usize,
        first_logits: Vec<f32>,
    ) -> Result<()> {
        let gpu = &self.gpu;
        let host_samples = tokens.picker.host_samples;
        let mut logits = first_logits;
        for step in 0.. {
            let next = match host_samples {
                true => self.sample(tokens, &logits)?,
                false => self.checked_id(gpu.read_u32(&state.next_token)?[0])?,
            };
            if !tokens.take(self, next)? {
                return Ok(());
            }
            if step >= free_rows {
                return Err(cache_full(free_rows));
            }
            let start = thread_cpu_us();
            match self.llama.embed_tokens {
                Some(_) => state.next_token.write_u32(gpu, &[next])?,
                None => state.buffers.hidden.write_f32(gpu, &self.embed(&[next])?)?,
            }
            self.submit_step(plan, None);
            tokens.out.host_us.push(thread_cpu_us() - start);
            tokens.out.fed += 1;
            if host_samples {
                logits = gpu.read_f32(&state.buffers.logits)?;
            }
        }
        Ok(())
    }

    /// Record and submit one replayed step, then (greedy) copy its token into `read.1`.
    /// Returns the submission to wait for.
    fn submit_step(
        &self,
        plan: &[Arc<Dispatch>],
        read: Option<(&Tensor, &GpuBuffer)>,
    ) -> wgpu::SubmissionIndex {
        let mut rec = Recorder::with_batch(&self.gpu, usize::MAX);
        rec.set_stage("decode");
        for dispatch in plan {
            rec.dispatch_shared(dispatch);
        }
        if let Some((token, slot)) = read {
            rec.copy(&token.buffer, 0, slot, 0, 4);
        }
        rec.submit().expect("a decode step records dispatches")
    }

    /// A GPU argmax's id, refused when no logit was a number.
    fn checked_id(&self, id: u32) -> Result<u32> {
        if id as usize >= self.config.text.vocab_size {
            return Err(no_token());
        }
        Ok(id)
    }

    /// The next token sampled on the host from `logits` (with its log-probabilities when asked).
    fn sample(&self, tokens: &mut TokenLoop, logits: &[f32]) -> Result<u32> {
        let picker = &mut tokens.picker;
        if let (Some(n), Some(list)) = (picker.logprobs, tokens.out.logprobs.as_mut()) {
            list.push(
                top_logprobs(logits, n)
                    .into_iter()
                    .map(|(id, logprob)| TokenLogprob { id, logprob })
                    .collect(),
            );
        }
        picker.sampler.sample(logits).ok_or_else(no_token)
    }
}

/// Microseconds of CPU time this thread has used: a decode step's host work, without the time
/// the thread spends blocked (a driver that runs one submission at a time, as lavapipe does,
/// holds the next submit until the previous step finishes). Wall-clock time where the platform
/// has no per-thread clock.
fn thread_cpu_us() -> f64 {
    #[cfg(unix)]
    {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `t` is a valid timespec the call writes; the clock id is a constant.
        if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } == 0 {
            return t.tv_sec as f64 * 1e6 + t.tv_nsec as f64 / 1e3;
        }
    }
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_secs_f64() * 1e6
}

/// The error for a step the KV cache has no row for.
fn cache_full(free_rows: usize) -> Error {
    Error::argument(
        "max_new_tokens",
        format!("the KV cache holds {free_rows} more tokens; the next one does not fit"),
    )
}

/// Both pickers (the GPU argmax and the host sampler) find no token when every logit is NaN.
fn no_token() -> Error {
    Error::gpu(
        "sampling",
        "the logits row holds no number (every value is NaN)",
    )
}
