//! Prefill: the prompt's embeddings (text rows from the checkpoint, image rows from the
//! projector) through every decoder layer, with STAR stage 2 / FastV at layer K, and the
//! first token's logits.

use crate::error::Result;
use crate::gpu::kernels::attention::{self, AttentionShape, ScoreOutput};
use crate::gpu::kernels::sample as gpu_sample;
use crate::gpu::kernels::topk::{self, Segment};
use crate::gpu::{DType, Recorder, Tensor};
use crate::model::llama::{KvCache, LlamaBuffers};
use crate::model::llava::Engine;
use crate::prune::{Stage2, Stage2Rows};

use super::image::EncodedImage;
use super::prepare::PreparedRequest;

/// The language model's state after prefill, ready to decode.
pub(super) struct Prefilled {
    /// Sized for the whole prompt; decode steps use row 0.
    pub buffers: LlamaBuffers,
    pub cache: KvCache,
    /// (1,) u32: the greedy next token, when the GPU picks it.
    pub next_token: Tensor,
    /// Prompt rows left after stage 2 (the whole prompt without it).
    pub rows: usize,
    /// (rows,) u32: the prompt rows stage 2 kept, when it ran.
    pub stage2_rows: Option<Tensor>,
}

/// Rows each decoder layer's cache will hold: its prompt rows (all of them before stage 2's
/// layer K, the kept ones from K on) and every generated token but the last, which is never
/// fed back.
fn kv_capacities(input: &PreparedRequest, layers: usize) -> Vec<usize> {
    let plan = &input.plan;
    let text_rows = input.prompt.ids.len() - plan.n1();
    let generated = input.max_new.saturating_sub(1);
    plan.tokens_per_layer(text_rows, layers)
        .into_iter()
        .map(|rows| rows + generated)
        .collect()
}

/// Stage 2's buffers: layer K−1's attention scores and the compaction's row list and gathers.
pub(super) struct Stage2Buffers {
    partials: Tensor,
    /// (prompt rows,) per-key scores.
    scores: Tensor,
    /// (kept rows,) u32: the prompt rows kept.
    rows: Tensor,
    /// (kept rows, d): the kept hidden rows, before they are copied to the front.
    hidden: Tensor,
    /// (kept rows,) u32: their position ids.
    positions: Tensor,
}

/// The image rows of the prompt.
fn image_segment(input: &PreparedRequest) -> Segment {
    Segment {
        total: input.prompt.ids.len(),
        start: input.prompt.image_start,
        len: input.prompt.image_tokens,
    }
}

impl Stage2Buffers {
    /// The kept rows' list, which outlives stage 2 (the others are dropped with it).
    pub(super) fn into_rows(self) -> Tensor {
        self.rows
    }
}

impl Engine {
    /// A KV cache sized per layer for a first turn of `input` (see [`kv_capacities`]).
    pub(super) fn new_kv_cache(&self, input: &PreparedRequest) -> Result<KvCache> {
        let capacities = kv_capacities(input, self.llama.layers.len());
        KvCache::new(&self.gpu, &self.config.text, &capacities, self.kv_dtype)
    }

    /// The decoder's state for the prompt's new rows (those after the `input.reused` ones
    /// `cache` holds): their activations, the cache, and the GPU-picked token.
    pub(super) fn prefill_state(
        &self,
        input: &PreparedRequest,
        cache: KvCache,
    ) -> Result<Prefilled> {
        let gpu = &self.gpu;
        let rows = input.prompt.ids.len() - input.reused;
        Ok(Prefilled {
            buffers: self.llama.buffers(gpu, rows)?,
            cache,
            next_token: Tensor::empty(gpu, &[1], DType::U32, "next_token")?,
            rows,
            stage2_rows: None,
        })
    }

    /// The buffers stage 2 needs to score the prompt and keep `keep` visual rows.
    pub(super) fn stage2_buffers(
        &self,
        input: &PreparedRequest,
        keep: usize,
    ) -> Result<Stage2Buffers> {
        let (gpu, text) = (&self.gpu, &self.config.text);
        let prompt_len = input.prompt.ids.len();
        let shape = AttentionShape {
            q_rows: prompt_len,
            kv_rows: prompt_len,
            heads: text.num_attention_heads,
            kv_heads: text.num_key_value_heads,
            head_dim: text.head_dim,
            causal: true,
        };
        let (partials, scores) = attention::score_buffers(gpu, &shape)?;
        let kept_rows = image_segment(input).kept_rows(keep);
        let dt = text.hidden_size;
        Ok(Stage2Buffers {
            partials,
            scores,
            rows: Tensor::empty(gpu, &[kept_rows], DType::U32, "stage2.rows")?,
            hidden: Tensor::empty(gpu, &[kept_rows, dt], DType::F32, "stage2.hidden")?,
            positions: Tensor::empty(gpu, &[kept_rows], DType::U32, "stage2.positions")?,
        })
    }

