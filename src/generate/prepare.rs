//! Step 1 of a turn, on the host: render and tokenize the conversation, turn the pruning options
//! into a plan (first turn), find the image's projector output in the cache or preprocess the
//! image, work out which tokens the session's KV cache already holds, and gather the embeddings
//! of the rest.

use std::path::Path;

use image::DynamicImage;

use crate::error::{Error, Result};
use crate::model::image_cache::{ImageKey, ProjectedImage};
use crate::model::llava::Engine;
use crate::prune::Plan;
use crate::text::EncodedPrompt;
use crate::vision::anyres::{AnyresLayout, PackedToken};
use crate::vision::decode_image;

use super::anyres_plan::AnyresRequest;
use super::request::{Conversation, GenerateRequest, TurnSettings};
use super::session::{Session, SessionState};

/// Where the turn's image rows come from.
pub(super) enum ImageStep {
    /// Run the vision tower on these preprocessed pixels ([3, S, S]; LLaVA-NeXT: every view,
    /// [views, 3, S, S]); store the output under the key when the session uses the image cache.
    Encode {
        pixels: Vec<f32>,
        key: Option<ImageKey>,
    },
    /// The projector output of an identical image seen before.
    Cached(ProjectedImage),
    /// A follow-up turn: the image rows are in the session's KV cache already.
    InSession,
}

/// A turn checked, tokenized and planned: what the GPU passes need.
pub(super) struct PreparedRequest {
    pub image: ImageStep,
    /// The image's identity: a hash of its bytes alone (a session holds one image).
    pub image_id: ImageKey,
    /// LLaVA-NeXT: how the image is tiled, selected per view and packed (None for LLaVA-1.5).
    pub anyres: Option<AnyresRequest>,
    pub plan: Plan,
    /// The whole conversation's ids with the N1 image tokens the language model receives.
    pub prompt: EncodedPrompt,
    /// Leading ids of `prompt` whose keys and values the session's cache already holds.
    pub reused: usize,
    /// Token embeddings of `prompt[reused..]` [rows, d]; image rows stay zero until the
    /// projector output is copied over them on the GPU.
    pub embeddings: Vec<f32>,
    /// Tokens to generate at most: the request's limit, capped by the context.
    pub max_new: usize,
}

impl Engine {
    /// Whether a turn with `settings` pads its image to a square.
    pub fn pads_images(&self, settings: &TurnSettings) -> bool {
        settings.pad_to_square.unwrap_or(self.pads_by_default)
    }

    /// Prepare a turn of `session`: its first (plan, image, whole prompt) or a follow-up (only
    /// the tokens after the longest prefix the session holds).
    pub(super) fn prepare(
        &self,
        session: &Session,
        conversation: &Conversation,
        settings: &TurnSettings,
    ) -> Result<PreparedRequest> {
        let bytes = conversation.image.bytes()?;
        let image_id = ImageKey::new(&bytes, "");
        let text = settings.template.render_conversation(
            &conversation.messages,
            conversation.image_in,
            &self.tokenizer.image_token,
        )?;
        match session.state() {
            Some(state) => self.prepare_follow_up(state, image_id, &text, settings),
            None => {
                let source = conversation.image.source();
                self.prepare_first(session, (&bytes, image_id), source, &text, settings)
            }
        }
    }

    fn prepare_first(
        &self,
        session: &Session,
        (bytes, image_id): (&[u8], ImageKey),
        source: &Path,
        text: &str,
        settings: &TurnSettings,
    ) -> Result<PreparedRequest> {
        // LLaVA-NeXT's token count depends on the image's size, so its image is decoded first.
        let decoded = match self.config.anyres {
            Some(_) => Some(decode_image(bytes, source)?),
            None => None,
        };
        let (plan, prompt, anyres) = match &decoded {
            Some(image) => {
                let layout = self.checked_layout(image, settings)?;
                let (plan, prompt, anyres) = self.plan_first_anyres(text, settings, layout)?;
                (plan, prompt, Some(anyres))
            }
            None => {
                let (plan, prompt) = self.plan_first(text, settings, self.config.image_tokens())?;
                (plan, prompt, None)
            }
        };
        let selection = match &anyres {
            Some(anyres) => format!("{:?}", anyres.per_view),
            None => format!("{:?}", plan.before_projector),
        };
        let key = session.uses_image_cache().then(|| {
            let settings = format!("pad_to_square={} {selection}", self.pads_images(settings));
            ImageKey::new(bytes, &settings)
        });
        let cached = key.and_then(|k| self.image_cache.lock().ok()?.get(&k));
        let image = match cached {
            Some(projected) => ImageStep::Cached(projected),
            None => {
                let decoded = match decoded {
                    Some(image) => image,
                    None => decode_image(bytes, source)?,
                };
                let processor = &self.image_processor;
                let pixels = match &anyres {
                    Some(anyres) => processor
                        .anyres_views(&decoded, source, &anyres.layout)?
                        .concat(),
                    None => processor.preprocess(&decoded, source, self.pads_images(settings))?,
                };
                ImageStep::Encode { pixels, key }
            }
        };
        let embeddings = self.prompt_embeddings(&prompt, 0)?;
        Ok(PreparedRequest {
            image,
            image_id,
            anyres,
            plan,
            max_new: self.max_new(settings, &prompt),
            prompt,
            reused: 0,
            embeddings,
        })
    }

