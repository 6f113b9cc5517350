//! Visual-token pruning, exactly as docs/pruning.md specifies: STAR's two stages and, for
//! comparison in the same engine, FastV, FasterVLM, VisPruner, DART, DivPrune and a random
//! baseline.
//!
//! This module turns the user's method and budgets into a [`Plan`] (what each stage keeps and
//! where it runs) and holds the host-side selection rules (VisPruner's diversity step, DART's
//! duplication, DivPrune's max-min diversity, random).
//! The GPU work (score accumulation inside attention, top-k, compaction) is scheduled by
//! `generate.rs`.

pub mod cost;
pub mod dart;
pub mod divprune;
pub mod merge;
pub mod vispruner;

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Every visual token reaches the language model.
    #[default]
    None,
    /// Stage 1 in the vision encoder, stage 2 at decoder layer K.
    Star,
    /// Drop at decoder layer K by the last prompt row's attention (no stage 1).
    Fastv,
    /// Before the projector by the CLS attention row.
    Fastervlm,
    /// Before the projector: important tokens by CLS attention plus diverse ones by similarity.
    Vispruner,
    /// Before the projector, uniformly at random with a seed.
    Random,
    /// At decoder layer K (default 2): pivot tokens by key norm, then the tokens least similar
    /// to each pivot (no attention scores).
    Dart,
    /// Before decoder layer 0: max-min diversity over the projected image features.
    Divprune,
}

/// What stage 1 (or a before-projector method) scores patches by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage1Score {
    /// Attention each patch receives, averaged over heads and all queries.
    #[default]
    Attention,
    /// The CLS query row only (FasterVLM).
    Cls,
}

impl Method {
    pub const ALL: [Method; 8] = [
        Method::None,
        Method::Star,
        Method::Fastv,
        Method::Fastervlm,
        Method::Vispruner,
        Method::Random,
        Method::Dart,
        Method::Divprune,
    ];

    /// The lower-case name, as in JSON output and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Method::None => "none",
            Method::Star => "star",
            Method::Fastv => "fastv",
            Method::Fastervlm => "fastervlm",
            Method::Vispruner => "vispruner",
            Method::Random => "random",
            Method::Dart => "dart",
            Method::Divprune => "divprune",
        }
    }
}

impl Stage1Score {
    pub const ALL: [Stage1Score; 2] = [Stage1Score::Attention, Stage1Score::Cls];

    pub fn name(self) -> &'static str {
        match self {
            Stage1Score::Attention => "attention",
            Stage1Score::Cls => "cls",
        }
    }
}

/// Parse one of `all` by its `name`; the error names the API `field`.
fn parse_name<T: Copy>(
    text: &str,
    all: &[T],
    name: impl Fn(T) -> &'static str,
    field: &str,
) -> Result<T> {
    all.iter()
        .copied()
        .find(|&v| name(v) == text)
        .ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|&v| name(v)).collect();
            Error::argument(
                field,
                format!("'{text}' is not one of {}", names.join(", ")),
            )
        })
}

impl FromStr for Method {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        parse_name(text, &Self::ALL, Self::name, "prune.method")
    }
}

