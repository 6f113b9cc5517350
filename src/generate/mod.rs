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
mod host_stage2;
mod image;
mod memory;
mod output;
mod positions;
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
use crate::vision::anyres::PackedToken;

use anyres_plan::AnyresRequest;
use decode::{Decoded, TokenPicker};
use image::EncodedImage;
pub use memory::RequestMemory;
use output::ms;
pub use output::{
    GenerateOutput, ImageFrom, ImageReport, KeptIndices, KeptPerView, MemoryReport, PrefillMacs,
    PruneReport, Timings, TokenLogprob, TurnReport, ViewPatch, VisualTokens,
};
use positions::image_positions;
use prefill::Prefilled;
use prepare::{PreparedRequest, TurnImage};
pub use request::{Conversation, GenerateRequest, ImageInput, TurnSettings, DEFAULT_MAX_IMAGES};
pub use session::Session;
use session::{HeldImage, SessionState};

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

    /// Answer the last message of `conversation` in `session`: prepare (tokenize, find what
    /// the session holds, plan and find each new image), images (encode + stage 1 + projector
    /// per new image, unless cached), prefill (stage 2 over the turn's images), decode, output.
    /// `cancel`, once set, stops the answer before its next token.
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
        let images = self.image_steps(&input)?;
        self.fit_images(&mut input, &images, settings)?;
        let positions = self.row_positions(&input, &images, settings.prune.positions);
        debug_assert_eq!(positions.next, input.next_position);
        let vision_ms = ms(t1);

        let prefill_start = Instant::now();
        let mut picker = TokenPicker::new(settings, &mut on_text, cancel);
        let first_prompt_len = session.first_prompt_len();
        let cache = self.turn_cache(session, &input)?;
        let mut state = self.prefill(
            &input,
            &images,
            &positions.rows,
            cache,
            !picker.host_samples,
        )?;
        // The logits row is read back only when the host samples or a caller asked for it.
        let wanted = picker.host_samples || settings.capture_outputs;
        let first_logits = self.read_if(wanted, &state.buffers.logits)?;
        let mut image_features = Vec::new();
        for image in &images {
            image_features.extend(self.read_if(settings.capture_outputs, &image.embeddings)?);
        }
        let spans = position_spans(&input, &images, settings);
        let kept = self.kept_indices(&input, images, &state)?;
        let first = first_logits.clone();
        let decoded = self.decode(
            settings,
            &input,
            &mut state,
            &mut picker,
            first,
            prefill_start,
        )?;

        let measured = Measured {
            kv_cache_bytes: state.cache.allocated_bytes(),
            memory: MemoryReport::of(&self.gpu.memory_stats()),
            timings_ms: timings(self.load_ms, (preprocess_ms, vision_ms), &decoded, total),
            first_logits,
            image_features,
        };
        let reports = image_reports(&input, &kept);
        let new_state = session_state(
            &input,
            (settings, first_prompt_len),
            &decoded,
            state.cache,
            (&kept, &spans),
        );
        let macs = self.prefill_macs(&input, &new_state.images);
        session.store(new_state);
        self.turn_output(&input, settings, decoded, (reports, macs), measured)
    }

    /// What a turn returns, from its parts.
    fn turn_output(
        &self,
        input: &PreparedRequest,
        settings: &TurnSettings,
        decoded: Decoded,
        (reports, prefill_macs): (Vec<ImageReport>, PrefillMacs),
        measured: Measured,
    ) -> Result<GenerateOutput> {
        let decoded_steps = decoded.ids.len().saturating_sub(1);
        Ok(GenerateOutput {
            text: self.tokenizer.decode(&decoded.ids)?,
            generated_ids: decoded.ids,
            prompt_tokens: input.prompt.ids.len(),
            visual_tokens: VisualTokens::sum(reports.iter().map(|r| &r.visual_tokens)),
            kept_visual_indices: match reports.as_slice() {
                [only] => only.kept_visual_indices.clone(),
                _ => None,
            },
            images: reports,
            kv_cache_bytes: measured.kv_cache_bytes,
            timings_ms: measured.timings_ms,
            decode_tokens_per_second: per_second(decoded_steps, decoded.decode_ms),
            decode_host_us_per_token: median_or_zero(&decoded.host_us),
            prefill_macs,
            prune: PruneReport::of(
                settings.prune.method,
                input.images.first().map(|i| &i.plan),
                settings.prune.positions,
            ),
            stop_reason: decoded.stop_reason,
            logprobs: decoded.logprobs,
            memory: measured.memory,
            first_logits: measured.first_logits,
            image_features: measured.image_features,
            turn: turn_report(input),
        })
    }

    /// The KV cache for `input`'s turn: the session's, cut back to what the turn reuses and
    /// grown by the turn's new rows and answer, or one sized for them.
    fn turn_cache(&self, session: &mut Session, input: &PreparedRequest) -> Result<KvCache> {
        let turn_rows = prefill::turn_rows_per_layer(input, self.llama.layers.len());
        match session.take_cache(&self.gpu, input.reuse, &turn_rows)? {
            Some(cache) => Ok(cache),
            None => self.new_kv_cache(input),
        }
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

    /// The f32 contents of `tensor` when `wanted` (an empty vector otherwise): readbacks that
    /// only some requests need stay off the others' path.
    fn read_if(&self, wanted: bool, tensor: &Tensor) -> Result<Vec<f32>> {
        if wanted {
            self.gpu.read_f32(tensor)
        } else {
            Ok(Vec::new())
        }
    }

    /// What each new image kept: its indices into the original patch grid per stage (None
    /// when no pruning ran) and its rows in the layers after stage 2. `images[i]` is the image
    /// pass of `input.images[i]`; stage 2's kept rows are read back and split per image.
    fn kept_indices(
        &self,
        input: &PreparedRequest,
        images: Vec<EncodedImage>,
        state: &Prefilled,
    ) -> Result<Vec<ImageKept>> {
        // Stage 2's kept rows, as local prompt rows.
        let stage2_rows = match &state.stage2_rows {
            Some(rows) => Some(self.gpu.read_u32(rows)?),
            None => None,
        };
        let mut kept = Vec::with_capacity(images.len());
        for (image, encoded) in input.images.iter().zip(images) {
            let span = input.span(image);
            let local = (span.start - input.reused)..(span.end() - input.reused);
            // Stage 2's kept rows of this image, as positions among its rows.
            let stage2_local: Option<Vec<usize>> = stage2_rows.as_ref().map(|rows| {
                let mine = rows
                    .iter()
                    .map(|&r| r as usize)
                    .filter(|r| local.contains(r));
                mine.map(|r| r - local.start).collect()
            });
            let rows = stage2_local.as_ref().map_or(span.len, Vec::len);
            let plan = &image.plan;
            let indices = if plan.before_projector.is_none() && plan.stage2.is_none() {
                None
            } else if let Some(anyres) = &image.anyres {
                Some(kept_per_view(anyres, stage2_local))
            } else {
                let stage1 = encoded.kept;
                let stage2 = stage2_local.map(|local| {
                    let original = |l: usize| stage1.as_ref().map_or(l, |s| s[l]);
                    local.into_iter().map(original).collect()
                });
                Some(KeptIndices {
                    stage1,
                    stage2,
                    per_view: None,
                })
            };
            kept.push(ImageKept { indices, rows });
        }
        Ok(kept)
    }

    /// Theoretical prefill multiply-adds of the decoder, as run and without pruning, for the
    /// conversation's whole prompt as one prefill (a follow-up turn computes fewer); `images`
    /// are every image of the conversation as the cache now holds it.
    fn prefill_macs(&self, input: &PreparedRequest, images: &[HeldImage]) -> PrefillMacs {
        let text = &self.config.text;
        let (widths, layers) = (text.layer_widths(), text.num_hidden_layers);
        let text_tokens = input.prompt.text_tokens();
        let per_layer: Vec<usize> = (0..layers)
            .map(|l| text_tokens + images.iter().map(|i| i.rows_in_layer(l)).sum::<usize>())
            .collect();
        let unpruned = text_tokens + images.iter().map(|i| i.n0).sum::<usize>();
        PrefillMacs {
            prefill: prefill_macs(&per_layer, &widths),
            prefill_unpruned: prefill_macs(&vec![unpruned; layers], &widths),
        }
    }
}

