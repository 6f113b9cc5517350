//! Step 1 of a turn, on the host: render and tokenize the conversation, find what the session's
//! KV cache already holds, plan each new image's pruning, find its projector output in the cache
//! or preprocess it, and gather the embeddings of the new ids.

use std::path::Path;
use std::sync::Arc;

use image::DynamicImage;

use crate::error::{Error, Result};
use crate::model::image_cache::{ImageKey, ProjectedImage};
use crate::model::llava::Engine;
use crate::prune::{Plan, Positions};
use crate::text::EncodedPrompt;
use crate::vision::anyres::AnyresLayout;
use crate::vision::decode_image;

use super::anyres_plan::AnyresRequest;
use super::request::{Conversation, GenerateRequest, ImageInput, TurnSettings};
use super::session::{HeldImage, Reuse, Session};

/// Where a new image's rows come from.
pub(super) enum ImageStep {
    /// Run the vision tower on these preprocessed pixels ([3, S, S]; LLaVA-NeXT: every view,
    /// [views, 3, S, S]); store the output under the key when the session uses the image cache.
    Encode {
        pixels: Vec<f32>,
        key: Option<ImageKey>,
    },
    /// The projector output of an identical image seen before.
    Cached(ProjectedImage),
}

/// An image the turn prefills (one the session's cache does not hold yet).
pub(super) struct TurnImage {
    /// Its index among the conversation's images (and the prompt's image spans).
    pub index: usize,
    pub step: ImageStep,
    /// Its pruning plan over its prompt rows (LLaVA-NeXT: restated once its pass has run).
    pub plan: Plan,
    /// LLaVA-NeXT: how it is tiled, selected per view and packed (None for LLaVA-1.5).
    pub anyres: Option<AnyresRequest>,
}

/// A conversation's ids before each image placeholder becomes its image's rows.
pub(super) struct RawPrompt {
    pub ids: Vec<u32>,
    /// Index of each image's placeholder in `ids`.
    pub placeholders: Vec<usize>,
}

/// A turn checked, tokenized and planned: what the GPU passes need.
pub(super) struct PreparedRequest {
    /// The images this turn prefills, in prompt order (the conversation's last ones).
    pub images: Vec<TurnImage>,
    /// The images whose rows the session's cache holds (the conversation's first ones).
    pub held: Vec<HeldImage>,
    /// Every image's identity: a hash of its bytes alone.
    pub keys: Vec<ImageKey>,
    pub raw: RawPrompt,
    /// The whole conversation's ids, each image expanded to the rows the language model gets.
    pub prompt: EncodedPrompt,
    /// What the session's cache serves.
    pub reuse: Reuse,
    /// Leading ids of `prompt` whose keys and values the session's cache holds.
    pub reused: usize,
    /// Token embeddings of `prompt[reused..]` [rows, d]; image rows stay zero until the
    /// projector output is copied over them on the GPU.
    pub embeddings: Vec<f32>,
    /// Tokens to generate at most: the request's limit, capped by the context.
    pub max_new: usize,
    /// The position after the prompt's last row: the first generated token's (more than the
    /// prompt's length when kept image tokens keep their original positions).
    pub next_position: usize,
}

impl PreparedRequest {
    /// Where image `image` of this turn sits in the prompt.
    pub fn span(&self, image: &TurnImage) -> crate::text::ImageSpan {
        self.prompt.images[image.index]
    }
}

impl Engine {
    /// Whether a turn with `settings` pads its image to a square.
    pub fn pads_images(&self, settings: &TurnSettings) -> bool {
        settings.pad_to_square.unwrap_or(self.pads_by_default)
    }

    /// Check pruning options against the model before any request (a chat's `/prune`): the
    /// budgets must fit an image of LLaVA-1.5's fixed size, or LLaVA-NeXT's base view.
    pub fn check_prune(&self, prune: &crate::prune::PruneOptions) -> Result<()> {
        let layers = self.config.text.num_hidden_layers;
        prune
            .plan(self.config.image_tokens(), layers, 1)
            .map(|_| ())
    }