    /// Run the prompt's new rows (after the `input.reused` ones `cache` holds) through the
    /// decoder and leave the first token's logits in `buffers.logits` (and, with `gpu_argmax`,
    /// its greedy id in `next_token`). `image` is the projector output on a first turn.
    pub(super) fn prefill(
        &self,
        input: &PreparedRequest,
        image: Option<&EncodedImage>,
        cache: KvCache,
        gpu_argmax: bool,
    ) -> Result<Prefilled> {
        let gpu = &self.gpu;
        let (prompt_len, reused) = (input.prompt.ids.len(), input.reused);
        let mut state = self.prefill_state(input, cache)?;
        let buffers = &state.buffers;
        buffers.hidden.write_f32(gpu, &input.embeddings)?;
        // New rows sit at the positions after the reused ones (STAR's rule: stage 2 never
        // shifts a position).
        buffers
            .positions
            .write_u32(gpu, &(reused as u32..prompt_len as u32).collect::<Vec<_>>())?;
        let mut rec = Recorder::new(gpu);
        rec.set_stage("prefill");
        if let Some(image) = image {
            // The projector output replaces the image placeholders' rows.
            let row_bytes = (self.config.text.hidden_size * 4) as u64;
            rec.copy(
                &image.embeddings.buffer,
                0,
                &state.buffers.hidden.buffer,
                (input.prompt.image_start - reused) as u64 * row_bytes,
                input.prompt.image_tokens as u64 * row_bytes,
            );
        }
        match input.plan.stage2 {
            // Stage 2 runs once, on the first prompt; follow-up rows pass every layer.
            Some(stage2) if reused == 0 => {
                self.prefill_with_stage2(&mut rec, &mut state, input, stage2)?
            }
            _ => self.run_layers(&mut rec, &mut state, 0..self.llama.layers.len(), None)?,
        }
        rec.set_stage("first token");
        self.llama
            .logits(&mut rec, &state.buffers, state.rows - 1)?;
        if gpu_argmax {
            rec.dispatch(gpu_sample::argmax(
                gpu,
                &state.buffers.logits,
                0,
                &state.next_token,
                0,
            )?);
        }
        rec.finish("prefill")?;
        Ok(state)
    }

    fn run_layers(
        &self,
        rec: &mut Recorder,
        state: &mut Prefilled,
        layers: std::ops::Range<usize>,
        scores: Option<ScoreOutput>,
    ) -> Result<()> {
        let (b, t) = (&state.buffers, state.rows);
        self.llama
            .forward_layers(rec, b, t, &mut state.cache, layers, scores)
    }

    /// Layers 0..K with layer K−1 scoring the visual rows, compaction of the hidden state and
    /// position ids to the kept rows, then layers K..L on the rows left.
    fn prefill_with_stage2(
        &self,
        rec: &mut Recorder,
        state: &mut Prefilled,
        input: &PreparedRequest,
        stage2: Stage2,
    ) -> Result<()> {
        let prompt = &input.prompt;
        let prompt_len = prompt.ids.len();
        let s2 = self.stage2_buffers(input, stage2.keep)?;
        let q_start = match stage2.rows {
            Stage2Rows::TextAfterImage => prompt.image_start + prompt.image_tokens,
            Stage2Rows::LastRow => prompt_len - 1,
        };
        let out = ScoreOutput {
            q_start,
            q_end: prompt_len,
            partials: &s2.partials,
            scores: &s2.scores,
        };
        self.run_layers(rec, state, 0..stage2.layer, Some(out))?;
        if let Some(anyres) = &input.anyres {
            // LLaVA-NeXT's newline rows are never scored or dropped (docs/pruning.md): they
            // enter the top-k with an infinite score, and the budget counts them besides N2.
            rec.submit();
            for row in anyres.newline_rows() {
                let at = prompt.image_start + row;
                s2.scores.write_f32_at(&self.gpu, at, &[f32::INFINITY])?;
            }
        }
        let segment = image_segment(input);
        rec.set_stage("stage 2");
        self.compact_prompt(rec, &state.buffers, &s2, segment, stage2.keep)?;
        state.rows = segment.kept_rows(stage2.keep);
        state.stage2_rows = Some(s2.rows);
        rec.set_stage("prefill");
        self.run_layers(rec, state, stage2.layer..self.llama.layers.len(), None)
    }

    /// Keep the text rows and the `keep` top-scored rows of the image `segment`: gather the
    /// hidden state and position ids of the kept rows to the front of `b`'s buffers (the kept
    /// rows' indices land in `s2.rows`).
    fn compact_prompt(
        &self,
        rec: &mut Recorder,
        b: &LlamaBuffers,
        s2: &Stage2Buffers,
        segment: Segment,
        keep: usize,
    ) -> Result<()> {
        let gpu = &self.gpu;
        let dt = self.config.text.hidden_size;
        let kept_rows = segment.kept_rows(keep);
        let (scores, rows, hidden, positions) = (&s2.scores, &s2.rows, &s2.hidden, &s2.positions);
        rec.dispatch(topk::select(
            gpu,
            scores,
            segment.start,
            segment,
            keep,
            rows,
        )?);
        rec.dispatch(topk::gather_rows(
            gpu, &b.hidden, rows, 0, kept_rows, hidden,
        )?);
        rec.dispatch(topk::gather_rows(
            gpu,
            &b.positions,
            rows,
            0,
            kept_rows,
            positions,
        )?);
        // Gather cannot work in place: gather into scratch, then copy back to the front.
        let row_bytes = (dt * 4) as u64;
        rec.copy(
            &hidden.buffer,
            0,
            &b.hidden.buffer,
            0,
            kept_rows as u64 * row_bytes,
        );
        rec.copy(
            &positions.buffer,
            0,
            &b.positions.buffer,
            0,
            kept_rows as u64 * 4,
        );
        Ok(())
    }
}
