//! `--profile` / `--trace`: every dispatch is timed on the clock the adapter offers, and the
//! timings are consistent with the model that ran and with the wall clock around the request.

mod fixture;

use std::collections::HashMap;
use std::time::Instant;

use llava_wgpu::gpu::device::list_adapters;
use llava_wgpu::gpu::profiler::TimingMode;
use llava_wgpu::gpu::GpuOptions;
use llava_wgpu::prune::{Method, PruneOptions};
use llava_wgpu::{Engine, EngineOptions, GenerateRequest};

const NEW_TOKENS: usize = 3;

/// The best timing mode the adapter's own feature list allows once `options` disable some.
fn expected_mode(engine: &Engine, options: &GpuOptions) -> TimingMode {
    let adapter = list_adapters(&GpuOptions::default())
        .into_iter()
        .find(|a| a.name == engine.gpu.info.name)
        .expect("the device's adapter is listed");
    let timestamps = adapter.timestamp_query && !options.disable_timestamps;
    if timestamps
        && adapter.timestamp_query_inside_passes
        && !options.disable_timestamps_inside_passes
    {
        TimingMode::InsidePasses
    } else if timestamps {
        TimingMode::PassPerDispatch
    } else {
        TimingMode::CpuWallClock
    }
}

/// Each way of disabling features gives the mode the adapter's features predict, and in each the
/// profile is consistent (see `check_profile`).
#[test]
fn every_timing_mode_the_adapter_allows_gives_a_consistent_profile() {
    let options = [
        GpuOptions::default(),
        GpuOptions {
            disable_timestamps_inside_passes: true,
            ..Default::default()
        },
        GpuOptions {
            disable_timestamps: true,
            ..Default::default()
        },
    ];
    for gpu in options {
        let engine_options = EngineOptions {
            gpu: gpu.clone(),
            ..Default::default()
        };
        let engine = Engine::load(&fixture::model_dir(), engine_options).unwrap();
        let mode = expected_mode(&engine, &gpu);
        check_profile(&engine, mode);
    }
}

fn check_profile(engine: &Engine, mode: TimingMode) {
    let case = &fixture::cases()[1];
    let mut request = GenerateRequest::new(&case.image, &case.prompt);
    request.max_new_tokens = NEW_TOKENS;
    request.ignore_eos = true;
    request.prune = PruneOptions {
        method: Method::Star,
        stage1_keep: Some(32),
        keep: Some(7),
        stage2_layer: Some(2),
        ..Default::default()
    };
    engine.gpu.start_profiling();
    let wall = Instant::now();
    let out = engine.generate(&request, |_| {}).unwrap();
    let wall_us = wall.elapsed().as_secs_f64() * 1e6;
    let report = engine
        .gpu
        .finish_profiling()
        .unwrap()
        .expect("profiling was on");
    assert_eq!(report.mode, mode);
    assert_eq!(out.generated_ids.len(), NEW_TOKENS);
    // Profiling stops with the report.
    assert!(engine.gpu.finish_profiling().unwrap().is_none());

    let trace = report.chrome_trace();
    let kernels: Vec<_> = trace["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["cat"] == "kernel")
        .collect();

    check_attention_counts(engine, &kernels);

    // The queue runs dispatches in the order they were recorded, so on one clock each starts
    // no earlier than the previous one, and none lasts a negative time.
    let mut previous = f64::NEG_INFINITY;
    let mut kernel_us = 0.0;
    for e in &kernels {
        let (ts, dur) = (e["ts"].as_f64().unwrap(), e["dur"].as_f64().unwrap());
        assert!(dur >= 0.0, "{} lasts {dur} µs", e["name"]);
        assert!(
            ts >= previous - 1e-3,
            "{} starts before the kernel recorded before it",
            e["name"]
        );
        previous = ts;
        kernel_us += dur;
    }
    // GPU time cannot exceed the wall time of the request that contains it.
    assert!(
        kernel_us > 0.0 && kernel_us <= wall_us,
        "{kernel_us} µs of kernels in a {wall_us} µs request ({mode:?})"
    );
    assert!((report.kernel_us() - kernel_us).abs() <= 1e-6 * kernel_us);
    // Host preprocessing appears in the table, and every row reports throughput from its counts.
    assert!(report.stages.iter().any(|s| s.stage == "preprocess"));
    assert!(report
        .rows
        .iter()
        .any(|r| r.kernel.starts_with("matmul") && r.gflops > 0.0));
    assert!(report.table().contains("attention"));
}

/// One attention per layer per forward pass, counted from the config: the CLIP layers that run,
/// every decoder layer once for the prompt, and once per decoded token after the first.
fn check_attention_counts(engine: &Engine, kernels: &[&serde_json::Value]) {
    let config = &engine.config;
    let mut attention: HashMap<&str, usize> = HashMap::new();
    for e in kernels {
        let name = e["name"].as_str().unwrap();
        if name.starts_with("attention") && name != "attention_scores_reduce" {
            *attention
                .entry(e["args"]["stage"].as_str().unwrap())
                .or_default() += 1;
        }
    }
    let layers = config.text.num_hidden_layers;
    let prompt_pass: usize = ["prefill", "stage 2", "first token"]
        .iter()
        .map(|s| attention.get(s).copied().unwrap_or(0))
        .sum();
    assert_eq!(attention["vision"], config.vision_layers_to_run());
    assert_eq!(prompt_pass, layers);
    assert_eq!(attention["decode"], (NEW_TOKENS - 1) * layers);
}