    /// The conversation rendered with its template and tokenized, one placeholder id per image.
    pub(super) fn raw_conversation(
        &self,
        conversation: &Conversation,
        settings: &TurnSettings,
    ) -> Result<RawPrompt> {
        let images = conversation.images.len();
        if images > settings.max_images {
            return Err(Error::argument(
                "max_images",
                format!(
                    "the conversation holds {images} images; at most {} are allowed",
                    settings.max_images
                ),
            ));
        }
        let text = settings
            .template
            .render_conversation(&conversation.messages, &self.tokenizer.image_token)?;
        let ids = self.tokenizer.encode(&text, true)?;
        let image_id = self.tokenizer.image_token_id;
        let placeholders: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == image_id).collect();
        if placeholders.len() != images {
            return Err(Error::argument(
                "messages",
                format!(
                    "the conversation's messages hold {} image placeholder(s) {} after templating, for {images} image(s)",
                    placeholders.len(),
                    self.tokenizer.image_token,
                ),
            ));
        }
        Ok(RawPrompt { ids, placeholders })
    }

    /// Prepare a turn of `session`: the ids after the longest prefix its cache holds, and every
    /// image after the ones it holds planned and found (image cache) or preprocessed.
    pub(super) fn prepare(
        &self,
        session: &Session,
        conversation: &Conversation,
        settings: &TurnSettings,
    ) -> Result<PreparedRequest> {
        let raw = self.raw_conversation(conversation, settings)?;
        let bytes = conversation
            .images
            .iter()
            .map(ImageInput::bytes)
            .collect::<Result<Vec<_>>>()?;
        let keys: Vec<ImageKey> = bytes.iter().map(|b| ImageKey::new(b, "")).collect();
        let (reuse, held) = match session.state() {
            Some(state) => {
                state.check_same_settings(settings)?;
                let reuse = state.reuse(&raw.ids, &keys);
                (reuse, state.images[..reuse.images].to_vec())
            }
            None => (Reuse { raw: 0, images: 0 }, Vec::new()),
        };
        let text_after_images = raw.ids.len() - raw.placeholders.last().map_or(0, |&p| p + 1);
        if bytes.len() == held.len() && self.config.anyres.is_none() {
            // No image to prune: the options are still checked, so a bad flag never passes
            // silently on a text-only turn.
            self.plan_pruning(settings, self.config.image_tokens(), text_after_images)?;
        }
        let images = (held.len()..bytes.len())
            .map(|j| {
                let source = conversation.images[j].source();
                self.plan_image(session, (j, &bytes[j]), source, settings, text_after_images)
            })
            .collect::<Result<Vec<_>>>()?;
        self.finish_prepare(raw, (reuse, held), images, keys, settings)
    }

    /// The prompt with every image's rows, what of it is reused, and the new ids' embeddings.
    fn finish_prepare(
        &self,
        raw: RawPrompt,
        (reuse, held): (Reuse, Vec<HeldImage>),
        images: Vec<TurnImage>,
        keys: Vec<ImageKey>,
        settings: &TurnSettings,
    ) -> Result<PreparedRequest> {
        let rows: Vec<usize> = held
            .iter()
            .map(|h| h.rows)
            .chain(images.iter().map(|i| i.plan.n1()))
            .collect();
        let prompt = self.tokenizer.expand_images(&raw.ids, &rows)?;
        // The raw prefix holds one placeholder per held image, the prompt its rows.
        let reused = reuse.raw - held.len() + held.iter().map(|h| h.rows).sum::<usize>();
        let embeddings = self.prompt_embeddings(&prompt, reused)?;
        let mut input = PreparedRequest {
            max_new: 0,
            next_position: 0,
            images,
            held,
            keys,
            raw,
            prompt,
            reuse,
            reused,
            embeddings,
        };
        // LLaVA-NeXT images with a selection are tokenized with every packed row and shrink after
        // their passes: the context is checked then (`fit_images`), not against rows they drop.
        let shrinks = input
            .images
            .iter()
            .any(|i| i.anyres.as_ref().is_some_and(|a| a.per_view.is_some()));
        self.set_limits(&mut input, settings, !shrinks)?;
        Ok(input)
    }

    /// Image `index` of the conversation, new to the session: its pruning plan (the prompt
    /// has `text_after_images` ids after the last image) and its rows from the image cache or
    /// its preprocessed pixels.
    fn plan_image(
        &self,
        session: &Session,
        (index, bytes): (usize, &Arc<[u8]>),
        source: &Path,
        settings: &TurnSettings,
        text_after_images: usize,
    ) -> Result<TurnImage> {
        // LLaVA-NeXT's token count depends on the image's size, so its image is decoded first.
        let decoded = match self.config.anyres {
            Some(_) => Some(decode_image(bytes, source)?),
            None => None,
        };
        let (plan, anyres) = match &decoded {
            Some(image) => {
                let layout = self.checked_layout(image, settings)?;
                let (plan, anyres) = self.plan_anyres(settings, layout, text_after_images)?;
                (plan, Some(anyres))
            }
            None => {
                let n0 = self.config.image_tokens();
                (self.plan_pruning(settings, n0, text_after_images)?, None)
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
        let step = match cached {
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
        Ok(TurnImage {
            index,
            step,
            plan,
            anyres,
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

    /// A LLaVA-NeXT image's plan over its patch tokens split per view, restated over its
    /// packed rows (every one until its pass has run, see [`Engine::fit_images`]).
    fn plan_anyres(
        &self,
        settings: &TurnSettings,
        layout: AnyresLayout,
        text_after_images: usize,
    ) -> Result<(Plan, AnyresRequest)> {
        let layers = self.config.text.num_hidden_layers;
        if settings.prune.stage1_keep_mass.is_some() {
            return Err(Error::argument(
                "prune.stage1_keep_mass",
                "an adaptive stage 1 runs on LLaVA-1.5 only: LLaVA-NeXT selects per view \
                 (use prune.keep_mass, the adaptive stage 2)",
            ));
        }
        let patches = settings
            .prune
            .plan(layout.visual_tokens(), layers, text_after_images)?;
        let anyres = AnyresRequest::new(layout, &patches, &settings.prune)?;
        Ok((anyres.row_plan(&patches), anyres))
    }

    /// The pruning plan of a LLaVA-1.5 image of `n0` visual tokens.
    fn plan_pruning(&self, settings: &TurnSettings, n0: usize, text_after: usize) -> Result<Plan> {
        let layers = self.config.text.num_hidden_layers;
        settings.prune.plan(n0, layers, text_after)
    }

    /// The prompt's side of a one-shot `request` for [`Engine::allocate_request`]: template,
    /// tokens and every image's pruning plan, with no image read and no embeddings gathered.
    pub(super) fn plan_prompt(&self, request: &GenerateRequest) -> Result<PreparedRequest> {
        let (conversation, settings) = (request.conversation(), request.settings());
        if self.config.anyres.is_some() && !conversation.images.is_empty() {
            return Err(Error::argument(
                "model",
                "planning a LLaVA-NeXT request's memory without its image is not built: its visual tokens depend on the image's size",
            ));
        }
        let raw = self.raw_conversation(&conversation, &settings)?;
        let text_after_images = raw.ids.len() - raw.placeholders.last().map_or(0, |&p| p + 1);
        let n0 = self.config.image_tokens();
        let plan = self.plan_pruning(&settings, n0, text_after_images)?;
        let images = (0..conversation.images.len())
            .map(|index| TurnImage {
                index,
                step: ImageStep::Encode {
                    pixels: Vec::new(),
                    key: None,
                },
                plan,
                anyres: None,
            })
            .collect();
        let keys = vec![ImageKey::new(&[], ""); conversation.images.len()];
        let mut input = self.finish_prepare(
            raw,
            (Reuse { raw: 0, images: 0 }, Vec::new()),
            images,
            keys,
            &settings,
        )?;
        input.embeddings = Vec::new();
        Ok(input)
    }

    /// The position after the prompt and the answer's token limit, checked against the context:
    /// the prompt takes its rows' positions, and, where kept image tokens keep their original
    /// positions, those of the rows their selection dropped too.
    /// With `enforce` false the limits are only estimated (the prompt will shrink).
    pub(super) fn set_limits(
        &self,
        input: &mut PreparedRequest,
        settings: &TurnSettings,
        enforce: bool,
    ) -> Result<()> {
        let prompt = &input.prompt;
        let held: usize = input.held.iter().map(|h| h.position_span - h.rows).sum();
        let original = settings.prune.positions == Positions::Original;
        let dropped: usize = input
            .images
            .iter()
            .filter(|image| original && image.plan.before_projector.is_some())
            .map(|image| image.plan.n0 - prompt.images[image.index].len)
            .sum();
        let positions = prompt.ids.len() + held + dropped;
        let visual = prompt.ids.len() - prompt.text_tokens();
        let context = self.config.text.max_position_embeddings;
        if positions >= context && enforce {
            return Err(Error::argument(
                "prompt",
                format!("the prompt takes {positions} positions ({} tokens, {visual} of them visual), the model's context is {context}", prompt.ids.len()),
            ));
        }
        input.next_position = positions;
        input.max_new = settings
            .max_new_tokens
            .min(context.saturating_sub(positions));
        Ok(())
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
        let image_rows = prompt.images.iter().flat_map(|span| span.start..span.end());
        for row in image_rows.filter(|&r| r >= from) {
            embeddings[(row - from) * dt..(row - from + 1) * dt].fill(0.0);
        }
        Ok(embeddings)
    }
}