impl FromStr for Stage1Score {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        parse_name(text, &Self::ALL, Self::name, "prune.stage1_score")
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for Stage1Score {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The user's request, before it is checked against the model and the prompt.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PruneOptions {
    pub method: Method,
    pub stage1_keep: Option<usize>,
    /// Reduction ratio for stage 1: N1 = floor(N0 · (1 − R)).
    pub stage1_ratio: Option<f64>,
    /// Final budget N2.
    pub keep: Option<usize>,
    /// Reduction ratio for the final budget: N2 = round(N0 · (1 − X)).
    pub keep_ratio: Option<f64>,
    /// K, 1-based: scores from 0-based layer K−1, drop before 0-based layer K.
    pub stage2_layer: Option<usize>,
    /// What the before-projector scores rank patches by: STAR's stage 1 (default: the
    /// attention each patch receives) and VisPruner's important half (default: CLS, as the
    /// paper). Refused for methods with no such ranking.
    pub stage1_score: Option<Stage1Score>,
    /// VisPruner's share of important (ranked) tokens in its budget, in [0, 1]; the rest are
    /// its diverse tokens (default [`VISPRUNER_IMPORTANT_RATIO`], the paper's). VisPruner only.
    pub important_ratio: Option<f64>,
    /// Seed of the random baseline.
    pub seed: u64,
    /// The RoPE positions of the image tokens a selection before the projector keeps.
    pub positions: Positions,
    /// Adaptive stage 1 (STAR): keep, per image, the smallest set of patches whose share of
    /// the stage-1 attention mass reaches this (0, 1]; `stage1_keep` / `stage1_ratio` is then
    /// the cap (default: all N0). LLaVA-1.5 only.
    pub stage1_keep_mass: Option<f64>,
    /// Adaptive stage 2 (STAR, FastV): keep, per image, the smallest set of visual tokens whose
    /// share of the image's attention mass at layer K reaches this (0, 1]; `keep` is then the
    /// cap (default: every token stage 2 receives).
    pub keep_mass: Option<f64>,
    /// The fewest tokens an adaptive stage keeps per image (default 1; both stages).
    pub keep_floor: Option<usize>,
    /// Merge every patch a selection before the projector drops into the kept patch its
    /// feature is most similar to, each kept row becoming its group's mean ([`merge`]).
    pub merge: bool,
}

/// Where the image tokens kept before the projector sit in RoPE's positions
/// (docs/pruning.md, "Positions").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Positions {
    /// Each kept token keeps its patch's position, and the text after the image continues where
    /// it would unpruned (as stage 2 always does). The default: on the held-out questions it
    /// keeps more accuracy for every before-projector method (docs/evaluation.md, "Positions").
    #[default]
    Original,
    /// The kept tokens are renumbered one after another (the prompt is just shorter), as
    /// feeding a model fewer image tokens does.
    Contiguous,
}

impl Positions {
    pub const ALL: [Positions; 2] = [Positions::Original, Positions::Contiguous];

    pub fn name(self) -> &'static str {
        match self {
            Positions::Original => "original",
            Positions::Contiguous => "contiguous",
        }
    }
}

impl FromStr for Positions {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        parse_name(text, &Self::ALL, Self::name, "prune.positions")
    }
}

/// Default stage-1 reduction ratio (STAR: 576 → 518).
pub const DEFAULT_STAGE1_RATIO: f64 = 0.1;
/// Default final budget as a reduction ratio: 576 → 64 visual tokens (N0 / 9), the budget the
/// papers report most.
pub const DEFAULT_KEEP_RATIO: f64 = 8.0 / 9.0;
/// VisPruner's share of important (CLS-ranked) tokens in the final budget by default (the
/// paper's; `prune.important_ratio` sets another).
pub const VISPRUNER_IMPORTANT_RATIO: f64 = 0.5;

/// How the visual tokens are selected before the projector.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BeforeProjector {
    /// Top-k by scores from the last encoder layer's attention (STAR stage 1, FasterVLM).
    /// With `adaptive` (STAR's `stage1_keep_mass`), `keep` is the cap and the image pass
    /// keeps the smallest set reaching the share.
    TopK {
        score: Stage1Score,
        keep: usize,
        adaptive: Option<KeepMass>,
    },
    VisPruner {
        keep: usize,
        /// What ranks the important tokens.
        score: Stage1Score,
        /// The important tokens' share of `keep`; the rest are the diverse ones.
        important_ratio: f64,
    },
    Random {
        keep: usize,
        seed: u64,
    },
}

/// How the image rows that survive layer K are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage2Select {
    /// Top-k by the attention of every prompt row after the image (STAR).
    TextAttention,
    /// Top-k by the attention of the last prompt row (FastV).
    LastRowAttention,
    /// DART's duplication rule on layer K−1's keys and the normed hidden state
    /// ([`dart::select`]).
    Dart,
    /// DivPrune's max-min diversity on the rows entering the decoder ([`divprune::select`];
    /// K = 0).
    DivPrune,
}

impl Stage2Select {
    /// Whether layer K−1's attention scores the rows (otherwise the host selects from states
    /// it reads back).
    pub fn by_attention(self) -> bool {
        matches!(self, Self::TextAttention | Self::LastRowAttention)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stage2 {
    /// 1-based K: the drop applies to the rows entering 0-based layer K (0 for DivPrune, which
    /// drops before the first layer).
    pub layer: usize,
    /// N2 per image; with `adaptive`, the most an image keeps.
    pub keep: usize,
    pub select: Stage2Select,
    /// Keep each image's smallest set reaching a share of its attention mass (at most `keep`).
    pub adaptive: Option<KeepMass>,
}

/// An adaptive budget: per image, the fewest top-scored tokens whose scores sum to `mass` of
/// the image's total, and never fewer than `floor` ([`smallest_mass_set`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KeepMass {
    pub mass: f64,
    pub floor: usize,
}

/// A resolved pruning schedule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Plan {
    pub method: Method,
    /// Visual tokens out of the encoder.
    pub n0: usize,
    pub before_projector: Option<BeforeProjector>,
    /// The patches `before_projector` drops are merged into those it keeps (`--merge`).
    pub merge: bool,
    pub stage2: Option<Stage2>,
}

