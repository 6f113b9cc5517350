//! A conversation's state between turns: its tokens, the KV cache that holds them and the
//! images whose rows it holds.
//!
//! A turn renders the whole conversation and keeps the longest prefix the session already holds:
//! the common prefix of ids, cut before the first image that differs (another image gives the
//! same placeholder ids) and before any image whose stage-2 selection was scored by text the new
//! conversation changed. Only the rest is prefilled, at the positions after it. Each image is
//! pruned in the turn that first prefills it (docs/pruning.md, "Conversations"); its kept rows
//! then stay as they are for every later turn.

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::model::image_cache::ImageKey;
use crate::model::llama::KvCache;
use crate::model::llava::Engine;
use crate::prune::PruneOptions;
use crate::text::Template;

use super::request::{Conversation, TurnSettings};

/// One conversation with an [`Engine`]; answer its turns with [`Engine::turn`].
pub struct Session {
    image_cache: bool,
    state: Option<SessionState>,
}

/// What a turn leaves: the ids the cache holds, the images among them and the settings they
/// were made with.
pub(super) struct SessionState {
    pub template: Template,
    pub pad_to_square: Option<bool>,
    pub prune: PruneOptions,
    /// The ids the cache holds with one placeholder id per image (as the template and the
    /// tokenizer give them, before each placeholder becomes its image's rows), generated ids
    /// fed back through the decoder included. Conversations are matched in this form.
    pub raw: Vec<u32>,
    /// The images whose rows the cache holds, in prompt order.
    pub images: Vec<HeldImage>,
    /// Raw length of the session's first prompt: a conversation that keeps it continues this
    /// one (see [`Session::continues`]).
    pub first_prompt_len: usize,
    pub cache: KvCache,
}

/// An image of the conversation as the language model holds it.
#[derive(Clone, Debug)]
pub(super) struct HeldImage {
    /// Hash of the image's bytes.
    pub id: ImageKey,
    /// Index of its placeholder in [`SessionState::raw`].
    pub placeholder: usize,
    /// Rows the unpruned image would take (N0; LLaVA-NeXT: every packed row).
    pub n0: usize,
    /// Rows the prompt gives it (N1, after any selection before the projector).
    pub rows: usize,
    /// Positions it takes: N0 when its kept rows keep their original positions, else `rows`.
    pub position_span: usize,
    /// Rows stage 2 kept in layers from `pruned_from` on (`rows` when it did not run).
    pub kept: usize,
    /// 0-based decoder layer from which only `kept` rows are held (usize::MAX: every layer holds
    /// `rows`).
    pub pruned_from: usize,
    /// Raw length of the prompt of the turn that pruned it at stage 2: its selection was scored
    /// by that text, so a later turn reuses the image only when it keeps all of it. None when
    /// stage 2 did not run on it.
    pub scored_until: Option<usize>,
}

impl HeldImage {
    /// Rows it holds in decoder layer `layer`.
    pub fn rows_in_layer(&self, layer: usize) -> usize {
        if layer >= self.pruned_from {
            self.kept
        } else {
            self.rows
        }
    }
}

/// How much of a conversation a session's cache serves: `raw` leading ids in the placeholder
/// form, holding the first `images` images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Reuse {
    pub raw: usize,
    pub images: usize,
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

impl Session {
    /// A conversation: its KV cache grows by each turn's rows, and images go through the
    /// engine's image cache.
    pub fn new() -> Self {
        Self {
            image_cache: true,
            state: None,
        }
    }

    /// One question (`Engine::generate`): the vision tower always runs (its timings and memory
    /// are part of what a one-shot run reports).
    pub(super) fn one_shot() -> Self {
        Self {
            image_cache: false,
            state: None,
        }
    }

    pub(super) fn state(&self) -> Option<&SessionState> {
        self.state.as_ref()
    }

    pub(super) fn uses_image_cache(&self) -> bool {
        self.image_cache
    }

    /// Whether the session holds nothing (before its first turn, or after a failed one).
    pub fn is_empty(&self) -> bool {
        self.state.is_none()
    }

