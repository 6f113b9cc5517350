//! Pruning invariants from STAR.md on the tiny fixture, and parity with references recorded by
//! HF transformers / PyTorch (scripts/make_tiny_llava.py).

mod fixture;

use llava_wgpu::prune::{Method, PruneOptions};
use llava_wgpu::text::Template;
use llava_wgpu::{Engine, EngineOptions, GenerateOutput, GenerateRequest};

fn engine() -> Engine {
    Engine::load(&fixture::model_dir(), EngineOptions::default()).unwrap()
}

fn run(
    engine: &Engine,
    case: &fixture::Case,
    prune: PruneOptions,
    tokens: usize,
) -> GenerateOutput {
    let mut request = GenerateRequest::new(&case.image, &case.prompt);
    request.max_new_tokens = tokens;
    request.ignore_eos = true;
    request.prune = prune;
    engine.generate(&request, |_| {}).unwrap()
}

fn star(n1: usize, n2: usize, k: usize) -> PruneOptions {
    PruneOptions {
        method: Method::Star,
        stage1_keep: Some(n1),
        keep: Some(n2),
        stage2_layer: Some(k),
        ..Default::default()
    }
}

#[test]
fn keeping_every_token_is_bit_identical_to_no_pruning() {
    let engine = engine();
    for case in fixture::cases().iter().take(3) {
        let plain = run(&engine, case, PruneOptions::default(), 6);
        for k in [1, 2, 3] {
            let all = run(&engine, case, star(36, 36, k), 6);
            assert_eq!(
                all.first_logits, plain.first_logits,
                "case {} K={k}: logits differ",
                case.index
            );
            assert_eq!(all.generated_ids, plain.generated_ids);
            assert_eq!(all.kv_cache_bytes, plain.kv_cache_bytes);
            let kept = all.kept_visual_indices.unwrap();
            assert_eq!(kept.stage1.unwrap(), (0..36).collect::<Vec<_>>());
            assert_eq!(kept.stage2.unwrap(), (0..36).collect::<Vec<_>>());
        }
        let fastv_all = run(
            &engine,
            case,
            PruneOptions {
                method: Method::Fastv,
                keep: Some(36),
                ..Default::default()
            },
            6,
        );
        assert_eq!(fastv_all.first_logits, plain.first_logits);
    }
}

#[test]
fn kv_cache_shrinks_by_exactly_the_dropped_rows_in_layers_from_k() {
    let engine = engine();
    let cfg = &engine.config.text;
    let row_bytes = 2 * (cfg.num_key_value_heads * cfg.head_dim * 4) as u64;
    let case = &fixture::cases()[1];
    for (n1, n2, k) in [(32, 8, 2), (30, 5, 1), (36, 12, 3)] {
        let kept_all = run(&engine, case, star(n1, n1, k), 4);
        let pruned = run(&engine, case, star(n1, n2, k), 4);
        let layers_from_k = (cfg.num_hidden_layers - k) as u64;
        assert_eq!(
            kept_all.kv_cache_bytes - pruned.kv_cache_bytes,
            (n1 - n2) as u64 * layers_from_k * row_bytes,
            "N1={n1} N2={n2} K={k}"
        );
        assert_eq!(pruned.visual_tokens.after_stage1, n1);
        assert_eq!(pruned.visual_tokens.after_stage2, n2);
        let kept = pruned.kept_visual_indices.unwrap();
        let (s1, s2) = (kept.stage1.unwrap(), kept.stage2.unwrap());
        assert_eq!((s1.len(), s2.len()), (n1, n2));
        assert!(
            s1.windows(2).all(|w| w[0] < w[1]) && s2.windows(2).all(|w| w[0] < w[1]),
            "raster order"
        );
        assert!(
            s2.iter().all(|i| s1.contains(i)),
            "stage 2 keeps a subset of stage 1"
        );
        assert!(pruned.flops.prefill < pruned.flops.prefill_unpruned);
    }
}

#[test]
fn every_baseline_keeps_its_budget() {
    let engine = engine();
    let case = &fixture::cases()[3];
    for method in [
        Method::Fastv,
        Method::Fastervlm,
        Method::Vispruner,
        Method::Random,
    ] {
        let out = run(
            &engine,
            case,
            PruneOptions {
                method,
                keep: Some(9),
                ..Default::default()
            },
            3,
        );
        assert_eq!(out.visual_tokens.after_stage2, 9, "{method:?}");
        let kept = out.kept_visual_indices.unwrap();
        let last = kept.stage2.or(kept.stage1).unwrap();
        assert_eq!(last.len(), 9, "{method:?}");
        assert!(last.windows(2).all(|w| w[0] < w[1]) && last.iter().all(|&i| i < 36));
        assert_eq!(out.generated_ids.len(), 3);
    }
}

#[test]
fn impossible_settings_are_refused() {
    let engine = engine();
    let case = &fixture::cases()[0];
    let err = |prune: PruneOptions, template: Template, prompt: &str| {
        let mut request = GenerateRequest::new(&case.image, prompt);
        request.prune = prune;
        request.template = template;
        engine.generate(&request, |_| {}).unwrap_err().to_string()
    };
    let e = err(star(20, 30, 2), Template::LlavaHf, "What?");
    assert!(e.contains("--keep") && e.contains("N1"), "{e}");
    let e = err(star(40, 10, 2), Template::LlavaHf, "What?");
    assert!(e.contains("--stage1-keep"), "{e}");
    let e = err(star(30, 10, 4), Template::LlavaHf, "What?");
    assert!(e.contains("--stage2-layer"), "{e}");
    // Stage 2 needs text after the image.
    let e = err(star(30, 10, 2), Template::Raw, "USER: describe <image>");
    assert!(e.contains("no"), "{e}");
}