impl Plan {
    pub fn unpruned(n0: usize) -> Self {
        Self {
            method: Method::None,
            n0,
            before_projector: None,
            merge: false,
            stage2: None,
        }
    }

    /// Visual tokens the language model receives (N1).
    pub fn n1(&self) -> usize {
        match self.before_projector {
            Some(BeforeProjector::TopK { keep, .. })
            | Some(BeforeProjector::VisPruner { keep, .. })
            | Some(BeforeProjector::Random { keep, .. }) => keep,
            None => self.n0,
        }
    }

    /// The plan once an adaptive stage 1 has kept `n1` patches (at most its cap): stage 1 keeps
    /// `n1`, and stage 2 at most that.
    pub fn with_stage1_kept(mut self, n1: usize) -> Self {
        if let Some(BeforeProjector::TopK { keep, .. }) = &mut self.before_projector {
            *keep = n1;
        }
        if let Some(stage2) = &mut self.stage2 {
            stage2.keep = stage2.keep.min(n1);
        }
        self
    }

    /// Visual tokens after stage 2 (N2).
    pub fn n2(&self) -> usize {
        self.stage2.map_or(self.n1(), |s| s.keep)
    }

    /// Tokens entering each decoder layer for a prompt with `text` non-visual tokens.
    pub fn tokens_per_layer(&self, text: usize, layers: usize) -> Vec<usize> {
        (0..layers)
            .map(|l| match self.stage2 {
                Some(s) if l >= s.layer => text + s.keep,
                _ => text + self.n1(),
            })
            .collect()
    }
}

/// N1 from `prune.stage1_keep` or `prune.stage1_ratio` (default [`DEFAULT_STAGE1_RATIO`]).
fn stage1_budget(n0: usize, keep: Option<usize>, ratio: Option<f64>) -> Result<usize> {
    let n1 = match (keep, ratio) {
        (Some(_), Some(_)) => {
            return Err(Error::argument(
                "prune.stage1_keep",
                "give either prune.stage1_keep or prune.stage1_ratio, not both",
            ))
        }
        (Some(n), None) => n,
        (None, r) => {
            let r = r.unwrap_or(DEFAULT_STAGE1_RATIO);
            if !(0.0..1.0).contains(&r) {
                return Err(Error::argument(
                    "prune.stage1_ratio",
                    format!("{r} must be in [0, 1)"),
                ));
            }
            (n0 as f64 * (1.0 - r)).floor() as usize
        }
    };
    if n1 > n0 {
        return Err(Error::argument(
            "prune.stage1_keep",
            format!("N1 = {n1} exceeds the {n0} visual tokens"),
        ));
    }
    if n1 == 0 {
        return Err(Error::argument(
            "prune.stage1_keep",
            "stage 1 must keep at least one visual token",
        ));
    }
    Ok(n1)
}

/// N2 from `prune.keep` or `prune.keep_ratio` (default [`DEFAULT_KEEP_RATIO`]).
fn final_budget(n0: usize, keep: Option<usize>, ratio: Option<f64>) -> Result<usize> {
    let n2 = match (keep, ratio) {
        (Some(_), Some(_)) => {
            return Err(Error::argument(
                "prune.keep",
                "give either prune.keep or prune.keep_ratio, not both",
            ))
        }
        (Some(n), None) => n,
        (None, r) => {
            let r = r.unwrap_or(DEFAULT_KEEP_RATIO);
            if !(0.0..1.0).contains(&r) {
                return Err(Error::argument(
                    "prune.keep_ratio",
                    format!("{r} must be in [0, 1)"),
                ));
            }
            (n0 as f64 * (1.0 - r)).round() as usize
        }
    };
    if n2 == 0 {
        return Err(Error::argument(
            "prune.keep",
            "the final budget must keep at least one visual token",
        ));
    }
    Ok(n2)
}