    /// Ids the session's cache holds, each image as one placeholder id (empty before its first
    /// turn).
    pub fn tokens(&self) -> &[u32] {
        self.state.as_ref().map_or(&[], |s| &s.raw)
    }

    /// Images whose rows the session's cache holds.
    pub fn images(&self) -> usize {
        self.state.as_ref().map_or(0, |s| s.images.len())
    }

    /// Forget the conversation (the next turn is a first turn).
    pub fn reset(&mut self) {
        self.state = None;
    }

    /// How many leading ids (in the placeholder form) of `conversation` this session would
    /// reuse for a turn with `settings`, or None when the conversation does not continue it
    /// (other settings, or its first prompt not kept whole). A server picks sessions by this:
    /// another conversation that only shares a beginning with this one gets its own session
    /// (and the image cache), rather than taking this one's cache away from it.
    pub fn continues(
        &self,
        engine: &Engine,
        conversation: &Conversation,
        settings: &TurnSettings,
    ) -> Option<usize> {
        let state = self.state.as_ref()?;
        state.check_same_settings(settings).ok()?;
        let raw = engine.raw_conversation(conversation, settings).ok()?;
        let keys = conversation
            .images
            .iter()
            .map(|image| Ok(ImageKey::new(&image.bytes()?, "")))
            .collect::<Result<Vec<_>>>()
            .ok()?;
        let reuse = state.reuse(&raw.ids, &keys);
        (reuse.raw >= state.first_prompt_len).then_some(reuse.raw)
    }

    /// The session's cache cut back to the `reuse` it serves, each layer grown (by a GPU copy)
    /// to hold `turn_rows[layer]` more. None when the session holds nothing the turn reuses. The session holds neither while the GPU works, so a turn that fails leaves
    /// it empty and its next turn starts over.
    pub(super) fn take_cache(
        &mut self,
        gpu: &Gpu,
        reuse: Reuse,
        turn_rows: &[usize],
    ) -> Result<Option<KvCache>> {
        let Some(mut state) = self.state.take() else {
            return Ok(None);
        };
        if reuse.raw == 0 {
            return Ok(None);
        }
        state.truncate(reuse);
        for (layer, &rows) in turn_rows.iter().enumerate() {
            let needed = state.cache.layers[layer].len + rows;
            if needed > state.cache.layers[layer].capacity() {
                state.cache.grow_layer(gpu, layer, needed)?;
            }
        }
        Ok(Some(state.cache))
    }

    /// Raw length of the session's first prompt (None before its first turn).
    pub(super) fn first_prompt_len(&self) -> Option<usize> {
        self.state.as_ref().map(|s| s.first_prompt_len)
    }

    /// Keep what a turn left (its `raw` ids are what its `cache` now holds).
    pub(super) fn store(&mut self, state: SessionState) {
        self.state = Some(state);
    }
}

impl SessionState {
    /// A follow-up keeps the first turn's template, padding and pruning: the cache was built
    /// with them.
    pub fn check_same_settings(&self, settings: &TurnSettings) -> Result<()> {
        let differs = |field: &str| {
            Err(Error::argument(
                field,
                format!("{field} differs from this session's first turn, whose KV cache was built with it (start a new session to change it)"),
            ))
        };
        if settings.template != self.template {
            return differs("template");
        }
        if settings.pad_to_square != self.pad_to_square {
            return differs("pad_to_square");
        }
        if settings.prune != self.prune {
            return differs("prune");
        }
        Ok(())
    }

    /// What the cache serves of a conversation whose placeholder-form ids are `raw` and whose
    /// images hash to `keys`: the common prefix, cut before the first held image that is not the
    /// conversation's image at its place, or whose stage-2 scoring text the conversation does
    /// not keep whole, and leaving at least one new id (its logits start the answer).
    pub fn reuse(&self, raw: &[u32], keys: &[ImageKey]) -> Reuse {
        reusable_prefix((&self.raw, &self.images), raw, keys)
    }

