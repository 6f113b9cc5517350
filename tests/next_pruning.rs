//! Pruning on LLaVA-NeXT (docs/pruning.md, "LLaVA-NeXT"), against references HF transformers
//! recorded for the tiny random NeXT fixture (scripts/make_tiny_llava_next.py): before-projector
//! selection per view, stage 2 / FastV over the patch rows of all views with newline rows never
//! dropped, kept patches reported as (view, index) pairs.
//!
//! The packed order the expectations need is rebuilt here from cases.json's grid and unpadding
//! (not from the engine's `AnyresLayout`), so a packing mistake fails the test.

mod next_fixture;

use llava_wgpu::generate::ViewPatch;
use llava_wgpu::gpu::DType;
use llava_wgpu::prune::{Method, Positions, PruneOptions};
use llava_wgpu::text::Template;
use llava_wgpu::{Engine, EngineOptions, GenerateOutput, GenerateRequest};

use next_fixture::{Case, VICUNA};

/// The references were recorded with the kept tokens renumbered one after another (transformers
/// fed fewer image tokens), so these runs ask for contiguous positions.
fn contiguous() -> PruneOptions {
    PruneOptions {
        positions: Positions::Contiguous,
        ..PruneOptions::default()
    }
}

/// Stage 2's layer in these tests (1-based: scores of layer K−1, rows dropped entering K).
const K: usize = 2;
/// Measured: at most 7.3e-7 (tests/next_parity.rs); the bound leaves margin.
const F32_PARITY: f64 = 5e-6;

fn engine() -> Engine {
    let options = EngineOptions {
        weight_format: Some(llava_wgpu::gpu::WeightFormat::F32.into()),
        kv: Some(DType::F32),
        ..EngineOptions::default()
    };
    Engine::load(&next_fixture::model_dir(VICUNA), options).unwrap()
}

fn run(engine: &Engine, case: &Case, prune: PruneOptions, tokens: usize) -> GenerateOutput {
    let mut request = GenerateRequest::new(&case.image, &case.prompt);
    request.template = Template::VicunaV1;
    request.capture_outputs = true;
    request.max_new_tokens = tokens;
    request.ignore_eos = true;
    request.prune = prune;
    engine.generate(&request, |_| {}).unwrap()
}

/// One packed image row: a patch (view, index) or a newline (None).
type Row = Option<ViewPatch>;

/// The packed rows of `case` when view `v` keeps the patches `keep(v, index)` says, from
/// cases.json's crop grid and unpadded rows/columns: the base view's kept patches, then each
/// unpadded grid row's kept patches and a newline.
fn packed(case: &Case, keep: impl Fn(usize, usize) -> bool) -> Vec<Row> {
    let grid = 4; // patches per side of a 56-px view with 14-px patches
    let crop_cols = case.ints("crop_grid_rows_cols")[1];
    let (rows, cols) = (case.ints("unpadded_rows"), case.ints("unpadded_cols"));
    let mut out: Vec<Row> = (0..grid * grid)
        .filter(|&i| keep(0, i))
        .map(|index| Some(ViewPatch { view: 0, index }))
        .collect();
    for y in rows[0]..rows[1] {
        for x in cols[0]..cols[1] {
            let view = 1 + (y / grid) * crop_cols + x / grid;
            let index = (y % grid) * grid + x % grid;
            if keep(view, index) {
                out.push(Some(ViewPatch { view, index }));
            }
        }
        out.push(None);
    }
    out
}

/// Positions of the `n` largest `scores` among the patch rows of `rows` (ties to the lower
/// position), ascending: a CPU top-k over the reference scores, newlines never candidates.
fn top_patches(scores: &[f32], rows: &[Row], n: usize) -> Vec<usize> {
    assert_eq!(scores.len(), rows.len(), "one score per image row");
    let mut candidates: Vec<usize> = (0..rows.len()).filter(|&r| rows[r].is_some()).collect();
    candidates.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut kept = candidates[..n].to_vec();
    kept.sort_unstable();
    kept
}

/// The budget in `range` whose boundary (the n-th against the (n+1)-th largest patch score) is
/// widest, relative to the scores' spread, so float rounding cannot swap the kept set.
fn clear_budget(scores: &[f32], rows: &[Row], range: std::ops::Range<usize>) -> usize {
    let mut sorted: Vec<f32> = (0..rows.len())
        .filter(|&r| rows[r].is_some())
        .map(|r| scores[r])
        .collect();
    sorted.sort_by(|a, b| b.total_cmp(a));
    range
        .max_by(|&a, &b| (sorted[a - 1] - sorted[a]).total_cmp(&(sorted[b - 1] - sorted[b])))
        .unwrap()
}

fn per_view(out: &GenerateOutput) -> llava_wgpu::generate::KeptPerView {
    let kept = out.kept_visual_indices.clone().expect("pruned run");
    assert!(kept.stage1.is_none() && kept.stage2.is_none());
    kept.per_view
        .expect("NeXT kept patches are reported per view")
}

