//! The benchmark harness runs every setting and reports consistent numbers (no timing is
//! asserted: speed is shown by `llava-wgpu bench`, not by tests).

mod fixture;

use llava_wgpu::harness::bench;
use llava_wgpu::model::presets;
use llava_wgpu::{Engine, EngineOptions};

fn plan(warmup: usize, repeats: usize) -> bench::Plan {
    bench::Plan {
        warmup,
        repeats,
        decode_tokens: 2,
    }
}

/// Every setting's token counts are the budgets it asked for (docs/pruning.md's arithmetic, done
/// here by hand), speedups grow as budgets shrink, and the ceilings are the ones the adapter can
/// measure. No timing is compared with anything.
#[test]
fn pruning_bench_reports_every_setting_on_the_fixture() {
    let engine = Engine::load(&fixture::model_dir(), EngineOptions::default()).unwrap();
    let n0 = engine.config.image_tokens();
    let settings = bench::default_settings(n0);
    assert_eq!(settings.len(), 6);
    let report = bench::pruning(&engine, "fixture", &settings, plan(0, 1), |_| {}).unwrap();
    assert_eq!(report.settings.len(), settings.len());

    // Budgets scale from LLaVA's 576 tokens: N2 = round(n · N0 / 576), N1 = floor(0.9 · N0).
    let scaled = |n: f64| (n * n0 as f64 / 576.0).round() as usize;
    let n1 = (0.9 * n0 as f64).floor() as usize;
    let tokens: Vec<[usize; 3]> = report.settings.iter().map(|s| s.visual_tokens).collect();
    let expected = [
        [n0, n0, n0],
        [n0, n1, scaled(192.0)],
        [n0, n1, scaled(128.0)],
        [n0, n1, scaled(64.0)],
        [n0, n0, scaled(64.0)],
        [n0, scaled(64.0), scaled(64.0)],
    ];
    assert_eq!(tokens, expected);

    let none = &report.settings[0];
    let theory: Vec<f64> = report
        .settings
        .iter()
        .map(|s| s.theoretical_speedup)
        .collect();
    assert_eq!(theory[0], 1.0);
    // Fewer STAR tokens, less work. VisPruner's 64 tokens are all every decoder layer sees;
    // FastV and STAR keep 64 only from their layer K on.
    assert!(
        1.0 < theory[1] && theory[1] < theory[2] && theory[2] < theory[3],
        "{theory:?}"
    );
    assert!(theory[4] < theory[5] && theory[3] < theory[5], "{theory:?}");
    for s in &report.settings[1..] {
        assert!(s.kv_cache_bytes < none.kv_cache_bytes, "{}", s.label);
        assert!(s.prefill_macs < none.prefill_macs, "{}", s.label);
    }

    let c = &report.ceilings;
    assert!(c.fma_f32_gflops.is_finite() && c.fma_f32_gflops > 0.0);
    assert!(c.copy_gbytes_per_s.is_finite() && c.copy_gbytes_per_s > 0.0);
    assert_eq!(c.fma_f16_gflops.is_some(), engine.gpu.caps.shader_f16);
    // The ceilings are measured again after the requests, and the table says whether they held.
    let after = &report.ceilings_after;
    assert!(after.fma_f32_gflops > 0.0 && after.copy_gbytes_per_s > 0.0);
    let drift = c.drift(after);
    assert!(drift.is_finite() && drift >= 0.0);
    assert_eq!(
        report.ceilings_held(),
        drift <= bench::pruning::MAX_CEILING_DRIFT
    );
    assert!(report.table().contains("ceilings after the run"));
    let family = |name: &str| {
        report
            .kernel_families
            .iter()
            .find(|f| f.family == name)
            .unwrap_or_else(|| panic!("no {name} family"))
    };
    // The decode GEMV does one multiply-add per f16 weight (1 flop per byte): below the ridge
    // point of any device whose FMA rate in GFLOP/s exceeds its copy rate in GB/s.
    if c.fma_f32_gflops > c.copy_gbytes_per_s {
        assert_eq!(family("gemv").bound, bench::Bound::Bandwidth);
    }
    for f in &report.kernel_families {
        assert!(
            f.of_ceiling.is_finite() && f.of_ceiling > 0.0,
            "{}",
            f.family
        );
    }
    assert!(family("matmul").gflops > 0.0);
    assert!(report.table().contains("realised"));
}