/// What a turn measured about itself, for its output.
struct Measured {
    kv_cache_bytes: u64,
    memory: MemoryReport,
    timings_ms: Timings,
    first_logits: Vec<f32>,
    image_features: Vec<f32>,
}

/// The positions each new image takes (see `positions.rs`), for the session.
fn position_spans(
    input: &PreparedRequest,
    images: &[EncodedImage],
    settings: &TurnSettings,
) -> Vec<usize> {
    let spans = input.images.iter().zip(images);
    spans
        .map(|(image, encoded)| {
            let rows = input.span(image).len;
            image_positions(image, encoded, rows, settings.prune.positions).span
        })
        .collect()
}

/// What one new image kept (see [`Engine::kept_indices`]).
struct ImageKept {
    indices: Option<KeptIndices>,
    /// Its rows in the layers after stage 2 (all of its rows when stage 2 did not run).
    rows: usize,
}

/// What the session keeps after a turn: the settings its cache was built with, the ids the
/// cache now holds (the prompt and the generated ids fed back through the decoder), the images
/// among them, and the cache itself.
fn session_state(
    input: &PreparedRequest,
    (settings, first_prompt_len): (&TurnSettings, Option<usize>),
    decoded: &Decoded,
    cache: KvCache,
    (kept, position_spans): (&[ImageKept], &[usize]),
) -> SessionState {
    let mut raw = input.raw.ids.clone();
    raw.extend_from_slice(&decoded.ids[..decoded.fed]);
    let mut images = input.held.clone();
    for ((image, kept), &position_span) in input.images.iter().zip(kept).zip(position_spans) {
        let stage2 = image.plan.stage2;
        images.push(HeldImage {
            id: input.keys[image.index],
            placeholder: input.raw.placeholders[image.index],
            n0: image.plan.n0,
            rows: input.span(image).len,
            position_span,
            kept: kept.rows,
            pruned_from: stage2.map_or(usize::MAX, |s| s.layer),
            scored_until: stage2.map(|_| input.raw.ids.len()),
        });
    }
    // A turn that does not keep the first prompt whole starts the conversation over.
    let first_prompt_len = match (first_prompt_len, input.reuse.raw) {
        (Some(len), reused) if reused >= len => len,
        _ => input.raw.ids.len(),
    };
    SessionState {
        first_prompt_len,
        template: settings.template,
        pad_to_square: settings.pad_to_square,
        prune: settings.prune.clone(),
        raw,
        images,
        cache,
    }
}

