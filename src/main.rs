//! The `llava-wgpu` command line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use llava_wgpu::gpu::device::list_adapters;
use llava_wgpu::gpu::{Gpu, GpuOptions, WeightFormat};
use llava_wgpu::harness;
use llava_wgpu::prune::PruneOptions;
use llava_wgpu::sample::SamplingParams;
use llava_wgpu::vision::load_image;
use llava_wgpu::vision::overlay::{self, PatchGrid};
use llava_wgpu::{Engine, EngineOptions, GenerateOutput, GenerateRequest};

mod cli;
use cli::choices::{BackendArg, MethodArg, Stage1ScoreArg, TemplateArg, WeightsArg};

#[derive(Parser)]
#[command(
    name = "llava-wgpu",
    version,
    about = "LLaVA vision-language inference in WGSL compute shaders"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Device selection shared by every command that touches the GPU.
#[derive(Args, Clone, Debug)]
struct DeviceArgs {
    /// Adapter to use: `gpu`, `cpu`, an index from `devices`, or part of its name
    /// (default: the best real GPU; also read from LLAVA_WGPU_ADAPTER).
    #[arg(long, global = true)]
    adapter: Option<String>,
    /// Graphics API (default: every available one; also read from LLAVA_WGPU_BACKEND).
    #[arg(long, value_enum, global = true)]
    backend: Option<BackendArg>,
}

impl DeviceArgs {
    fn options(&self) -> GpuOptions {
        GpuOptions {
            adapter: self.adapter.clone(),
            backend: self.backend.map(Into::into),
            ..GpuOptions::default()
        }
    }

    /// Every command that loads a model does so on this device, with a progress bar.
    fn engine_options(&self, weight_format: WeightFormat) -> EngineOptions {
        EngineOptions {
            gpu: self.options(),
            weight_format,
            progress: true,
        }
    }
}

