//! The scheduler: preprocess → vision tower → projector → splice into the token embeddings →
//! prefill → decode loop with sampling and streamed text.

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::gpu::kernels::attention::{self, AttentionShape, ScoreOutput};
use crate::gpu::kernels::sample as gpu_sample;
use crate::gpu::kernels::topk::{self, Segment};
use crate::gpu::{DType, Recorder, Tensor};
use crate::model::config::FeatureSelect;
use crate::model::llama::KvCache;
use crate::model::llava::Engine;
use crate::model::projector::Projector;
use crate::prune::cost::prefill_macs;
use crate::prune::{
    vispruner, BeforeProjector, Plan, PruneOptions, Stage2Rows, VISPRUNER_IMPORTANT_RATIO,
};
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

#[derive(Clone, Debug, Default, Serialize)]
pub struct VisualTokens {
    pub encoder: usize,
    pub after_stage1: usize,
    pub after_stage2: usize,
}

/// Kept visual tokens as original patch-grid indices (raster order), per stage.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KeptIndices {
    pub stage1: Option<Vec<usize>>,
    pub stage2: Option<Vec<usize>>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept_visual_indices: Option<KeptIndices>,
    pub kv_cache_bytes: u64,
    pub timings_ms: Timings,
    pub decode_tokens_per_second: f64,
    pub flops: Flops,
    pub stop_reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<Vec<TokenLogprob>>>,
    pub memory: MemoryReport,
    /// Logits of the first generated step, with `capture_outputs` (not serialised).
    #[serde(skip)]
    pub first_logits: Vec<f32>,
    /// Projector output [visual tokens, text width], with `capture_outputs` (not serialised).
    #[serde(skip)]
    pub image_features: Vec<f32>,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// The image side of a request after the vision tower, selection and the projector.
struct EncodedImage {
    /// Projector output [N1, text width].
    embeddings: Tensor,
    /// Patch indices the language model receives (None: all of them).
    kept: Option<Vec<usize>>,
    activation_bytes: u64,
}

