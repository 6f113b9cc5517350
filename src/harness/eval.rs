//! `llava-wgpu eval`: accuracy of every pruning method at several visual-token budgets on a
//! held-out question set (JSONL lines `{"image": PATH, "question": TEXT, "answer": TEXT}`, image
//! paths relative to the file), with retention against the unpruned model and time per setting.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::generate::GenerateRequest;
use crate::model::llava::Engine;
use crate::prune::{Method, Positions, PruneOptions, Stage1Score};

use super::plot::{AccuracyPlot, PlotPoint, PlotSeries};
use super::stats::{wilson, Interval, McNemar, Z95};

#[derive(Clone, Debug)]
pub struct Example {
    pub image: PathBuf,
    pub question: String,
    pub answer: String,
    /// Optional `type` field (e.g. `count_all`): accuracy is also reported per type.
    pub kind: Option<String>,
}

/// Read a JSONL question set; errors name the file and line.
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    let fail = |reason: String| Error::File {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| fail(format!("line {}: {e}", i + 1)))?;
        let field = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_str())
                .map(str::to_string)
                .ok_or_else(|| fail(format!("line {}: missing string field `{k}`", i + 1)))
        };
        out.push(Example {
            image: base.join(field("image")?),
            question: field("question")?,
            answer: field("answer")?,
            kind: v.get("type").and_then(|x| x.as_str()).map(str::to_string),
        });
    }
    if out.is_empty() {
        return Err(fail("no examples".into()));
    }
    Ok(out)
}

/// Lower-case, trimmed, without trailing punctuation: how answers are compared.
pub fn normalise(text: &str) -> String {
    text.trim()
        .trim_end_matches(['.', '!', '?'])
        .trim()
        .to_lowercase()
}

/// Final budgets as fractions of the visual tokens.
pub const BUDGETS: [f64; 5] = [1.0, 0.5, 0.25, 0.11, 0.05];

/// The pruning request for `method` keeping `fraction` of `n0` visual tokens. STAR keeps 90% in
/// stage 1 (or the final budget, if larger) and the rest at its default layer. On LLaVA-NeXT
/// (`per_view`), stage 1 keeps 90% of every view (all of them when the final budget needs more).
pub fn setting(
    method: Method,
    fraction: f64,
    n0: usize,
    seed: u64,
    per_view: bool,
) -> PruneOptions {
    let n2 = ((n0 as f64 * fraction).round() as usize).clamp(1, n0);
    match method {
        Method::None => PruneOptions::default(),
        Method::Star if per_view => PruneOptions {
            method,
            stage1_ratio: Some(if n2 > (n0 as f64 * 0.9).floor() as usize {
                0.0
            } else {
                0.1
            }),
            keep: Some(n2),
            ..Default::default()
        },
        Method::Star => PruneOptions {
            method,
            stage1_keep: Some(((n0 as f64 * 0.9).floor() as usize).max(n2)),
            keep: Some(n2),
            ..Default::default()
        },
        _ => PruneOptions {
            method,
            keep: Some(n2),
            seed,
            ..Default::default()
        },
    }
}

/// The pruning request for an adaptive stage 2 keeping `mass` of each image's attention
/// (`--keep-mass`), uncapped; STAR's stage 1 keeps 90% as at a fixed budget. With `stage1`
/// (`--adaptive-stage 1`, STAR on LLaVA-1.5), STAR's stage 1 keeps the share of its patches'
/// attention instead, uncapped, and stage 2 keeps every token stage 1 kept.
pub fn adaptive_setting(
    method: Method,
    mass: f64,
    n0: usize,
    (per_view, stage1): (bool, bool),
) -> PruneOptions {
    let mut options = setting(method, 0.5, n0, 0, per_view);
    if stage1 && method == Method::Star && !per_view {
        options.stage1_keep = None;
        options.stage1_keep_mass = Some(mass);
        options.keep = Some(n0);
        return options;
    }
    options.keep = None;
    options.keep_mass = Some(mass);
    options
}

impl EvalRow {
    /// The row's budget as the table prints it.
    fn label(&self) -> String {
        budget_label(self.budget, self.keep_mass)
    }
}

/// `11%`, or `P=0.60` for an adaptive row.
fn budget_label(budget: f64, keep_mass: Option<f64>) -> String {
    match keep_mass {
        Some(mass) => format!("P={mass:.2}"),
        None => format!("{:.0}%", budget * 100.0),
    }
}

