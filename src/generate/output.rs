//! What a request returns: the text and ids, and the numbers `--json` prints about how they
//! were produced (token counts per pruning stage, kept patches, memory, time, flops).

use std::time::Instant;

use serde::Serialize;

use crate::gpu::MemoryStats;
use crate::prune::{BeforeProjector, Method, Plan, Positions, Stage1Score};

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

/// Milliseconds per step of a request, printed to the microsecond.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    /// Loading the model (once per engine; not part of `total`).
    #[serde(serialize_with = "microseconds")]
    pub load: f64,
    #[serde(serialize_with = "microseconds")]
    pub preprocess: f64,
    #[serde(serialize_with = "microseconds")]
    pub vision: f64,
    #[serde(serialize_with = "microseconds")]
    pub prefill: f64,
    #[serde(serialize_with = "microseconds")]
    pub decode: f64,
    /// The request from its start to its last token, without `load`.
    #[serde(serialize_with = "microseconds")]
    pub total: f64,
    /// Always false: says in the JSON that `total` leaves `load` out.
    pub total_includes_load: bool,
}

/// Milliseconds rounded to the microsecond (a timer's digits beyond it are noise).
fn microseconds<S: serde::Serializer>(ms: &f64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64((ms * 1e3).round() / 1e3)
}

/// GPU bytes allocated, read from the device's allocation tracker (`gpu/memory.rs`): the sizes
/// of buffers that existed, not a formula over shapes.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MemoryReport {
    /// Weights alive at the end of the request (the loaded model).
    pub weights_bytes: u64,
    /// The most KV-cache bytes alive at once during the request (not serialised: the output's
    /// `kv_cache_bytes` is the request's cache).
    #[serde(skip)]
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
pub struct PrefillMacs {
    pub prefill: u64,
    pub prefill_unpruned: u64,
}

/// The pruning a turn ran, as resolved for its images: N1 (`stage1_keep`, STAR's stage 1), N2
/// (`keep`: what stage 2 or a before-projector method keeps per image) and K. Budgets are absent
/// when the method has no such stage, or when the turn prefilled no image.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PruneReport {
    pub method: Method,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage1_keep: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage1_score: Option<Stage1Score>,
    /// VisPruner's share of important tokens in `keep`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub important_ratio: Option<f64>,
    /// An adaptive stage 1's share of attention mass (`stage1_keep` is then what the first
    /// image kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage1_keep_mass: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage2_layer: Option<usize>,
    /// An adaptive stage 2's share of attention mass (`keep` is then its cap per image, and
    /// `visual_tokens` counts what it kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_mass: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_floor: Option<usize>,
    /// Where the tokens kept before the projector sit (absent without such a selection).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub positions: Option<Positions>,
    /// The patches the selection before the projector dropped were merged into the kept ones
    /// (absent when not).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub merge: bool,
}

impl PruneReport {
    /// `method` as `plan` (an image's plan, when the turn had one) resolved it, its kept
    /// tokens at `positions`.
    pub fn of(method: Method, plan: Option<&Plan>, positions: Positions) -> Self {
        let mut report = Self {
            method,
            ..Self::default()
        };
        let Some(plan) = plan else {
            return report;
        };
        report.merge = plan.merge;
        match (plan.before_projector, plan.stage2) {
            (
                Some(BeforeProjector::TopK {
                    score,
                    keep,
                    adaptive,
                }),
                Some(_),
            ) => {
                report.stage1_keep = Some(keep);
                report.stage1_score = Some(score);
                report.stage1_keep_mass = adaptive.map(|a| a.mass);
            }
            (
                Some(BeforeProjector::VisPruner {
                    keep,
                    score,
                    important_ratio,
                }),
                None,
            ) => {
                report.keep = Some(keep);
                report.stage1_score = Some(score);
                report.important_ratio = Some(important_ratio);
            }
            (Some(_), None) => report.keep = Some(plan.n1()),
            _ => {}
        }
        if let Some(stage2) = plan.stage2 {
            report.keep = Some(stage2.keep);
            report.stage2_layer = Some(stage2.layer);
            report.keep_mass = stage2.adaptive.map(|a| a.mass);
            report.keep_floor = stage2.adaptive.map(|a| a.floor);
        }
        if let Some(BeforeProjector::TopK {
            adaptive: Some(a), ..
        }) = plan.before_projector
        {
            report.keep_floor = Some(a.floor);
        }
        if plan.before_projector.is_some() {
            report.positions = Some(positions);
        }
        report
    }
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
    /// Median over the decoder steps of the host thread's CPU microseconds to give the GPU the
    /// step's work (the replayed dispatches recorded and submitted; the sampled token written
    /// first when the host samples); 0 without a decoder step. CPU time: a driver may hold the
    /// submit until the previous step is done, and that wait is not host work.
    pub decode_host_us_per_token: f64,
    pub prefill_macs: PrefillMacs,
    /// The pruning that ran, with its budgets resolved.
    pub prune: PruneReport,
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
