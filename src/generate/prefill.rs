//! Prefill: the prompt's embeddings (text rows from the checkpoint, image rows from the
//! projector) through every decoder layer, with STAR stage 2 / FastV at layer K, and the
//! first token's logits.

use std::ops::Range;

use crate::error::Result;
use crate::gpu::kernels::attention::{self, AttentionShape, ScoreOutput};
use crate::gpu::kernels::sample as gpu_sample;
use crate::gpu::kernels::topk::{self, Segment};
use crate::gpu::{DType, Recorder, Tensor};
use crate::model::llama::{KvCache, LlamaBuffers};
use crate::model::llava::Engine;
use crate::prune::{Stage2, Stage2Select};

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

/// Rows the turn adds to each decoder layer's cache: its new prompt rows (from stage 2's layer K
/// on, without the image rows it drops) and every generated token but the last, which is never
/// fed back.
pub(super) fn turn_rows_per_layer(input: &PreparedRequest, layers: usize) -> Vec<usize> {
    let new_rows = input.prompt.ids.len() - input.reused;
    let generated = input.max_new.saturating_sub(1);
    (0..layers)
        .map(|layer| {
            let dropped: usize = input
                .images
                .iter()
                .filter_map(|image| {
                    let stage2 = image.plan.stage2.filter(|s| layer >= s.layer)?;
                    Some(image.plan.n1() - stage2.keep)
                })
                .sum();
            new_rows - dropped + generated
        })
        .collect()
}

/// Stage 2 of a turn (docs/pruning.md, "Conversations"): the image rows of the images the turn
/// prefills, ranked together by the turn's text after its last image (or its last row, FastV);
/// the rows between them are kept.
pub(super) struct TurnStage2 {
    /// Its layer K and scoring rows.
    pub stage2: Stage2,
    /// The turn's rows (local: 0 is the first new row), from its first image's first row to its
    /// last image's last row.
    pub segment: Segment,
    /// Rows of `segment` listed as kept whatever their scores (infinite scores): text between
    /// the images and LLaVA-NeXT's newline rows. Local.
    pub always_kept: Vec<usize>,
    /// Rows of `segment` kept: every image's budget and `always_kept`.
    pub keep: usize,
    /// First local query row whose attention scores the keys (DART: the first row text pivots
    /// may come from).
    pub q_start: usize,
    /// Key index (the cache row in layer K−1) of the segment's first row.
    pub score_offset: usize,
    /// Each new image's rows (local, newline rows included) and the most of its patch rows
    /// stage 2 keeps (N2): what an adaptive stage 2 selects from, image by image.
    pub image_rows: Vec<(Range<usize>, usize)>,
}

impl TurnStage2 {
    /// The turn's stage 2, when its plan has one and the turn prefills an image.
    pub fn of(input: &PreparedRequest) -> Option<Self> {
        let (first, last) = (input.images.first()?, input.images.last()?);
        let stage2 = first.plan.stage2?;
        let reused = input.reused;
        let (start, end) = (input.span(first).start, input.span(last).end());
        let mut always_kept: Vec<usize> = (start..end).collect();
        let mut keep = 0;
        let mut image_rows = Vec::with_capacity(input.images.len());
        for image in &input.images {
            let span = input.span(image);
            always_kept.retain(|r| !(span.start..span.end()).contains(r));
            let mut image_keep = image.plan.stage2.map_or(span.len, |s| s.keep);
            if let Some(anyres) = &image.anyres {
                // Newline rows are never scored or dropped; the row plan's keep counts them.
                always_kept.extend(anyres.newline_rows().map(|r| span.start + r));
                image_keep -= anyres.newline_rows().count();
            }
            keep += image_keep;
            image_rows.push((span.start - reused..span.end() - reused, image_keep));
        }
        keep += always_kept.len();
        let rows = input.prompt.ids.len() - reused;
        Some(Self {
            stage2,
            segment: Segment {
                total: rows,
                start: start - reused,
                len: end - start,
            },
            always_kept: always_kept.into_iter().map(|r| r - reused).collect(),
            keep,
            q_start: match stage2.select {
                Stage2Select::LastRowAttention => rows - 1,
                _ => end - reused,
            },
            score_offset: start,
            image_rows,
        })
    }
}

