//! The image side of a LLaVA-NeXT request: one vision-tower pass per view (the base view, then
//! the crops), each view's own before-projector selection when the method has one, the
//! projector over the kept patch rows, and the packing transformers does in
//! `pack_image_features`: the base view's rows, then each unpadded grid row followed by
//! `image_newline` (`vision/anyres.rs` computes the order on the host; one gather applies it).
//!
//! Pruning follows docs/pruning.md's NeXT section: budgets are split across views before the
//! projector; stage 2 and FastV rank the patch rows of all views together, and newline rows are
//! never scored, dropped or counted.

use crate::error::{Error, Result};
use crate::gpu::kernels::topk;
use crate::gpu::{DType, Recorder, Tensor};
use crate::model::llava::Engine;
use crate::model::projector::Projector;
use crate::prune::BeforeProjector;
use crate::vision::anyres::PackedToken;

use super::anyres_plan::AnyresRequest;
use super::image::EncodedImage;

impl Engine {
    /// Encode `pixels` ([views, 3, S, S]) into the packed image rows the prompt receives:
    /// [packed rows, text width], with `packed` saying what each row is.
    pub(super) fn encode_anyres_image(
        &self,
        pixels: &[f32],
        anyres: &AnyresRequest,
    ) -> Result<EncodedImage> {
        let gpu = &self.gpu;
        let layout = &anyres.layout;
        let dv = self.config.vision.hidden_size;
        let newline = self.image_newline.as_ref().ok_or_else(|| {
            Error::shape(
                "image_newline",
                "an anyres request on a model without image_newline",
            )
        })?;
        let views = layout.views();
        let per_view = layout.patches_per_view();
        let budgets: Vec<usize> = match &anyres.per_view {
            Some(selections) => selections.iter().map(|s| selection_keep(*s)).collect(),
            None => vec![per_view; views],
        };
        let kept_rows: usize = budgets.iter().sum();
        // (kept rows, dv): every view's kept patch rows (CLS dropped), view after view.
        let features = Tensor::empty(gpu, &[kept_rows, dv], DType::F32, "anyres.features")?;
        let mut rec = Recorder::new(gpu);
        let kept = self.encode_views(&mut rec, pixels, anyres, &budgets, &features)?;
        let packed = layout.packed_kept(&kept);
        let embeddings = self.project_and_pack(&mut rec, &features, newline, &kept, &packed)?;
        rec.finish("vision")?;
        Ok(EncodedImage {
            embeddings,
            kept: None,
            packed: Some(packed),
        })
    }

    /// Each view through the tower with its selection (`budgets[v]` patches kept), its kept
    /// rows copied into `features` view after view. Returns each view's kept patch indices.
    fn encode_views(
        &self,
        rec: &mut Recorder,
        pixels: &[f32],
        anyres: &AnyresRequest,
        budgets: &[usize],
        features: &Tensor,
    ) -> Result<Vec<Vec<usize>>> {
        let gpu = &self.gpu;
        let (views, per_view) = (anyres.layout.views(), anyres.layout.patches_per_view());
        let tower = self.vision.buffers(gpu)?;
        let dv = self.config.vision.hidden_size;
        rec.set_stage("vision");
        let view_len = pixels.len() / views;
        let row_bytes = (dv * 4) as u64;
        let mut kept = Vec::with_capacity(views);
        let mut offset = 0;
        for (v, view) in pixels.chunks_exact(view_len).enumerate() {
            let keep = budgets[v];
            let view_kept = match &anyres.per_view {
                // A budget smaller than the views leaves the last ones empty: no tower pass.
                Some(_) if keep == 0 => Vec::new(),
                None => {
                    self.vision.forward(rec, &tower, view, None)?;
                    // Patch rows follow CLS (vision_feature_select_strategy "default").
                    rec.copy(
                        &tower.hidden.buffer,
                        row_bytes,
                        &features.buffer,
                        offset as u64 * row_bytes,
                        per_view as u64 * row_bytes,
                    );
                    (0..per_view).collect()
                }
                Some(selections) => {
                    let rows = Tensor::empty(gpu, &[keep, dv], DType::F32, "anyres.view")?;
                    let pair = (&tower, &rows);
                    let chosen = self.selected_patch_features(
                        rec,
                        pair,
                        view,
                        (per_view, false),
                        selections[v],
                    )?;
                    rec.copy(
                        &rows.buffer,
                        0,
                        &features.buffer,
                        offset as u64 * row_bytes,
                        keep as u64 * row_bytes,
                    );
                    rec.set_stage("vision");
                    chosen
                }
            };
            kept.push(view_kept);
            offset += keep;
            // The next view's pixels are a queue write: this view's commands must go first.
            rec.submit();
        }
        Ok(kept)
    }