/// One row of a sweep: a method at a fixed budget (a fraction of the visual tokens), or with
/// an adaptive stage 2 (`keep_mass`; `budget` is then 1, no cap), its selection before the
/// projector merging what it drops or not.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Setting {
    pub method: Method,
    pub budget: f64,
    pub keep_mass: Option<f64>,
    pub merge: bool,
}

impl Setting {
    fn fixed(method: Method, budget: f64) -> Self {
        Self {
            method,
            budget,
            keep_mass: None,
            merge: false,
        }
    }

    /// The row's name: the method's, with `+merge` when it merges.
    fn name(&self) -> String {
        match self.merge {
            true => format!("{}{MERGED}", self.method.name()),
            false => self.method.name().to_string(),
        }
    }

    fn label(&self) -> String {
        budget_label(self.budget, self.keep_mass)
    }
}

/// What a merging row's name adds to its method's (`vispruner+merge`).
pub const MERGED: &str = "+merge";

/// Whether `method` selects before the projector, so `--merge` applies to it.
fn merges(method: Method) -> bool {
    matches!(
        method,
        Method::Star | Method::Fastervlm | Method::Vispruner | Method::Random
    )
}

/// An adaptive row against the same method's fixed budget with the nearest mean token count.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FixedPair {
    pub budget: f64,
    pub mean_visual_tokens: f64,
    /// "reference" is the fixed-budget row.
    pub test: McNemar,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalRow {
    pub method: String,
    pub budget: f64,
    /// An adaptive stage 2's share of attention mass (`--keep-mass`); absent for fixed budgets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_mass: Option<f64>,
    /// Visual tokens that reached the layers after every drop, averaged over the questions
    /// (LLaVA-NeXT's count depends on the image).
    pub mean_visual_tokens: f64,
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
    /// 95% Wilson score interval of `accuracy` (`stats::wilson`).
    pub accuracy_ci95: Interval,
    /// Accuracy relative to the unpruned model.
    pub retention: f64,
    /// Exact McNemar test against the report's `paired_with` method at the same budget on the
    /// same questions ("reference" is that method); absent on its own rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paired: Option<McNemar>,
    /// Adaptive rows: the test against the same method's fixed budget of the nearest mean cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vs_fixed: Option<FixedPair>,
    /// Whether the selection merged what it dropped (`method` then ends in `+merge`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub merge: bool,
    /// Merged rows: the test against the same setting unmerged ("reference").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vs_unmerged: Option<McNemar>,
    pub total_ms: f64,
    pub ms_per_question: f64,
    /// One character per question in the set's order: `1` answered correctly, `0` not.
    pub outcomes: String,
    /// Per question type (only when the set's lines have a `type`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_type: BTreeMap<String, TypeScore>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TypeScore {
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
    /// 95% Wilson score interval of `accuracy`.
    pub accuracy_ci95: Interval,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalReport {
    pub model: String,
    pub questions: usize,
    /// Where the tokens kept before the projector sat (docs/pruning.md, "Positions").
    pub positions: Positions,
    /// The method every other row is paired with at its budget (McNemar).
    pub paired_with: Method,
    /// VisPruner's share of important tokens, when the sweep set one (`--important-ratio`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub important_ratio: Option<f64>,
    /// Whether the sweep added merged rows for the selections before the projector
    /// (`--merge`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub merge: bool,
    /// STAR's stage-1 reduction ratio, when the sweep set one (`--stage1-ratio`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage1_ratio: Option<f64>,
    /// STAR's adaptive rows adapted stage 1 (`--adaptive-stage 1`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adaptive_stage1: bool,
    /// The adaptive rows' floor (`--keep-floor`), when the sweep set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_floor: Option<usize>,
    pub rows: Vec<EvalRow>,
}

/// The settings an evaluation sweeps: each method at each budget, with one rule for positions.
#[derive(Clone, Debug)]
pub struct Sweep {
    pub methods: Vec<Method>,
    /// Final budgets as fractions of the visual tokens.
    pub budgets: Vec<f64>,
    pub positions: Positions,
    /// The method each row is compared with, question by question (default STAR).
    pub paired_with: Method,
    /// Shares of attention mass for adaptive rows of STAR and FastV (`--keep-mass`).
    pub masses: Vec<f64>,
    /// The patch ranking of STAR's stage 1 and VisPruner's important half (None: each
    /// method's default).
    pub stage1_score: Option<Stage1Score>,
    /// VisPruner's share of important tokens (None: the paper's).
    pub important_ratio: Option<f64>,
    /// Each row of a selection before the projector runs again merging the patches it drops
    /// (`--merge`; the row is named `method+merge`).
    pub merge: bool,
    /// STAR's stage-1 reduction ratio (None: the paper's 0.1); stage 1 keeps at least the
    /// final budget.
    pub stage1_ratio: Option<f64>,
    /// STAR's adaptive rows adapt stage 1 (`--adaptive-stage 1`) rather than stage 2.
    pub adaptive_stage1: bool,
    /// The fewest tokens an adaptive row keeps per image (`--keep-floor`; None: 1).
    pub keep_floor: Option<usize>,
}

impl Default for Sweep {
    /// Every method at every budget of [`BUDGETS`], the default positions, paired with STAR.
    fn default() -> Self {
        Self {
            methods: METHODS.to_vec(),
            budgets: BUDGETS.to_vec(),
            positions: Positions::default(),
            paired_with: Method::Star,
            masses: Vec::new(),
            stage1_score: None,
            important_ratio: None,
            merge: false,
            stage1_ratio: None,
            adaptive_stage1: false,
            keep_floor: None,
        }
    }
}

impl Sweep {
    /// The rows to evaluate, in order: unpruned, each method at each budget, then the
    /// adaptive rows (STAR and FastV, when swept, at each share).
    pub fn settings(&self) -> Result<Vec<Setting>> {
        if let Some(bad) = self.budgets.iter().find(|b| !(**b > 0.0 && **b <= 1.0)) {
            return Err(Error::argument(
                "budgets",
                format!("{bad} is not a fraction of the visual tokens in (0, 1]"),
            ));
        }
        if let Some(bad) = self.masses.iter().find(|m| !(**m > 0.0 && **m <= 1.0)) {
            return Err(Error::argument(
                "prune.keep_mass",
                format!("{bad} is not a share of the attention mass in (0, 1]"),
            ));
        }
        let methods = self.methods.iter().filter(|&&m| m != Method::None);
        let mut settings = vec![Setting::fixed(Method::None, 1.0)];
        for &method in methods.clone() {
            settings.extend(self.budgets.iter().map(|&b| Setting::fixed(method, b)));
        }
        for &method in methods.filter(|&&m| matches!(m, Method::Star | Method::Fastv)) {
            settings.extend(self.masses.iter().map(|&mass| Setting {
                method,
                budget: 1.0,
                keep_mass: Some(mass),
                merge: false,
            }));
        }
        // `--merge`: every row of a method that selects before the projector, again merged.
        if self.merge {
            let merged = settings.iter().filter(|s| merges(s.method));
            let merged: Vec<Setting> = merged.map(|&s| Setting { merge: true, ..s }).collect();
            settings.extend(merged);
        }
        Ok(settings)
    }
}

pub const METHODS: [Method; 7] = [
    Method::Star,
    Method::Fastv,
    Method::Fastervlm,
    Method::Vispruner,
    Method::Dart,
    Method::Divprune,
    Method::Random,
];

/// Evaluate the unpruned model, then every method at every budget.
pub fn run(
    engine: &Engine,
    label: &str,
    examples: &[Example],
    max_new_tokens: usize,
    progress: impl FnMut(&str),
) -> Result<EvalReport> {
    let sweep = Sweep::default();
    run_methods(engine, label, examples, &sweep, max_new_tokens, progress)
}

/// Evaluate the unpruned model, then each of the sweep's methods at each of its budgets (a
/// shorter run, e.g. STAR at 11% alone to compare weight formats).
pub fn run_methods(
    engine: &Engine,
    label: &str,
    examples: &[Example],
    sweep: &Sweep,
    max_new_tokens: usize,
    mut progress: impl FnMut(&str),
) -> Result<EvalReport> {
    let mut rows: Vec<EvalRow> = Vec::new();
    for setting in sweep.settings()? {
        let row = evaluate(engine, examples, (setting, sweep), max_new_tokens)?;
        progress(&format!(
            "{} {}: {:.1}% correct (95% CI {:.1}–{:.1}%), {:.1} visual tokens",
            setting.name(),
            setting.label(),
            row.accuracy * 100.0,
            row.accuracy_ci95.low * 100.0,
            row.accuracy_ci95.high * 100.0,
            row.mean_visual_tokens
        ));
        rows.push(row);
    }
    let unpruned = rows[0].accuracy;
    for row in &mut rows {
        row.retention = if unpruned > 0.0 {
            row.accuracy / unpruned
        } else {
            0.0
        };
    }
    pair_rows(&mut rows, sweep.paired_with);
    pair_adaptive_with_fixed(&mut rows);
    pair_merged_with_unmerged(&mut rows);
    Ok(EvalReport {
        model: label.to_string(),
        questions: examples.len(),
        positions: sweep.positions,
        paired_with: sweep.paired_with,
        important_ratio: sweep.important_ratio,
        merge: sweep.merge,
        stage1_ratio: sweep.stage1_ratio,
        adaptive_stage1: sweep.adaptive_stage1,
        keep_floor: sweep.keep_floor,
        rows,
    })
}

/// Answer every question with `method` at `budget` (retention and the STAR comparison are
/// filled in once every row is known).
fn evaluate(
    engine: &Engine,
    examples: &[Example],
    (setting, sweep): (Setting, &Sweep),
    max_new_tokens: usize,
) -> Result<EvalRow> {
    let per_view = engine.config.anyres.is_some();
    let start = Instant::now();
    let mut outcomes = String::with_capacity(examples.len());
    let mut by_type: BTreeMap<String, TypeScore> = BTreeMap::new();
    let mut visual = 0;
    for (i, ex) in examples.iter().enumerate() {
        let mut request = GenerateRequest::new(&ex.image, &ex.question);
        request.max_new_tokens = max_new_tokens;
        request.template = engine.template;
        // LLaVA-NeXT's visual tokens depend on the image's size; the budget follows them.
        let n0 = engine.visual_tokens_of(&ex.image)?;
        // A different random selection per question, reproducible.
        request.prune = match setting.keep_mass {
            Some(mass) => PruneOptions {
                keep_floor: sweep.keep_floor,
                ..adaptive_setting(setting.method, mass, n0, (per_view, sweep.adaptive_stage1))
            },
            None => self::setting(setting.method, setting.budget, n0, i as u64, per_view),
        };
        request.prune.positions = sweep.positions;
        if matches!(setting.method, Method::Star | Method::Vispruner) {
            request.prune.stage1_score = sweep.stage1_score;
        }
        if setting.method == Method::Vispruner {
            request.prune.important_ratio = sweep.important_ratio;
        }
        apply_stage1_options(&mut request.prune, sweep, n0, per_view);
        request.prune.merge = setting.merge;
        let out = engine.generate(&request, |_| {})?;
        visual += out.visual_tokens.after_stage2;
        let good = normalise(&out.text) == normalise(&ex.answer);
        outcomes.push(if good { '1' } else { '0' });
        if let Some(kind) = &ex.kind {
            let score = by_type.entry(kind.clone()).or_default();
            score.total += 1;
            score.correct += usize::from(good);
        }
    }
    let total_ms = start.elapsed().as_secs_f64() * 1e3;
    for score in by_type.values_mut() {
        score.accuracy = score.correct as f64 / score.total as f64;
        score.accuracy_ci95 = wilson(score.correct, score.total, Z95);
    }
    let correct = outcomes.chars().filter(|&c| c == '1').count();
    Ok(EvalRow {
        method: setting.name(),
        merge: setting.merge,
        budget: setting.budget,
        keep_mass: setting.keep_mass,
        mean_visual_tokens: visual as f64 / examples.len() as f64,
        correct,
        total: examples.len(),
        accuracy: correct as f64 / examples.len() as f64,
        accuracy_ci95: wilson(correct, examples.len(), Z95),
        retention: 0.0,
        paired: None,
        vs_fixed: None,
        vs_unmerged: None,
        total_ms,
        ms_per_question: total_ms / examples.len() as f64,
        outcomes,
        by_type,
    })
}

/// Pair every row that is not `with`'s with `with`'s row at the same budget (the unpruned row
/// with `with` keeping everything) and test the difference with the exact McNemar test.
/// The sweep's `--stage1-ratio` on STAR's fixed-budget rows (LLaVA-1.5: stage 1 keeps at least
/// the final budget).
fn apply_stage1_options(prune: &mut PruneOptions, sweep: &Sweep, n0: usize, per_view: bool) {
    // Fixed budgets only: an adaptive row's stage 1 is its cap or its own share.
    let fixed = prune.keep_mass.is_none() && prune.stage1_keep_mass.is_none();
    if let (Method::Star, Some(ratio), Some(n2), true, false) = (
        prune.method,
        sweep.stage1_ratio,
        prune.keep,
        fixed,
        per_view,
    ) {
        let n1 = (n0 as f64 * (1.0 - ratio)).floor() as usize;
        prune.stage1_keep = Some(n1.max(n2));
    }
}

fn pair_rows(rows: &mut [EvalRow], with: Method) {
    let correct = |r: &EvalRow| r.outcomes.chars().map(|c| c == '1').collect::<Vec<_>>();
    // Rows meet at the same fixed budget, or the same adaptive share.
    type Key = (f64, Option<f64>);
    let reference: Vec<(Key, Vec<bool>)> = rows
        .iter()
        .filter(|r| r.method == with.name())
        .map(|r| ((r.budget, r.keep_mass), correct(r)))
        .collect();
    for row in rows.iter_mut().filter(|r| r.method != with.name()) {
        let key = (row.budget, row.keep_mass);
        if let Some((_, reference)) = reference.iter().find(|(k, _)| *k == key) {
            row.paired = Some(McNemar::of(&correct(row), reference));
        }
    }
}

/// Pair every adaptive row with its method's fixed-budget row of the nearest mean visual
/// tokens: the comparison at equal cost an adaptive budget has to win.
fn pair_adaptive_with_fixed(rows: &mut [EvalRow]) {
    let correct = |r: &EvalRow| r.outcomes.chars().map(|c| c == '1').collect::<Vec<_>>();
    let fixed: Vec<(String, f64, f64, Vec<bool>)> = rows
        .iter()
        .filter(|r| r.keep_mass.is_none())
        .map(|r| (r.method.clone(), r.budget, r.mean_visual_tokens, correct(r)))
        .collect();
    for row in rows.iter_mut().filter(|r| r.keep_mass.is_some()) {
        let gap = |tokens: f64| (tokens - row.mean_visual_tokens).abs();
        let nearest = fixed
            .iter()
            .filter(|(method, ..)| *method == row.method)
            .min_by(|a, b| gap(a.2).total_cmp(&gap(b.2)));
        if let Some((_, budget, tokens, reference)) = nearest {
            row.vs_fixed = Some(FixedPair {
                budget: *budget,
                mean_visual_tokens: *tokens,
                test: McNemar::of(&correct(row), reference),
            });
        }
    }
}

/// Pair every merged row with the same setting unmerged (`vs_unmerged`).
fn pair_merged_with_unmerged(rows: &mut [EvalRow]) {
    let correct = |r: &EvalRow| r.outcomes.chars().map(|c| c == '1').collect::<Vec<_>>();
    type Key = (String, f64, Option<f64>);
    let unmerged: Vec<(Key, Vec<bool>)> = rows
        .iter()
        .filter(|r| !r.merge)
        .map(|r| ((r.method.clone(), r.budget, r.keep_mass), correct(r)))
        .collect();
    for row in rows.iter_mut().filter(|r| r.merge) {
        let base = row.method.trim_end_matches(MERGED).to_string();
        let key = (base, row.budget, row.keep_mass);
        if let Some((_, reference)) = unmerged.iter().find(|(k, _)| *k == key) {
            row.vs_unmerged = Some(McNemar::of(&correct(row), reference));
        }
    }
}

/// `+3 -10 p=0.092`: questions only this method got right, only the paired method got right,
/// the p-value.
fn paired_cell(r: &EvalRow) -> String {
    match &r.paired {
        Some(m) => format!(
            "+{} -{} p={:.3}",
            m.only_this_correct, m.only_reference_correct, m.p_value
        ),
        None => "-".to_string(),
    }
}

/// `82.6-94.5`: an interval in percent.
fn ci_cell(ci: &Interval) -> String {
    format!("{:.1}-{:.1}", ci.low * 100.0, ci.high * 100.0)
}

impl EvalReport {
    /// Accuracy against the visual tokens kept, one series per method (its rows in budget
    /// order) with the 95% intervals, and the unpruned accuracy as the reference line.
    pub fn plot(&self) -> AccuracyPlot {
        let mut series: Vec<PlotSeries> = Vec::new();
        for row in self.rows.iter().filter(|r| r.method != Method::None.name()) {
            let point = PlotPoint {
                visual_tokens: row.mean_visual_tokens,
                accuracy: row.accuracy,
                low: row.accuracy_ci95.low,
                high: row.accuracy_ci95.high,
            };
            let name = match row.keep_mass {
                Some(_) => format!("{} adaptive", row.method),
                None => row.method.clone(),
            };
            match series.iter_mut().find(|s| s.name == name) {
                Some(s) => s.points.push(point),
                None => series.push(PlotSeries {
                    variant_of: row.merge.then(|| name.replace(MERGED, "")),
                    name,
                    points: vec![point],
                }),
            }
        }
        let unpruned = self.rows.iter().find(|r| r.method == Method::None.name());
        AccuracyPlot {
            title: format!(
                "{}: {} held-out questions, {} positions",
                self.model,
                self.questions,
                self.positions.name()
            ),
            x_label: "visual tokens kept per question (mean)".into(),
            series,
            reference: unpruned.map(|r| ("unpruned".to_string(), r.accuracy)),
        }
    }

    pub fn table(&self) -> String {
        let paired = self.paired_with.name();
        let mut options = String::new();
        if self.merge {
            options.push_str(" (rows named +merge merge the patches they drop into the kept ones)");
        }
        if let Some(ratio) = self.stage1_ratio {
            options.push_str(&format!("; STAR's stage 1 reduction ratio {ratio}"));
        }
        if self.adaptive_stage1 {
            options.push_str("; STAR's adaptive rows adapt stage 1");
        }
        if let Some(floor) = self.keep_floor {
            options.push_str(&format!("; adaptive rows keep at least {floor}"));
        }
        let mut out = format!(
            "model: {}\n{} held-out questions; tokens kept before the projector at {} \
             positions{options}; visual: tokens kept per question (mean); 95% CI: Wilson score \
             interval; vs {paired}: questions only this row / only {paired} at the same budget \
             answered correctly, exact McNemar p\n\n",
            self.model,
            self.questions,
            self.positions.name()
        );
        out.push_str(&format!(
            "{:<10} {:>7} {:>8} {:>9} {:>11} {:>10} {:>20} {:>12}\n",
            "method",
            "budget",
            "visual",
            "accuracy",
            "95% CI",
            "retention",
            format!("vs {paired}"),
            "ms/question"
        ));
        for r in &self.rows {
            out.push_str(&format!(
                "{:<10} {:>7} {:>8.1} {:>8.1}% {:>11} {:>9.1}% {:>20} {:>12.1}\n",
                r.method,
                r.label(),
                r.mean_visual_tokens,
                r.accuracy * 100.0,
                ci_cell(&r.accuracy_ci95),
                r.retention * 100.0,
                paired_cell(r),
                r.ms_per_question
            ));
        }
        out.push_str(&self.adaptive_table());
        out.push_str(&self.merged_table());
        out.push_str(&self.type_table());
        out
    }

    /// Each adaptive row against its method's fixed budget of the nearest mean token count
    /// (empty without adaptive rows).
    fn merged_table(&self) -> String {
        let mut out = String::new();
        for r in &self.rows {
            let Some(m) = &r.vs_unmerged else { continue };
            if out.is_empty() {
                out.push_str("\nmerged against the same setting unmerged\n");
            }
            out.push_str(&format!(
                "{} {} ({:.1}%): +{} -{} p={:.3}\n",
                r.method,
                r.label(),
                r.accuracy * 100.0,
                m.only_this_correct,
                m.only_reference_correct,
                m.p_value
            ));
        }
        out
    }

    fn adaptive_table(&self) -> String {
        let mut out = String::new();
        for r in &self.rows {
            let Some(pair) = &r.vs_fixed else { continue };
            if out.is_empty() {
                out.push_str("\nadaptive against fixed budgets at the nearest mean cost\n");
            }
            let m = &pair.test;
            out.push_str(&format!(
                "{} {} ({:.1} tokens, {:.1}%) vs {} {:.0}% ({:.1} tokens): +{} -{} p={:.3}\n",
                r.method,
                r.label(),
                r.mean_visual_tokens,
                r.accuracy * 100.0,
                r.method,
                pair.budget * 100.0,
                pair.mean_visual_tokens,
                m.only_this_correct,
                m.only_reference_correct,
                m.p_value
            ));
        }
        out
    }

    /// Accuracy per question type with its interval (empty when the set has no types).
    fn type_table(&self) -> String {
        let kinds: Vec<&String> = self
            .rows
            .first()
            .map(|r| r.by_type.keys().collect())
            .unwrap_or_default();
        if kinds.is_empty() {
            return String::new();
        }
        let width = |k: &str| k.len().max(16);
        let mut out = "\naccuracy by question type (%, 95% CI)\n".to_string();
        out.push_str(&format!("{:<10} {:>7}", "method", "budget"));
        for k in &kinds {
            out.push_str(&format!(" {:>w$}", k, w = width(k)));
        }
        out.push('\n');
        for r in &self.rows {
            out.push_str(&format!("{:<10} {:>7}", r.method, r.label()));
            for k in &kinds {
                let cell = r.by_type.get(*k).map_or("-".to_string(), |s| {
                    format!("{:.1} [{}]", s.accuracy * 100.0, ci_cell(&s.accuracy_ci95))
                });
                out.push_str(&format!(" {:>w$}", cell, w = width(k)));
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_compare_without_case_or_final_punctuation() {
        assert_eq!(normalise(" Red."), "red");
        assert_eq!(normalise("top left"), normalise("Top Left!"));
        assert_ne!(normalise("red"), normalise("blue"));
    }

    #[test]
    fn budgets_scale_with_the_visual_tokens() {
        let s = setting(Method::Star, 0.11, 576, 0, false);
        assert_eq!((s.stage1_keep, s.keep), (Some(518), Some(63)));
        let s = setting(Method::Star, 1.0, 196, 0, false);
        assert_eq!((s.stage1_keep, s.keep), (Some(196), Some(196)));
        assert_eq!(setting(Method::Random, 0.05, 196, 0, false).keep, Some(10));
    }

    #[test]
    fn merged_rows_are_paired_with_the_same_setting_unmerged() {
        let mut merged = row("vispruner+merge", 0.11, "1101");
        merged.merge = true;
        let mut rows = vec![
            row("vispruner", 0.11, "1010"),
            row("vispruner", 0.05, "0000"),
            merged,
        ];
        pair_merged_with_unmerged(&mut rows);
        let m = rows[2].vs_unmerged.unwrap();
        assert_eq!((m.only_this_correct, m.only_reference_correct), (2, 1));
        assert!(rows[0].vs_unmerged.is_none() && rows[1].vs_unmerged.is_none());
    }

    #[test]
    fn sweep_options_reach_the_rows_they_apply_to() {
        let sweep = Sweep {
            methods: vec![Method::Star, Method::Fastv, Method::Vispruner],
            budgets: vec![0.11],
            masses: vec![0.4],
            merge: true,
            stage1_ratio: Some(1.0),
            ..Sweep::default()
        };
        // `--merge` repeats the rows of the methods that select before the projector.
        let names: Vec<String> = sweep.settings().unwrap().iter().map(|s| s.name()).collect();
        let want = [
            "none",
            "star",
            "fastv",
            "vispruner",
            "star",
            "fastv",
            "star+merge",
            "vispruner+merge",
            "star+merge",
        ];
        assert_eq!(names, want);
        let applied = |method, ratio| {
            let mut prune = setting(method, 0.11, 196, 0, false);
            let sweep = Sweep {
                stage1_ratio: Some(ratio),
                ..sweep.clone()
            };
            apply_stage1_options(&mut prune, &sweep, 196, false);
            prune
        };
        // Ratio 1 leaves the whole budget to stage 1; 0.5 keeps half the patches there.
        let star = applied(Method::Star, 1.0);
        assert_eq!((star.stage1_keep, star.keep), (Some(22), Some(22)));
        assert_eq!(applied(Method::Star, 0.5).stage1_keep, Some(98));
        assert_eq!(applied(Method::Fastv, 1.0).stage1_keep, None);
        // `--adaptive-stage 1`: STAR's stage 1 keeps the share, stage 2 all it receives;
        // FastV has no stage 1 and adapts its stage 2; the ratio leaves adaptive rows alone.
        let mut star = adaptive_setting(Method::Star, 0.4, 196, (false, true));
        apply_stage1_options(&mut star, &sweep, 196, false);
        assert_eq!(
            (
                star.stage1_keep_mass,
                star.stage1_keep,
                star.keep,
                star.keep_mass
            ),
            (Some(0.4), None, Some(196), None)
        );
        let fastv = adaptive_setting(Method::Fastv, 0.4, 196, (false, true));
        assert_eq!((fastv.keep_mass, fastv.stage1_keep_mass), (Some(0.4), None));
    }

    fn row(method: &str, budget: f64, outcomes: &str) -> EvalRow {
        let correct = outcomes.chars().filter(|&c| c == '1').count();
        EvalRow {
            method: method.into(),
            budget,
            mean_visual_tokens: 0.0,
            correct,
            total: outcomes.len(),
            accuracy: correct as f64 / outcomes.len() as f64,
            accuracy_ci95: wilson(correct, outcomes.len(), Z95),
            retention: 1.0,
            keep_mass: None,
            paired: None,
            vs_fixed: None,
            merge: false,
            vs_unmerged: None,
            total_ms: 0.0,
            ms_per_question: 0.0,
            outcomes: outcomes.into(),
            by_type: BTreeMap::new(),
        }
    }

    /// Each row is paired with STAR's row at its own budget: FastV at 11% below has 3 questions
    /// only it answers and 10 only STAR answers (p = 0.09228515625 by hand, see stats.rs), at
    /// 5% one discordant pair each way (p = 1).
    #[test]
    fn rows_are_compared_with_star_at_the_same_budget() {
        let star_11 = format!("{}{}{}", "1".repeat(10), "0".repeat(3), "1".repeat(7));
        let fastv_11 = format!("{}{}{}", "0".repeat(10), "1".repeat(3), "1".repeat(7));
        let mut rows = vec![
            row("none", 1.0, "11"),
            row("star", 0.11, &star_11),
            row("star", 0.05, "10"),
            row("fastv", 0.11, &fastv_11),
            row("fastv", 0.05, "01"),
        ];
        pair_rows(&mut rows, Method::Star);
        assert!(rows[0].paired.is_none(), "no STAR row at 100%");
        assert!(rows[1].paired.is_none() && rows[2].paired.is_none());
        let m = rows[3].paired.unwrap();
        assert_eq!((m.only_this_correct, m.only_reference_correct), (3, 10));
        assert!((m.p_value - 0.092_285_156_25).abs() < 1e-12);
        let m = rows[4].paired.unwrap();
        assert_eq!(
            (m.only_this_correct, m.only_reference_correct, m.p_value),
            (1, 1, 1.0)
        );
        let table = EvalReport {
            model: "m".into(),
            questions: 20,
            positions: Positions::Original,
            important_ratio: None,
            merge: false,
            stage1_ratio: None,
            adaptive_stage1: false,
            keep_floor: None,
            paired_with: Method::Star,
            rows,
        }
        .table();
        assert!(table.contains("+3 -10 p=0.092"), "{table}");
        assert!(table.contains("vs star"), "{table}");
        assert!(table.contains("at original positions"), "{table}");
    }

    /// An adaptive row is paired with its method's fixed row of the nearest mean token count,
    /// never with another method's, and the table says so.
    #[test]
    fn adaptive_rows_meet_the_fixed_budget_of_equal_cost() {
        let with_tokens = |mut r: EvalRow, tokens: f64, mass: Option<f64>| {
            r.mean_visual_tokens = tokens;
            r.keep_mass = mass;
            r
        };
        let mut rows = vec![
            with_tokens(row("star", 0.25, "1100"), 49.0, None),
            with_tokens(row("star", 0.11, "1000"), 22.0, None),
            with_tokens(row("fastv", 0.11, "1111"), 21.0, None),
            with_tokens(row("star", 1.0, "0111"), 20.0, Some(0.6)),
        ];
        pair_adaptive_with_fixed(&mut rows);
        assert!(rows[..3].iter().all(|r| r.vs_fixed.is_none()));
        let pair = rows[3].vs_fixed.clone().unwrap();
        assert_eq!((pair.budget, pair.mean_visual_tokens), (0.11, 22.0));
        assert_eq!(
            (
                pair.test.only_this_correct,
                pair.test.only_reference_correct
            ),
            (3, 1)
        );
        let table = EvalReport {
            model: "m".into(),
            questions: 4,
            positions: Positions::Original,
            important_ratio: None,
            merge: false,
            stage1_ratio: None,
            adaptive_stage1: false,
            keep_floor: None,
            paired_with: Method::Star,
            rows,
        }
        .table();
        assert!(
            table.contains("star P=0.60 (20.0 tokens, 75.0%) vs star 11% (22.0 tokens): +3 -1"),
            "{table}"
        );
    }

    /// Pairing with another method: its rows are the reference and carry no test themselves.
    #[test]
    fn rows_can_be_paired_with_any_method() {
        let mut rows = vec![
            row("none", 1.0, "11"),
            row("star", 0.11, "1100"),
            row("fastv", 0.11, "0011"),
        ];
        pair_rows(&mut rows, Method::Fastv);
        assert!(rows[2].paired.is_none() && rows[0].paired.is_none());
        let m = rows[1].paired.unwrap();
        assert_eq!((m.only_this_correct, m.only_reference_correct), (2, 2));
    }
}