/// Stage 2's buffers: layer K−1's attention scores and the compaction's row list and gathers.
pub(super) struct Stage2Buffers {
    partials: Tensor,
    /// (prompt rows,) per-key scores.
    scores: Tensor,
    /// (kept rows,) u32: the new rows kept (local).
    rows: Tensor,
    /// (kept rows, d): the kept hidden rows, before they are copied to the front.
    hidden: Tensor,
    /// (kept rows,) u32: their position ids.
    positions: Tensor,
}

impl Stage2Buffers {
    /// The kept rows' list, which outlives stage 2 (the others are dropped with it).
    pub(super) fn into_rows(self) -> Tensor {
        self.rows
    }
}

impl Engine {
    /// A KV cache sized per layer for the rows a turn of `input` adds to an empty cache.
    pub(super) fn new_kv_cache(&self, input: &PreparedRequest) -> Result<KvCache> {
        let capacities = turn_rows_per_layer(input, self.llama.layers.len());
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

    /// The buffers `stage2` needs to score the prompt's keys and keep its rows.
    pub(super) fn stage2_buffers(
        &self,
        input: &PreparedRequest,
        stage2: &TurnStage2,
    ) -> Result<Stage2Buffers> {
        let (gpu, text) = (&self.gpu, &self.config.text);
        let shape = AttentionShape {
            q_rows: stage2.segment.total,
            kv_rows: input.prompt.ids.len(),
            heads: text.num_attention_heads,
            kv_heads: text.num_key_value_heads,
            head_dim: text.head_dim,
            causal: true,
        };
        let (partials, scores) = attention::score_buffers(gpu, &shape)?;
        let kept_rows = stage2.segment.kept_rows(stage2.keep);
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
    /// its greedy id in `next_token`). `images` are the projector outputs of the images the turn
    /// prefills, in the order of `input.images`; `positions` the new rows' RoPE positions.
    pub(super) fn prefill(
        &self,
        input: &PreparedRequest,
        images: &[EncodedImage],
        positions: &[u32],
        cache: KvCache,
        gpu_argmax: bool,
    ) -> Result<Prefilled> {
        let gpu = &self.gpu;
        let reused = input.reused;
        let mut state = self.prefill_state(input, cache)?;
        let buffers = &state.buffers;
        buffers.hidden.write_f32(gpu, &input.embeddings)?;
        // The new rows' positions (`positions.rs`); stage 2 never shifts a position.
        buffers.positions.write_u32(gpu, positions)?;
        let mut rec = Recorder::new(gpu);
        rec.set_stage("prefill");
        let row_bytes = (self.config.text.hidden_size * 4) as u64;
        for (image, encoded) in input.images.iter().zip(images) {
            // The projector output replaces the image placeholders' rows.
            let span = input.span(image);
            rec.copy(
                &encoded.embeddings.buffer,
                0,
                &state.buffers.hidden.buffer,
                (span.start - reused) as u64 * row_bytes,
                span.len as u64 * row_bytes,
            );
        }
        match TurnStage2::of(input) {
            Some(stage2) => self.prefill_with_stage2(&mut rec, &mut state, input, &stage2)?,
            None => self.run_layers(&mut rec, &mut state, 0..self.llama.layers.len(), None)?,
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

    /// Layers 0..K (layer K−1 scoring the turn's image rows, when attention selects),
    /// compaction of the hidden state and position ids to the kept rows, then layers K..L on
    /// the rows left.
    fn prefill_with_stage2(
        &self,
        rec: &mut Recorder,
        state: &mut Prefilled,
        input: &PreparedRequest,
        stage2: &TurnStage2,
    ) -> Result<()> {
        let s2 = self.stage2_buffers(input, stage2)?;
        let layer = stage2.stage2.layer;
        let kept_rows = if stage2.stage2.select.by_attention() {
            let out = ScoreOutput {
                q_start: stage2.q_start,
                q_end: stage2.segment.total,
                partials: &s2.partials,
                scores: &s2.scores,
            };
            self.run_layers(rec, state, 0..layer, Some(out))?;
            rec.set_stage("stage 2");
            match stage2.stage2.adaptive {
                Some(adaptive) => {
                    let kept = self.adaptive_stage2_rows(rec, &s2.scores, stage2, adaptive)?;
                    s2.rows.write_u32(&self.gpu, &kept)?;
                    self.fit_cache_after_stage2(state, input, stage2, kept.len())?;
                    kept.len()
                }
                None => {
                    self.select_by_scores(rec, &s2, stage2)?;
                    stage2.segment.kept_rows(stage2.keep)
                }
            }
        } else {
            self.run_layers(rec, state, 0..layer, None)?;
            rec.set_stage("stage 2");
            let kept = self.host_stage2_rows(rec, &state.buffers, stage2)?;
            s2.rows.write_u32(&self.gpu, &kept)?;
            kept.len()
        };
        self.compact_prompt(rec, &state.buffers, &s2, kept_rows)?;
        state.rows = kept_rows;
        // An adaptive stage 2 keeps fewer rows than its buffers hold: the list is that long.
        state.stage2_rows = Some(s2.rows.view(&[kept_rows])?);
        rec.set_stage("prefill");
        let layers = layer..self.llama.layers.len();
        self.run_layers(rec, state, layers, None)
    }

    /// An adaptive stage 2 kept `kept_rows` of the turn's rows, fewer than the cap the layers
    /// from K on were sized for: size them for what they will hold (nothing is in them yet from
    /// this turn; earlier turns' rows are copied).
    fn fit_cache_after_stage2(
        &self,
        state: &mut Prefilled,
        input: &PreparedRequest,
        stage2: &TurnStage2,
        kept_rows: usize,
    ) -> Result<()> {
        let generated = input.max_new.saturating_sub(1);
        for layer in stage2.stage2.layer..self.llama.layers.len() {
            let held = state.cache.layers[layer].len;
            state
                .cache
                .grow_layer(&self.gpu, layer, held + kept_rows + generated)?;
        }
        Ok(())
    }

    /// Top-k of layer K−1's scores into `s2.rows`. Rows that are no image patch enter it with
    /// an infinite score, and the budget counts them besides the images' (docs/pruning.md).
    fn select_by_scores(
        &self,
        rec: &mut Recorder,
        s2: &Stage2Buffers,
        stage2: &TurnStage2,
    ) -> Result<()> {
        if !stage2.always_kept.is_empty() {
            rec.submit();
            let first_key = stage2.score_offset - stage2.segment.start;
            for &row in &stage2.always_kept {
                s2.scores
                    .write_f32_at(&self.gpu, first_key + row, &[f32::INFINITY])?;
            }
        }
        rec.dispatch_all(topk::select(
            &self.gpu,
            &s2.scores,
            stage2.score_offset,
            stage2.segment,
            stage2.keep,
            &s2.rows,
        )?);
        Ok(())
    }

    /// Gather the hidden state and position ids of the `kept_rows` rows `s2.rows` lists to the
    /// front of `b`'s buffers.
    fn compact_prompt(
        &self,
        rec: &mut Recorder,
        b: &LlamaBuffers,
        s2: &Stage2Buffers,
        kept_rows: usize,
    ) -> Result<()> {
        let gpu = &self.gpu;
        let dt = self.config.text.hidden_size;
        let (rows, hidden, positions) = (&s2.rows, &s2.hidden, &s2.positions);
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