/// How the turn reused earlier work: its shared prefix and where each image's rows came from.
fn turn_report(input: &PreparedRequest) -> TurnReport {
    let held = input.held.iter().map(|_| ImageFrom::Session);
    let new = input.images.iter().map(|image| match &image.step {
        prepare::ImageStep::Cached(_) => ImageFrom::Cache,
        prepare::ImageStep::Encode { .. } => ImageFrom::Encoder,
    });
    TurnReport {
        reused_tokens: input.reused,
        images: held.chain(new).collect(),
    }
}

/// Per new image: its index in the conversation, its visual tokens per stage and its kept
/// patches.
fn image_reports(input: &PreparedRequest, kept: &[ImageKept]) -> Vec<ImageReport> {
    input
        .images
        .iter()
        .zip(kept)
        .map(|(image, kept)| {
            let mut visual_tokens = visual_tokens(image);
            // Stage 2 ranks a turn's images together: what each kept is counted, not its share.
            if let Some(indices) = &kept.indices {
                let per_view = indices.per_view.as_ref().and_then(|p| p.stage2.as_ref());
                if let Some(n) = indices
                    .stage2
                    .as_ref()
                    .map(Vec::len)
                    .or(per_view.map(Vec::len))
                {
                    visual_tokens.after_stage2 = n;
                }
            }
            ImageReport {
                index: image.index,
                visual_tokens,
                kept_visual_indices: kept.indices.clone(),
            }
        })
        .collect()
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

/// An image's visual tokens per stage. On LLaVA-NeXT, patch tokens that reach the language
/// model: `image_newline` rows are no visual tokens (docs/pruning.md).
fn visual_tokens(image: &TurnImage) -> VisualTokens {
    match &image.anyres {
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
        None => VisualTokens::of(&image.plan),
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
        total_includes_load: false,
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

/// The median of `values`, or 0 for none.
fn median_or_zero(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}
