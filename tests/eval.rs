//! `eval`: reading held-out sets, scoring answers, one row per method and budget.

mod fixture;

use llava_wgpu::harness::eval::{self, BUDGETS, METHODS};
use llava_wgpu::{Engine, EngineOptions};

/// Questions 1–3 expect what the unpruned model says (2 tokens; the second with trailing
/// punctuation, which scoring ignores); question 4 expects an answer no model gives. So the
/// unpruned model scores exactly 3 of 4, every row misses question 4, and retention is relative
/// to 75%.
#[test]
fn eval_scores_right_and_wrong_answers() {
    let engine = Engine::load(&fixture::model_dir(), EngineOptions::default()).unwrap();
    let dir = std::env::temp_dir().join(format!("llava-wgpu-eval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = fixture::cases();
    let mut lines = String::new();
    for (i, case) in cases.iter().take(3).enumerate() {
        let mut answer = engine.tokenizer.decode(&case.greedy_ids[..2]).unwrap();
        if i == 1 {
            answer.push_str(" !");
        }
        let line =
            serde_json::json!({"image": case.image, "question": case.prompt, "answer": answer});
        lines.push_str(&format!("{line}\n"));
    }
    let wrong = serde_json::json!({"image": cases[0].image, "question": cases[0].prompt,
        "answer": "no model answers this"});
    lines.push_str(&format!("{wrong}\n"));
    let path = dir.join("held_out.jsonl");
    std::fs::write(&path, lines).unwrap();
    let examples = eval::read_jsonl(&path).unwrap();
    let report = eval::run(&engine, "fixture", &examples, 2, |_| {}).unwrap();
    assert_eq!(report.rows.len(), 1 + METHODS.len() * BUDGETS.len());
    assert_eq!(report.rows[0].accuracy, 0.75);
    assert_eq!(report.rows[0].outcomes, "1110");
    for row in &report.rows {
        assert_eq!(row.total, 4);
        assert!(
            row.outcomes.ends_with('0'),
            "{} scored the wrong answer",
            row.method
        );
        assert!(
            (row.retention - row.accuracy / 0.75).abs() < 1e-12,
            "retention is relative to the unpruned 75%"
        );
        if row.budget == 1.0 && row.method != "random" {
            // Keeping every token is the unpruned model.
            assert_eq!(row.outcomes, "1110", "{} at 100%", row.method);
        }
    }
    assert!(report.table().contains("retention"));

    check_intervals_and_pairing(&report);
    check_bad_lines_are_named(&path);
    std::fs::remove_dir_all(&dir).ok();
}

/// Every accuracy carries its 95% interval, and every row but STAR's is paired with STAR's row
/// at its budget: the discordant counts are those of the two rows' per-question outcomes.
fn check_intervals_and_pairing(report: &eval::EvalReport) {
    for row in &report.rows {
        let ci = row.accuracy_ci95;
        assert!(ci.low <= row.accuracy && row.accuracy <= ci.high, "{ci:?}");
        assert!(
            ci.high - ci.low > 0.3,
            "4 questions leave a wide interval: {ci:?}"
        );
        assert_eq!(row.outcomes.len(), 4);
        if row.method == "star" {
            assert!(row.paired.is_none());
            continue;
        }
        let star = report
            .rows
            .iter()
            .find(|r| r.method == "star" && r.budget == row.budget)
            .unwrap();
        let m = row.paired.expect("paired with STAR");
        let pairs = || row.outcomes.chars().zip(star.outcomes.chars());
        assert_eq!(
            m.only_this_correct,
            pairs().filter(|p| *p == ('1', '0')).count()
        );
        assert_eq!(
            m.only_reference_correct,
            pairs().filter(|p| *p == ('0', '1')).count()
        );
        // Question 4 is wrong everywhere, so at most 3 questions are discordant and no
        // difference can be significant: the exact two-sided p is at least 2 · 2^-3 = 0.25.
        assert!(m.p_value >= 0.25, "{m:?}");
    }
    let json = serde_json::to_value(report).unwrap();
    assert!(json["rows"][1]["accuracy_ci95"]["low"].is_number());
    assert!(json["rows"][1]["paired"].is_null(), "STAR is the reference");
    assert!(json["rows"][1 + BUDGETS.len()]["paired"]["p_value"].is_number());
    // `eval --from-json` reads the report back: the same rows, the same plot.
    let back: eval::EvalReport = serde_json::from_value(json).unwrap();
    assert_eq!(back.rows.len(), report.rows.len());
    assert_eq!(back.plot(), report.plot());
}

/// Bad lines are named by file and line.
fn check_bad_lines_are_named(path: &std::path::Path) {
    std::fs::write(path, "{\"image\": \"a.png\", \"question\": \"q\"}\n").unwrap();
    let e = eval::read_jsonl(path).unwrap_err().to_string();
    assert!(
        e.contains("held_out.jsonl") && e.contains("line 1") && e.contains("answer"),
        "{e}"
    );
    std::fs::write(path, "not json\n").unwrap();
    assert!(eval::read_jsonl(path)
        .unwrap_err()
        .to_string()
        .contains("line 1"));
}
