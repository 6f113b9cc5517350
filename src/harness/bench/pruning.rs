//! `llava-wgpu bench`: pruned against unpruned on a whole model, with the theoretical prefill
//! speedup next to the measured one and, for one unpruned request, where the time goes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::kernels::bound_name;
use super::{median_f64, Bound, Ceilings};
use crate::error::{Error, Result};
use crate::generate::{GenerateOutput, GenerateRequest};
use crate::gpu::profiler::ProfileReport;
use crate::harness::roofline::{Roofline, RooflinePoint};
use crate::model::llava::{Engine, EngineOptions};
use crate::prune::{Method, PruneOptions};

/// One pruning setting the benchmark runs.
#[derive(Clone, Debug)]
pub struct Setting {
    pub label: String,
    pub prune: PruneOptions,
}

/// The settings the STAR paper compares (docs/pruning.md), with budgets scaled from LLaVA's
/// 576 tokens to the model's N0: none; STAR N1 = 518 with N2 = 192, 128, 64; FastV K = 2
/// keeping 64; VisPruner 64.
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

/// The settings whose label contains one of `only` (ignoring case), always with the baseline
/// `none` first; every text must match a setting, so a typo is an error, not a run of the
/// baseline alone. An empty `only` keeps everything.
pub fn select_settings(settings: Vec<Setting>, only: &[String]) -> Result<Vec<Setting>> {
    if only.is_empty() {
        return Ok(settings);
    }
    let matches = |s: &Setting, text: &str| s.label.to_lowercase().contains(&text.to_lowercase());
    if let Some(text) = only
        .iter()
        .find(|text| !settings.iter().any(|s| matches(s, text)))
    {
        let labels: Vec<&str> = settings.iter().map(|s| s.label.as_str()).collect();
        return Err(Error::argument(
            "only",
            format!("'{text}' is in no setting's label; the settings are {labels:?}"),
        ));
    }
    Ok(settings
        .into_iter()
        .filter(|s| s.label == "none" || only.iter().any(|text| matches(s, text)))
        .collect())
}

/// Decoder width from which a CPU adapter gets [`short_run`]'s defaults: LLaVA-1.5-7B's 4096
/// (and 13B's 5120) are above it, the narrow presets (512) below.
pub const SHORT_RUN_WIDTH: usize = 2048;

/// Whether `bench` should default to a short run: a software driver (lavapipe, SwiftShader, WARP)
/// spends minutes on one request of a 7B-class model, so the full default (six settings, a
/// warm-up and three timed requests each) would take hours.
pub fn short_run(engine: &Engine) -> bool {
    engine.gpu.is_cpu() && engine.config.text.hidden_size >= SHORT_RUN_WIDTH
}

/// The short run's settings: the baseline and the smallest STAR budget of `settings` (the
/// headline speedup), or the baseline alone if there is no STAR setting.
pub fn short_run_settings(settings: Vec<Setting>) -> Vec<Setting> {
    let last_star = settings
        .iter()
        .rposition(|s| s.prune.method == Method::Star);
    settings
        .into_iter()
        .enumerate()
        .filter(|(i, s)| s.label == "none" || Some(*i) == last_star)
        .map(|(_, s)| s)
        .collect()
}

/// LLaVA-NeXT's settings (docs/pruning.md, NeXT; the STAR paper's NeXT budgets): none; STAR
/// (stage 1 keeping 90% of every view) at 1/9 and 1/18 of `n0` (11% and 5.5%: 320 and 160 of
/// 2,880); FastV K = 2 and VisPruner at 1/9.
pub fn next_settings(n0: usize) -> Vec<Setting> {
    let budget = |parts: usize| ((n0 as f64 / parts as f64).round() as usize).max(1);
    let (n11, n55) = (budget(9), budget(18));
    let star = |n2: usize| Setting {
        label: format!("star 90%/view N2={n2}"),
        prune: PruneOptions {
            method: Method::Star,
            keep: Some(n2),
            ..Default::default()
        },
    };
    vec![
        Setting {
            label: "none".into(),
            prune: PruneOptions::default(),
        },
        star(n11),
        star(n55),
        Setting {
            label: format!("fastv K=2 N2={n11}"),
            prune: PruneOptions {
                method: Method::Fastv,
                keep: Some(n11),
                stage2_layer: Some(2),
                ..Default::default()
            },
        },
        Setting {
            label: format!("vispruner N2={n11}"),
            prune: PruneOptions {
                method: Method::Vispruner,
                keep: Some(n11),
                ..Default::default()
            },
        },
    ]
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
    /// Median of the requests' `decode_host_us_per_token`: the host's share of a decode step.
    pub median_decode_host_us_per_token: f64,
    pub kv_cache_bytes: u64,
    pub prefill_macs: u64,
    pub theoretical_speedup: f64,
    pub measured_speedup: f64,
    /// measured / theoretical prefill speedup.
    pub realisation: f64,
}

