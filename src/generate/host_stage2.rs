//! Stage-2 selections the host computes from what it reads back (docs/pruning.md, "DART and
//! DivPrune", "Adaptive budgets"): DART after decoder layer K−1 and DivPrune on the rows entering
//! the decoder, from states instead of attention scores; an adaptive stage 2 from layer K−1's
//! scores, whose count is only known once they are. Each writes the same kept-row list the GPU
//! top-k writes, so the compaction after them is stage 2's. Also the Gram matrix VisPruner and
//! DivPrune compare rows by.

use crate::error::{Error, Result};
use crate::gpu::kernels::linear;
use crate::gpu::{DType, Recorder, Tensor, WeightFormat};
use crate::model::llama::LlamaBuffers;
use crate::model::llava::Engine;
use crate::prune::dart::{self, DartRows};
use crate::prune::{divprune, smallest_mass_set, KeepMass, Stage2Select};

use super::prefill::TurnStage2;

impl Engine {
    /// The turn's kept rows (local, ascending, as `topk::select` lists them: every row outside
    /// the segment, the always-kept rows, and the image rows the method keeps), chosen on the
    /// host from `b` after the layers before K have run.
    pub(super) fn host_stage2_rows(
        &self,
        rec: &mut Recorder,
        b: &LlamaBuffers,
        stage2: &TurnStage2,
    ) -> Result<Vec<u32>> {
        let segment = stage2.segment;
        // Image rows, relative to the segment's first row: the candidates.
        let images: Vec<usize> = (0..segment.len)
            .filter(|r| !stage2.always_kept.contains(&(segment.start + r)))
            .collect();
        let keep = stage2.keep - stage2.always_kept.len();
        let kept = match stage2.stage2.select {
            Stage2Select::Dart => self.dart_rows(rec, b, stage2, &images, keep)?,
            Stage2Select::DivPrune => self.divprune_rows(rec, b, stage2, &images, keep)?,
            attention => unreachable!("{attention:?} is selected on the GPU"),
        };
        Ok(kept_row_list(stage2, &kept))
    }

    /// An adaptive stage 2 ([`KeepMass`]): per image, the smallest set of its rows whose
    /// layer-(K−1) scores reach the share of the image's total, within the floor and the
    /// image's cap. Reads the scores back.
    pub(super) fn adaptive_stage2_rows(
        &self,
        rec: &mut Recorder,
        scores: &Tensor,
        stage2: &TurnStage2,
        adaptive: KeepMass,
    ) -> Result<Vec<u32>> {
        rec.submit();
        let scores = self.gpu.read_f32(scores)?;
        let segment = stage2.segment;
        // The score of turn-local row r: its key is the cache row of the segment's first row
        // plus its offset.
        let score = |r: usize| scores[stage2.score_offset + r - segment.start];
        let mut kept = Vec::new();
        for (range, cap) in &stage2.image_rows {
            let rows: Vec<usize> = range
                .clone()
                .filter(|r| !stage2.always_kept.contains(r))
                .collect();
            let values: Vec<f32> = rows.iter().map(|&r| score(r)).collect();
            let chosen = smallest_mass_set(&values, adaptive.mass, adaptive.floor, *cap);
            kept.extend(chosen.into_iter().map(|i| rows[i] - segment.start));
        }
        kept.sort_unstable();
        Ok(kept_row_list(stage2, &kept))
    }

    /// DART: key L1 norms of layer K−1 (in `b.k`, rotated) and the hidden state through the
    /// final norm, for the rows from the first image row to the end of the prompt.
    fn dart_rows(
        &self,
        rec: &mut Recorder,
        b: &LlamaBuffers,
        stage2: &TurnStage2,
        images: &[usize],
        keep: usize,
    ) -> Result<Vec<usize>> {
        let gpu = &self.gpu;
        let segment = stage2.segment;
        let window = segment.start..segment.total;
        self.llama.norm.forward(rec, &b.hidden, &b.normed)?;
        rec.submit();
        let normed = gpu.read_rows_f32(&b.normed, window.clone())?;
        let keys = gpu.read_rows_f32(&b.k, window)?;
        let key_width = b.k.rows_cols().1;
        let key_l1: Vec<f64> = keys
            .chunks_exact(key_width)
            .map(|key| key.iter().map(|x| x.abs() as f64).sum())
            .collect();
        let rows = DartRows {
            normed: &normed,
            width: self.config.text.hidden_size,
            key_l1: &key_l1,
            image_rows: images,
            text_rows: stage2.q_start - segment.start..segment.total - segment.start,
        };
        Ok(dart::select(&rows, keep).kept)
    }

