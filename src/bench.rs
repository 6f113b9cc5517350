//! `llava-wgpu bench kernels`: throughput of the kernel families on the chosen adapter, next to
//! the adapter's measured buffer-copy bandwidth, so later work compares against fixed numbers.
//!
//! Each case is recorded once, run once to warm up (pipeline compilation, first-touch of
//! buffers), then timed `repeats` times as a whole submission (wall clock from submit to the
//! GPU going idle) and reported by its median. GFLOP/s and GB/s come from each launcher's
//! analytic flop and byte counts, not from counters.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::Result;
use crate::gpu::kernels::linear::{gemv, matmul};
use crate::gpu::kernels::{attention, Dispatch};
use crate::gpu::{DType, Gpu, Recorder, Tensor, Weight, WeightFormat};

#[derive(Clone, Debug, Serialize)]
pub struct KernelResult {
    pub kernel: String,
    pub shape: String,
    pub median_ms: f64,
    pub gflops: f64,
    pub gbytes_per_s: f64,
    /// Achieved bandwidth as a fraction of the measured copy bandwidth.
    pub bandwidth_fraction: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct KernelReport {
    pub adapter: String,
    pub backend: String,
    pub repeats: usize,
    /// Buffer-to-buffer copy, counting bytes read plus bytes written.
    pub copy_gbytes_per_s: f64,
    pub results: Vec<KernelResult>,
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn time_dispatches(gpu: &Gpu, dispatches: &[Dispatch], repeats: usize) -> Result<Duration> {
    let run = || -> Result<Duration> {
        let start = Instant::now();
        let mut rec = Recorder::with_batch(gpu, usize::MAX);
        rec.dispatch_all(dispatches.iter().cloned());
        rec.finish("bench")?;
        Ok(start.elapsed())
    };
    run()?;
    let samples = (0..repeats.max(1))
        .map(|_| run())
        .collect::<Result<Vec<_>>>()?;
    Ok(median(samples))
}

/// Copy bandwidth between two device buffers of `bytes` each.
fn copy_bandwidth(gpu: &Gpu, bytes: u64, repeats: usize) -> Result<f64> {
    let make = |label| {
        gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes,
            usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    };
    let (src, dst) = (make("copy_src"), make("copy_dst"));
    let run = || -> Result<Duration> {
        let start = Instant::now();
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&src, 0, &dst, 0, bytes);
        gpu.queue.submit([enc.finish()]);
        gpu.wait("copy bandwidth")?;
        Ok(start.elapsed())
    };
    run()?;
    let t = median(
        (0..repeats.max(1))
            .map(|_| run())
            .collect::<Result<Vec<_>>>()?,
    );
    Ok(2.0 * bytes as f64 / t.as_secs_f64() / 1e9)
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    // A cheap deterministic generator: benchmark inputs only need to be non-trivial.
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn result(name: &str, dispatches: &[Dispatch], time: Duration, copy_gbs: f64) -> KernelResult {
    let r = measure(name, dispatches, time, copy_gbs);
    eprintln!("    {}", row(&r));
    r
}

fn row(r: &KernelResult) -> String {
    format!(
        "{:<20} {:<22} {:>11.3} {:>9.2} {:>8.2} {:>8.1}%",
        r.kernel,
        r.shape,
        r.median_ms,
        r.gflops,
        r.gbytes_per_s,
        100.0 * r.bandwidth_fraction
    )
}

fn measure(name: &str, dispatches: &[Dispatch], time: Duration, copy_gbs: f64) -> KernelResult {
    let flops: u64 = dispatches.iter().map(|d| d.flops).sum();
    let bytes: u64 = dispatches.iter().map(|d| d.bytes).sum();
    let secs = time.as_secs_f64();
    let gbs = bytes as f64 / secs / 1e9;
    KernelResult {
        kernel: name.to_string(),
        shape: dispatches
            .first()
            .map(|d| d.shape.clone())
            .unwrap_or_default(),
        median_ms: secs * 1e3,
        gflops: flops as f64 / secs / 1e9,
        gbytes_per_s: gbs,
        bandwidth_fraction: gbs / copy_gbs,
    }
}

/// Run the kernel benchmark suite.
pub fn kernels(gpu: &Gpu, repeats: usize, mut progress: impl FnMut(&str)) -> Result<KernelReport> {
    let copy_bytes = (64u64 << 20).min(gpu.adapter_binding_bytes);
    progress("buffer copy");
    let copy_gbs = copy_bandwidth(gpu, copy_bytes, repeats)?;
    let mut results = Vec::new();

    for (n, k) in [(1024usize, 1024usize), (4096, 1024)] {
        let w_values = random(n * k, (n + k) as u64);
        let w16 = Weight::from_f32(gpu, "w", n, k, &w_values, WeightFormat::F16)?;
        for m in [1usize, 64, 577] {
            let x = Tensor::from_f32(gpu, &[m, k], &random(m * k, m as u64), "x")?;
            let y = Tensor::empty(gpu, &[m, n], DType::F32, "y")?;
            progress(&format!("matmul M={m} N={n} K={k}"));
            let d = matmul::matmul(gpu, &x, &w16, &y, false)?;
            let t = time_dispatches(gpu, &d, repeats)?;
            results.push(result("matmul_f16", &d, t, copy_gbs));
            if m == 1 {
                progress(&format!("gemv N={n} K={k}"));
                let d = gemv::gemv(gpu, &x, 0, &w16, &y, 0, false)?;
                let t = time_dispatches(gpu, &d, repeats)?;
                results.push(result(d[0].kernel, &d, t, copy_gbs));
            }
        }
    }
    // ggml's own perf shape (peer-bench.md: W 4096×4096 f16, 512 columns) for a direct comparison.
    {
        let (m, n, k) = (512usize, 4096usize, 4096usize);
        let w = Weight::from_f32(gpu, "w", n, k, &random(n * k, 5), WeightFormat::F16)?;
        let x = Tensor::from_f32(gpu, &[m, k], &random(m * k, 6), "x")?;
        let y = Tensor::empty(gpu, &[m, n], DType::F32, "y")?;
        progress(&format!("matmul M={m} N={n} K={k}"));
        let d = matmul::matmul(gpu, &x, &w, &y, false)?;
        let t = time_dispatches(gpu, &d, repeats)?;
        results.push(result("matmul_f16", &d, t, copy_gbs));
    }
    // The decode GEMV of a 7B model's MLP (f16 weights, 4096 → 11008) and of its attention
    // projections (4096 → 4096): memory bound, compare GB/s with the copy bandwidth.
    for (n, k) in [(4096usize, 4096usize), (11008, 4096)] {
        let w = Weight::from_f32(gpu, "w", n, k, &random(n * k, 7), WeightFormat::F16)?;
        let x = Tensor::from_f32(gpu, &[1, k], &random(k, 3), "x")?;
        let y = Tensor::empty(gpu, &[1, n], DType::F32, "y")?;
        progress(&format!("gemv N={n} K={k}"));
        let d = gemv::gemv(gpu, &x, 0, &w, &y, 0, false)?;
        let t = time_dispatches(gpu, &d, repeats)?;
        results.push(result(d[0].kernel, &d, t, copy_gbs));
    }
    // CLIP ViT-L/14-336 self-attention: 577 tokens, 16 heads of 64.
    {
        let shape = attention::AttentionShape {
            q_rows: 577,
            kv_rows: 577,
            heads: 16,
            kv_heads: 16,
            head_dim: 64,
            causal: false,
        };
        let numel = 577 * 16 * 64;
        let q = Tensor::from_f32(gpu, &[577, 1024], &random(numel, 11), "q")?;
        let k = Tensor::from_f32(gpu, &[577, 1024], &random(numel, 12), "k")?;
        let v = Tensor::from_f32(gpu, &[577, 1024], &random(numel, 13), "v")?;
        let o = Tensor::empty(gpu, &[577, 1024], DType::F32, "o")?;
        progress("attention T=577 H=16 D=64");
        let d = attention::attention(gpu, &shape, 0.125, &q, &k, &v, &o, None)?;
        let t = time_dispatches(gpu, &d, repeats)?;
        let mut r = result("attention", &d, t, copy_gbs);
        r.shape = "T=577 H=16 D=64".into();
        results.push(r);
        let partials = Tensor::empty(
            gpu,
            &[attention::score_partials_len(&shape)],
            DType::F32,
            "partials",
        )?;
        let scores = Tensor::empty(gpu, &[577], DType::F32, "scores")?;
        let out = attention::ScoreOutput {
            q_start: 0,
            q_end: 577,
            partials: &partials,
            scores: &scores,
        };
        progress("attention + scores T=577 H=16 D=64");
        let d = attention::attention(gpu, &shape, 0.125, &q, &k, &v, &o, Some(out))?;
        let t = time_dispatches(gpu, &d, repeats)?;
        let mut r = result("attention+scores", &d, t, copy_gbs);
        r.shape = "T=577 H=16 D=64".into();
        results.push(r);
    }
    Ok(KernelReport {
        adapter: gpu.describe(),
        backend: format!("{:?}", gpu.info.backend),
        repeats,
        copy_gbytes_per_s: copy_gbs,
        results,
    })
}

impl KernelReport {
    /// The table `bench kernels` prints.
    pub fn table(&self) -> String {
        let mut out = format!(
            "adapter: {}\nbuffer copy: {:.2} GB/s (read + write), median of {} runs\n\n",
            self.adapter, self.copy_gbytes_per_s, self.repeats
        );
        out.push_str(&format!(
            "{:<20} {:<22} {:>11} {:>9} {:>8} {:>9}\n",
            "kernel", "shape", "median ms", "GFLOP/s", "GB/s", "% of copy"
        ));
        for r in &self.results {
            out.push_str(&row(r));
            out.push('\n');
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// `llava-wgpu bench`: pruned against unpruned on a whole model.

use std::path::{Path, PathBuf};

use crate::generate::{GenerateOutput, GenerateRequest};
use crate::model::llava::Engine;
use crate::prune::{Method, PruneOptions};

/// One pruning setting the benchmark runs.
#[derive(Clone, Debug)]
pub struct Setting {
    pub label: String,
    pub prune: PruneOptions,
}

/// The settings of issue/STAR.md comparisons, with budgets scaled from LLaVA's 576 tokens to
/// the model's N0: none; STAR N1 = 518 with N2 = 192, 128, 64; FastV K = 2 keeping 64;
/// VisPruner 64.
pub fn default_settings(n0: usize) -> Vec<Setting> {
    let scaled = |n: usize| ((n as f64 * n0 as f64 / 576.0).round() as usize).max(1);
    let mut settings = vec![Setting {
        label: "none".into(),
        prune: PruneOptions::default(),
    }];
    for n2 in [192, 128, 64] {
        settings.push(Setting {
            label: format!("star N1={} N2={}", (n0 as f64 * 0.9).floor(), scaled(n2)),
            prune: PruneOptions {
                method: Method::Star,
                keep: Some(scaled(n2)),
                ..Default::default()
            },
        });
    }
    settings.push(Setting {
        label: format!("fastv K=2 N2={}", scaled(64)),
        prune: PruneOptions {
            method: Method::Fastv,
            keep: Some(scaled(64)),
            stage2_layer: Some(2),
            ..Default::default()
        },
    });
    settings.push(Setting {
        label: format!("vispruner N2={}", scaled(64)),
        prune: PruneOptions {
            method: Method::Vispruner,
            keep: Some(scaled(64)),
            ..Default::default()
        },
    });
    settings
}

#[derive(Clone, Debug, Serialize)]
pub struct SettingResult {
    pub label: String,
    pub visual_tokens: [usize; 3],
    pub prompt_tokens: usize,
    pub median_ttft_ms: f64,
    pub median_vision_ms: f64,
    pub median_prefill_ms: f64,
    pub median_decode_tokens_per_second: f64,
    pub kv_cache_bytes: u64,
    pub prefill_macs: u64,
    pub theoretical_speedup: f64,
    pub measured_speedup: f64,
    /// measured / theoretical prefill speedup.
    pub realisation: f64,
}

/// A kernel family's throughput during one unpruned request, against the measured peaks.
#[derive(Clone, Debug, Serialize)]
pub struct FamilyEfficiency {
    pub family: String,
    pub time_ms: f64,
    pub gflops: f64,
    pub gbytes_per_s: f64,
    pub of_matmul_peak: f64,
    pub of_copy_bandwidth: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PruningReport {
    pub model: String,
    pub adapter: String,
    pub warmup: usize,
    pub repeats: usize,
    pub decode_tokens: usize,
    pub copy_gbytes_per_s: f64,
    pub matmul_peak_gflops: f64,
    pub matmul_peak_shape: String,
    pub settings: Vec<SettingResult>,
    pub kernel_families: Vec<FamilyEfficiency>,
}

fn median_f64(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A deterministic noise-and-gradient test image, written once to the temp directory.
fn bench_image(size: u32) -> Result<PathBuf> {
    let path = std::env::temp_dir().join(format!("llava-wgpu-bench-{size}.png"));
    let image = image::RgbImage::from_fn(size, size, |x, y| {
        let n = (x.wrapping_mul(7919) ^ y.wrapping_mul(104_729)) % 64;
        image::Rgb([
            (x * 255 / size) as u8,
            (y * 255 / size) as u8,
            (128 + n) as u8,
        ])
    });
    image.save(&path).map_err(|e| crate::Error::File {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    Ok(path)
}

/// The best throughput of the tiled matmul on a large f16 problem: the "peak" kernel
/// efficiencies are measured against.
pub fn matmul_peak(gpu: &Gpu, repeats: usize) -> Result<(f64, String)> {
    let (m, n, k) = (577usize, 1024usize, 1024usize);
    let w = Weight::from_f32(gpu, "w", n, k, &random(n * k, 1), WeightFormat::F16)?;
    let x = Tensor::from_f32(gpu, &[m, k], &random(m * k, 2), "x")?;
    let y = Tensor::empty(gpu, &[m, n], DType::F32, "y")?;
    let d = matmul::matmul(gpu, &x, &w, &y, false)?;
    let t = time_dispatches(gpu, &d, repeats)?;
    let flops: u64 = d.iter().map(|d| d.flops).sum();
    Ok((
        flops as f64 / t.as_secs_f64() / 1e9,
        format!("M={m} N={n} K={k} f16"),
    ))
}

fn family(kernel: &str) -> &'static str {
    match kernel {
        k if k.starts_with("matmul") => "matmul",
        k if k.starts_with("gemv") => "gemv",
        k if k.starts_with("attention") => "attention",
        k if k.contains("norm") => "norm",
        "rope" => "rope",
        "quick_gelu" | "gelu_erf" | "silu_mul" => "activation",
        k if k.starts_with("topk") || k.starts_with("gather") => "topk/gather",
        k if k.starts_with("argmax") => "argmax",
        _ => "other",
    }
}

/// Run every setting on `engine` with `warmup` + `repeats` requests each.
pub fn pruning(
    engine: &Engine,
    model_label: &str,
    settings: &[Setting],
    warmup: usize,
    repeats: usize,
    decode_tokens: usize,
    mut progress: impl FnMut(&str),
) -> Result<PruningReport> {
    let gpu = &engine.gpu;
    let image = bench_image(engine.config.vision.image_size as u32)?;
    // About 55 text tokens after the image, like a detailed question.
    let prompt = if engine.checkpoint.dir().is_dir() {
        "Describe every object in this picture: its colour, its shape, where it is, and how it relates to the others. ".repeat(3)
    } else {
        (100..155)
            .map(|i| format!("t{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let request = |prune: &PruneOptions| {
        let mut r = GenerateRequest::new(&image, &prompt);
        r.max_new_tokens = decode_tokens;
        r.ignore_eos = true;
        r.prune = prune.clone();
        r
    };
    progress("measuring copy bandwidth and matmul peak");
    let copy_gbs = copy_bandwidth(gpu, (64u64 << 20).min(gpu.adapter_binding_bytes), 3)?;
    let (peak, peak_shape) = matmul_peak(gpu, 3)?;

    let mut runs: Vec<(String, Vec<GenerateOutput>)> = Vec::new();
    for setting in settings {
        let mut outputs = Vec::new();
        for i in 0..warmup + repeats {
            progress(&format!(
                "{} ({}/{})",
                setting.label,
                i + 1,
                warmup + repeats
            ));
            let out = engine.generate(&request(&setting.prune), |_| {})?;
            if i >= warmup {
                outputs.push(out);
            }
        }
        runs.push((setting.label.clone(), outputs));
    }
    let baseline_prefill = median_f64(runs[0].1.iter().map(|o| o.timings_ms.prefill).collect());
    let settings: Vec<SettingResult> = runs
        .iter()
        .map(|(label, outs)| {
            let first = &outs[0];
            let prefill = median_f64(outs.iter().map(|o| o.timings_ms.prefill).collect());
            let theoretical = first.flops.prefill_unpruned as f64 / first.flops.prefill as f64;
            let measured = baseline_prefill / prefill;
            SettingResult {
                label: label.clone(),
                visual_tokens: [
                    first.visual_tokens.encoder,
                    first.visual_tokens.after_stage1,
                    first.visual_tokens.after_stage2,
                ],
                prompt_tokens: first.prompt_tokens,
                median_ttft_ms: median_f64(
                    outs.iter()
                        .map(|o| {
                            o.timings_ms.preprocess + o.timings_ms.vision + o.timings_ms.prefill
                        })
                        .collect(),
                ),
                median_vision_ms: median_f64(outs.iter().map(|o| o.timings_ms.vision).collect()),
                median_prefill_ms: prefill,
                median_decode_tokens_per_second: median_f64(
                    outs.iter().map(|o| o.decode_tokens_per_second).collect(),
                ),
                kv_cache_bytes: first.kv_cache_bytes,
                prefill_macs: first.flops.prefill,
                theoretical_speedup: theoretical,
                measured_speedup: measured,
                realisation: measured / theoretical,
            }
        })
        .collect();

    // One profiled unpruned request: where the time goes, per kernel family.
    progress("profiling one unpruned request");
    gpu.start_profiling();
    engine.generate(&request(&PruneOptions::default()), |_| {})?;
    let profile = gpu.finish_profiling()?.expect("profiling was started");
    let mut families: std::collections::BTreeMap<&str, (f64, u64, u64)> = Default::default();
    for row in &profile.rows {
        let f = families.entry(family(&row.kernel)).or_default();
        f.0 += row.total_us;
        f.1 += (row.gflops * row.total_us * 1e3) as u64;
        f.2 += (row.gbytes_per_s * row.total_us * 1e3) as u64;
    }
    let mut kernel_families: Vec<FamilyEfficiency> = families
        .into_iter()
        .map(|(name, (us, flops, bytes))| {
            let secs = us / 1e6;
            let (gflops, gbs) = (flops as f64 / secs / 1e9, bytes as f64 / secs / 1e9);
            FamilyEfficiency {
                family: name.to_string(),
                time_ms: us / 1e3,
                gflops,
                gbytes_per_s: gbs,
                of_matmul_peak: gflops / peak,
                of_copy_bandwidth: gbs / copy_gbs,
            }
        })
        .collect();
    kernel_families.sort_by(|a, b| b.time_ms.total_cmp(&a.time_ms));
    Ok(PruningReport {
        model: model_label.to_string(),
        adapter: gpu.describe(),
        warmup,
        repeats,
        decode_tokens,
        copy_gbytes_per_s: copy_gbs,
        matmul_peak_gflops: peak,
        matmul_peak_shape: peak_shape,
        settings,
        kernel_families,
    })
}

impl PruningReport {
    pub fn table(&self) -> String {
        let mut out = format!(
            "model: {}\nadapter: {}\n{} warm-up + {} timed requests per setting (medians), {} decode tokens\n\
             copy bandwidth {:.2} GB/s, matmul peak {:.2} GFLOP/s ({})\n\n",
            self.model,
            self.adapter,
            self.warmup,
            self.repeats,
            self.decode_tokens,
            self.copy_gbytes_per_s,
            self.matmul_peak_gflops,
            self.matmul_peak_shape
        );
        out.push_str(&format!(
            "{:<22} {:>15} {:>9} {:>10} {:>11} {:>10} {:>9} {:>8} {:>8} {:>8}\n",
            "setting",
            "visual tokens",
            "TTFT ms",
            "vision ms",
            "prefill ms",
            "decode t/s",
            "KV MiB",
            "theory",
            "measured",
            "realised"
        ));
        for s in &self.settings {
            out.push_str(&format!(
                "{:<22} {:>15} {:>9.0} {:>10.0} {:>11.0} {:>10.2} {:>9.2} {:>7.2}x {:>7.2}x {:>7.0}%\n",
                s.label,
                format!("{}>{}>{}", s.visual_tokens[0], s.visual_tokens[1], s.visual_tokens[2]),
                s.median_ttft_ms,
                s.median_vision_ms,
                s.median_prefill_ms,
                s.median_decode_tokens_per_second,
                s.kv_cache_bytes as f64 / (1 << 20) as f64,
                s.theoretical_speedup,
                s.measured_speedup,
                100.0 * s.realisation
            ));
        }
        out.push_str("\nkernel families in one unpruned request:\n");
        out.push_str(&format!(
            "{:<12} {:>9} {:>9} {:>8} {:>13} {:>12}\n",
            "family", "time ms", "GFLOP/s", "GB/s", "% matmul peak", "% copy BW"
        ));
        for f in &self.kernel_families {
            out.push_str(&format!(
                "{:<12} {:>9.1} {:>9.2} {:>8.2} {:>12.0}% {:>11.0}%\n",
                f.family,
                f.time_ms,
                f.gflops,
                f.gbytes_per_s,
                100.0 * f.of_matmul_peak,
                100.0 * f.of_copy_bandwidth
            ));
        }
        out
    }
}

/// Where `bench` gets its model: a directory or a preset.
pub fn load_engine(
    model: Option<&Path>,
    preset: Option<&str>,
    options: crate::EngineOptions,
) -> Result<(Engine, String)> {
    match (model, preset) {
        (Some(dir), _) => Ok((Engine::load(dir, options)?, dir.display().to_string())),
        (None, name) => {
            let name = name.unwrap_or("small");
            Ok((
                Engine::synthetic(name, options)?,
                format!("preset {name} (random f16 weights)"),
            ))
        }
    }
}
