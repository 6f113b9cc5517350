//! What a request returns: the text and ids, and the numbers `--json` prints about how they
//! were produced (token counts per pruning stage, kept patches, memory, time, flops).

use std::time::Instant;

use serde::Serialize;

use crate::gpu::MemoryStats;
use crate::prune::Plan;

#[derive(Clone, Debug, Default, Serialize)]
pub struct VisualTokens {
    pub encoder: usize,
    pub after_stage1: usize,
    pub after_stage2: usize,
}

/// Kept visual tokens as original patch-grid indices (raster order), per stage.
impl VisualTokens {
    /// The counts a pruning plan leads to.
    pub fn of(plan: &Plan) -> Self {
        Self {
            encoder: plan.n0,
            after_stage1: plan.n1(),
            after_stage2: plan.n2(),
        }
    }

    /// The counts of several images together.
    pub fn sum<'a>(each: impl Iterator<Item = &'a VisualTokens>) -> Self {
        each.fold(Self::default(), |total, v| Self {
            encoder: total.encoder + v.encoder,
            after_stage1: total.after_stage1 + v.after_stage1,
            after_stage2: total.after_stage2 + v.after_stage2,
        })
    }
}

/// One image a turn prefilled: its place among the conversation's images, its visual tokens per
/// stage and the patches it kept.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ImageReport {
    /// Index among the conversation's images (0 = the first image of the conversation).
    pub index: usize,
    pub visual_tokens: VisualTokens,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept_visual_indices: Option<KeptIndices>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct KeptIndices {
    pub stage1: Option<Vec<usize>>,
    pub stage2: Option<Vec<usize>>,
    /// LLaVA-NeXT: the kept patches of each stage as (view, index on that view's grid);
    /// `stage1` and `stage2` are then None.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_view: Option<KeptPerView>,
}

/// A LLaVA-NeXT request's kept patches per stage, in prompt order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KeptPerView {
    pub stage1: Option<Vec<ViewPatch>>,
    pub stage2: Option<Vec<ViewPatch>>,
}

/// Patch `index` (raster order on the view's own grid) of view `view` (0 = the base view, then
/// the crops in raster order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ViewPatch {
    pub view: usize,
    pub index: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    pub load: f64,
    pub preprocess: f64,
    pub vision: f64,
    pub prefill: f64,
    pub decode: f64,
    pub total: f64,
}

/// GPU bytes allocated, read from the device's allocation tracker (`gpu/memory.rs`): the sizes
/// of buffers that existed, not a formula over shapes.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MemoryReport {
    /// Weights alive at the end of the request (the loaded model).
    pub weights_bytes: u64,
    /// The most KV-cache bytes alive at once during the request.
    pub kv_cache_bytes: u64,
    /// The most activation bytes alive at once during the request.
    pub activation_bytes: u64,
    /// The most scratch bytes (uniform blocks, readback staging) alive at once.
    pub scratch_bytes: u64,
    /// The most bytes of all kinds alive at once during the request.
    pub peak_bytes: u64,
}

impl MemoryReport {
    /// The request's figures from the tracker's counters (peaks reset when it started).
    pub fn of(stats: &MemoryStats) -> Self {
        Self {
            weights_bytes: stats.live.weights,
            kv_cache_bytes: stats.peak.kv,
            activation_bytes: stats.peak.activations,
            scratch_bytes: stats.peak.scratch,
            peak_bytes: stats.peak_total,
        }
    }
}

/// Theoretical prefill multiply-adds of the decoder (the cost model of docs/pruning.md).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Flops {
    pub prefill: u64,
    pub prefill_unpruned: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct GenerateOutput {
    pub text: String,
    pub generated_ids: Vec<u32>,
    pub prompt_tokens: usize,
    /// Visual tokens per stage of the images this turn prefilled, together (zero for a
    /// text-only turn and for a follow-up whose images the session already held).
    pub visual_tokens: VisualTokens,
    /// The kept patches when the turn prefilled exactly one image (`images` has every image's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept_visual_indices: Option<KeptIndices>,
    /// Each image this turn prefilled, in prompt order.
    pub images: Vec<ImageReport>,
    /// Bytes of the KV-cache buffers this request allocated (every layer's K and V, each sized
    /// for the rows that layer holds: pruned layers are smaller).
    pub kv_cache_bytes: u64,
    pub timings_ms: Timings,
    pub decode_tokens_per_second: f64,
    pub flops: Flops,
    pub stop_reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<Vec<TokenLogprob>>>,
    pub memory: MemoryReport,
    /// Logits of the first generated step, with `capture_outputs` (not serialised).
    #[serde(skip)]
    pub first_logits: Vec<f32>,
    /// Projector output [visual tokens, text width], with `capture_outputs` (not serialised).
    #[serde(skip)]
    pub image_features: Vec<f32>,
    /// How the turn used its session and the image cache (not serialised: `run --json` has
    /// one turn).
    #[serde(skip)]
    pub turn: TurnReport,
}

/// Where an image's rows came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImageFrom {
    /// The vision tower, stage 1 and the projector ran.
    #[default]
    Encoder,
    /// The engine's image cache held the projector output.
    Cache,
    /// An earlier turn prefilled it: the session's KV cache holds its rows.
    Session,
}

#[derive(Clone, Debug, Default)]
pub struct TurnReport {
    /// Prompt ids whose keys and values came from the session's cache.
    pub reused_tokens: usize,
    /// Where each image of the conversation came from, in order.
    pub images: Vec<ImageFrom>,
}

/// Milliseconds since `since`.
pub(super) fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}