fn patches(rows: &[Row], positions: &[usize]) -> Vec<ViewPatch> {
    positions.iter().filter_map(|&p| rows[p]).collect()
}

#[test]
fn keeping_every_token_is_bit_identical_to_no_pruning() {
    let engine = engine();
    for case in next_fixture::cases(VICUNA).iter().take(3) {
        let unpruned = run(&engine, case, PruneOptions::default(), 4);
        let all = case.int("visual_tokens");
        let star = PruneOptions {
            method: Method::Star,
            stage1_ratio: Some(0.0),
            keep: Some(all),
            stage2_layer: Some(K),
            ..contiguous()
        };
        let fastv = PruneOptions {
            method: Method::Fastv,
            keep: Some(all),
            stage2_layer: Some(K),
            ..contiguous()
        };
        for prune in [star, fastv] {
            let out = run(&engine, case, prune.clone(), 4);
            let label = format!("case {} {}", case.index, prune.method);
            assert_eq!(out.first_logits, unpruned.first_logits, "{label}: logits");
            assert_eq!(out.generated_ids, unpruned.generated_ids, "{label}");
            assert_eq!(out.visual_tokens.after_stage2, all, "{label}");
        }
    }
}

#[test]
fn stage_1_selects_per_view_and_matches_transformers() {
    let engine = engine();
    for case in next_fixture::cases(VICUNA) {
        let i = case.index;
        let per_view_keep = case.int("stage1_keep_per_view");
        let views = case.int("num_views");
        let reference: Vec<Vec<usize>> = case.int_lists("stage1_kept_per_view");
        // Stage 2 keeps every patch stage 1 left, so the output is stage 1's alone.
        let star = PruneOptions {
            method: Method::Star,
            stage1_keep: Some(per_view_keep * views),
            keep: Some(per_view_keep * views),
            stage2_layer: Some(K),
            ..contiguous()
        };
        let out = run(&engine, &case, star, 8);
        let rows = packed(&case, |v, index| reference[v].contains(&index));
        let want: Vec<ViewPatch> = rows.iter().filter_map(|r| *r).collect();
        assert_eq!(
            per_view(&out).stage1.unwrap(),
            want,
            "case {i}: stage-1 kept patches"
        );
        assert_eq!(out.visual_tokens.after_stage1, want.len(), "case {i}");
        assert_eq!(
            out.prompt_tokens,
            case.ints("stage1_input_ids").len(),
            "case {i}"
        );
        let features = next_fixture::tensor(VICUNA, &format!("case{i}.stage1_image_features"));
        let logits = next_fixture::tensor(VICUNA, &format!("case{i}.stage1_first_logits"));
        let (e_features, e_logits) = (
            next_fixture::rel_l2(&out.image_features, &features),
            next_fixture::rel_l2(&out.first_logits, &logits),
        );
        eprintln!("case {i}: stage-1 features rel L2 {e_features:.2e}, logits {e_logits:.2e}");
        assert!(e_features < F32_PARITY && e_logits < F32_PARITY, "case {i}");
        let greedy: Vec<u32> = case
            .ints("stage1_greedy_ids")
            .iter()
            .map(|&x| x as u32)
            .collect();
        assert_greedy_until_eos(&out.generated_ids, &greedy, &format!("case {i}: stage 1"));
    }
}

/// The references mask EOS at every step; the engine, with `ignore_eos`, may pick it and go
/// on. Tokens must agree up to the engine's first EOS (and that EOS must not come first).
fn assert_greedy_until_eos(got: &[u32], want: &[u32], label: &str) {
    const EOS: u32 = 2;
    let until = got.iter().position(|&t| t == EOS).unwrap_or(got.len());
    assert!(until > 0, "{label}: EOS as the first token");
    assert_eq!(got[..until], want[..until], "{label}: greedy tokens");
}