/// K must leave at least one decoder layer before it and, since stage 2 scores the visual
/// tokens by the text after the image, the prompt must have some.
fn check_stage2_layer(k: usize, layers: usize, text_after_image: usize) -> Result<usize> {
    if k == 0 || k >= layers {
        return Err(Error::argument(
            "prune.stage2_layer",
            format!(
                "K = {k} is outside the model: it must be in 1..={} for {layers} decoder layers",
                layers - 1
            ),
        ));
    }
    if text_after_image == 0 {
        return Err(Error::argument(
            "prune.stage2_layer",
            "stage 2 scores visual tokens by the text after the image, and this prompt has none \
             (put the question after the image, or use prune.method = fastervlm|vispruner|divprune|none)",
        ));
    }
    Ok(k)
}

/// STAR's default K (14 of 32 layers) scaled to the model's depth (18 of 40).
pub fn default_stage2_layer(layers: usize) -> usize {
    ((14.0 * layers as f64 / 32.0).round() as usize).clamp(1, layers.saturating_sub(1).max(1))
}

/// FastV's K = 2, or the last layer that still has one before it in a shallower model.
fn default_fastv_layer(layers: usize) -> usize {
    2.min(layers.saturating_sub(1)).max(1)
}

impl PruneOptions {
    /// Check the request against the model (`n0` visual tokens, `layers` decoder layers) and
    /// the prompt (`text_after_image` tokens follow the image).
    pub fn plan(&self, n0: usize, layers: usize, text_after_image: usize) -> Result<Plan> {
        self.refuse_settings_the_method_ignores()?;
        if self.method == Method::None {
            return Ok(Plan::unpruned(n0));
        }
        let adaptive = self.adaptive()?;
        // An adaptive stage 2 without a budget is capped only by the tokens it receives.
        let uncapped = adaptive.is_some() && self.keep.is_none() && self.keep_ratio.is_none();
        let n2 = match uncapped {
            true => n0,
            false => final_budget(n0, self.keep, self.keep_ratio)?,
        };
        let before_projector = |selection| Plan {
            method: self.method,
            n0,
            before_projector: Some(selection),
            merge: self.merge,
            stage2: None,
        };
        let plan = match self.method {
            Method::None => unreachable!("returned above"),
            Method::Star => self.star(n0, n2, uncapped, (layers, text_after_image))?,
            Method::Fastv => self.fastv(n0, n2, layers, text_after_image)?,
            Method::Fastervlm => before_projector(BeforeProjector::TopK {
                score: Stage1Score::Cls,
                keep: n2,
                adaptive: None,
            }),
            Method::Vispruner => before_projector(BeforeProjector::VisPruner {
                keep: n2,
                score: self.stage1_score.unwrap_or(Stage1Score::Cls),
                important_ratio: self.important_ratio.unwrap_or(VISPRUNER_IMPORTANT_RATIO),
            }),
            Method::Random => before_projector(BeforeProjector::Random {
                keep: n2,
                seed: self.seed,
            }),
            Method::Dart => self.dart(n0, n2, layers, text_after_image)?,
            Method::Divprune => Plan {
                method: self.method,
                n0,
                before_projector: None,
                merge: false,
                stage2: Some(Stage2 {
                    layer: 0,
                    keep: n2,
                    select: Stage2Select::DivPrune,
                    adaptive: None,
                }),
            },
        };
        if plan.n2() > n0 {
            return Err(Error::argument(
                "prune.keep",
                format!("N2 = {} exceeds the {n0} visual tokens", plan.n2()),
            ));
        }
        with_adaptive(plan, adaptive)
    }

    /// `prune.keep_mass` and `prune.keep_floor`, checked: only the attention-ranked stage 2
    /// (STAR, FastV) can keep a share of its attention mass.
    fn adaptive(&self) -> Result<Option<KeepMass>> {
        let Some(mass) = self.keep_mass else {
            if self.keep_floor.is_some() && self.stage1_keep_mass.is_none() {
                return Err(Error::argument(
                    "prune.keep_floor",
                    "a floor applies to an adaptive budget: give prune.keep_mass too",
                ));
            }
            return Ok(None);
        };
        if !matches!(self.method, Method::Star | Method::Fastv) {
            return Err(Error::argument(
                "prune.keep_mass",
                format!(
                    "an adaptive budget keeps a share of the attention at layer K, which \
                     prune.method = {} does not rank by (use star or fastv)",
                    self.method
                ),
            ));
        }
        self.keep_mass("prune.keep_mass", mass).map(Some)
    }

    /// `mass` (set as `field`) with the floor, checked.
    fn keep_mass(&self, field: &str, mass: f64) -> Result<KeepMass> {
        if !(mass > 0.0 && mass <= 1.0) {
            return Err(Error::argument(field, format!("{mass} must be in (0, 1]")));
        }
        let floor = self.keep_floor.unwrap_or(1);
        if floor == 0 {
            return Err(Error::argument(
                "prune.keep_floor",
                "an adaptive budget must keep at least one visual token",
            ));
        }
        Ok(KeepMass { mass, floor })
    }