    /// The projector over `features` (the kept rows of every view, view after view), then one
    /// gather into prompt order with `image_newline` where `packed` has a newline.
    fn project_and_pack(
        &self,
        rec: &mut Recorder,
        features: &Tensor,
        newline: &Tensor,
        kept: &[Vec<usize>],
        packed: &[PackedToken],
    ) -> Result<Tensor> {
        let gpu = &self.gpu;
        let dt = self.config.text.hidden_size;
        let rows = features.shape[0];
        rec.set_stage("projector");
        let scratch = Projector::scratch(gpu, rows, dt)?;
        // (rows + 1, dt): the projected rows and, last, image_newline.
        let source = Tensor::empty(gpu, &[rows + 1, dt], DType::F32, "anyres.source")?;
        let projected = Tensor::empty(gpu, &[rows, dt], DType::F32, "anyres.projected")?;
        self.projector
            .forward(rec, features, &scratch, &projected)?;
        let out_row = (dt * 4) as u64;
        rec.copy(
            &projected.buffer,
            0,
            &source.buffer,
            0,
            rows as u64 * out_row,
        );
        rec.copy(
            &newline.buffer,
            0,
            &source.buffer,
            rows as u64 * out_row,
            out_row,
        );
        let order = Tensor::empty(gpu, &[packed.len()], DType::U32, "anyres.order")?;
        order.write_u32(gpu, &source_rows(kept, packed, rows))?;
        let embeddings = Tensor::empty(gpu, &[packed.len(), dt], DType::F32, "image.embeddings")?;
        rec.dispatch(topk::gather_rows(
            gpu,
            &source,
            &order,
            0,
            packed.len(),
            &embeddings,
        )?);
        Ok(embeddings)
    }
}

/// Patches a before-projector selection keeps.
fn selection_keep(selection: BeforeProjector) -> usize {
    match selection {
        BeforeProjector::TopK { keep, .. }
        | BeforeProjector::VisPruner { keep, .. }
        | BeforeProjector::Random { keep, .. } => keep,
    }
}

/// For each packed token, its row in the gather source: the kept rows of every view, view
/// after view (`kept[v]` ascending), then the newline at `newline_row`.
fn source_rows(kept: &[Vec<usize>], packed: &[PackedToken], newline_row: usize) -> Vec<u32> {
    let mut first_row = Vec::with_capacity(kept.len());
    let mut total = 0;
    for view in kept {
        first_row.push(total);
        total += view.len();
    }
    packed
        .iter()
        .map(|token| match *token {
            PackedToken::Patch { view, index } => {
                let at = kept[view]
                    .binary_search(&index)
                    .expect("packed tokens come from the kept lists");
                (first_row[view] + at) as u32
            }
            PackedToken::Newline => newline_row as u32,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_rows_follow_the_kept_lists() {
        let kept = vec![vec![0, 2], vec![1, 3]];
        let packed = [
            PackedToken::Patch { view: 0, index: 2 },
            PackedToken::Patch { view: 1, index: 1 },
            PackedToken::Newline,
            PackedToken::Patch { view: 1, index: 3 },
            PackedToken::Patch { view: 0, index: 0 },
        ];
        assert_eq!(source_rows(&kept, &packed, 4), vec![1, 2, 4, 3, 0]);
    }
}
