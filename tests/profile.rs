//! `--profile` / `--trace`: every dispatch is timed, grouped by stage, and the Chrome trace's
//! kernel events nest inside their stage spans and add up to the stage totals of the table.

mod fixture;

use std::collections::HashMap;

use llava_wgpu::gpu::profiler::TimingMode;
use llava_wgpu::gpu::GpuOptions;
use llava_wgpu::prune::{Method, PruneOptions};
use llava_wgpu::{Engine, EngineOptions, GenerateRequest};

/// Timestamps inside passes (what lavapipe offers), one pass per dispatch, and CPU timing.
#[test]
fn trace_events_nest_in_their_stages_and_add_up_in_every_timing_mode() {
    let modes = [
        (GpuOptions::default(), TimingMode::InsidePasses),
        (
            GpuOptions {
                disable_timestamps_inside_passes: true,
                ..Default::default()
            },
            TimingMode::PassPerDispatch,
        ),
        (
            GpuOptions {
                disable_timestamps: true,
                ..Default::default()
            },
            TimingMode::CpuWallClock,
        ),
    ];
    for (gpu, mode) in modes {
        let options = EngineOptions {
            gpu,
            ..Default::default()
        };
        let engine = Engine::load(&fixture::model_dir(), options).unwrap();
        check_trace(&engine, mode);
    }
}

fn check_trace(engine: &Engine, mode: TimingMode) {
    let case = &fixture::cases()[1];
    let mut request = GenerateRequest::new(&case.image, &case.prompt);
    request.max_new_tokens = 3;
    request.prune = PruneOptions {
        method: Method::Star,
        stage1_keep: Some(32),
        keep: Some(7),
        stage2_layer: Some(2),
        ..Default::default()
    };
    engine.gpu.start_profiling();
    engine.generate(&request, |_| {}).unwrap();
    let report = engine
        .gpu
        .finish_profiling()
        .unwrap()
        .expect("profiling was on");
    assert_eq!(report.mode, mode);
    // Profiling stops with the report.
    assert!(engine.gpu.finish_profiling().unwrap().is_none());

    let text = serde_json::to_string(&report.chrome_trace()).unwrap();
    let trace: serde_json::Value = serde_json::from_str(&text).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    let mut spans: HashMap<String, (f64, f64, f64)> = HashMap::new();
    for e in events.iter().filter(|e| e["cat"] == "stage") {
        let (ts, dur) = (e["ts"].as_f64().unwrap(), e["dur"].as_f64().unwrap());
        spans.insert(
            e["name"].as_str().unwrap().to_string(),
            (ts, ts + dur, e["args"]["kernel_total_us"].as_f64().unwrap()),
        );
    }
    for stage in [
        "vision",
        "stage 1",
        "projector",
        "prefill",
        "stage 2",
        "first token",
        "decode",
    ] {
        assert!(
            spans.contains_key(stage),
            "stage {stage} missing from the trace"
        );
    }
    let mut sums: HashMap<String, f64> = HashMap::new();
    let kernels: Vec<_> = events.iter().filter(|e| e["cat"] == "kernel").collect();
    assert!(kernels.len() > 100);
    for e in kernels {
        let stage = e["args"]["stage"].as_str().unwrap();
        let (ts, dur) = (e["ts"].as_f64().unwrap(), e["dur"].as_f64().unwrap());
        assert!(dur >= 0.0);
        let (start, end, _) = spans[stage];
        let slack = 1e-3; // µs, float rounding
        assert!(
            ts >= start - slack && ts + dur <= end + slack,
            "{} outside its stage {stage}",
            e["name"]
        );
        *sums.entry(stage.to_string()).or_default() += dur;
    }
    for (stage, (_, _, total)) in &spans {
        let sum = sums[stage];
        assert!(
            (sum - total).abs() <= 1e-6 * total.max(1.0),
            "{stage}: kernels add up to {sum} µs, span says {total}"
        );
        let table_total = report
            .stages
            .iter()
            .find(|s| &s.stage == stage)
            .unwrap()
            .total_us;
        assert!(
            (table_total - total).abs() <= 1e-6 * total.max(1.0),
            "{stage}: table {table_total} vs trace {total}"
        );
    }
    // Host preprocessing appears in the table, and every row reports throughput from its counts.
    assert!(report.stages.iter().any(|s| s.stage == "preprocess"));
    assert!(report
        .rows
        .iter()
        .any(|r| r.kernel.starts_with("matmul") && r.gflops > 0.0));
    assert!(report.table().contains("attention"));
}
