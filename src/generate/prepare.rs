//! Step 1 of a request, on the host: load and preprocess the image, render and tokenize the
//! prompt, turn the pruning options into a plan, and gather the prompt's token embeddings.

use crate::error::{Error, Result};
use crate::model::llava::Engine;
use crate::prune::Plan;
use crate::text::EncodedPrompt;
use crate::vision::load_image;

use super::request::GenerateRequest;

/// A request checked, tokenized and planned: what the GPU passes need.
pub(super) struct PreparedRequest {
    /// The preprocessed image, [3, S, S].
    pub pixels: Vec<f32>,
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
        let pixels =
            self.image_processor
                .preprocess(&image, &request.image, request.pad_to_square)?;
        let mut input = self.plan_prompt(request)?;
        input.embeddings = self.prompt_embeddings(&input.prompt)?;
        input.pixels = pixels;
        Ok(input)
    }

    /// The prompt's side of [`Engine::prepare`]: template, tokens and pruning plan, with no
    /// image read and no embeddings gathered (`pixels` and `embeddings` stay empty).
    pub(super) fn plan_prompt(&self, request: &GenerateRequest) -> Result<PreparedRequest> {
        let n0 = self.config.image_tokens();
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
        Ok(PreparedRequest {
            pixels: Vec::new(),
            plan,
            max_new: request.max_new_tokens.min(context - prompt_len),
            prompt,
            embeddings: Vec::new(),
        })
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