#[derive(Args)]
struct RunArgs {
    /// Model directory in the llava-hf layout (config.json, safetensors, tokenizer.json);
    /// default: the trained demo model in weights/tiny-llava-shapes.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Image file (png, jpeg, bmp, gif, webp, tiff).
    #[arg(long)]
    image: PathBuf,
    /// The question about the image.
    #[arg(long)]
    prompt: String,
    /// Maximum number of tokens to generate.
    #[arg(short = 'n', long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Visual-token pruning method (default STAR: the README's accuracy table shows why).
    #[arg(long, value_enum, default_value_t = MethodArg::Star)]
    prune: MethodArg,
    /// STAR stage 1: visual tokens kept in the vision encoder (N1).
    #[arg(long, value_name = "N1", conflicts_with = "stage1_ratio")]
    stage1_keep: Option<usize>,
    /// STAR stage 1 as a reduction ratio: N1 = floor(N0·(1−R)) (default 0.1: 576 → 518).
    #[arg(long, value_name = "R")]
    stage1_ratio: Option<f64>,
    /// Final visual-token budget (N2).
    #[arg(long, value_name = "N2", conflicts_with = "keep_ratio")]
    keep: Option<usize>,
    /// Final budget as a reduction ratio: N2 = round(N0·(1−X)) (default 8/9: 576 → 64).
    #[arg(long, value_name = "X")]
    keep_ratio: Option<f64>,
    /// Decoder layer K (1-based) of stage 2 / FastV (default: 14 of 32 scaled to the depth; FastV 2).
    #[arg(long, value_name = "K")]
    stage2_layer: Option<usize>,
    /// What STAR stage 1 scores patches by.
    #[arg(long, value_enum, default_value_t = Stage1ScoreArg::Attention)]
    stage1_score: Stage1ScoreArg,
    /// Time every GPU dispatch and print a per-kernel table on stderr.
    #[arg(long)]
    profile: bool,
    /// Write the profiled dispatches as a Chrome trace (open in Perfetto or chrome://tracing).
    #[arg(long, value_name = "FILE.json")]
    trace: Option<PathBuf>,
    /// Write the input image with pruned patches dimmed (one panel per stage) to this PNG.
    #[arg(long, value_name = "FILE.png")]
    kept_overlay: Option<PathBuf>,
    /// Prompt format.
    #[arg(long, value_enum, default_value_t = TemplateArg::LlavaHf)]
    template: TemplateArg,
    /// Pad the image to a square with the mean colour before resizing (original LLaVA eval).
    #[arg(long)]
    pad_to_square: bool,
    /// Weight format on the GPU.
    #[arg(long, value_enum, default_value_t = WeightsArg::F16)]
    weights: WeightsArg,
    /// Keep generating after the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object on stdout instead of streaming text.
    #[arg(long)]
    json: bool,
    /// With --json: the top-N log-probabilities of every generated token.
    #[arg(long, value_name = "N")]
    logprobs: Option<usize>,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Accuracy of every pruning method at 100/50/25/11/5% of the visual tokens on a held-out set.
    Eval {
        /// Model directory (llava-hf layout); default: the demo model in weights/tiny-llava-shapes.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Held-out questions: JSONL lines {"image", "question", "answer"[, "type"]} (image paths
        /// relative to the file); default: weights/shapes-heldout/heldout.jsonl.
        #[arg(long)]
        questions: Option<PathBuf>,
        /// Evaluate only the first N questions.
        #[arg(long)]
        limit: Option<usize>,
        /// Tokens generated per answer.
        #[arg(long, default_value_t = 8)]
        max_new_tokens: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        device: DeviceArgs,
    },
    /// Answer a question about an image.
    Run(Box<RunArgs>),
    /// List every adapter with its backend, type, driver, limits and optional features.
    Devices {
        #[command(flatten)]
        device: DeviceArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks: pruned against unpruned on a model (default), or `bench kernels`.
    #[command(args_conflicts_with_subcommands = true)]
    Bench {
        #[command(subcommand)]
        what: Option<BenchCommand>,
        #[command(flatten)]
        args: BenchArgs,
        #[command(flatten)]
        device: DeviceArgs,
    },
}

#[derive(Args)]
struct BenchArgs {
    /// Model directory (llava-hf layout); without it a synthetic model from --preset is built.
    #[arg(long, conflicts_with = "preset")]
    model: Option<PathBuf>,
    /// Synthetic model with random f16 weights: small (576 visual tokens, narrow layers),
    /// next-small (LLaVA-NeXT's 2,880, narrow layers; unpruned only for now), llava-1.5-7b,
    /// llava-1.5-13b.
    #[arg(long)]
    preset: Option<String>,
    /// Untimed requests per setting before the timed ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed requests per setting (medians are reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    repeats: u32,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 16)]
    decode_tokens: usize,
    /// Run only the settings whose label contains this text (repeatable; `none`, the baseline
    /// every speedup is measured against, always runs).
    #[arg(long, value_name = "TEXT")]
    only: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Matmul, gemv and attention throughput next to the adapter's copy bandwidth.
    Kernels {
        /// Timed runs per case (the median is reported).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
        repeats: u32,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn devices(device: &DeviceArgs, json: bool) -> Result<()> {
    let options = device.options().with_env()?;
    let adapters = list_adapters(&options);
    if json {
        println!("{}", serde_json::to_string_pretty(&adapters)?);
        return Ok(());
    }
    if adapters.is_empty() {
        anyhow::bail!(
            "no adapter found. On Linux without a GPU install Mesa's software Vulkan driver \
             (Debian/Ubuntu: apt-get install mesa-vulkan-drivers)"
        );
    }
    for a in &adapters {
        println!("[{}] {}", a.index, a.name);
        println!(
            "    backend {}, type {}{}",
            a.backend,
            a.device_type,
            if a.is_cpu { " (software)" } else { "" }
        );
        println!("    driver {} {}", a.driver, a.driver_info);
        println!(
            "    vendor 0x{:04x}, device 0x{:04x}",
            a.vendor_id, a.device_id
        );
        println!(
            "    max storage binding {} MiB, max buffer {} MiB, {} storage buffers per stage",
            a.max_storage_buffer_binding_size >> 20,
            a.max_buffer_size >> 20,
            a.max_storage_buffers_per_shader_stage
        );
        println!(
            "    workgroup memory {} KiB, {} invocations per workgroup, {} workgroups per dimension",
            a.max_compute_workgroup_storage_size >> 10,
            a.max_compute_invocations_per_workgroup,
            a.max_compute_workgroups_per_dimension
        );
        let yes = |b: bool| if b { "yes" } else { "no" };
        println!(
            "    shader-f16 {}, subgroups {} (size {}..{}), timestamps {}, timestamps inside passes {}",
            yes(a.shader_f16),
            yes(a.subgroups),
            a.subgroup_min_size,
            a.subgroup_max_size,
            yes(a.timestamp_query),
            yes(a.timestamp_query_inside_passes)
        );
    }
    Ok(())
}

fn bench_kernels(device: &DeviceArgs, repeats: u32, json: bool) -> Result<()> {
    let gpu = Gpu::new(device.options())?;
    eprintln!("benchmarking on {}", gpu.describe());
    let report = harness::bench::kernels(&gpu, repeats as usize, |case| eprintln!("  {case}"))
        .context("kernel benchmark failed")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// Mesa's Vulkan drivers print "error: XDG_RUNTIME_DIR is invalid" several times when a headless
/// machine has no session directory; give them a private one (before any thread starts).
fn quiet_mesa_without_a_session() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        let dir = std::env::temp_dir().join("llava-wgpu-runtime");
        if std::fs::create_dir_all(&dir).is_ok() {
            std::env::set_var("XDG_RUNTIME_DIR", &dir);
        }
    }
}

/// The demo model and the slice of its held-out set that ship in the repository.
const DEFAULT_MODEL: &str = "weights/tiny-llava-shapes";
const DEFAULT_QUESTIONS: &str = "weights/shapes-heldout/heldout.jsonl";

/// A file or directory of the repository, found from the working directory (a checkout) or from
/// where the binary was built. `marker`: a file the directory must hold; `None`: the path is a file.
fn shipped_path(relative: &str, flag: &str, marker: Option<&str>) -> Result<PathBuf> {
    let candidates = [
        PathBuf::from(relative),
        Path::new(env!("CARGO_MANIFEST_DIR")).join(relative),
    ];
    candidates
        .iter()
        .find(|p| match marker {
            Some(file) => p.join(file).exists(),
            None => p.is_file(),
        })
        .cloned()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no {flag} given and the default {relative} was not found \
                 (run from the repository, or pass {flag})"
            )
        })
}

