//! `eval`: reading held-out sets, scoring answers, one row per method and budget.

mod fixture;

use llava_wgpu::harness::eval::{self, BUDGETS, METHODS};
use llava_wgpu::{Engine, EngineOptions};

#[test]
fn eval_scores_the_unpruned_model_against_its_own_greedy_answers() {
    let engine = Engine::load(&fixture::model_dir(), EngineOptions::default()).unwrap();
    let dir = std::env::temp_dir().join(format!("llava-wgpu-eval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The expected answer of each question is what the unpruned model says (2 tokens), so the
    // unpruned accuracy must be exactly 100% and every row must be scored against it.
    let mut lines = String::new();
    for case in fixture::cases().iter().take(3) {
        let answer = engine.tokenizer.decode(&case.greedy_ids[..2]).unwrap();
        let line =
            serde_json::json!({"image": case.image, "question": case.prompt, "answer": answer});
        lines.push_str(&format!("{line}\n"));
    }
    let path = dir.join("held_out.jsonl");
    std::fs::write(&path, lines).unwrap();
    let examples = eval::read_jsonl(&path).unwrap();
    let report = eval::run(&engine, "fixture", &examples, 2, |_| {}).unwrap();
    assert_eq!(report.rows.len(), 1 + METHODS.len() * BUDGETS.len());
    assert_eq!(report.rows[0].accuracy, 1.0);
    for row in &report.rows {
        assert_eq!(row.total, 3);
        assert!(
            (row.retention - row.accuracy).abs() < 1e-12,
            "retention is relative to 100%"
        );
        if row.budget == 1.0 && row.method != "random" {
            // Keeping every token is the unpruned model.
            assert_eq!(row.accuracy, 1.0, "{} at 100%", row.method);
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
            "3 questions leave a wide interval: {ci:?}"
        );
        assert_eq!(row.outcomes.len(), 3);
        if row.method == "star" {
            assert!(row.vs_star.is_none());
            continue;
        }
        let star = report
            .rows
            .iter()
            .find(|r| r.method == "star" && r.budget == row.budget)
            .unwrap();
        let m = row.vs_star.expect("paired with STAR");
        let pairs = || row.outcomes.chars().zip(star.outcomes.chars());
        assert_eq!(
            m.only_this_correct,
            pairs().filter(|p| *p == ('1', '0')).count()
        );
        assert_eq!(
            m.only_reference_correct,
            pairs().filter(|p| *p == ('0', '1')).count()
        );
        // With at most 3 discordant questions no difference can be significant (min p = 0.25).
        assert!(m.p_value >= 0.25, "{m:?}");
    }
    let json = serde_json::to_value(report).unwrap();
    assert!(json["rows"][1]["accuracy_ci95"]["low"].is_number());
    assert!(
        json["rows"][1]["vs_star"].is_null(),
        "STAR is the reference"
    );
    assert!(json["rows"][1 + BUDGETS.len()]["vs_star"]["p_value"].is_number());
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