/// A kernel family's throughput during one unpruned request, against the ceiling that bounds
/// it (by the family's analytic flops per byte).
#[derive(Clone, Debug, Serialize)]
pub struct FamilyEfficiency {
    pub family: String,
    pub time_ms: f64,
    pub gflops: f64,
    pub gbytes_per_s: f64,
    pub bound: Bound,
    pub of_ceiling: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PruningReport {
    pub model: String,
    pub adapter: String,
    pub warmup: usize,
    pub repeats: usize,
    pub decode_tokens: usize,
    /// Measured before the requests; the kernel families are fractions of these.
    pub ceilings: Ceilings,
    /// Measured again after the last request: if the device's speed moved during the run
    /// (another job started or stopped), the fractions of the ceilings are not reliable.
    pub ceilings_after: Ceilings,
    pub settings: Vec<SettingResult>,
    pub kernel_families: Vec<FamilyEfficiency>,
}

/// How far the ceilings may move during a run before the report says its fractions of them are
/// unreliable (the run-to-run noise of lavapipe's ceilings is about 10%).
pub const MAX_CEILING_DRIFT: f64 = 0.25;

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
    image.save(&path).map_err(|e| Error::File {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    Ok(path)
}

/// About 55 text tokens after the image, like a detailed question (a synthetic model's
/// tokenizer only knows `t<N>` words).
pub fn bench_prompt(engine: &Engine) -> String {
    if engine.checkpoint.dir().is_dir() {
        "Describe every object in this picture: its colour, its shape, where it is, and how it relates to the others. ".repeat(3)
    } else {
        (100..155)
            .map(|i| format!("t{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl PruningReport {
    /// The kernel families of the profiled warm-up request on a roofline of the run's ceilings
    /// (`bench --roofline`).
    pub fn roofline(&self) -> Roofline {
        let points = self
            .kernel_families
            .iter()
            .map(|f| {
                let seconds = f.time_ms / 1e3;
                RooflinePoint {
                    name: f.family.clone(),
                    flops: f.gflops * 1e9 * seconds,
                    bytes: f.gbytes_per_s * 1e9 * seconds,
                    seconds,
                }
            })
            .collect();
        Roofline {
            title: format!("bench {} on {}", self.model, self.adapter),
            fma_gflops: self.ceilings.fma_f32_gflops,
            copy_gbytes_per_s: self.ceilings.copy_gbytes_per_s,
            points,
        }
    }
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

/// How many requests each setting gets and how long they are.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Untimed requests per setting before the timed ones.
    pub warmup: usize,
    /// Timed requests per setting; the report gives their medians.
    pub repeats: usize,
    /// Tokens generated per request (EOS ignored).
    pub decode_tokens: usize,
}

/// Each setting's label and its timed outputs.
type SettingRuns = Vec<(String, Vec<GenerateOutput>)>;

/// The timed outputs of every setting, in order, after `plan.warmup` untimed requests each, and
/// with `profile_warmup` the GPU profile of the baseline's last warm-up request if there is one
/// (profiling an untimed request spares the kernel-family table a request of its own).
fn run_settings(
    engine: &Engine,
    settings: &[Setting],
    plan: Plan,
    profile_warmup: bool,
    request: impl Fn(&PruneOptions) -> GenerateRequest,
    progress: &mut dyn FnMut(&str),
) -> Result<(SettingRuns, Option<ProfileReport>)> {
    let (mut runs, mut profile) = (Vec::new(), None);
    let total = plan.warmup + plan.repeats;
    for (index, setting) in settings.iter().enumerate() {
        let mut outputs = Vec::new();
        for i in 0..total {
            progress(&format!("{} ({}/{total})", setting.label, i + 1));
            let profiled = profile_warmup && index == 0 && i + 1 == plan.warmup;
            if profiled {
                engine.gpu.start_profiling();
            }
            let out = engine.generate(&request(&setting.prune), |_| {})?;
            if profiled {
                profile = engine.gpu.finish_profiling()?;
            }
            if i >= plan.warmup {
                outputs.push(out);
            }
        }
        runs.push((setting.label.clone(), outputs));
    }
    Ok((runs, profile))
}

/// Medians of one setting's outputs; speedups against the unpruned `baseline_prefill` ms.
fn summarise(label: &str, outs: &[GenerateOutput], baseline_prefill: f64) -> SettingResult {
    let first = &outs[0];
    let median = |f: fn(&GenerateOutput) -> f64| median_f64(outs.iter().map(f).collect());
    let prefill = median(|o| o.timings_ms.prefill);
    let theoretical =
        first.prefill_macs.prefill_unpruned as f64 / first.prefill_macs.prefill as f64;
    let measured = baseline_prefill / prefill;
    SettingResult {
        label: label.to_string(),
        visual_tokens: [
            first.visual_tokens.encoder,
            first.visual_tokens.after_stage1,
            first.visual_tokens.after_stage2,
        ],
        prompt_tokens: first.prompt_tokens,
        median_ttft_ms: median(|o| {
            o.timings_ms.preprocess + o.timings_ms.vision + o.timings_ms.prefill
        }),
        median_vision_ms: median(|o| o.timings_ms.vision),
        median_prefill_ms: prefill,
        median_decode_tokens_per_second: median(|o| o.decode_tokens_per_second),
        median_decode_host_us_per_token: median(|o| o.decode_host_us_per_token),
        kv_cache_bytes: first.kv_cache_bytes,
        prefill_macs: first.prefill_macs.prefill,
        theoretical_speedup: theoretical,
        measured_speedup: measured,
        realisation: measured / theoretical,
    }
}

/// Time, throughput and share of the bounding ceiling per kernel family, slowest first.
fn kernel_families(profile: &ProfileReport, ceilings: &Ceilings) -> Vec<FamilyEfficiency> {
    let mut families: BTreeMap<&str, (f64, u64, u64)> = Default::default();
    for row in &profile.rows {
        let f = families.entry(family(&row.kernel)).or_default();
        f.0 += row.total_us;
        f.1 += (row.gflops * row.total_us * 1e3) as u64;
        f.2 += (row.gbytes_per_s * row.total_us * 1e3) as u64;
    }
    let mut efficiencies: Vec<FamilyEfficiency> = families
        .into_iter()
        .map(|(name, (us, flops, bytes))| {
            let secs = us / 1e6;
            let (gflops, gbs) = (flops as f64 / secs / 1e9, bytes as f64 / secs / 1e9);
            let bound = ceilings.bound(flops as f64, bytes as f64);
            FamilyEfficiency {
                family: name.to_string(),
                time_ms: us / 1e3,
                gflops,
                gbytes_per_s: gbs,
                bound,
                of_ceiling: ceilings.fraction(bound, gflops, gbs),
            }
        })
        .collect();
    efficiencies.sort_by(|a, b| b.time_ms.total_cmp(&a.time_ms));
    efficiencies
}

/// The image `bench` asks about: the tower's size; on LLaVA-NeXT a square as large as the
/// largest square pinpoint, so it is tiled into the most crops (2 x 2 plus the base view, 2,880
/// visual tokens, for llava-hf's list).
fn bench_image_for(engine: &Engine) -> Result<PathBuf> {
    let side = match &engine.config.anyres {
        Some(anyres) => anyres
            .grid_pinpoints
            .iter()
            .filter(|(h, w)| h == w)
            .map(|&(h, _)| h)
            .max()
            .unwrap_or(engine.config.vision.image_size),
        None => engine.config.vision.image_size,
    };
    bench_image(side as u32)
}

/// Visual tokens of the image `bench` asks about (the N0 its budgets scale with).
pub fn bench_visual_tokens(engine: &Engine) -> Result<usize> {
    engine.visual_tokens_of(&bench_image_for(engine)?)
}

/// The request `bench` sends for one setting: the bench image and prompt, `plan.decode_tokens`
/// tokens with EOS ignored.
fn bench_request(engine: &Engine, plan: Plan) -> Result<impl Fn(&PruneOptions) -> GenerateRequest> {
    let image = bench_image_for(engine)?;
    let prompt = bench_prompt(engine);
    Ok(move |prune: &PruneOptions| {
        let mut r = GenerateRequest::new(&image, &prompt);
        r.max_new_tokens = plan.decode_tokens;
        r.ignore_eos = true;
        r.prune = prune.clone();
        r
    })
}

fn check_plan(settings: &[Setting], plan: Plan) -> Result<()> {
    if plan.repeats == 0 {
        return Err(Error::argument(
            "repeats",
            "must be at least 1: the report gives medians of the timed requests",
        ));
    }
    if settings.is_empty() {
        return Err(Error::argument(
            "settings",
            "give at least one setting; the first is the baseline of every speedup",
        ));
    }
    Ok(())
}

/// Medians per setting, speedups against the first setting's prefill.
fn summarise_runs(runs: &SettingRuns) -> Vec<SettingResult> {
    let baseline_prefill = median_f64(runs[0].1.iter().map(|o| o.timings_ms.prefill).collect());
    runs.iter()
        .map(|(label, outs)| summarise(label, outs, baseline_prefill))
        .collect()
}

/// The timed settings alone: no ceilings, no kernel profile (`bench --weights q4_0`'s f16
/// comparison).
pub fn timed_settings(
    engine: &Engine,
    settings: &[Setting],
    plan: Plan,
    mut progress: impl FnMut(&str),
) -> Result<Vec<SettingResult>> {
    check_plan(settings, plan)?;
    let request = bench_request(engine, plan)?;
    let (runs, _) = run_settings(engine, settings, plan, false, request, &mut progress)?;
    Ok(summarise_runs(&runs))
}

/// Run every setting on `engine` with `plan.warmup` + `plan.repeats` requests each, the
/// ceilings, and the kernel families of one unpruned request.
pub fn pruning(
    engine: &Engine,
    model_label: &str,
    settings: &[Setting],
    plan: Plan,
    mut progress: impl FnMut(&str),
) -> Result<PruningReport> {
    check_plan(settings, plan)?;
    let gpu = &engine.gpu;
    let request = bench_request(engine, plan)?;
    progress("ceilings: FMA throughput and copy bandwidth");
    let ceilings = Ceilings::measure(gpu, plan.repeats)?;

    let (runs, warmup_profile) =
        run_settings(engine, settings, plan, true, &request, &mut progress)?;
    let profile = match warmup_profile {
        Some(profile) => profile,
        None => {
            // No warm-up to profile: one more request of the baseline, profiled.
            progress(&format!("profiling one {} request", settings[0].label));
            gpu.start_profiling();
            engine.generate(&request(&settings[0].prune), |_| {})?;
            gpu.finish_profiling()?.expect("profiling was started")
        }
    };
    progress("ceilings again, after the requests");
    let ceilings_after = Ceilings::measure(gpu, plan.repeats)?;
    Ok(PruningReport {
        model: model_label.to_string(),
        adapter: gpu.describe(),
        warmup: plan.warmup,
        repeats: plan.repeats,
        decode_tokens: plan.decode_tokens,
        kernel_families: kernel_families(&profile, &ceilings),
        ceilings,
        ceilings_after,
        settings: summarise_runs(&runs),
    })
}

impl PruningReport {
    /// Whether the ceilings measured after the run are within [`MAX_CEILING_DRIFT`] of the
    /// ones before it, so fractions of them mean what they say.
    pub fn ceilings_held(&self) -> bool {
        self.ceilings.drift(&self.ceilings_after) <= MAX_CEILING_DRIFT
    }

    fn ceiling_drift_line(&self) -> String {
        let after = &self.ceilings_after;
        let drift = 100.0 * self.ceilings.drift(after);
        let verdict = if self.ceilings_held() {
            "the fractions below hold"
        } else {
            "the device's speed changed during the run (other work?): the fractions below are \
             NOT reliable"
        };
        format!(
            "(ceilings after the run: FMA f32 {:.2} GFLOP/s, copy {:.2} GB/s; moved {drift:.0}%: {verdict})\n",
            after.fma_f32_gflops, after.copy_gbytes_per_s
        )
    }

    pub fn table(&self) -> String {
        let mut out = format!(
            "model: {}\nadapter: {}\n{} warm-up + {} timed requests per setting (medians), {} decode tokens\n{}\n\n",
            self.model,
            self.adapter,
            self.warmup,
            self.repeats,
            self.decode_tokens,
            self.ceilings.describe()
        );
        out.push_str(&format!(
            "{:<22} {:>15} {:>9} {:>10} {:>7} {:>11} {:>10} {:>11} {:>9} {:>8} {:>8} {:>8}\n",
            "setting",
            "visual tokens",
            "TTFT ms",
            "vision ms",
            "vision%",
            "prefill ms",
            "decode t/s",
            "host µs/tok",
            "KV MiB",
            "theory",
            "measured",
            "realised"
        ));
        for s in &self.settings {
            out.push_str(&format!(
                "{:<22} {:>15} {:>9.0} {:>10.0} {:>6.0}% {:>11.0} {:>10.2} {:>11.0} {:>9.2} {:>7.2}x {:>7.2}x {:>7.0}%\n",
                s.label,
                format!("{}>{}>{}", s.visual_tokens[0], s.visual_tokens[1], s.visual_tokens[2]),
                s.median_ttft_ms,
                s.median_vision_ms,
                100.0 * s.median_vision_ms / s.median_ttft_ms,
                s.median_prefill_ms,
                s.median_decode_tokens_per_second,
                s.median_decode_host_us_per_token,
                s.kv_cache_bytes as f64 / (1 << 20) as f64,
                s.theoretical_speedup,
                s.measured_speedup,
                100.0 * s.realisation
            ));
        }
        let baseline = self.settings.first().map_or("", |s| s.label.as_str());
        out.push_str(&format!("\nkernel families in one {baseline} request:\n"));
        out.push_str(&self.ceiling_drift_line());
        out.push_str(&format!(
            "{:<12} {:>9} {:>9} {:>8} {:>10} {:>8}\n",
            "family", "time ms", "GFLOP/s", "GB/s", "bound", "% of it"
        ));
        for f in &self.kernel_families {
            out.push_str(&format!(
                "{:<12} {:>9.1} {:>9.2} {:>8.2} {:>10} {:>7.1}%\n",
                f.family,
                f.time_ms,
                f.gflops,
                f.gbytes_per_s,
                bound_name(f.bound),
                100.0 * f.of_ceiling
            ));
        }
        out
    }
}

/// Where `bench` gets its model: a directory or a preset, and a label naming it with its weight
/// formats.
pub fn load_engine(
    model: Option<&Path>,
    preset: Option<&str>,
    options: EngineOptions,
) -> Result<(Engine, String)> {
    let formats = |engine: &Engine| {
        let [text, vision] = &engine.weight_labels;
        format!("language model in {text}, vision in {vision}")
    };
    match (model, preset) {
        (Some(dir), _) => {
            let engine = Engine::load(dir, options)?;
            let label = format!("{} ({})", dir.display(), formats(&engine));
            Ok((engine, label))
        }
        (None, name) => {
            let name = name.unwrap_or("small");
            let depth = match options.text_layers {
                Some(n) => format!(", first {n} decoder layers"),
                None => String::new(),
            };
            let engine = Engine::synthetic(name, options)?;
            let label = format!(
                "preset {name} (random weights, {}{depth})",
                formats(&engine)
            );
            Ok((engine, label))
        }
    }
}