    /// STAR's adaptive stage 1 (`prune.stage1_keep_mass`), checked.
    fn stage1_adaptive(&self) -> Result<Option<KeepMass>> {
        let Some(mass) = self.stage1_keep_mass else {
            return Ok(None);
        };
        if self.method != Method::Star {
            return Err(Error::argument(
                "prune.stage1_keep_mass",
                format!(
                    "only STAR has a stage 1, not prune.method = {}",
                    self.method
                ),
            ));
        }
        self.keep_mass("prune.stage1_keep_mass", mass).map(Some)
    }

    /// A budget for a stage the method does not have is refused rather than silently ignored.
    fn refuse_settings_the_method_ignores(&self) -> Result<()> {
        let stage1 = self.stage1_keep.is_some()
            || self.stage1_ratio.is_some()
            || self.stage1_keep_mass.is_some();
        let stage2 = self.stage2_layer.is_some();
        let budget = self.keep.is_some() || self.keep_ratio.is_some();
        let refuse = |field: &str, why: &str| {
            Err(Error::argument(
                field,
                format!("{why} with prune.method = {}", self.method),
            ))
        };
        match self.method {
            Method::None if stage1 || stage2 || budget => {
                refuse("prune.method", "pruning budgets have no effect")
            }
            Method::Fastv
            | Method::Fastervlm
            | Method::Vispruner
            | Method::Random
            | Method::Dart
            | Method::Divprune
                if stage1 =>
            {
                refuse("prune.stage1_keep", "there is no separate stage 1")
            }
            Method::None | Method::Fastv | Method::Dart | Method::Divprune if self.merge => refuse(
                "prune.merge",
                "merging needs a selection before the projector (star, fastervlm, vispruner, \
                 random), which there is not",
            ),
            Method::Fastervlm | Method::Vispruner | Method::Random if stage2 => {
                refuse("prune.stage2_layer", "there is no stage 2")
            }
            Method::Divprune if stage2 => refuse(
                "prune.stage2_layer",
                "the selection runs before the first decoder layer",
            ),
            _ if self.important_ratio.is_some() && self.method != Method::Vispruner => refuse(
                "prune.important_ratio",
                "only vispruner splits its budget into important and diverse tokens",
            ),
            _ if self
                .important_ratio
                .is_some_and(|r| !(0.0..=1.0).contains(&r)) =>
            {
                refuse(
                    "prune.important_ratio",
                    "the important tokens' share must be in [0, 1]",
                )
            }
            Method::Star | Method::Vispruner => Ok(()),
            _ if self.stage1_score.is_some() => refuse(
                "prune.stage1_score",
                "no patch ranking can be chosen (only star and vispruner take one)",
            ),
            _ => Ok(()),
        }
    }

    /// STAR: top-k in the vision encoder down to N1, then down to N2 at decoder layer K
    /// (`uncapped`: an adaptive stage 2 may keep up to all N1).
    fn star(
        &self,
        n0: usize,
        n2: usize,
        uncapped: bool,
        (layers, text_after_image): (usize, usize),
    ) -> Result<Plan> {
        let stage1 = self.stage1_adaptive()?;
        // An adaptive stage 1 without a budget may keep every patch.
        let n1 = match stage1 {
            Some(_) if self.stage1_keep.is_none() && self.stage1_ratio.is_none() => n0,
            _ => stage1_budget(n0, self.stage1_keep, self.stage1_ratio)?,
        };
        let n2 = if uncapped { n1 } else { n2 };
        if let Some(floor) = stage1.map(|a| a.floor).filter(|&f| f > n1) {
            return Err(Error::argument(
                "prune.keep_floor",
                format!("the floor {floor} exceeds the stage-1 cap N1 = {n1}"),
            ));
        }
        if n2 > n1 {
            return Err(Error::argument(
                "prune.keep",
                format!("N2 = {n2} exceeds N1 = {n1} (stage 2 cannot keep more than stage 1)"),
            ));
        }
        let k = self
            .stage2_layer
            .unwrap_or_else(|| default_stage2_layer(layers));
        Ok(Plan {
            method: self.method,
            n0,
            before_projector: Some(BeforeProjector::TopK {
                score: self.stage1_score.unwrap_or_default(),
                keep: n1,
                adaptive: stage1,
            }),
            merge: self.merge,
            stage2: Some(Stage2 {
                layer: check_stage2_layer(k, layers, text_after_image)?,
                keep: n2,
                select: Stage2Select::TextAttention,
                adaptive: None,
            }),
        })
    }