fn default_model() -> Result<PathBuf> {
    shipped_path(DEFAULT_MODEL, "--model DIR", Some("config.json"))
}

fn run(args: &RunArgs) -> Result<()> {
    args.check_sampling()?;
    let model = match &args.model {
        Some(dir) => dir.clone(),
        None => default_model()?,
    };
    let engine = Engine::load(&model, args.device.engine_options(args.weights.into()))?;
    let request = args.request();
    let json = args.json;
    let profiling = args.profile || args.trace.is_some();
    if profiling {
        engine.gpu.start_profiling();
    }
    let output = engine.generate(&request, |piece| {
        if !json {
            print!("{piece}");
            let _ = std::io::stdout().flush();
        }
    })?;
    report_profile(&engine, args, &output)?;
    if let Some(path) = &args.kept_overlay {
        write_kept_overlay(&engine, &request, &output, path)?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&output)?);
    } else {
        println!();
        eprintln!("{}", summary(&output));
    }
    Ok(())
}

impl RunArgs {
    /// Sampling settings the library would accept but that make no sense, refused up front.
    fn check_sampling(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            anyhow::bail!(
                "invalid argument --temperature: {} must be a finite number ≥ 0",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            anyhow::bail!("invalid argument --top-p: {} must be in (0, 1]", self.top_p);
        }
        if self.logprobs == Some(0) {
            anyhow::bail!("invalid argument --logprobs: must be at least 1");
        }
        Ok(())
    }

    fn request(&self) -> GenerateRequest {
        GenerateRequest {
            image: self.image.clone(),
            prompt: self.prompt.clone(),
            template: self.template.into(),
            max_new_tokens: self.max_new_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_p: self.top_p,
                seed: self.seed,
            },
            logprobs: self.logprobs,
            pad_to_square: self.pad_to_square,
            ignore_eos: self.ignore_eos,
            capture_outputs: false,
            prune: PruneOptions {
                method: self.prune.into(),
                stage1_keep: self.stage1_keep,
                stage1_ratio: self.stage1_ratio,
                keep: self.keep,
                keep_ratio: self.keep_ratio,
                stage2_layer: self.stage2_layer,
                stage1_score: self.stage1_score.into(),
                seed: self.seed,
            },
        }
    }
}

/// `--profile` prints the per-kernel table on stderr; `--trace` writes the Chrome trace.
fn report_profile(engine: &Engine, args: &RunArgs, output: &GenerateOutput) -> Result<()> {
    let Some(report) = engine.gpu.finish_profiling()? else {
        return Ok(());
    };
    if args.profile {
        eprint!("\n{}", report.table());
        let t = &output.timings_ms;
        eprintln!(
            "  time to first token {:.1} ms (wall, from the request), decode {:.2} tokens/s",
            t.preprocess + t.vision + t.prefill,
            output.decode_tokens_per_second
        );
    }
    if let Some(path) = &args.trace {
        let text = serde_json::to_string(&report.chrome_trace())?;
        std::fs::write(path, text)
            .with_context(|| format!("cannot write the trace to {}", path.display()))?;
    }
    Ok(())
}