    /// Keep the cached rows of the `reuse.raw` leading ids only: each layer holds the text ids
    /// and, per held image, the rows it keeps in that layer.
    fn truncate(&mut self, reuse: Reuse) {
        self.images.truncate(reuse.images);
        let text = reuse.raw - reuse.images;
        for (l, layer) in self.cache.layers.iter_mut().enumerate() {
            layer.len = text
                + self
                    .images
                    .iter()
                    .map(|i| i.rows_in_layer(l))
                    .sum::<usize>();
        }
        self.raw.truncate(reuse.raw);
    }
}

/// [`SessionState::reuse`] over what the session holds (`held_raw` ids, `held` images): the
/// common prefix, cut before the first image that differs or whose stage-2 scoring text is not
/// kept whole. A cut can strand an image accepted before it whose scoring text reached past the
/// cut (two images pruned together in one turn, the second replaced): such images are dropped
/// too, back to the first whose text the prefix still keeps.
fn reusable_prefix(
    (held_raw, held): (&[u32], &[HeldImage]),
    raw: &[u32],
    keys: &[ImageKey],
) -> Reuse {
    let common = raw.iter().zip(held_raw).take_while(|(a, b)| a == b).count();
    let mut prefix = common.min(raw.len().saturating_sub(1));
    let mut images = 0;
    for (j, image) in held.iter().enumerate() {
        if image.placeholder >= prefix {
            break;
        }
        let same = keys.get(j) == Some(&image.id);
        let scored_text_kept = image.scored_until.is_none_or(|end| end <= prefix);
        if !same || !scored_text_kept {
            prefix = image.placeholder;
            while images > 0
                && held[images - 1]
                    .scored_until
                    .is_some_and(|end| end > prefix)
            {
                images -= 1;
                prefix = held[images].placeholder;
            }
            break;
        }
        images = j + 1;
    }
    Reuse {
        raw: prefix,
        images,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image at raw index `placeholder`, pruned at stage 2 by text up to `scored_until`.
    fn image(key: u8, placeholder: usize, scored_until: Option<usize>) -> HeldImage {
        HeldImage {
            id: ImageKey([key; 32]),
            placeholder,
            n0: 4,
            rows: 3,
            position_span: 3,
            kept: 2,
            pruned_from: 1,
            scored_until,
        }
    }

    #[test]
    fn reuse_stops_before_an_image_that_changed_and_its_turn_partners() {
        // Raw ids: text 0..=1, image A at 2, text 3, image B at 4, text 5..=9 (A and B pruned
        // together by the turn that ended at 8), then a fed answer.
        let held_raw: Vec<u32> = (0..12).collect();
        let held = [image(1, 2, Some(8)), image(2, 4, Some(8))];
        let keys = |b: u8| [ImageKey([1; 32]), ImageKey([b; 32])];
        let same = reusable_prefix((&held_raw, &held), &(0..15).collect::<Vec<_>>(), &keys(2));
        assert_eq!(same, Reuse { raw: 12, images: 2 });
        // B replaced: both go (A's kept rows were ranked with B), back to A's placeholder.
        let replaced = reusable_prefix((&held_raw, &held), &(0..15).collect::<Vec<_>>(), &keys(9));
        assert_eq!(replaced, Reuse { raw: 2, images: 0 });
        // The scoring text edited (ids differ from 6 on): both images go as well.
        let mut edited: Vec<u32> = (0..15).collect();
        edited[6] = 99;
        assert_eq!(
            reusable_prefix((&held_raw, &held), &edited, &keys(2)),
            Reuse { raw: 2, images: 0 }
        );
        // An unpruned image stays when later text changes; at least one new id is left.
        let unpruned = [image(1, 2, None)];
        assert_eq!(
            reusable_prefix((&held_raw, &unpruned), &edited, &keys(2)),
            Reuse { raw: 6, images: 1 }
        );
        assert_eq!(
            reusable_prefix((&held_raw, &unpruned), &held_raw[..5], &keys(2)),
            Reuse { raw: 4, images: 1 }
        );
    }
}
