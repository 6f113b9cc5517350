//! The scheduler: one request from image and prompt to text, one file per step.
//!
//! 1. `prepare.rs`: load and preprocess the image, render and tokenize the prompt, turn the
//!    pruning options into a [`Plan`](crate::prune::Plan), gather the token embeddings;
//! 2. `image.rs`: vision tower → stage 1 (or another before-projector selection) → projector;
//! 3. `prefill.rs`: the prompt through the decoder, stage 2 at layer K, the first logits;
//! 4. `decode.rs`: sampling, streamed text, one decoder step per token;
//! 5. `output.rs`: what the request returns (`--json`).
//!
//! `request.rs` holds what a caller asks for; `memory.rs` creates a request's buffers without
//! running it (`llava-wgpu memory`). Pruning follows `docs/pruning.md`.

mod anyres;
mod anyres_plan;
mod decode;
mod image;
mod memory;
mod output;
mod prefill;
mod prepare;
mod request;
mod session;

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use crate::error::Result;
use crate::gpu::Tensor;
use crate::model::llama::KvCache;
use crate::model::llava::Engine;
use crate::prune::cost::prefill_macs;
use crate::text::EncodedPrompt;
use crate::vision::anyres::PackedToken;

use anyres_plan::AnyresRequest;
use decode::{Decoded, TokenPicker};
pub use memory::RequestMemory;
use output::ms;
pub use output::{
    Flops, GenerateOutput, ImageFrom, KeptIndices, KeptPerView, MemoryReport, Timings,
    TokenLogprob, TurnReport, ViewPatch, VisualTokens,
};
use prefill::Prefilled;
use prepare::PreparedRequest;
pub use request::{Conversation, GenerateRequest, ImageInput, TurnSettings};
pub use session::Session;
use session::SessionState;

impl Engine {
    /// Answer `request`, calling `on_text` with each new piece of text as it is decoded: a
    /// session with one turn.
    pub fn generate(
        &self,
        request: &GenerateRequest,
        on_text: impl FnMut(&str),
    ) -> Result<GenerateOutput> {
        let mut session = Session::one_shot();
        let conversation = request.conversation();
        self.turn(
            &mut session,
            &conversation,
            &request.settings(),
            None,
            on_text,
        )
    }

    /// Answer the last message of `conversation` in `session`: prepare (tokenize, plan, find
    /// the image), image (encode + stage 1 + projector, unless cached or already in the
    /// session), prefill (stage 2 on a first turn), decode, output. `cancel`, once set, stops
    /// the answer before its next token.
    pub fn turn(
        &self,
        session: &mut Session,
        conversation: &Conversation,
        settings: &TurnSettings,
        cancel: Option<&AtomicBool>,
        mut on_text: impl FnMut(&str),
    ) -> Result<GenerateOutput> {
        let total = Instant::now();
        // Peaks from here on belong to this request (the weights stay alive across requests).
        self.gpu.memory.reset_peaks();
        let t0 = Instant::now();
        let mut input = self.prepare(session, conversation, settings)?;
        let preprocess_ms = ms(t0);
        self.gpu.profile_host_stage("preprocess", preprocess_ms);

        let t1 = Instant::now();
        let image = self.image_step(&input)?;
        let packed = image.as_ref().and_then(|i| i.packed.as_deref());
        self.fit_image(&mut input, packed, settings);
        let vision_ms = ms(t1);

        let prefill_start = Instant::now();
        let mut picker = TokenPicker::new(settings, &mut on_text, cancel);
        let first_prompt_len = session.first_prompt_len();
        let (cache, kept_before) = self.turn_cache(session, &input)?;
        let mut state = self.prefill(&input, image.as_ref(), cache, !picker.host_samples)?;
        // The logits row is read back only when the host samples or a caller asked for it.
        let wanted = picker.host_samples || settings.capture_outputs;
        let first_logits = self.read_if(wanted, &state.buffers.logits)?;
        let image_features = match &image {
            Some(image) => self.read_if(settings.capture_outputs, &image.embeddings)?,
            None => Vec::new(),
        };
        let kept_visual_indices = match kept_before {
            Some(kept) => kept,
            None => self.kept_indices(&input, image.and_then(|i| i.kept), &state)?,
        };
        let first = first_logits.clone();
        let decoded = self.decode(
            settings,
            &input,
            &mut state,
            &mut picker,
            first,
            prefill_start,
        )?;

        let kv_cache_bytes = state.cache.allocated_bytes();
        let memory = MemoryReport::of(&self.gpu.memory_stats());
        let decoded_steps = decoded.ids.len().saturating_sub(1);
        let turn = turn_report(&input);
        let timings_ms = timings(self.load_ms, (preprocess_ms, vision_ms), &decoded, total);
        session.store(session_state(
            &input,
            settings,
            first_prompt_len,
            &decoded.ids[..decoded.fed],
            state.cache,
            kept_visual_indices.clone(),
        ));
        Ok(GenerateOutput {
            text: self.tokenizer.decode(&decoded.ids)?,
            generated_ids: decoded.ids,
            prompt_tokens: input.prompt.ids.len(),
            visual_tokens: visual_tokens(&input),
            kept_visual_indices,
            kv_cache_bytes,
            timings_ms,
            decode_tokens_per_second: per_second(decoded_steps, decoded.decode_ms),
            flops: self.prefill_flops(&input),
            stop_reason: decoded.stop_reason,
            logprobs: decoded.logprobs,
            memory,
            first_logits,
            image_features,
            turn,
        })
    }