/// With a warm-up, the kernel families come from the baseline's profiled warm-up request: every
/// family a request dispatches is there, and the timed settings alone carry no profile.
#[test]
fn kernel_families_come_from_the_warm_up_when_there_is_one() {
    let engine = Engine::load(&fixture::model_dir(), EngineOptions::default()).unwrap();
    let settings = &bench::default_settings(engine.config.image_tokens())[..1];
    let report = bench::pruning(&engine, "fixture", settings, plan(1, 1), |_| {}).unwrap();
    let families: Vec<&str> = report
        .kernel_families
        .iter()
        .map(|f| f.family.as_str())
        .collect();
    for family in ["matmul", "attention", "norm", "gemv"] {
        assert!(families.contains(&family), "{family} missing: {families:?}");
    }
    let timed = bench::timed_settings(&engine, settings, plan(1, 2), |_| {}).unwrap();
    assert_eq!(timed.len(), 1);
    assert_eq!(timed[0].visual_tokens, report.settings[0].visual_tokens);
    assert!(timed[0].median_decode_tokens_per_second > 0.0);
}

/// A library caller asking for zero timed runs used to index `runs[0]` of an empty list (and
/// `bench kernels` silently ran once): both are argument errors naming `repeats`, as are an
/// empty list of settings and an unknown kernel section.
#[test]
fn zero_repeats_and_no_settings_are_argument_errors() {
    let engine = Engine::load(&fixture::model_dir(), EngineOptions::default()).unwrap();
    let settings = bench::default_settings(engine.config.image_tokens());
    let name = |r: llava_wgpu::Result<_>| match r {
        Err(llava_wgpu::Error::Argument { name, .. }) => name,
        Err(other) => panic!("not an argument error: {other}"),
        Ok(_) => panic!("accepted"),
    };
    let pruning =
        |settings, repeats| bench::pruning(&engine, "fixture", settings, plan(0, repeats), |_| {});
    assert_eq!(name(pruning(&settings, 0).map(|_| ())), "repeats");
    assert_eq!(name(pruning(&[], 1).map(|_| ())), "settings");
    let timed = bench::timed_settings(&engine, &settings, plan(1, 0), |_| {});
    assert_eq!(name(timed.map(|_| ())), "repeats");
    assert_eq!(
        name(bench::kernels(&engine.gpu, 0, |_| {}).map(|_| ())),
        "repeats"
    );
    // --only: case does not matter, the baseline stays first, and a text no label contains is
    // refused instead of running the baseline alone.
    let only = |texts: &[&str]| {
        let texts: Vec<String> = texts.iter().map(|t| t.to_string()).collect();
        bench::select_settings(settings.clone(), &texts)
    };
    let labels: Vec<String> = only(&["STAR N1"])
        .unwrap()
        .into_iter()
        .map(|s| s.label)
        .collect();
    assert_eq!(labels.len(), 4, "{labels:?}");
    assert_eq!(labels[0], "none");
    assert!(
        labels[1..].iter().all(|l| l.starts_with("star N1=")),
        "{labels:?}"
    );
    assert_eq!(only(&[]).unwrap().len(), settings.len());
    assert_eq!(name(only(&["fastv", "STRA"]).map(|_| ())), "only");
    // An unknown section is refused before anything is timed.
    let sections = bench::kernel_sections(&engine.gpu, 1, &["quantized"], |_| {});
    assert_eq!(name(sections.map(|_| ())), "sections");
}