impl Engine {
    /// Run the vision tower, apply the plan's before-projector selection and the projector.
    fn encode_image(&self, pixels: &[f32], plan: &Plan) -> Result<EncodedImage> {
        let gpu = &self.gpu;
        let cfg = &self.config;
        let (dv, dt) = (cfg.vision.hidden_size, cfg.text.hidden_size);
        let n0 = plan.n0;
        let n1 = plan.n1();
        let tokens = self.vision.tokens();
        let buffers = self.vision.buffers(gpu)?;
        let features = Tensor::empty(gpu, &[n1, dv], DType::F32, "image.features")?;
        let scratch = Projector::scratch(gpu, n1, dt)?;
        let embeddings = Tensor::empty(gpu, &[n1, dt], DType::F32, "image.embeddings")?;
        let mut activation_bytes = buffers.bytes()
            + features.buffer.size()
            + scratch.buffer.size()
            + embeddings.buffer.size();
        // Rows of the encoder output that become image features: patches after CLS.
        let skip = match cfg.vision_feature_select_strategy {
            FeatureSelect::Default => 1,
            FeatureSelect::Full => 0,
        };
        let mut rec = Recorder::new(gpu);
        rec.set_stage("vision");
        let kept = match plan.before_projector {
            None => {
                self.vision.forward(&mut rec, &buffers, pixels, None)?;
                rec.copy(
                    &buffers.hidden.buffer,
                    (skip * dv * 4) as u64,
                    &features.buffer,
                    0,
                    (n0 * dv * 4) as u64,
                );
                None
            }
            Some(selection) => {
                if skip != 1 {
                    return Err(Error::argument(
                        "--prune",
                        "visual-token pruning needs vision_feature_select_strategy \"default\" (CLS is never a visual token)",
                    ));
                }
                let heads = cfg.vision.num_attention_heads;
                let shape = AttentionShape {
                    q_rows: tokens,
                    kv_rows: tokens,
                    heads,
                    kv_heads: heads,
                    head_dim: cfg.vision.head_dim(),
                    causal: false,
                };
                let (partials, scores) = attention::score_buffers(gpu, &shape)?;
                activation_bytes += partials.buffer.size() + scores.buffer.size();
                // Which query rows score the patches: all of them, or the CLS row only.
                let cls_only = !matches!(
                    selection,
                    BeforeProjector::TopK {
                        score: crate::prune::Stage1Score::Attention,
                        ..
                    }
                );
                let q_end = if cls_only { 1 } else { tokens };
                let out = ScoreOutput {
                    q_start: 0,
                    q_end,
                    partials: &partials,
                    scores: &scores,
                };
                let needs_scores = !matches!(selection, BeforeProjector::Random { .. });
                self.vision
                    .forward(&mut rec, &buffers, pixels, needs_scores.then_some(out))?;
                // Row list into the encoder output: [CLS, 1 + kept...]; the gather skips CLS.
                let segment = Segment {
                    total: tokens,
                    start: 1,
                    len: n0,
                };
                let rows = Tensor::empty(gpu, &[segment.kept_rows(n1)], DType::U32, "stage1.rows")?;
                rec.set_stage("stage 1");
                let kept = match selection {
                    BeforeProjector::TopK { keep, .. } => {
                        rec.dispatch(topk::select(gpu, &scores, 1, segment, keep, &rows)?);
                        rec.dispatch(topk::gather_rows(
                            gpu,
                            &buffers.hidden,
                            &rows,
                            1,
                            keep,
                            &features,
                        )?);
                        rec.submit();
                        gpu.read_u32(&rows)?[1..]
                            .iter()
                            .map(|&r| r as usize - 1)
                            .collect()
                    }
                    BeforeProjector::VisPruner { keep } => {
                        rec.submit();
                        let cls = gpu.read_f32(&scores)?;
                        let hidden = gpu.read_f32(&buffers.hidden)?;
                        vispruner::select(
                            &cls[1..],
                            &hidden[dv..],
                            dv,
                            keep,
                            VISPRUNER_IMPORTANT_RATIO,
                        )
                    }
                    BeforeProjector::Random { keep, seed } => {
                        crate::prune::random_selection(n0, keep, seed)
                    }
                };
                if !matches!(selection, BeforeProjector::TopK { .. }) {
                    let list: Vec<u32> = std::iter::once(0)
                        .chain(kept.iter().map(|&i| i as u32 + 1))
                        .collect();
                    rows.write_u32(gpu, &list)?;
                    rec.dispatch(topk::gather_rows(
                        gpu,
                        &buffers.hidden,
                        &rows,
                        1,
                        n1,
                        &features,
                    )?);
                }
                Some(kept)
            }
        };
        rec.set_stage("projector");
        self.projector
            .forward(&mut rec, &features, &scratch, &embeddings)?;
        rec.finish("vision")?;
        Ok(EncodedImage {
            embeddings,
            kept,
            activation_bytes,
        })
    }