/// The line `run` prints on stderr after the answer.
fn summary(output: &GenerateOutput) -> String {
    let v = &output.visual_tokens;
    // The first token comes from prefill; a decode rate exists only from the second on.
    let decode = if output.decode_tokens_per_second > 0.0 {
        format!("decode {:.1} tokens/s", output.decode_tokens_per_second)
    } else {
        "no decode steps".to_string()
    };
    format!(
        "{} prompt tokens, visual {} -> {} -> {}, {} generated; prefill {:.0} ms, {decode}",
        output.prompt_tokens,
        v.encoder,
        v.after_stage1,
        v.after_stage2,
        output.generated_ids.len(),
        output.timings_ms.prefill,
    )
}

/// `--kept-overlay`: the crop the model saw, one panel per pruning stage.
fn write_kept_overlay(
    engine: &Engine,
    request: &GenerateRequest,
    output: &GenerateOutput,
    path: &Path,
) -> Result<()> {
    let kept = output.kept_visual_indices.as_ref().ok_or_else(|| {
        anyhow::anyhow!(
            "invalid argument --kept-overlay: needs a pruning method (--prune ...): nothing was dropped"
        )
    })?;
    let stages: Vec<&[usize]> = [kept.stage1.as_deref(), kept.stage2.as_deref()]
        .into_iter()
        .flatten()
        .collect();
    let image = load_image(&request.image)?;
    let patches = PatchGrid {
        patch_size: engine.config.vision.patch_size,
        grid: engine.config.vision.grid(),
    };
    overlay::write(
        &image,
        &request.image,
        &engine.image_processor,
        request.pad_to_square,
        patches,
        &stages,
        path,
    )?;
    Ok(())
}

fn bench_pruning(args: &BenchArgs, device: &DeviceArgs) -> Result<()> {
    let options = device.engine_options(WeightFormat::F16);
    let (engine, label) =
        harness::bench::load_engine(args.model.as_deref(), args.preset.as_deref(), options)?;
    eprintln!("benchmarking {label} on {}", engine.gpu.describe());
    let mut settings = harness::bench::default_settings(engine.config.image_tokens());
    if !args.only.is_empty() {
        settings.retain(|s| {
            s.label == "none" || args.only.iter().any(|o| s.label.contains(o.as_str()))
        });
    }
    let report = harness::bench::pruning(
        &engine,
        &label,
        &settings,
        args.warmup,
        args.repeats as usize,
        args.decode_tokens,
        |what| eprintln!("  {what}"),
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

fn eval(
    model: Option<&Path>,
    questions: Option<&Path>,
    limit: Option<usize>,
    max_new: usize,
    json: bool,
    device: &DeviceArgs,
) -> Result<()> {
    let model = match model {
        Some(m) => m.to_path_buf(),
        None => default_model()?,
    };
    let questions = match questions {
        Some(q) => q.to_path_buf(),
        None => shipped_path(DEFAULT_QUESTIONS, "--questions FILE.jsonl", None)?,
    };
    let mut examples = harness::eval::read_jsonl(&questions)?;
    if let Some(n) = limit {
        examples.truncate(n.max(1));
    }
    let engine = Engine::load(&model, device.engine_options(WeightFormat::F16))?;
    let report = harness::eval::run(
        &engine,
        &model.display().to_string(),
        &examples,
        max_new,
        |line| eprintln!("  {line}"),
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

fn main() -> ExitCode {
    quiet_mesa_without_a_session();
    let cli = Cli::parse();
    let outcome = match &cli.command {
        Command::Run(args) => run(args),
        Command::Devices { device, json } => devices(device, *json),
        Command::Eval {
            model,
            questions,
            limit,
            max_new_tokens,
            json,
            device,
        } => eval(
            model.as_deref(),
            questions.as_deref(),
            *limit,
            *max_new_tokens,
            *json,
            device,
        ),
        Command::Bench {
            what: Some(BenchCommand::Kernels { repeats, json }),
            device,
            ..
        } => bench_kernels(device, *repeats, *json),
        Command::Bench {
            what: None,
            args,
            device,
        } => bench_pruning(args, device),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", cli::flags::describe(&error));
            ExitCode::FAILURE
        }
    }
}
