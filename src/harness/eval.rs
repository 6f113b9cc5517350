//! `llava-wgpu eval`: accuracy of every pruning method at several visual-token budgets on a
//! held-out question set (JSONL lines `{"image": PATH, "question": TEXT, "answer": TEXT}`, image
//! paths relative to the file), with retention against the unpruned model and time per setting.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::generate::GenerateRequest;
use crate::model::llava::Engine;
use crate::prune::{Method, PruneOptions};

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
/// stage 1 (or the final budget, if larger) and the rest at its default layer.
pub fn setting(method: Method, fraction: f64, n0: usize, seed: u64) -> PruneOptions {
    let n2 = ((n0 as f64 * fraction).round() as usize).clamp(1, n0);
    match method {
        Method::None => PruneOptions::default(),
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

#[derive(Clone, Debug, Serialize)]
pub struct EvalRow {
    pub method: String,
    pub budget: f64,
    pub visual_tokens: usize,
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
    /// Accuracy relative to the unpruned model.
    pub retention: f64,
    pub total_ms: f64,
    pub ms_per_question: f64,
    /// Per question type (only when the set's lines have a `type`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub by_type: BTreeMap<String, TypeScore>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TypeScore {
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub questions: usize,
    pub rows: Vec<EvalRow>,
}

pub const METHODS: [Method; 5] = [
    Method::Star,
    Method::Fastv,
    Method::Fastervlm,
    Method::Vispruner,
    Method::Random,
];

/// Evaluate the unpruned model, then every method at every budget.
pub fn run(
    engine: &Engine,
    label: &str,
    examples: &[Example],
    max_new_tokens: usize,
    mut progress: impl FnMut(&str),
) -> Result<EvalReport> {
    let n0 = engine.config.image_tokens();
    let mut plan: Vec<(Method, f64)> = vec![(Method::None, 1.0)];
    for method in METHODS {
        for budget in BUDGETS {
            plan.push((method, budget));
        }
    }
    let mut rows: Vec<EvalRow> = Vec::new();
    for (method, budget) in plan {
        let prune = setting(method, budget, n0, 0);
        let start = Instant::now();
        let mut correct = 0;
        let mut by_type: BTreeMap<String, TypeScore> = BTreeMap::new();
        let mut visual = n0;
        for (i, ex) in examples.iter().enumerate() {
            let mut request = GenerateRequest::new(&ex.image, &ex.question);
            request.max_new_tokens = max_new_tokens;
            // A different random selection per question, reproducible.
            request.prune = PruneOptions {
                seed: i as u64,
                ..prune.clone()
            };
            let out = engine.generate(&request, |_| {})?;
            visual = out.visual_tokens.after_stage2;
            let good = normalise(&out.text) == normalise(&ex.answer);
            correct += usize::from(good);
            if let Some(kind) = &ex.kind {
                let score = by_type.entry(kind.clone()).or_default();
                score.total += 1;
                score.correct += usize::from(good);
            }
        }
        let total_ms = start.elapsed().as_secs_f64() * 1e3;
        for score in by_type.values_mut() {
            score.accuracy = score.correct as f64 / score.total as f64;
        }
        let accuracy = correct as f64 / examples.len() as f64;
        let unpruned = rows.first().map_or(accuracy, |r| r.accuracy);
        let name = format!("{method:?}").to_lowercase();
        progress(&format!(
            "{name} {:.0}%: {:.1}% correct",
            budget * 100.0,
            accuracy * 100.0
        ));
        rows.push(EvalRow {
            method: name,
            budget,
            visual_tokens: visual,
            correct,
            total: examples.len(),
            accuracy,
            retention: if unpruned > 0.0 {
                accuracy / unpruned
            } else {
                0.0
            },
            total_ms,
            ms_per_question: total_ms / examples.len() as f64,
            by_type,
        });
    }
    Ok(EvalReport {
        model: label.to_string(),
        questions: examples.len(),
        rows,
    })
}

impl EvalReport {
    pub fn table(&self) -> String {
        let mut out = format!(
            "model: {}\n{} held-out questions\n\n",
            self.model, self.questions
        );
        out.push_str(&format!(
            "{:<10} {:>7} {:>8} {:>9} {:>10} {:>12}\n",
            "method", "budget", "visual", "accuracy", "retention", "ms/question"
        ));
        for r in &self.rows {
            out.push_str(&format!(
                "{:<10} {:>6.0}% {:>8} {:>8.1}% {:>9.1}% {:>12.1}\n",
                r.method,
                r.budget * 100.0,
                r.visual_tokens,
                r.accuracy * 100.0,
                r.retention * 100.0,
                r.ms_per_question
            ));
        }
        let kinds: Vec<&String> = self
            .rows
            .first()
            .map(|r| r.by_type.keys().collect())
            .unwrap_or_default();
        if !kinds.is_empty() {
            out.push_str("\naccuracy by question type (%)\n");
            out.push_str(&format!("{:<10} {:>7}", "method", "budget"));
            for k in &kinds {
                out.push_str(&format!(" {:>w$}", k, w = k.len().max(6)));
            }
            out.push('\n');
            for r in &self.rows {
                out.push_str(&format!("{:<10} {:>6.0}%", r.method, r.budget * 100.0));
                for k in &kinds {
                    let acc = r.by_type.get(*k).map_or(f64::NAN, |s| s.accuracy * 100.0);
                    out.push_str(&format!(" {:>w$.1}", acc, w = k.len().max(6)));
                }
                out.push('\n');
            }
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
        let s = setting(Method::Star, 0.11, 576, 0);
        assert_eq!((s.stage1_keep, s.keep), (Some(518), Some(63)));
        let s = setting(Method::Star, 1.0, 196, 0);
        assert_eq!((s.stage1_keep, s.keep), (Some(196), Some(196)));
        assert_eq!(setting(Method::Random, 0.05, 196, 0).keep, Some(10));
    }
}