/// The stage-2 reference scripts/next_pruning_reference.py recorded.
fn stage2_reference() -> serde_json::Value {
    let dir = next_fixture::model_dir(VICUNA).join("reference");
    let text = std::fs::read_to_string(dir.join("pruning.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn pruning_tensor(name: &str) -> Vec<f32> {
    let dir = next_fixture::model_dir(VICUNA).join("reference");
    next_fixture::read_tensor(&dir.join("pruning.safetensors"), name)
}

#[test]
fn stage_2_and_fastv_outputs_match_the_pytorch_drop_reference() {
    let engine = engine();
    let reference = stage2_reference();
    let k = reference["K"].as_u64().unwrap() as usize;
    for case in next_fixture::cases(VICUNA) {
        let i = case.index;
        let views = case.int("num_views");
        let per_view_keep = case.int("stage1_keep_per_view");
        for method in [Method::Fastv, Method::Star] {
            let want = &reference["cases"][i][method.name()];
            let n2 = want["n2"].as_u64().unwrap() as usize;
            let prune = PruneOptions {
                method,
                stage1_keep: (method == Method::Star).then_some(per_view_keep * views),
                keep: Some(n2),
                stage2_layer: Some(k),
                ..contiguous()
            };
            let out = run(&engine, &case, prune, 8);
            let label = format!("case {i} {method}");
            let kept: Vec<ViewPatch> = want["kept_patches"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| ViewPatch {
                    view: p["view"].as_u64().unwrap() as usize,
                    index: p["index"].as_u64().unwrap() as usize,
                })
                .collect();
            assert_eq!(
                per_view(&out).stage2.unwrap(),
                kept,
                "{label}: kept patches"
            );
            let logits = pruning_tensor(&format!("case{i}.{}_first_logits", method.name()));
            let e = next_fixture::rel_l2(&out.first_logits, &logits);
            eprintln!("{label}: first logits rel L2 {e:.2e}");
            assert!(e < F32_PARITY, "{label}: first logits rel L2 {e}");
            let greedy: Vec<u32> = want["greedy_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            assert_greedy_until_eos(&out.generated_ids, &greedy, &label);
        }
    }
}

#[test]
fn stage_2_and_fastv_keep_the_top_patches_over_all_views_and_every_newline() {
    let engine = engine();
    for case in next_fixture::cases(VICUNA) {
        let i = case.index;
        let rows = packed(&case, |_, _| true);
        let settings = [
            (
                Method::Fastv,
                format!("case{i}.fastv_image_scores_layer{}", K - 1),
            ),
            (
                Method::Star,
                format!("case{i}.text_image_scores_layer{}", K - 1),
            ),
        ];
        for (method, scores_name) in settings {
            let scores = next_fixture::tensor(VICUNA, &scores_name);
            let n2 = clear_budget(&scores, &rows, 3..case.int("visual_tokens") / 2);
            let prune = PruneOptions {
                method,
                stage1_ratio: (method == Method::Star).then_some(0.0),
                keep: Some(n2),
                stage2_layer: Some(K),
                ..contiguous()
            };
            let out = run(&engine, &case, prune, 1);
            let want = patches(&rows, &top_patches(&scores, &rows, n2));
            assert_eq!(
                per_view(&out).stage2.unwrap(),
                want,
                "case {i} {method} N2 = {n2}"
            );
            assert_eq!(out.visual_tokens.after_stage2, n2, "case {i} {method}");
        }
    }
}

#[test]
fn before_projector_baselines_split_their_budget_across_views() {
    let engine = engine();
    for case in next_fixture::cases(VICUNA) {
        let i = case.index;
        let views = case.int("num_views");
        let cls = next_fixture::tensor(VICUNA, &format!("case{i}.clip_cls_scores"));
        let n2 = 2 * views + 1; // the base view gets one more than the others
        let prune = PruneOptions {
            method: Method::Fastervlm,
            keep: Some(n2),
            ..contiguous()
        };
        let out = run(&engine, &case, prune, 1);
        // Per view: top-k of the CLS row's attention to that view's patches (key 0 is CLS).
        let kept: Vec<Vec<usize>> = (0..views)
            .map(|v| {
                let row = &cls[v * 17 + 1..(v + 1) * 17];
                let budget = 2 + usize::from(v == 0);
                let mut order: Vec<usize> = (0..16).collect();
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
                order.truncate(budget);
                order
            })
            .collect();
        let rows = packed(&case, |v, index| kept[v].contains(&index));
        let want: Vec<ViewPatch> = rows.iter().filter_map(|r| *r).collect();
        assert_eq!(
            per_view(&out).stage1.unwrap(),
            want,
            "case {i}: FasterVLM per view"
        );
        assert_eq!(out.visual_tokens.after_stage2, want.len(), "case {i}");
        assert!(want.len() <= n2, "unpadding only removes patches");
    }
}

#[test]
fn a_budget_below_the_view_count_goes_to_the_first_views() {
    let engine = engine();
    let case = &next_fixture::cases(VICUNA)[0];
    let prune = PruneOptions {
        method: Method::Fastervlm,
        keep: Some(2),
        ..contiguous()
    };
    let out = run(&engine, case, prune, 1);
    let views: Vec<usize> = per_view(&out)
        .stage1
        .unwrap()
        .iter()
        .map(|p| p.view)
        .collect();
    assert_eq!(
        views,
        vec![0, 1],
        "one patch each for the base view and the first crop"
    );
    let too_many = PruneOptions {
        method: Method::Star,
        stage1_keep: Some(17 * case.int("num_views")),
        keep: Some(4),
        ..contiguous()
    };
    let mut request = GenerateRequest::new(&case.image, &case.prompt);
    request.prune = too_many;
    let err = engine.generate(&request, |_| {}).unwrap_err().to_string();
    assert!(err.contains("prune.stage1_keep"), "{err}");
}
