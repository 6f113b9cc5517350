//! The benchmark harness runs every setting and reports consistent numbers (no timing is
//! asserted: speed is shown by `llava-wgpu bench`, not by tests).

mod fixture;

use llava_wgpu::harness::bench;
use llava_wgpu::model::presets;
use llava_wgpu::prune::cost::prefill_macs;
use llava_wgpu::{Engine, EngineOptions};

#[test]
fn pruning_bench_reports_every_setting_on_the_fixture() {
    let engine = Engine::load(&fixture::model_dir(), EngineOptions::default()).unwrap();
    let settings = bench::default_settings(engine.config.image_tokens());
    assert_eq!(settings.len(), 6);
    let report = bench::pruning(&engine, "fixture", &settings, 0, 1, 2, |_| {}).unwrap();
    assert_eq!(report.settings.len(), settings.len());
    let none = &report.settings[0];
    assert_eq!(none.theoretical_speedup, 1.0);
    assert_eq!(none.measured_speedup, 1.0);
    let cfg = &engine.config.text;
    for s in &report.settings[1..] {
        assert!(s.theoretical_speedup > 1.0, "{}", s.label);
        assert!(s.kv_cache_bytes < none.kv_cache_bytes, "{}", s.label);
        assert!((s.realisation - s.measured_speedup / s.theoretical_speedup).abs() < 1e-12);
    }
    // The unpruned cost is the docs/pruning.md formula over every layer at the full prompt length.
    let unpruned = prefill_macs(
        &vec![none.prompt_tokens; cfg.num_hidden_layers],
        &cfg.layer_widths(),
    );
    assert_eq!(none.prefill_macs, unpruned);
    assert!(report
        .kernel_families
        .iter()
        .any(|f| f.family == "matmul" && f.gflops > 0.0));
    assert!(report.table().contains("realised"));
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
        |settings, repeats| bench::pruning(&engine, "fixture", settings, 0, repeats, 2, |_| {});
    assert_eq!(name(pruning(&settings, 0).map(|_| ())), "repeats");
    assert_eq!(name(pruning(&[], 1).map(|_| ())), "settings");
    assert_eq!(
        name(bench::kernels(&engine.gpu, 0, |_| {}).map(|_| ())),
        "repeats"
    );
    // An unknown section is refused before anything is timed.
    let sections = bench::kernel_sections(&engine.gpu, 1, &["quantized"], |_| {});
    assert_eq!(name(sections.map(|_| ())), "sections");
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
