//! A conversation's state between turns: its tokens, the KV cache that holds them and the
//! pruning decisions of its first turn.
//!
//! A follow-up turn renders the whole conversation, keeps the longest prefix of ids the session
//! already holds (at least its whole first prompt) and prefills only the rest, at the positions
//! after it, through every layer. The visual tokens stage 1 and stage 2 kept for the first
//! question stay the conversation's visual tokens: layers ≥ K hold only the N2 survivors for
//! every later turn too. A session holds one image; a conversation about another image needs a
//! new session.

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::model::image_cache::ImageKey;
use crate::model::llama::KvCache;
use crate::model::llava::Engine;
use crate::prune::{Plan, PruneOptions};
use crate::text::{EncodedPrompt, Template};

use super::anyres_plan::AnyresRequest;
use super::output::KeptIndices;
use super::request::{Conversation, TurnSettings};

/// One conversation with an [`Engine`]; answer its turns with [`Engine::turn`].
pub struct Session {
    image_cache: bool,
    state: Option<SessionState>,
}

/// What the first turn leaves: the ids the cache holds and the settings they were made with.
pub(super) struct SessionState {
    /// Hash of the image's bytes.
    pub image: ImageKey,
    pub template: Template,
    pub pad_to_square: Option<bool>,
    pub prune: PruneOptions,
    pub plan: Plan,
    /// LLaVA-NeXT: the image's tiling and the packed rows the cache holds (None for 1.5).
    pub anyres: Option<AnyresRequest>,
    pub image_start: usize,
    /// Length of the first prompt, whose text after the image scored stage 2.
    pub first_prompt_len: usize,
    /// Every id whose keys and values the cache holds, in order (prompt ids and generated ids
    /// that went through the decoder).
    pub tokens: Vec<u32>,
    pub cache: KvCache,
    pub kept: Option<KeptIndices>,
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

    /// Ids whose keys and values the session holds (empty before its first turn).
    pub fn tokens(&self) -> &[u32] {
        self.state.as_ref().map_or(&[], |s| &s.tokens)
    }

    /// Forget the conversation (the next turn is a first turn).
    pub fn reset(&mut self) {
        self.state = None;
    }

    /// How many leading ids of `conversation` this session would reuse for a turn with
    /// `settings`, or None when it cannot continue it (another image or settings, or a
    /// conversation that does not extend its first prompt).
    pub fn continues(
        &self,
        engine: &Engine,
        conversation: &Conversation,
        settings: &TurnSettings,
    ) -> Option<usize> {
        let state = self.state.as_ref()?;
        state.check_same_settings(settings).ok()?;
        let bytes = conversation.image.bytes().ok()?;
        if ImageKey::new(&bytes, "") != state.image {
            return None;
        }
        let prompt = engine
            .tokenize_conversation(conversation, settings, state.plan.n1())
            .ok()?;
        state.reusable_prefix(&prompt)
    }

    /// The pruning plan of the first turn (None before it).
    pub fn plan(&self) -> Option<&Plan> {
        self.state.as_ref().map(|s| &s.plan)
    }

    /// A follow-up's KV cache and the first turn's kept visual indices: the session's cache cut
    /// back to the `reused` ids the turn shares, each layer grown (by a GPU copy) to hold
    /// `turn_rows` more (the turn's new prompt rows and its answer). None before a first turn.
    /// The session holds neither while the GPU works, so a turn that fails leaves it empty and
    /// its next turn starts over.
    pub(super) fn take_cache(
        &mut self,
        gpu: &Gpu,
        reused: usize,
        turn_rows: usize,
    ) -> Result<Option<(KvCache, Option<KeptIndices>)>> {
        let Some(mut state) = self.state.take() else {
            return Ok(None);
        };
        state.truncate(reused);
        for layer in 0..state.cache.layers.len() {
            let needed = state.cache.layers[layer].len + turn_rows;
            if needed > state.cache.layers[layer].capacity() {
                state.cache.grow_layer(gpu, layer, needed)?;
            }
        }
        Ok(Some((state.cache, state.kept)))
    }

    /// Keep what a turn left (its `tokens` are what its `cache` now holds).
    pub(super) fn store(&mut self, state: SessionState) {
        self.state = Some(state);
    }

    pub(super) fn first_prompt_len(&self) -> Option<usize> {
        self.state.as_ref().map(|s| s.first_prompt_len)
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

    /// Leading ids of `prompt` to reuse: the common prefix with what the cache holds, leaving at
    /// least one new id (its logits start the answer), and covering the whole first prompt.
    pub fn reusable_prefix(&self, prompt: &EncodedPrompt) -> Option<usize> {
        if prompt.image_start != self.image_start || prompt.image_tokens != self.plan.n1() {
            return None;
        }
        let common = prompt
            .ids
            .iter()
            .zip(&self.tokens)
            .take_while(|(a, b)| a == b)
            .count();
        let reused = common.min(prompt.ids.len().saturating_sub(1));
        (reused >= self.first_prompt_len).then_some(reused)
    }

    /// Drop the cached rows of every id after the first `len`. Layers ≥ K hold N1 − N2 fewer
    /// rows than the others (the visual rows stage 2 dropped), all of them in the first prompt.
    fn truncate(&mut self, len: usize) {
        let dropped = self.plan.n1() - self.plan.n2();
        let first_pruned = self.plan.stage2.map_or(usize::MAX, |s| s.layer);
        for (i, layer) in self.cache.layers.iter_mut().enumerate() {
            layer.len = if i >= first_pruned {
                len - dropped
            } else {
                len
            };
        }
        self.tokens.truncate(len);
    }
}