    /// LLaVA-NeXT: how `image` is tiled into views and packed into the prompt.
    fn checked_layout(
        &self,
        image: &DynamicImage,
        settings: &TurnSettings,
    ) -> Result<AnyresLayout> {
        if settings.pad_to_square == Some(true) {
            return Err(Error::argument(
                "pad_to_square",
                "LLaVA-NeXT tiles the image at its own aspect ratio; padding to a square is LLaVA-1.5's evaluation setting",
            ));
        }
        Ok(self.anyres_layout(image).expect("called for anyres models"))
    }

    /// LLaVA-NeXT: how `image` is tiled (its pinpoint, crops and unpadding); None for
    /// LLaVA-1.5.
    pub fn anyres_layout(&self, image: &DynamicImage) -> Option<AnyresLayout> {
        let anyres = self.config.anyres.as_ref()?;
        let vision = &self.config.vision;
        Some(AnyresLayout::new(
            (image.height() as usize, image.width() as usize),
            &anyres.grid_pinpoints,
            vision.image_size,
            vision.patch_size,
        ))
    }

    /// A LLaVA-NeXT first turn: the plan over the image's patch tokens split per view, and the
    /// prompt tokenized with every packed row (the image pass may keep fewer, see
    /// [`PreparedRequest::fit_image`]); the plan returned is over prompt rows.
    fn plan_first_anyres(
        &self,
        text: &str,
        settings: &TurnSettings,
        layout: AnyresLayout,
    ) -> Result<(Plan, EncodedPrompt, AnyresRequest)> {
        let rows = layout.image_tokens();
        let prompt = self.tokenizer.encode_with_image(text, rows)?;
        self.check_context(&prompt, rows)?;
        let text_after_image = prompt.ids.len() - prompt.image_start - rows;
        let layers = self.config.text.num_hidden_layers;
        let patches = settings
            .prune
            .plan(layout.visual_tokens(), layers, text_after_image)?;
        let anyres = AnyresRequest::new(layout, &patches, &settings.prune)?;
        Ok((anyres.row_plan(&patches), prompt, anyres))
    }

    /// A first turn's pruning plan for `n0` visual tokens and its prompt tokenized with N1 image
    /// tokens.
    fn plan_first(
        &self,
        text: &str,
        settings: &TurnSettings,
        n0: usize,
    ) -> Result<(Plan, EncodedPrompt)> {
        // The plan needs the text after the image, which tokenizing with N0 tokens tells.
        let probe = self.tokenizer.encode_with_image(text, n0)?;
        let text_after_image = probe.ids.len() - probe.image_start - n0;
        let layers = self.config.text.num_hidden_layers;
        let plan = settings.prune.plan(n0, layers, text_after_image)?;
        let prompt = self.tokenizer.encode_with_image(text, plan.n1())?;
        self.check_context(&prompt, plan.n1())?;
        Ok((plan, prompt))
    }

    /// The prompt's side of a one-shot `request` for [`Engine::allocate_request`]: template,
    /// tokens and pruning plan, with no image read and no embeddings gathered.
    pub(super) fn plan_prompt(&self, request: &GenerateRequest) -> Result<PreparedRequest> {
        let (conversation, settings) = (request.conversation(), request.settings());
        let text = settings.template.render_conversation(
            &conversation.messages,
            conversation.image_in,
            &self.tokenizer.image_token,
        )?;
        if self.config.anyres.is_some() {
            return Err(Error::argument(
                "model",
                "planning a LLaVA-NeXT request's memory without its image is not built: its visual tokens depend on the image's size",
            ));
        }
        let (plan, prompt) = self.plan_first(&text, &settings, self.config.image_tokens())?;
        Ok(PreparedRequest {
            image: ImageStep::Encode {
                pixels: Vec::new(),
                key: None,
            },
            image_id: ImageKey::new(&[], ""),
            anyres: None,
            plan,
            max_new: self.max_new(&settings, &prompt),
            prompt,
            reused: 0,
            embeddings: Vec::new(),
        })
    }