    /// Answer `request`, calling `on_text` with each new piece of text as it is decoded.
    pub fn generate(
        &self,
        request: &GenerateRequest,
        mut on_text: impl FnMut(&str),
    ) -> Result<GenerateOutput> {
        let total = Instant::now();
        let gpu = &self.gpu;
        let cfg = &self.config;
        let dt = cfg.text.hidden_size;
        let layers = cfg.text.num_hidden_layers;

        // Preprocess, tokenize, plan.
        let t0 = Instant::now();
        let image = load_image(&request.image)?;
        let pixels = self
            .image_processor
            .preprocess(&image, request.pad_to_square);
        let n0 = cfg.image_tokens();
        let text = request
            .template
            .render(&request.prompt, &self.tokenizer.image_token);
        let probe = self.tokenizer.encode_with_image(&text, n0)?;
        let text_after_image = probe.ids.len() - probe.image_start - n0;
        let plan = request.prune.plan(n0, layers, text_after_image)?;
        let n1 = plan.n1();
        let prompt = self.tokenizer.encode_with_image(&text, n1)?;
        let prompt_len = prompt.ids.len();
        let context = cfg.text.max_position_embeddings;
        if prompt_len >= context {
            return Err(Error::argument(
                "--prompt",
                format!("the prompt takes {prompt_len} tokens ({n1} of them visual), the model's context is {context}"),
            ));
        }
        let max_new = request.max_new_tokens.min(context - prompt_len);
        let text_ids: Vec<u32> = prompt
            .ids
            .iter()
            .map(|&id| {
                if id == self.tokenizer.image_token_id {
                    0
                } else {
                    id
                }
            })
            .collect();
        let mut text_embeddings = self.embed(&text_ids)?;
        // Image rows are overwritten on the GPU by the projector output.
        text_embeddings[prompt.image_start * dt..(prompt.image_start + n1) * dt].fill(0.0);
        let preprocess_ms = ms(t0);
        gpu.profile_host_stage("preprocess", preprocess_ms);

        // Vision tower, stage 1 and projector.
        let t1 = Instant::now();
        let image = self.encode_image(&pixels, &plan)?;
        let vision_ms = ms(t1);

        // Prefill, with stage 2 at layer K.
        let t2 = Instant::now();
        let buffers = self.llama.buffers(gpu, prompt_len)?;
        let mut cache = KvCache::new(gpu, &cfg.text, prompt_len + max_new)?;
        buffers.hidden.write_f32(gpu, &text_embeddings)?;
        buffers
            .positions
            .write_u32(gpu, &(0..prompt_len as u32).collect::<Vec<_>>())?;
        let token_out = Tensor::empty(gpu, &[1], DType::U32, "next_token")?;
        let mut rec = Recorder::new(gpu);
        rec.set_stage("prefill");
        let row_bytes = (dt * 4) as u64;
        rec.copy(
            &image.embeddings.buffer,
            0,
            &buffers.hidden.buffer,
            prompt.image_start as u64 * row_bytes,
            n1 as u64 * row_bytes,
        );
        let mut rows_after_stage2 = prompt_len;
        let mut stage2_kept = None;
        let mut extra_bytes = 0;
        match plan.stage2 {
            None => self.llama.forward_layers(
                &mut rec,
                &buffers,
                prompt_len,
                &mut cache,
                0..layers,
                None,
            )?,
            Some(stage2) => {
                let k = stage2.layer;
                let shape = AttentionShape {
                    q_rows: prompt_len,
                    kv_rows: prompt_len,
                    heads: cfg.text.num_attention_heads,
                    kv_heads: cfg.text.num_key_value_heads,
                    head_dim: cfg.text.head_dim,
                    causal: true,
                };
                let (partials, scores) = attention::score_buffers(gpu, &shape)?;
                let q_start = match stage2.rows {
                    Stage2Rows::TextAfterImage => prompt.image_start + n1,
                    Stage2Rows::LastRow => prompt_len - 1,
                };
                let out = ScoreOutput {
                    q_start,
                    q_end: prompt_len,
                    partials: &partials,
                    scores: &scores,
                };
                self.llama.forward_layers(
                    &mut rec,
                    &buffers,
                    prompt_len,
                    &mut cache,
                    0..k,
                    Some(out),
                )?;
                // Compact the hidden state and the position ids entering layer K.
                let segment = Segment {
                    total: prompt_len,
                    start: prompt.image_start,
                    len: n1,
                };
                rows_after_stage2 = segment.kept_rows(stage2.keep);
                let rows = Tensor::empty(gpu, &[rows_after_stage2], DType::U32, "stage2.rows")?;
                let hidden =
                    Tensor::empty(gpu, &[rows_after_stage2, dt], DType::F32, "stage2.hidden")?;
                let positions =
                    Tensor::empty(gpu, &[rows_after_stage2], DType::U32, "stage2.positions")?;
                rec.set_stage("stage 2");
                extra_bytes = partials.buffer.size()
                    + scores.buffer.size()
                    + rows.buffer.size()
                    + hidden.buffer.size()
                    + positions.buffer.size();
                rec.dispatch(topk::select(
                    gpu,
                    &scores,
                    prompt.image_start,
                    segment,
                    stage2.keep,
                    &rows,
                )?);
                rec.dispatch(topk::gather_rows(
                    gpu,
                    &buffers.hidden,
                    &rows,
                    0,
                    rows_after_stage2,
                    &hidden,
                )?);
                rec.dispatch(topk::gather_rows(
                    gpu,
                    &buffers.positions,
                    &rows,
                    0,
                    rows_after_stage2,
                    &positions,
                )?);
                rec.copy(
                    &hidden.buffer,
                    0,
                    &buffers.hidden.buffer,
                    0,
                    rows_after_stage2 as u64 * row_bytes,
                );
                rec.copy(
                    &positions.buffer,
                    0,
                    &buffers.positions.buffer,
                    0,
                    rows_after_stage2 as u64 * 4,
                );
                rec.set_stage("prefill");
                self.llama.forward_layers(
                    &mut rec,
                    &buffers,
                    rows_after_stage2,
                    &mut cache,
                    k..layers,
                    None,
                )?;
                stage2_kept = Some(rows);
            }
        }
        rec.set_stage("first token");
        self.llama
            .logits(&mut rec, &buffers, rows_after_stage2 - 1)?;
        let mut sampler = Sampler::new(request.sampling);
        let need_logits = !sampler.is_greedy() || request.logprobs.is_some();
        if !need_logits {
            rec.dispatch(gpu_sample::argmax(gpu, &buffers.logits, 0, &token_out, 0)?);
        }
        rec.finish("prefill")?;
        // The logits row is read only when the host samples from it or a caller asked for it;
        // greedy decoding reads just the argmax id.
        let first_logits = if need_logits || request.capture_outputs {
            gpu.read_f32(&buffers.logits)?
        } else {
            Vec::new()
        };
        let image_features = if request.capture_outputs {
            gpu.read_f32(&image.embeddings)?
        } else {
            Vec::new()
        };

        // Kept indices in the original patch grid.
        let stage1 = image.kept.clone();
        let stage2 = match &stage2_kept {
            Some(rows) => {
                let list = gpu.read_u32(rows)?;
                let local = list
                    .iter()
                    .map(|&r| r as usize)
                    .filter(|&r| r >= prompt.image_start && r < prompt.image_start + n1);
                Some(
                    local
                        .map(|r| {
                            stage1
                                .as_ref()
                                .map_or(r - prompt.image_start, |s| s[r - prompt.image_start])
                        })
                        .collect(),
                )
            }
            None => None,
        };
        let pruning = plan.before_projector.is_some() || plan.stage2.is_some();

        let mut output = GenerateOutput {
            prompt_tokens: prompt_len,
            visual_tokens: VisualTokens {
                encoder: n0,
                after_stage1: n1,
                after_stage2: plan.n2(),
            },
            kept_visual_indices: pruning.then_some(KeptIndices { stage1, stage2 }),
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
            // Decode one token. It sits at the position after the prompt as it entered the
            // language model (before stage 2), as if nothing had been dropped.
            buffers.hidden.write_f32(gpu, &self.embed(&[next])?)?;
            buffers
                .positions
                .write_u32(gpu, &[(prompt_len + step) as u32])?;
            let mut rec = Recorder::new(gpu);
            rec.set_stage("decode");
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
        let text_tokens = prompt_len - n1;
        output.flops = Flops {
            prefill: prefill_macs(&plan.tokens_per_layer(text_tokens, layers), d, m),
            prefill_unpruned: prefill_macs(&vec![text_tokens + n0; layers], d, m),
        };
        output.kv_cache_bytes = cache.used_bytes();
        output.memory = MemoryReport {
            weights_bytes: self.weight_bytes,
            kv_cache_bytes: cache.used_bytes(),
            kv_cache_allocated_bytes: cache.allocated_bytes(),
            activation_bytes: image.activation_bytes
                + buffers.bytes()
                + extra_bytes
                + token_out.buffer.size(),
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
