//! A LLaVA-NeXT request's plan (docs/pruning.md, NeXT): how the image is tiled, what each view
//! keeps before the projector, stage 2's budget in patch tokens, and the packed rows the prompt
//! holds. `anyres.rs` runs the image side from it.

use crate::error::{Error, Result};
use crate::prune::{
    BeforeProjector, Method, Plan, PruneOptions, Stage1Score, DEFAULT_STAGE1_RATIO,
};
use crate::vision::anyres::{split_budget, AnyresLayout, PackedToken};

/// A LLaVA-NeXT request's image side: the tiling, each view's selection before the projector,
/// stage 2's budget in patch tokens, and the packed rows the prompt holds.
#[derive(Clone, Debug)]
pub(super) struct AnyresRequest {
    pub layout: AnyresLayout,
    /// The selection each view gets before the projector (None: every patch).
    pub per_view: Option<Vec<BeforeProjector>>,
    /// Patch tokens stage 2 (or FastV) keeps; newline rows are kept besides.
    pub stage2_keep: Option<usize>,
    /// The prompt's image rows in order: every packed token until the image pass has run,
    /// then the ones its selection kept.
    pub packed: Vec<PackedToken>,
}

impl AnyresRequest {
    /// Split `plan`, made over the image's patch tokens (N0 = `layout.visual_tokens()`), into
    /// per-view budgets: STAR's stage 1 keeps `floor(N_c (1 − R))` of every view (or
    /// `prune.stage1_keep` split across views), a before-projector baseline splits N2.
    pub fn new(layout: AnyresLayout, plan: &Plan, prune: &PruneOptions) -> Result<Self> {
        let views = layout.views();
        let per_view_patches = layout.patches_per_view();
        let budgets = |total: usize| split_budget(total, views);
        if plan.merge {
            return Err(Error::argument(
                "prune.merge",
                "merging the dropped patches is built for LLaVA-1.5's single view; this is a \
                 LLaVA-NeXT model (its views are selected one by one)",
            ));
        }
        let per_view = match plan.before_projector {
            None => None,
            Some(selection) => {
                let keeps = match (plan.method, prune.stage1_keep) {
                    (Method::Star, Some(total)) => budgets(total),
                    (Method::Star, None) => {
                        let r = prune.stage1_ratio.unwrap_or(DEFAULT_STAGE1_RATIO);
                        let keep = (per_view_patches as f64 * (1.0 - r)).floor() as usize;
                        vec![keep; views]
                    }
                    _ => budgets(plan.n1()),
                };
                if let Some(v) = keeps.iter().position(|&k| k > per_view_patches) {
                    return Err(Error::argument(
                        "prune.stage1_keep",
                        format!(
                            "view {v} of {views} would keep {} of its {per_view_patches} patches (a LLaVA-NeXT budget before the projector is split across views)",
                            keeps[v]
                        ),
                    ));
                }
                let per_view = keeps.iter().enumerate();
                Some(per_view.map(|(v, &k)| for_view(selection, k, v)).collect())
            }
        };
        Ok(Self {
            packed: layout.packed(),
            stage2_keep: plan.stage2.map(|s| s.keep),
            per_view,
            layout,
        })
    }

    /// Patch tokens among the packed rows (newlines excluded).
    pub fn patch_tokens(&self) -> usize {
        self.packed
            .iter()
            .filter(|t| matches!(t, PackedToken::Patch { .. }))
            .count()
    }

    /// Positions of the newline rows among the packed rows.
    pub fn newline_rows(&self) -> impl Iterator<Item = usize> + '_ {
        self.packed
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == PackedToken::Newline)
            .map(|(i, _)| i)
    }

    /// `plan` (its method and stage 2's layer) restated over the prompt's image rows, which the
    /// decoder works with: N0 is every packed row, N1 the rows in `packed`, stage 2 keeps its
    /// patch budget (at most the patches left) plus every newline.
    pub fn row_plan(&self, plan: &Plan) -> Plan {
        let rows = self.packed.len();
        let newlines = rows - self.patch_tokens();
        Plan {
            method: plan.method,
            n0: self.layout.image_tokens(),
            before_projector: self.per_view.as_ref().map(|_| BeforeProjector::TopK {
                score: Stage1Score::Attention,
                keep: rows,
                adaptive: None,
            }),
            merge: plan.merge,
            stage2: plan.stage2.map(|mut s| {
                let patches = self.stage2_keep.unwrap_or(s.keep);
                s.keep = patches.min(self.patch_tokens()) + newlines;
                s
            }),
        }
    }
}

/// `selection` with view `v`'s budget `keep` (random draws get a seed per view).
fn for_view(selection: BeforeProjector, keep: usize, v: usize) -> BeforeProjector {
    match selection {
        BeforeProjector::TopK {
            score, adaptive, ..
        } => BeforeProjector::TopK {
            score,
            keep,
            adaptive,
        },
        BeforeProjector::VisPruner {
            score,
            important_ratio,
            ..
        } => BeforeProjector::VisPruner {
            keep,
            score,
            important_ratio,
        },
        BeforeProjector::Random { seed, .. } => BeforeProjector::Random {
            keep,
            seed: seed.wrapping_add(v as u64),
        },
    }
}