    /// A follow-up: same image and settings as the session's first turn, a conversation that
    /// starts with the session's first prompt; only the ids after the common prefix are new.
    fn prepare_follow_up(
        &self,
        state: &SessionState,
        image_id: ImageKey,
        text: &str,
        settings: &TurnSettings,
    ) -> Result<PreparedRequest> {
        state.check_same_settings(settings)?;
        if image_id != state.image {
            return Err(Error::argument(
                "messages",
                "a session holds one image: this conversation's image differs from the one its first turn saw (start a new session for another image)",
            ));
        }
        let n1 = state.plan.n1();
        let prompt = self.tokenizer.encode_with_image(text, n1)?;
        self.check_context(&prompt, n1)?;
        let reused = state.reusable_prefix(&prompt).ok_or_else(|| {
            Error::argument(
                "messages",
                "the conversation does not continue this session's first prompt (same image, first question, then at least one new token)",
            )
        })?;
        let embeddings = self.prompt_embeddings(&prompt, reused)?;
        Ok(PreparedRequest {
            image: ImageStep::InSession,
            image_id,
            anyres: state.anyres.clone(),
            plan: state.plan,
            max_new: self.max_new(settings, &prompt),
            prompt,
            reused,
            embeddings,
        })
    }

    fn check_context(&self, prompt: &EncodedPrompt, n1: usize) -> Result<()> {
        let prompt_len = prompt.ids.len();
        let context = self.config.text.max_position_embeddings;
        if prompt_len >= context {
            return Err(Error::argument(
                "prompt",
                format!("the prompt takes {prompt_len} tokens ({n1} of them visual), the model's context is {context}"),
            ));
        }
        Ok(())
    }

    /// LLaVA-NeXT, after the image pass: the prompt was tokenized with every packed row; keep
    /// the rows of the tokens the pass kept (`packed`) and restate the plan over them.
    pub(super) fn fit_image(
        &self,
        input: &mut PreparedRequest,
        packed: Option<&[PackedToken]>,
        settings: &TurnSettings,
    ) {
        let (Some(anyres), Some(packed)) = (input.anyres.as_mut(), packed) else {
            return;
        };
        let dropped = anyres.packed.len() - packed.len();
        anyres.packed = packed.to_vec();
        input.plan = anyres.row_plan(&input.plan);
        let prompt = &mut input.prompt;
        let end = prompt.image_start + prompt.image_tokens;
        prompt.ids.drain(end - dropped..end);
        prompt.image_tokens -= dropped;
        // A first turn's embeddings start at row 0; image rows are zero until the GPU fills them.
        let dt = self.config.text.hidden_size;
        input.embeddings.drain((end - dropped) * dt..end * dt);
        input.max_new = self.max_new(settings, &input.prompt);
    }

    /// The request's token limit, capped by the room the context leaves after `prompt`.
    fn max_new(&self, settings: &TurnSettings, prompt: &EncodedPrompt) -> usize {
        let context = self.config.text.max_position_embeddings;
        settings.max_new_tokens.min(context - prompt.ids.len())
    }

    /// Token embeddings of `prompt.ids[from..]`, with zero rows where the image goes.
    fn prompt_embeddings(&self, prompt: &EncodedPrompt, from: usize) -> Result<Vec<f32>> {
        let dt = self.config.text.hidden_size;
        let image_id = self.tokenizer.image_token_id;
        // Image placeholders are looked up as id 0 (any valid row), then zeroed.
        let ids: Vec<u32> = prompt.ids[from..]
            .iter()
            .map(|&id| if id == image_id { 0 } else { id })
            .collect();
        let mut embeddings = self.embed(&ids)?;
        let image_rows = prompt.image_start..prompt.image_start + prompt.image_tokens;
        for row in image_rows.filter(|&r| r >= from) {
            embeddings[(row - from) * dt..(row - from + 1) * dt].fill(0.0);
        }
        Ok(embeddings)
    }
}