    /// DivPrune: the Gram matrix of the segment's rows as they enter the decoder, then the
    /// greedy max-min choice on the host.
    fn divprune_rows(
        &self,
        rec: &mut Recorder,
        b: &LlamaBuffers,
        stage2: &TurnStage2,
        images: &[usize],
        keep: usize,
    ) -> Result<Vec<usize>> {
        let n = stage2.segment.len;
        let gram = self.gram(rec, &b.hidden, stage2.segment.start, n, "DivPrune")?;
        Ok(divprune::select(&gram, n, images, keep))
    }

    /// The Gram matrix `X·Xᵀ` of rows `[first, first + n)` of the f32 matrix `x`, read back
    /// (n × n, row-major): the rows are copied into their own tensor, zero-padded to an f32
    /// weight row (zeros change no dot product), and multiplied by themselves with the matmul
    /// kernel. `method` names who asked, in the error when n × n floats exceed a GPU binding.
    pub(super) fn gram(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        first: usize,
        n: usize,
        method: &str,
    ) -> Result<Vec<f32>> {
        let gpu = &self.gpu;
        let gram_bytes = (n * n * 4) as u64;
        if gram_bytes > gpu.adapter_binding_bytes {
            return Err(Error::argument(
                "prune.method",
                format!(
                    "{method} over {n} image rows needs an {n}×{n} similarity matrix of \
                     {gram_bytes} bytes, more than the {} bytes one GPU binding holds here: \
                     prefill fewer images per turn",
                    gpu.adapter_binding_bytes
                ),
            ));
        }
        let rows = self.padded_rows(rec, x, first, n)?;
        let gram = Tensor::empty(gpu, &[n, n], DType::F32, "gram")?;
        rec.dispatch_all(linear::gram(gpu, &rows, &gram)?);
        rec.submit();
        gpu.read_f32(&gram)
    }

    /// Rows `[first, first + n)` of `x` copied into their own tensor, each padded with zeros to
    /// the width an f32 weight row has.
    fn padded_rows(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        first: usize,
        n: usize,
    ) -> Result<Tensor> {
        let d = x.rows_cols().1;
        let width = d.next_multiple_of(WeightFormat::F32.row_alignment());
        let rows = Tensor::empty(&self.gpu, &[n, width], DType::F32, "gram.rows")?;
        let start = (first * d * 4) as u64;
        if width == d {
            rec.copy(&x.buffer, start, &rows.buffer, 0, (n * d * 4) as u64);
        } else {
            for r in 0..n {
                let (from, to) = (start + (r * d * 4) as u64, (r * width * 4) as u64);
                rec.copy(&x.buffer, from, &rows.buffer, to, (d * 4) as u64);
            }
        }
        Ok(rows)
    }
}

/// The turn's kept rows as `topk::select` lists them (local, ascending): every row before and
/// after the segment, its always-kept rows, and `kept` (rows relative to the segment's first).
fn kept_row_list(stage2: &TurnStage2, kept: &[usize]) -> Vec<u32> {
    let segment = stage2.segment;
    let in_segment = (0..segment.len).filter(|r| {
        kept.binary_search(r).is_ok() || stage2.always_kept.contains(&(segment.start + r))
    });
    let rows = (0..segment.start)
        .chain(in_segment.map(|r| segment.start + r))
        .chain(segment.start + segment.len..segment.total);
    rows.map(|r| r as u32).collect()
}