    /// The KV cache for `input`'s turn and, on a follow-up, the first turn's kept visual
    /// indices. A follow-up grows the session's cache by this turn's new rows and answer; a
    /// first turn gets a cache sized per layer for its prompt and answer.
    fn turn_cache(
        &self,
        session: &mut Session,
        input: &PreparedRequest,
    ) -> Result<(KvCache, Option<Option<KeptIndices>>)> {
        let turn_rows = input.prompt.ids.len() - input.reused + input.max_new.saturating_sub(1);
        Ok(
            match session.take_cache(&self.gpu, input.reused, turn_rows)? {
                Some((cache, kept)) => (cache, Some(kept)),
                None => (self.new_kv_cache(input)?, None),
            },
        )
    }

    /// Visual tokens the vision side gives `image`: fixed for LLaVA-1.5; on LLaVA-NeXT the
    /// patches of every view after unpadding, which depend on the image's size.
    pub fn visual_tokens_of(&self, image: &std::path::Path) -> Result<usize> {
        if self.config.anyres.is_none() {
            return Ok(self.config.image_tokens());
        }
        let decoded = crate::vision::load_image(image)?;
        let layout = self.anyres_layout(&decoded).expect("an anyres model");
        Ok(layout.visual_tokens())
    }

    /// The conversation's ids with `image_tokens` image tokens, as a turn would tokenize them
    /// (to match a conversation against sessions by prefix).
    pub fn tokenize_conversation(
        &self,
        conversation: &Conversation,
        settings: &TurnSettings,
        image_tokens: usize,
    ) -> Result<EncodedPrompt> {
        let text = settings.template.render_conversation(
            &conversation.messages,
            conversation.image_in,
            &self.tokenizer.image_token,
        )?;
        self.tokenizer.encode_with_image(&text, image_tokens)
    }

    /// The f32 contents of `tensor` when `wanted` (an empty vector otherwise): readbacks that
    /// only some requests need stay off the others' path.
    fn read_if(&self, wanted: bool, tensor: &Tensor) -> Result<Vec<f32>> {
        if wanted {
            self.gpu.read_f32(tensor)
        } else {
            Ok(Vec::new())
        }
    }

    /// Kept visual tokens per stage as indices into the original patch grid (None when no
    /// pruning ran). `stage1` comes from the image pass; stage 2's kept prompt rows are read
    /// back and mapped through stage 1's selection.
    fn kept_indices(
        &self,
        input: &PreparedRequest,
        stage1: Option<Vec<usize>>,
        state: &Prefilled,
    ) -> Result<Option<KeptIndices>> {
        let plan = &input.plan;
        if plan.before_projector.is_none() && plan.stage2.is_none() {
            return Ok(None);
        }
        let image_rows = input.prompt.image_start..input.prompt.image_start + plan.n1();
        // Stage 2's kept rows, as positions among the image rows.
        let stage2_local = match &state.stage2_rows {
            Some(rows) => Some(
                self.gpu
                    .read_u32(rows)?
                    .iter()
                    .map(|&r| r as usize)
                    .filter(|r| image_rows.contains(r))
                    .map(|r| r - image_rows.start)
                    .collect::<Vec<_>>(),
            ),
            None => None,
        };
        if let Some(anyres) = &input.anyres {
            return Ok(Some(kept_per_view(anyres, stage2_local)));
        }
        let stage2 = stage2_local.map(|local| {
            let original = |l: usize| stage1.as_ref().map_or(l, |s| s[l]);
            local.into_iter().map(original).collect()
        });
        Ok(Some(KeptIndices {
            stage1,
            stage2,
            per_view: None,
        }))
    }