/// A short run (a CPU adapter with a 7B-class model) keeps the baseline and the smallest STAR
/// budget, for LLaVA-1.5's settings and LLaVA-NeXT's; the fixture's narrow model on this
/// machine's CPU adapter does not get one.
#[test]
fn a_short_run_keeps_the_baseline_and_the_smallest_star_budget() {
    let labels = |settings: Vec<bench::Setting>| -> Vec<String> {
        bench::short_run_settings(settings)
            .into_iter()
            .map(|s| s.label)
            .collect()
    };
    assert_eq!(
        labels(bench::default_settings(576)),
        ["none", "star N1=518 N2=64"]
    );
    assert_eq!(
        labels(bench::next_settings(2880)),
        ["none", "star 90%/view N2=160"]
    );
    let engine = Engine::load(&fixture::model_dir(), EngineOptions::default()).unwrap();
    assert!(engine.config.text.hidden_size < bench::SHORT_RUN_WIDTH);
    assert!(!bench::short_run(&engine));
}

#[test]
fn presets_describe_llava_shapes_and_load() {
    let seven = presets::config("llava-1.5-7b").unwrap();
    assert_eq!(
        (
            seven.text.hidden_size,
            seven.text.num_hidden_layers,
            seven.image_tokens()
        ),
        (4096, 32, 576)
    );
    let shapes = presets::tensor_shapes(&seven);
    assert_eq!(
        shapes["text.layers.31.mlp.down_proj.weight"],
        vec![4096, 11008]
    );
    assert_eq!(
        shapes["vision.encoder.layers.22.mlp.fc1.weight"],
        vec![4096, 1024]
    );
    assert!(
        !shapes.contains_key("vision.encoder.layers.23.mlp.fc1.weight"),
        "layer 23 never runs"
    );
    assert_eq!(
        presets::config("llava-1.5-13b")
            .unwrap()
            .text
            .num_hidden_layers,
        40
    );
    assert!(presets::config("nope")
        .unwrap_err()
        .to_string()
        .contains("argument preset"));
    fixture::private_runtime_dir();
    let small = Engine::synthetic("small", EngineOptions::default()).unwrap();
    assert_eq!(small.config.image_tokens(), 576);
    assert!(small.weight_bytes > 50 << 20);
}

/// A short soak on the fixture: every request runs, the resident-memory figures are read, and
/// `resident_bytes` agrees with the kernel's other count of resident pages (/proc/self/statm,
/// 4 KiB pages on the x86-64 and aarch64 Linux this runs on) to within what a few allocations
/// between the two reads can move.
#[test]
fn a_short_soak_runs_every_request_and_reads_resident_memory() {
    use llava_wgpu::harness::bench::soak;
    use llava_wgpu::harness::eval::Example;
    let engine = Engine::load(&fixture::model_dir(), EngineOptions::default()).unwrap();
    let examples: Vec<Example> = fixture::cases()
        .into_iter()
        .take(3)
        .map(|c| Example {
            image: c.image,
            question: c.prompt,
            answer: String::new(),
            kind: None,
        })
        .collect();
    let report = soak::soak(&engine, "fixture", &examples, 8, |_| {}).unwrap();
    assert_eq!((report.requests, report.questions), (8, 3));
    // Request i asks for 1 + i % 6 tokens; EOS may end one early.
    assert!((1..=24).contains(&report.generated_tokens), "{report:?}");
    // The tracker counts the weights at least, and every request's buffers are gone by the end.
    let gpu_start = report.gpu_allocated_start_bytes.expect("GPU bytes tracked");
    assert!(gpu_start > 0, "{report:?}");
    assert_eq!(
        report.gpu_allocated_end_bytes,
        Some(gpu_start),
        "{report:?}"
    );
    if cfg!(target_os = "linux") {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        let rss = soak::resident_bytes().unwrap();
        let diff = (rss as f64 - (pages * 4096) as f64).abs();
        assert!(
            diff < 0.05 * rss as f64,
            "VmRSS {rss} vs statm {pages} pages"
        );
        assert!(report.rss_start_bytes.is_some() && report.rss_growth.is_some());
    }
    assert!(report.table().contains("resident memory"));
    let zero = soak::soak(&engine, "fixture", &examples, 0, |_| {});
    assert!(matches!(zero, Err(llava_wgpu::Error::Argument { .. })));
}
