//! The image side of a LLaVA-NeXT request: one vision-tower pass per view (the base view, then
//! the crops), the projector over every view's patch rows, and the packing transformers does in
//! `pack_image_features`: the base view's rows, then each unpadded grid row followed by
//! `image_newline` (`vision/anyres.rs` computes the order on the host; one gather applies it).

use crate::error::{Error, Result};
use crate::gpu::kernels::topk;
use crate::gpu::{DType, Recorder, Tensor};
use crate::model::llava::Engine;
use crate::model::projector::Projector;
use crate::vision::anyres::{AnyresLayout, PackedToken};

use super::image::EncodedImage;

impl Engine {
    /// Encode `pixels` ([views, 3, S, S]) into the packed image rows the prompt receives,
    /// [layout.image_tokens(), text width].
    pub(super) fn encode_anyres_image(
        &self,
        pixels: &[f32],
        layout: &AnyresLayout,
    ) -> Result<EncodedImage> {
        let gpu = &self.gpu;
        let (dv, dt) = (self.config.vision.hidden_size, self.config.text.hidden_size);
        let newline = self.image_newline.as_ref().ok_or_else(|| {
            Error::shape(
                "image_newline",
                "an anyres request on a model without image_newline",
            )
        })?;
        let (views, per_view) = (layout.views(), layout.patches_per_view());
        let patch_rows = views * per_view;
        let tower = self.vision.buffers(gpu)?;
        // (views · patches, dv): every view's patch rows (CLS dropped), view after view.
        let features = Tensor::empty(gpu, &[patch_rows, dv], DType::F32, "anyres.features")?;
        let scratch = Projector::scratch(gpu, patch_rows, dt)?;
        // (views · patches, dt): the projector output of every patch row.
        let projected = Tensor::empty(gpu, &[patch_rows, dt], DType::F32, "anyres.projected")?;
        // (views · patches + 1, dt): the projected rows and, last, image_newline.
        let source = Tensor::empty(gpu, &[patch_rows + 1, dt], DType::F32, "anyres.source")?;
        let order = Tensor::empty(gpu, &[layout.image_tokens()], DType::U32, "anyres.order")?;
        order.write_u32(gpu, &packed_rows(layout, patch_rows))?;
        let embeddings = Tensor::empty(
            gpu,
            &[layout.image_tokens(), dt],
            DType::F32,
            "image.embeddings",
        )?;

        let mut rec = Recorder::new(gpu);
        rec.set_stage("vision");
        let view_len = pixels.len() / views;
        let row_bytes = (dv * 4) as u64;
        for (v, view) in pixels.chunks_exact(view_len).enumerate() {
            self.vision.forward(&mut rec, &tower, view, None)?;
            // Patch rows follow CLS (vision_feature_select_strategy "default").
            rec.copy(
                &tower.hidden.buffer,
                row_bytes,
                &features.buffer,
                (v * per_view) as u64 * row_bytes,
                per_view as u64 * row_bytes,
            );
            // The next view's pixels are a queue write: this view's commands must go first.
            rec.submit();
        }
        rec.set_stage("projector");
        self.projector
            .forward(&mut rec, &features, &scratch, &projected)?;
        let out_row = (dt * 4) as u64;
        rec.copy(
            &projected.buffer,
            0,
            &source.buffer,
            0,
            patch_rows as u64 * out_row,
        );
        rec.copy(
            &newline.buffer,
            0,
            &source.buffer,
            patch_rows as u64 * out_row,
            out_row,
        );
        rec.dispatch(topk::gather_rows(
            gpu,
            &source,
            &order,
            0,
            layout.image_tokens(),
            &embeddings,
        )?);
        rec.finish("vision")?;
        Ok(EncodedImage {
            embeddings,
            kept: None,
        })
    }
}

/// For each packed image token, its row in the gather source: patch `index` of view `view` is
/// row `view · patches + index`, a newline the row after all patches (`newline_row`).
fn packed_rows(layout: &AnyresLayout, newline_row: usize) -> Vec<u32> {
    let per_view = layout.patches_per_view();
    layout
        .packed()
        .into_iter()
        .map(|token| match token {
            PackedToken::Patch { view, index } => (view * per_view + index) as u32,
            PackedToken::Newline => newline_row as u32,
        })
        .collect()
}