    /// Theoretical prefill multiply-adds of the decoder, as run and without pruning, for the
    /// conversation's whole prompt as one prefill (a follow-up turn computes fewer).
    fn prefill_flops(&self, input: &PreparedRequest) -> Flops {
        let text = &self.config.text;
        let (widths, layers) = (text.layer_widths(), text.num_hidden_layers);
        let plan = &input.plan;
        let text_tokens = input.prompt.ids.len() - plan.n1();
        Flops {
            prefill: prefill_macs(&plan.tokens_per_layer(text_tokens, layers), &widths),
            prefill_unpruned: prefill_macs(&vec![text_tokens + plan.n0; layers], &widths),
        }
    }
}

/// What the session keeps after a turn: the settings its cache was built with, the ids the
/// cache now holds (the prompt and the generated ids `fed` back through the decoder) and the
/// cache itself.
fn session_state(
    input: &PreparedRequest,
    settings: &TurnSettings,
    first_prompt_len: Option<usize>,
    fed: &[u32],
    cache: KvCache,
    kept: Option<KeptIndices>,
) -> SessionState {
    let mut tokens = input.prompt.ids.clone();
    tokens.extend_from_slice(fed);
    SessionState {
        image: input.image_id,
        template: settings.template,
        pad_to_square: settings.pad_to_square,
        prune: settings.prune.clone(),
        plan: input.plan,
        anyres: input.anyres.clone(),
        image_start: input.prompt.image_start,
        first_prompt_len: first_prompt_len.unwrap_or(input.prompt.ids.len()),
        tokens,
        cache,
        kept,
    }
}

/// How the turn reused earlier work: its shared prefix and where its image rows came from.
fn turn_report(input: &PreparedRequest) -> TurnReport {
    TurnReport {
        reused_tokens: input.reused,
        image: match &input.image {
            prepare::ImageStep::InSession => ImageFrom::Session,
            prepare::ImageStep::Cached(_) => ImageFrom::Cache,
            prepare::ImageStep::Encode { .. } => ImageFrom::Encoder,
        },
    }
}

/// LLaVA-NeXT's kept patches: after the image pass (when it selected), the packed patch rows;
/// after stage 2, the patches of the rows it kept (`stage2_local`: positions among the image
/// rows; newline rows, always kept, are no patches).
fn kept_per_view(anyres: &AnyresRequest, stage2_local: Option<Vec<usize>>) -> KeptIndices {
    let patch = |token: &PackedToken| match *token {
        PackedToken::Patch { view, index } => Some(ViewPatch { view, index }),
        PackedToken::Newline => None,
    };
    let stage1 = anyres
        .per_view
        .as_ref()
        .map(|_| anyres.packed.iter().filter_map(patch).collect());
    let stage2 = stage2_local.map(|local| {
        let rows = local.into_iter().map(|l| &anyres.packed[l]);
        rows.filter_map(patch).collect()
    });
    KeptIndices {
        stage1: None,
        stage2: None,
        per_view: Some(KeptPerView { stage1, stage2 }),
    }
}

/// Visual tokens per stage. On LLaVA-NeXT, patch tokens that reach the language model:
/// `image_newline` rows are no visual tokens (docs/pruning.md).
fn visual_tokens(input: &PreparedRequest) -> VisualTokens {
    match &input.anyres {
        Some(anyres) => {
            let after_stage1 = anyres.patch_tokens();
            VisualTokens {
                encoder: anyres.layout.visual_tokens(),
                after_stage1,
                after_stage2: anyres
                    .stage2_keep
                    .map_or(after_stage1, |keep| keep.min(after_stage1)),
            }
        }
        None => VisualTokens::of(&input.plan),
    }
}

/// A turn's timings: host preprocessing and the image pass as measured around them, prefill and
/// decode as the decoding loop measured them, and the whole turn since `start`.
fn timings(
    load: f64,
    (preprocess, vision): (f64, f64),
    decoded: &Decoded,
    start: Instant,
) -> Timings {
    Timings {
        load,
        preprocess,
        vision,
        prefill: decoded.prefill_ms,
        decode: decoded.decode_ms,
        total: ms(start),
    }
}

/// Events per second over `ms` milliseconds (0 when no time passed).
fn per_second(events: usize, ms: f64) -> f64 {
    if ms > 0.0 {
        events as f64 / (ms / 1e3)
    } else {
        0.0
    }
}
