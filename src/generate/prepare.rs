//! Step 1 of a request, on the host: load and preprocess the image, render and tokenize the
//! prompt, turn the pruning options into a plan, and gather the prompt's token embeddings.

use image::DynamicImage;

use crate::error::{Error, Result};
use crate::model::llava::Engine;
use crate::prune::{Method, Plan};
use crate::text::EncodedPrompt;
use crate::vision::anyres::AnyresLayout;
use crate::vision::load_image;

use super::request::GenerateRequest;

/// A request checked, tokenized and planned: what the GPU passes need.
pub(super) struct PreparedRequest {
    /// The preprocessed image, [3, S, S]; for LLaVA-NeXT every view, [views, 3, S, S].
    pub pixels: Vec<f32>,
    /// LLaVA-NeXT: how the image is tiled into views and packed (None for LLaVA-1.5).
    pub anyres: Option<AnyresLayout>,
    pub plan: Plan,
    /// Prompt ids with the N1 image tokens the language model receives.
    pub prompt: EncodedPrompt,
    /// Token embeddings of `prompt` [prompt length, d]; the image rows stay zero until the
    /// projector output is copied over them on the GPU.
    pub embeddings: Vec<f32>,
    /// Tokens to generate at most: the request's limit, capped by the context.
    pub max_new: usize,
}

impl Engine {
    /// Preprocess the image, tokenize the prompt with N1 image tokens, plan the pruning and
    /// gather the text embeddings.
    pub(super) fn prepare(&self, request: &GenerateRequest) -> Result<PreparedRequest> {
        let image = load_image(&request.image)?;
        let (pixels, anyres) = self.preprocess_image(&image, request)?;
        let n0 = anyres
            .as_ref()
            .map_or(self.config.image_tokens(), AnyresLayout::image_tokens);
        let text = request
            .template
            .render(&request.prompt, &self.tokenizer.image_token);
        // The plan needs the text after the image, which tokenizing with N0 tokens tells.
        let probe = self.tokenizer.encode_with_image(&text, n0)?;
        let text_after_image = probe.ids.len() - probe.image_start - n0;
        let layers = self.config.text.num_hidden_layers;
        let plan = request.prune.plan(n0, layers, text_after_image)?;
        let n1 = plan.n1();
        let prompt = self.tokenizer.encode_with_image(&text, n1)?;
        let prompt_len = prompt.ids.len();
        let context = self.config.text.max_position_embeddings;
        if prompt_len >= context {
            return Err(Error::argument(
                "prompt",
                format!("the prompt takes {prompt_len} tokens ({n1} of them visual), the model's context is {context}"),
            ));
        }
        let embeddings = self.prompt_embeddings(&prompt)?;
        Ok(PreparedRequest {
            pixels,
            anyres,
            plan,
            max_new: request.max_new_tokens.min(context - prompt_len),
            prompt,
            embeddings,
        })
    }

    /// The image's pixels for the vision tower: one view (LLaVA-1.5), or LLaVA-NeXT's base view
    /// and crops with their layout.
    fn preprocess_image(
        &self,
        image: &DynamicImage,
        request: &GenerateRequest,
    ) -> Result<(Vec<f32>, Option<AnyresLayout>)> {
        let processor = &self.image_processor;
        let Some(anyres) = &self.config.anyres else {
            let pixels = processor.preprocess(image, &request.image, request.pad_to_square)?;
            return Ok((pixels, None));
        };
        if request.pad_to_square {
            return Err(Error::argument(
                "pad_to_square",
                "LLaVA-NeXT tiles the image at its own aspect ratio; padding to a square is LLaVA-1.5's evaluation setting",
            ));
        }
        if request.prune.method != Method::None {
            return Err(Error::argument(
                "prune.method",
                "visual-token pruning on LLaVA-NeXT (anyres) models is not built yet: use method none",
            ));
        }
        let vision = &self.config.vision;
        let hw = (image.height() as usize, image.width() as usize);
        let layout = AnyresLayout::new(
            hw,
            &anyres.grid_pinpoints,
            vision.image_size,
            vision.patch_size,
        );
        let views = processor.anyres_views(image, &request.image, &layout)?;
        Ok((views.concat(), Some(layout)))
    }

    /// Token embeddings of the prompt, with zero rows where the image goes.
    fn prompt_embeddings(&self, prompt: &EncodedPrompt) -> Result<Vec<f32>> {
        let dt = self.config.text.hidden_size;
        let image_id = self.tokenizer.image_token_id;
        // Image placeholders are looked up as id 0 (any valid row), then zeroed.
        let ids: Vec<u32> = prompt
            .ids
            .iter()
            .map(|&id| if id == image_id { 0 } else { id })
            .collect();
        let mut embeddings = self.embed(&ids)?;
        let image_rows = prompt.image_start..prompt.image_start + prompt.image_tokens;
        embeddings[image_rows.start * dt..image_rows.end * dt].fill(0.0);
        Ok(embeddings)
    }
}