    /// FastV: every visual token up to decoder layer K, then N2 by the last prompt row.
    fn fastv(&self, n0: usize, n2: usize, layers: usize, text_after_image: usize) -> Result<Plan> {
        self.at_layer(
            n0,
            n2,
            (layers, text_after_image),
            Stage2Select::LastRowAttention,
        )
    }

    /// DART: every visual token up to decoder layer K (FastV's default 2), then N2 by
    /// duplication with pivots, text pivots among the rows after the image.
    fn dart(&self, n0: usize, n2: usize, layers: usize, text_after_image: usize) -> Result<Plan> {
        self.at_layer(n0, n2, (layers, text_after_image), Stage2Select::Dart)
    }

    /// A one-stage method that drops at decoder layer K (default 2, or `prune.stage2_layer`).
    fn at_layer(
        &self,
        n0: usize,
        n2: usize,
        (layers, text_after_image): (usize, usize),
        select: Stage2Select,
    ) -> Result<Plan> {
        let k = self.stage2_layer.unwrap_or(default_fastv_layer(layers));
        Ok(Plan {
            method: self.method,
            n0,
            before_projector: None,
            merge: false,
            stage2: Some(Stage2 {
                layer: check_stage2_layer(k, layers, text_after_image)?,
                keep: n2,
                select,
                adaptive: None,
            }),
        })
    }
}

/// `plan` with an adaptive stage 2, whose floor must fit under its cap.
fn with_adaptive(mut plan: Plan, adaptive: Option<KeepMass>) -> Result<Plan> {
    let (Some(adaptive), Some(stage2)) = (adaptive, plan.stage2.as_mut()) else {
        return Ok(plan);
    };
    if adaptive.floor > stage2.keep {
        return Err(Error::argument(
            "prune.keep_floor",
            format!(
                "the floor {} exceeds the cap N2 = {} (prune.keep)",
                adaptive.floor, stage2.keep
            ),
        ));
    }
    stage2.adaptive = Some(adaptive);
    Ok(plan)
}

/// An adaptive selection ([`KeepMass`]): the fewest top-scored of `scores` whose sum reaches
/// `mass` of their total, at least `floor` and at most `cap`, as ascending positions. Ranked
/// by the top-k rule (ties to the lower index, NaN last and counted as 0).
pub fn smallest_mass_set(scores: &[f32], mass: f64, floor: usize, cap: usize) -> Vec<usize> {
    let value = |s: f32| if s.is_nan() { 0.0 } else { s.max(0.0) as f64 };
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| {
        value(scores[b])
            .total_cmp(&value(scores[a]))
            .then(a.cmp(&b))
    });
    let total: f64 = scores.iter().map(|&s| value(s)).sum();
    let mut sum = 0.0;
    let mut count = scores.len();
    for (i, &position) in order.iter().enumerate() {
        sum += value(scores[position]);
        if sum >= mass * total {
            count = i + 1;
            break;
        }
    }
    top_k(scores, count.clamp(floor, cap.max(floor)))
}

/// Cosine similarity of rows `a` and `b` from the Gram matrix of `n` rows (`G_ab / √(G_aa G_bb)`,
/// 0 when a row is zero), in f64: what VisPruner and DivPrune compare rows by.
pub fn gram_cosine(gram: &[f32], n: usize, a: usize, b: usize) -> f64 {
    let norms = gram[a * n + a] as f64 * gram[b * n + b] as f64;
    if norms <= 0.0 {
        return 0.0;
    }
    gram[a * n + b] as f64 / norms.sqrt()
}

/// The Gram matrix of `n` rows of `dim` values, in f32 as the GPU returns it (for tests and
/// references that start from features).
pub fn gram_of(features: &[f32], dim: usize) -> Vec<f32> {
    let n = features.len() / dim;
    let row = |i: usize| &features[i * dim..(i + 1) * dim];
    let mut gram = vec![0f32; n * n];
    for a in 0..n {
        for b in 0..n {
            let dot: f64 = row(a)
                .iter()
                .zip(row(b))
                .map(|(x, y)| *x as f64 * *y as f64)
                .sum();
            gram[a * n + b] = dot as f32;
        }
    }
    gram
}

