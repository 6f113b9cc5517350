//! The scheduler: preprocess → vision tower → projector → splice into the token embeddings →
//! prefill → decode loop with sampling and streamed text.

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::gpu::kernels::sample as gpu_sample;
use crate::gpu::{DType, Recorder, Tensor};
use crate::model::config::FeatureSelect;
use crate::model::llama::KvCache;
use crate::model::llava::Engine;
use crate::model::projector::Projector;
use crate::prune::cost::prefill_macs;
use crate::sample::{top_logprobs, Sampler, SamplingParams};
use crate::text::{StreamDecoder, Template};
use crate::vision::load_image;

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
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct VisualTokens {
    pub encoder: usize,
    pub after_stage1: usize,
    pub after_stage2: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    pub load: f64,
    pub preprocess: f64,
    pub vision: f64,
    pub prefill: f64,
    pub decode: f64,
    pub total: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct MemoryReport {
    pub weights_bytes: u64,
    pub kv_cache_bytes: u64,
    pub kv_cache_allocated_bytes: u64,
    pub activation_bytes: u64,
}

/// Theoretical prefill multiply-adds of the decoder (STAR.md cost model).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Flops {
    pub prefill: u64,
    pub prefill_unpruned: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct GenerateOutput {
    pub text: String,
    pub generated_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub visual_tokens: VisualTokens,
    pub kv_cache_bytes: u64,
    pub timings_ms: Timings,
    pub decode_tokens_per_second: f64,
    pub flops: Flops,
    pub stop_reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<Vec<TokenLogprob>>>,
    pub memory: MemoryReport,
    /// Logits of the first generated step (for parity tests; not serialised).
    #[serde(skip)]
    pub first_logits: Vec<f32>,
    /// Projector output [visual tokens, text width] (for parity tests; not serialised).
    #[serde(skip)]
    pub image_features: Vec<f32>,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

impl Engine {
    /// Answer `request`, calling `on_text` with each new piece of text as it is decoded.
    pub fn generate(
        &self,
        request: &GenerateRequest,
        mut on_text: impl FnMut(&str),
    ) -> Result<GenerateOutput> {
        let total = Instant::now();
        let gpu = &self.gpu;
        let cfg = &self.config;
        let (dv, dt) = (cfg.vision.hidden_size, cfg.text.hidden_size);

        // Preprocess and tokenize.
        let t0 = Instant::now();
        let image = load_image(&request.image)?;
        let pixels = self
            .image_processor
            .preprocess(&image, request.pad_to_square);
        let n_visual = cfg.image_tokens();
        let text = request
            .template
            .render(&request.prompt, &self.tokenizer.image_token);
        let prompt = self.tokenizer.encode_with_image(&text, n_visual)?;
        let prompt_len = prompt.ids.len();
        let context = cfg.text.max_position_embeddings;
        if prompt_len >= context {
            return Err(Error::argument(
                "--prompt",
                format!("the prompt takes {prompt_len} tokens ({n_visual} of them visual), the model's context is {context}"),
            ));
        }
        let max_new = request.max_new_tokens.min(context - prompt_len);
        let mut text_embeddings = self.embed(
            &prompt
                .ids
                .iter()
                .map(|&id| {
                    if id == self.tokenizer.image_token_id {
                        0
                    } else {
                        id
                    }
                })
                .collect::<Vec<_>>(),
        )?;
        for row in prompt.image_start..prompt.image_start + n_visual {
            text_embeddings[row * dt..(row + 1) * dt].fill(0.0);
        }
        let preprocess_ms = ms(t0);

        // Vision tower and projector.
        let t1 = Instant::now();
        let vision_buffers = self.vision.buffers(gpu)?;
        let features = Tensor::empty(gpu, &[n_visual, dv], DType::F32, "image.features")?;
        let scratch = Projector::scratch(gpu, n_visual, dt)?;
        let image_embeddings = Tensor::empty(gpu, &[n_visual, dt], DType::F32, "image.embeddings")?;
        let mut rec = Recorder::new(gpu);
        self.vision
            .forward(&mut rec, &vision_buffers, &pixels, None)?;
        let skip = match cfg.vision_feature_select_strategy {
            FeatureSelect::Default => 1,
            FeatureSelect::Full => 0,
        };
        rec.copy(
            &vision_buffers.hidden.buffer,
            (skip * dv * 4) as u64,
            &features.buffer,
            0,
            (n_visual * dv * 4) as u64,
        );
        self.projector
            .forward(&mut rec, &features, &scratch, &image_embeddings)?;
        rec.finish("vision")?;
        let vision_ms = ms(t1);

        // Prefill.
        let t2 = Instant::now();
        let buffers = self.llama.buffers(gpu, prompt_len)?;
        let mut cache = KvCache::new(gpu, &cfg.text, prompt_len + max_new)?;
        buffers.hidden.write_f32(gpu, &text_embeddings)?;
        buffers
            .positions
            .write_u32(gpu, &(0..prompt_len as u32).collect::<Vec<_>>())?;
        let token_out = Tensor::empty(gpu, &[1], DType::U32, "next_token")?;
        let mut rec = Recorder::new(gpu);
        let row_bytes = (dt * 4) as u64;
        rec.copy(
            &image_embeddings.buffer,
            0,
            &buffers.hidden.buffer,
            prompt.image_start as u64 * row_bytes,
            n_visual as u64 * row_bytes,
        );
        let layers = cfg.text.num_hidden_layers;
        self.llama
            .forward_layers(&mut rec, &buffers, prompt_len, &mut cache, 0..layers, None)?;
        self.llama.logits(&mut rec, &buffers, prompt_len - 1)?;
        let mut sampler = Sampler::new(request.sampling);
        let need_logits = !sampler.is_greedy() || request.logprobs.is_some();
        if !need_logits {
            rec.dispatch(gpu_sample::argmax(gpu, &buffers.logits, 0, &token_out, 0)?);
        }
        rec.finish("prefill")?;
        let first_logits = gpu.read_f32(&buffers.logits)?;
        let image_features = gpu.read_f32(&image_embeddings)?;

        let mut output = GenerateOutput {
            prompt_tokens: prompt_len,
            visual_tokens: VisualTokens {
                encoder: n_visual,
                after_stage1: n_visual,
                after_stage2: n_visual,
            },
            first_logits: first_logits.clone(),
            image_features,
            ..Default::default()
        };
        let mut logprobs = request.logprobs.map(|_| Vec::new());
        let mut stream = StreamDecoder::new();
        let eos = &cfg.text.eos_token_id;
        let mut logits = first_logits;
        let mut prefill_ms = 0.0;
        // Decode time runs from the first token's arrival (the end of prefill) to the last one.
        let mut decode_start = Instant::now();
        let mut stop_reason = "max_new_tokens".to_string();
        for step in 0..max_new {
            let next = if need_logits {
                if step > 0 {
                    logits = gpu.read_f32(&buffers.logits)?;
                }
                if let (Some(n), Some(list)) = (request.logprobs, logprobs.as_mut()) {
                    list.push(
                        top_logprobs(&logits, n)
                            .into_iter()
                            .map(|(id, logprob)| TokenLogprob { id, logprob })
                            .collect(),
                    );
                }
                sampler.sample(&logits)
            } else {
                let id = gpu.read_u32(&token_out)?[0];
                if id as usize >= cfg.text.vocab_size {
                    return Err(Error::gpu(
                        "sampling",
                        "the logits row holds no finite value",
                    ));
                }
                id
            };
            if step == 0 {
                prefill_ms = ms(t2);
                decode_start = Instant::now();
            }
            if !request.ignore_eos && eos.contains(&next) {
                stop_reason = "eos".into();
                break;
            }
            output.generated_ids.push(next);
            let piece = stream.push(&self.tokenizer, next)?;
            if !piece.is_empty() {
                on_text(&piece);
            }
            if step + 1 == max_new {
                break;
            }
            // Decode one token.
            buffers.hidden.write_f32(gpu, &self.embed(&[next])?)?;
            // Generated token `step` sits at position prompt_len + step.
            buffers
                .positions
                .write_u32(gpu, &[(prompt_len + step) as u32])?;
            let mut rec = Recorder::new(gpu);
            self.llama
                .forward_layers(&mut rec, &buffers, 1, &mut cache, 0..layers, None)?;
            self.llama.logits(&mut rec, &buffers, 0)?;
            if !need_logits {
                rec.dispatch(gpu_sample::argmax(gpu, &buffers.logits, 0, &token_out, 0)?);
            }
            rec.finish("decode")?;
        }
        if max_new == 0 {
            prefill_ms = ms(t2);
        }
        let decode_ms = if output.generated_ids.len() > 1 {
            ms(decode_start)
        } else {
            0.0
        };
        output.text = self.tokenizer.decode(&output.generated_ids)?;
        output.stop_reason = stop_reason;
        output.logprobs = logprobs;
        let (d, m) = (cfg.text.hidden_size, cfg.text.intermediate_size);
        let unpruned = prefill_macs(&vec![prompt_len; layers], d, m);
        output.flops = Flops {
            prefill: unpruned,
            prefill_unpruned: unpruned,
        };
        output.kv_cache_bytes = cache.used_bytes();
        output.memory = MemoryReport {
            weights_bytes: self.weight_bytes,
            kv_cache_bytes: cache.used_bytes(),
            kv_cache_allocated_bytes: cache.allocated_bytes(),
            activation_bytes: vision_buffers.bytes()
                + buffers.bytes()
                + features.buffer.size()
                + scratch.buffer.size()
                + image_embeddings.buffer.size(),
        };
        let decoded_steps = output.generated_ids.len().saturating_sub(1);
        output.decode_tokens_per_second = if decode_ms > 0.0 {
            decoded_steps as f64 / (decode_ms / 1e3)
        } else {
            0.0
        };
        output.timings_ms = Timings {
            load: self.load_ms,
            preprocess: preprocess_ms,
            vision: vision_ms,
            prefill: prefill_ms,
            decode: decode_ms,
            total: ms(total),
        };
        Ok(output)
    }
}