/// `k` of `n` indices chosen uniformly with `seed`, ascending.
pub fn random_selection(n: usize, k: usize, seed: u64) -> Vec<usize> {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut chosen = rand::seq::index::sample(&mut rng, n, k).into_vec();
    chosen.sort_unstable();
    chosen
}

/// Top-k by score in ascending index order, by the GPU selection's own CPU reference, so host
/// (VisPruner) and GPU selections follow one rule: ties to the lower index, −0 = +0, NaN below
/// every number (see [`crate::gpu::kernels::topk::reference`]).
pub use crate::gpu::kernels::topk::reference as top_k;

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-ranked: 2 > 0 = −0 (lower index first) > −∞ > NaN = −NaN. The former host top-k
    /// (`total_cmp`) ranked +NaN above every number and −0 below +0, unlike the GPU.
    #[test]
    fn top_k_ranks_nan_last_and_the_two_zeros_equal() {
        let scores = [f32::NAN, -0.0, f32::NEG_INFINITY, 2.0, 0.0, -f32::NAN];
        let want: [&[usize]; 7] = [
            &[],
            &[3],
            &[1, 3],
            &[1, 3, 4],
            &[1, 2, 3, 4],
            &[0, 1, 2, 3, 4],
            &[0, 1, 2, 3, 4, 5],
        ];
        for (k, want) in want.iter().enumerate() {
            assert_eq!(top_k(&scores, k), *want, "k = {k}");
        }
        assert_eq!(
            top_k(&scores, 9),
            want[6],
            "k beyond the length keeps everything"
        );
    }

    fn opts(method: Method) -> PruneOptions {
        PruneOptions {
            method,
            ..Default::default()
        }
    }

    #[test]
    fn budgets_follow_star_md() {
        let star = opts(Method::Star).plan(576, 32, 40).unwrap();
        assert_eq!((star.n1(), star.n2()), (518, 64));
        assert_eq!(star.stage2.unwrap().layer, 14);
        let p = PruneOptions {
            keep_ratio: Some(0.9),
            ..opts(Method::Star)
        }
        .plan(576, 32, 40)
        .unwrap();
        assert_eq!(p.n2(), 58);
        let p = PruneOptions {
            keep_ratio: Some(0.95),
            ..opts(Method::Star)
        }
        .plan(576, 32, 40)
        .unwrap();
        assert_eq!(p.n2(), 29);
        assert_eq!(default_stage2_layer(40), 18);
        let fastv = PruneOptions {
            keep: Some(64),
            ..opts(Method::Fastv)
        }
        .plan(576, 32, 40)
        .unwrap();
        assert_eq!(fastv.stage2.unwrap().layer, 2);
        assert_eq!(fastv.n1(), 576);
    }

    #[test]
    fn impossible_settings_are_refused_with_the_field_named() {
        let e = |o: PruneOptions, text: usize| o.plan(576, 32, text).unwrap_err().to_string();
        assert!(e(
            PruneOptions {
                stage1_keep: Some(100),
                keep: Some(200),
                ..opts(Method::Star)
            },
            40
        )
        .contains("prune.keep"));
        assert!(e(
            PruneOptions {
                stage1_keep: Some(600),
                keep: Some(10),
                ..opts(Method::Star)
            },
            40
        )
        .contains("prune.stage1_keep"));
        assert!(e(
            PruneOptions {
                stage2_layer: Some(32),
                ..opts(Method::Star)
            },
            40
        )
        .contains("prune.stage2_layer"));
        assert!(e(
            PruneOptions {
                stage2_layer: Some(0),
                ..opts(Method::Fastv)
            },
            40
        )
        .contains("prune.stage2_layer"));
        assert!(e(opts(Method::Star), 0).contains("no"));
        assert!(e(
            PruneOptions {
                keep: Some(600),
                ..opts(Method::Random)
            },
            40
        )
        .contains("prune.keep"));
        assert!(e(
            PruneOptions {
                keep: Some(64),
                ..opts(Method::None)
            },
            40
        )
        .contains("prune.method"));
    }

    #[test]
    fn tokens_per_layer_drop_after_k() {
        let p = PruneOptions {
            stage1_keep: Some(518),
            keep: Some(64),
            stage2_layer: Some(14),
            ..opts(Method::Star)
        }
        .plan(576, 32, 40)
        .unwrap();
        let t = p.tokens_per_layer(60, 32);
        assert_eq!(t[13], 578);
        assert_eq!(t[14], 124);
    }

    /// Scores 1/2, 1/8, 1/4, 1/8 (total 1, exact in binary): 50% is reached by one token, 75%
    /// by two, 80% by three (1/2 + 1/4 + 1/8, the tie going to the lower index), all by four.
    #[test]
    fn the_smallest_set_reaching_a_share_of_the_mass() {
        let scores = [0.5, 0.125, 0.25, 0.125];
        assert_eq!(smallest_mass_set(&scores, 0.5, 1, 4), vec![0]);
        assert_eq!(smallest_mass_set(&scores, 0.75, 1, 4), vec![0, 2]);
        assert_eq!(smallest_mass_set(&scores, 0.8, 1, 4), vec![0, 1, 2]);
        assert_eq!(smallest_mass_set(&scores, 1.0, 1, 4), vec![0, 1, 2, 3]);
        // Floor and cap.
        assert_eq!(smallest_mass_set(&scores, 0.5, 2, 4), vec![0, 2]);
        assert_eq!(smallest_mass_set(&scores, 1.0, 1, 2), vec![0, 2]);
        // No mass at all: the floor.
        assert_eq!(smallest_mass_set(&[0.0, f32::NAN, 0.0], 0.9, 1, 3), vec![0]);
    }

    #[test]
    fn adaptive_budgets_are_checked() {
        let adaptive = |method, mass, floor, keep| PruneOptions {
            keep_mass: Some(mass),
            keep_floor: floor,
            keep,
            ..opts(method)
        };
        let star = adaptive(Method::Star, 0.6, None, None)
            .plan(576, 32, 40)
            .unwrap();
        let stage2 = star.stage2.unwrap();
        assert_eq!((stage2.keep, star.n1()), (518, 518), "capped by N1 only");
        assert_eq!(
            stage2.adaptive,
            Some(KeepMass {
                mass: 0.6,
                floor: 1
            })
        );
        let fastv = adaptive(Method::Fastv, 0.6, Some(8), Some(64));
        assert_eq!(fastv.plan(576, 32, 40).unwrap().stage2.unwrap().keep, 64);
        let e = |o: PruneOptions| o.plan(576, 32, 40).unwrap_err().to_string();
        assert!(e(adaptive(Method::Vispruner, 0.6, None, None)).contains("prune.keep_mass"));
        assert!(e(adaptive(Method::Star, 1.5, None, None)).contains("prune.keep_mass"));
        assert!(e(adaptive(Method::Star, 0.6, Some(100), Some(64))).contains("prune.keep_floor"));
        let ranked = |method| PruneOptions {
            stage1_score: Some(Stage1Score::Attention),
            keep: Some(64),
            ..opts(method)
        };
        assert!(e(ranked(Method::Fastv)).contains("prune.stage1_score"));
        let vispruner = ranked(Method::Vispruner).plan(576, 32, 40).unwrap();
        assert_eq!(
            vispruner.before_projector,
            Some(BeforeProjector::VisPruner {
                keep: 64,
                score: Stage1Score::Attention,
                important_ratio: VISPRUNER_IMPORTANT_RATIO,
            })
        );
        let split = |method, ratio| PruneOptions {
            important_ratio: Some(ratio),
            keep: Some(64),
            ..opts(method)
        };
        assert!(e(split(Method::Star, 0.25)).contains("prune.important_ratio"));
        assert!(e(split(Method::Vispruner, 1.5)).contains("prune.important_ratio"));
        assert!(matches!(
            split(Method::Vispruner, 0.25).plan(576, 32, 40).unwrap().before_projector,
            Some(BeforeProjector::VisPruner { important_ratio, .. }) if important_ratio == 0.25
        ));
        let floor_alone = PruneOptions {
            keep_floor: Some(4),
            ..opts(Method::Star)
        };
        assert!(e(floor_alone).contains("prune.keep_floor"));
        let merged = |method| PruneOptions {
            merge: true,
            ..opts(method)
        };
        for method in [Method::Fastv, Method::Dart, Method::Divprune, Method::None] {
            assert!(e(merged(method)).contains("prune.merge"), "{method}");
        }
        for method in [
            Method::Star,
            Method::Fastervlm,
            Method::Vispruner,
            Method::Random,
        ] {
            assert!(merged(method).plan(576, 32, 40).unwrap().merge, "{method}");
        }
    }

    #[test]
    fn cpu_top_k_breaks_ties_to_the_lower_index() {
        assert_eq!(top_k(&[1.0, 3.0, 3.0, 2.0, 3.0], 2), vec![1, 2]);
        assert_eq!(random_selection(10, 4, 1), random_selection(10, 4, 1));
    }
}
