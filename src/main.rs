//! The `llava-wgpu` command line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use llava_wgpu::generate::KeptPerView;
use llava_wgpu::gpu::device::list_adapters;
use llava_wgpu::gpu::{Gpu, GpuOptions, WeightFormat};
use llava_wgpu::harness;
use llava_wgpu::harness::roofline::Roofline;
use llava_wgpu::model::gguf;
use llava_wgpu::prune::{Method, PruneOptions};
use llava_wgpu::quant::Mix;
use llava_wgpu::sample::SamplingParams;
use llava_wgpu::text::Template;
use llava_wgpu::vision::load_image;
use llava_wgpu::vision::overlay::{self, PatchGrid};
use llava_wgpu::{Engine, EngineOptions, GenerateOutput, GenerateRequest};

mod cli;
use cli::choices::{
    BackendArg, FileFormatArg, KvArg, MethodArg, PositionsArg, QuantizedArg, Stage1ScoreArg,
    TemplateArg, WeightsArg,
};

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
    fn engine_options(&self, weights: &WeightArgs) -> EngineOptions {
        EngineOptions {
            gpu: self.options(),
            mmproj: weights.mmproj.clone(),
            weight_format: weights.weights.map(Into::into),
            vision_weight_format: weights.vision_weights.map(Into::into),
            progress: true,
            allocate_only: false,
            text_layers: None,
            kv: None,
            host_embeddings: weights.host_embeddings,
        }
    }
}

/// The mmproj of a GGUF model and the weight formats on the GPU, shared by every command that
/// loads a model.
#[derive(Args, Clone, Debug)]
struct WeightArgs {
    /// The mmproj GGUF (vision tower and projector, llama.cpp's `mmproj-*.gguf`) that goes
    /// with a GGUF text model given as --model.
    #[arg(long, value_name = "MMPROJ.gguf")]
    mmproj: Option<PathBuf>,
    /// Format of the language model's linear layers and lm_head for a llava-hf checkpoint
    /// (quantized at load, or as stored by `quantize`; default f16, or the stored format):
    /// a float type, one of ggml's block types, or llama-quantize's q4_k_m mix. A GGUF model
    /// runs in the types its file stores and takes no --weights.
    #[arg(long, value_enum)]
    weights: Option<WeightsArg>,
    /// Format of the vision tower and projector (default: f16 when --weights is quantized,
    /// otherwise the same as --weights); one format, not a mix.
    #[arg(long, value_enum)]
    vision_weights: Option<WeightsArg>,
    /// Keep the token embedding table on the host only, as llama.cpp does (262 MB less GPU
    /// memory for 7B f16): each decode step then waits for the host to read its token and
    /// upload the row.
    #[arg(long)]
    host_embeddings: bool,
}

impl WeightArgs {
    /// The defaults (f16 everywhere, or as stored), for commands without weight flags.
    fn f16() -> Self {
        Self {
            mmproj: None,
            weights: None,
            vision_weights: None,
            host_embeddings: false,
        }
    }
}

#[derive(Args)]
struct RunArgs {
    /// Model directory in the llava-hf layout (config.json, safetensors, tokenizer.json);
    /// default: the trained demo model in weights/tiny-llava-shapes.
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
    /// Image file (png, jpeg, bmp, gif, webp, tiff); repeat for several images (their
    /// placeholders open the question in this order); none for a text-only question.
    #[arg(long, short = 'i')]
    image: Vec<PathBuf>,
    /// The question.
    #[arg(long, short = 'p')]
    prompt: String,
    /// A system message before the question.
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// The most images a request may hold.
    #[arg(long, value_name = "N", default_value_t = llava_wgpu::generate::DEFAULT_MAX_IMAGES)]
    max_images: usize,
    /// Maximum number of tokens to generate.
    #[arg(short = 'n', long, default_value_t = 64)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Visual-token pruning method (default STAR: docs/evaluation.md shows why).
    #[arg(long, value_enum, default_value_t = MethodArg::Star)]
    prune: MethodArg,
    #[command(flatten)]
    budgets: BudgetArgs,
    /// Time every GPU dispatch and print a per-kernel table on stderr.
    #[arg(long)]
    profile: bool,
    /// Write the profiled dispatches as a Chrome trace (open in Perfetto or chrome://tracing).
    #[arg(long, value_name = "FILE.json")]
    trace: Option<PathBuf>,
    /// With --profile: draw each kernel on a roofline of this device's FMA and copy ceilings,
    /// measured after the request, to this PNG.
    #[arg(long, value_name = "FILE.png", requires = "profile")]
    roofline: Option<PathBuf>,
    /// Write the input image with pruned patches dimmed (one panel per stage) to this PNG.
    #[arg(long, value_name = "FILE.png")]
    kept_overlay: Option<PathBuf>,
    /// Prompt format (default: the one the model's kind ships: llava-hf for LLaVA-1.5,
    /// vicuna-v1 or mistral-inst for LLaVA-NeXT by its decoder).
    #[arg(long, value_enum)]
    template: Option<TemplateArg>,
    /// Pad the image to a square with the mean colour before resizing (original LLaVA eval;
    /// the default for GGUF LLaVA-1.5 models, as in llama.cpp).
    #[arg(long, conflicts_with = "no_pad")]
    pad_to_square: bool,
    /// Do not pad: the llava-hf processor's resize and centre crop (the default for llava-hf
    /// checkpoints).
    #[arg(long)]
    no_pad: bool,
    #[command(flatten)]
    weights: WeightArgs,
    /// KV-cache element type (default: f16 where the adapter has SHADER_F16, else f32).
    #[arg(long, value_enum)]
    kv: Option<KvArg>,
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
    Eval(Box<EvalArgs>),
    /// Write a checkpoint's quantized copy: as a llama.cpp GGUF pair (--format gguf: a text
    /// model and an mmproj, as llama.cpp's converters and llama-quantize write them), or as
    /// safetensors with the language model's linear layers and lm_head stored as ggml Q8_0 /
    /// Q4_0 blocks (loaded memory-mapped, without requantizing).
    Quantize {
        /// Model directory (llava-hf layout) with f32, f16 or bf16 weights.
        #[arg(long, short = 'm')]
        model: PathBuf,
        /// Directory to write (created; must not hold a checkpoint yet).
        #[arg(long)]
        out: PathBuf,
        /// File format.
        #[arg(long, value_enum, default_value_t = FileFormatArg::Safetensors)]
        format: FileFormatArg,
        /// Types of the language model's matrices.
        #[arg(long, value_enum)]
        weights: QuantizedArg,
        /// GGUF: the mmproj's linear layers in f16 (default) or q8_0.
        #[arg(long, value_enum)]
        vision_weights: Option<WeightsArg>,
    },
    /// Answer a question about an image.
    Run(Box<RunArgs>),
    /// An OpenAI-compatible HTTP server (POST /v1/chat/completions, GET /v1/models, GET /health).
    Serve(Box<cli::serve::ServeArgs>),
    /// An interactive chat about an image in the terminal.
    Chat(Box<cli::serve::ChatArgs>),
    /// List every adapter with its backend, type, driver, limits and optional features.
    Devices {
        #[command(flatten)]
        device: DeviceArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// GPU memory a full-depth request allocates (weights, KV cache, activations, scratch and
    /// the peak), measured by creating its buffers without computing.
    Memory(Box<MemoryArgs>),
    /// Benchmarks: pruned against unpruned on a model (default), or `bench kernels`.
    #[command(args_conflicts_with_subcommands = true)]
    Bench {
        #[command(subcommand)]
        what: Option<BenchCommand>,
        #[command(flatten)]
        args: Box<BenchArgs>,
        #[command(flatten)]
        device: DeviceArgs,
    },
}

#[derive(Args)]
struct EvalArgs {
    /// Model directory (llava-hf layout); default: the demo model in weights/tiny-llava-shapes.
    #[arg(long, short = 'm')]
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
    /// Evaluate only these pruning methods (comma-separated; the unpruned row always runs).
    #[arg(long, value_enum, value_delimiter = ',')]
    methods: Vec<MethodArg>,
    /// Evaluate only these budgets, as fractions of the visual tokens (comma-separated;
    /// default 1, 0.5, 0.25, 0.11, 0.05).
    #[arg(long, value_delimiter = ',')]
    budgets: Vec<f64>,
    /// RoPE positions of the tokens a selection before the projector keeps.
    #[arg(long, value_enum, default_value_t = PositionsArg::Original)]
    positions: PositionsArg,
    /// Also evaluate STAR and FastV (when among the methods) with an adaptive stage 2 keeping
    /// these shares of each image's attention mass (comma-separated, each in (0, 1]); each
    /// such row is compared with its method's fixed budget of the nearest mean token count.
    #[arg(long, value_delimiter = ',', value_name = "P")]
    keep_mass: Vec<f64>,
    /// What ranks patches in STAR's stage 1 and VisPruner's important half (default: each
    /// method's own, attention and cls).
    #[arg(long, value_enum)]
    stage1_score: Option<Stage1ScoreArg>,
    /// VisPruner's rows: the important (ranked) tokens' share of its budget, 0 to 1 (default
    /// 0.5, the paper's).
    #[arg(long, value_name = "R")]
    important_ratio: Option<f64>,
    /// Rows of methods that select before the projector (STAR, FasterVLM, VisPruner, random)
    /// merge the patches they drop into the kept ones (see `run --merge`).
    #[arg(long)]
    merge: bool,
    /// STAR's rows: stage 1's reduction ratio R, N1 = max(floor(N0 · (1 − R)), the final
    /// budget) (default 0.1, the paper's; 1 leaves the whole budget to stage 1).
    #[arg(long, value_name = "R")]
    stage1_ratio: Option<f64>,
    /// Which stage STAR's --keep-mass rows adapt: 2 (default; stage 1 keeps 90%) or 1 (LLaVA-1.5:
    /// stage 1 keeps the share of its patches' attention, stage 2 keeps all it receives).
    #[arg(long, value_name = "STAGE", default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    adaptive_stage: u8,
    /// The fewest visual tokens an adaptive row keeps per image (default 1).
    #[arg(long, value_name = "N")]
    keep_floor: Option<usize>,
    /// The method every other row is compared with, question by question (exact McNemar test
    /// at the same budget); it must be among the methods evaluated (default: star, or the first
    /// method when star is not evaluated).
    #[arg(long, value_enum)]
    paired_with: Option<MethodArg>,
    /// Also draw accuracy against visual tokens kept, one line per method with its 95%
    /// intervals, into this PNG file.
    #[arg(long, value_name = "FILE.png")]
    plot: Option<PathBuf>,
    /// Evaluate nothing: draw --plot from the report an earlier `eval --json` printed.
    #[arg(long, value_name = "REPORT.json", requires = "plot")]
    from_json: Option<PathBuf>,
    #[command(flatten)]
    weights: WeightArgs,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
struct BenchArgs {
    /// Model directory (llava-hf layout); without it a synthetic model from --preset is built.
    #[arg(long, short = 'm', conflicts_with = "preset")]
    model: Option<PathBuf>,
    /// Synthetic model with random weights (stored as --weights says): small (576 visual
    /// tokens, narrow layers), next-small (LLaVA-NeXT's 2,880, narrow layers), llava-1.5-7b,
    /// llava-1.5-13b.
    #[arg(long)]
    preset: Option<String>,
    /// Untimed requests per setting before the timed ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed requests per setting (medians are reported). Default 3, or 1 on a CPU adapter with
    /// a 7B-class model (decoder width 2048 or more), where a request takes minutes.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    repeats: Option<u32>,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 16)]
    decode_tokens: usize,
    /// Run only the first N decoder layers (real widths at a truncated depth, e.g.
    /// `--preset llava-1.5-7b --layers 2` on a small device).
    #[arg(long, value_name = "N")]
    layers: Option<usize>,
    /// KV-cache element type (default: f16 where the adapter has SHADER_F16, else f32).
    #[arg(long, value_enum)]
    kv: Option<KvArg>,
    /// Run only the settings whose label contains this text, ignoring case (repeatable; `none`,
    /// the baseline every speedup is measured against, always runs; a text no label contains is
    /// an error). Default: every setting, or `none` and the smallest STAR budget on a CPU adapter
    /// with a 7B-class model.
    #[arg(long, value_name = "TEXT")]
    only: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Draw the kernel families of the profiled warm-up request on a roofline of the run's
    /// ceilings, to this PNG.
    #[arg(long, value_name = "FILE.png")]
    roofline: Option<PathBuf>,
    #[command(flatten)]
    weights: WeightArgs,
}

impl BenchArgs {
    /// The engine `bench` loads: the device's, with the bench's weights, depth and KV type.
    fn engine_options(&self, device: &DeviceArgs) -> EngineOptions {
        let mut options = device.engine_options(&self.weights);
        options.text_layers = self.layers;
        options.kv = self.kv.map(Into::into);
        options
    }

    /// The requests per setting; `short` is [`harness::bench::short_run`].
    fn plan(&self, short: bool) -> harness::bench::Plan {
        let default_repeats = if short { 1 } else { 3 };
        harness::bench::Plan {
            warmup: self.warmup,
            repeats: self.repeats.map_or(default_repeats, |r| r as usize),
            decode_tokens: self.decode_tokens,
        }
    }
}

/// A pruning method's budgets (`run`, `memory`).
/// How tokens are picked (`run` and `chat`).
#[derive(Args)]
pub(crate) struct SamplingArgs {
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Random seed for sampling (and the random pruning baseline).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    /// Settings the library would accept but that make no sense, refused up front.
    pub(crate) fn check(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            anyhow::bail!(
                "invalid argument --temperature: {} must be a finite number ≥ 0",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            anyhow::bail!("invalid argument --top-p: {} must be in (0, 1]", self.top_p);
        }
        Ok(())
    }

    pub(crate) fn seed(&self) -> u64 {
        self.seed
    }

    pub(crate) fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
        }
    }
}

#[derive(Args)]
pub(crate) struct BudgetArgs {
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
    /// Adaptive stage 2 (STAR, FastV): keep, per image, the fewest visual tokens whose share of
    /// the image's attention at layer K reaches P (0 < P ≤ 1); --keep is then the cap.
    #[arg(long, value_name = "P")]
    keep_mass: Option<f64>,
    /// Adaptive STAR stage 1 (LLaVA-1.5): keep, per image, the fewest patches whose share of
    /// the stage-1 attention reaches P (0 < P ≤ 1); --stage1-keep is then the cap.
    #[arg(long, value_name = "P")]
    stage1_keep_mass: Option<f64>,
    /// The fewest visual tokens an adaptive stage keeps per image (default 1).
    #[arg(long, value_name = "N")]
    keep_floor: Option<usize>,
    /// What ranks patches before the projector: STAR's stage 1 (default attention, each
    /// patch's received attention) or VisPruner's important half (default cls).
    #[arg(long, value_enum)]
    stage1_score: Option<Stage1ScoreArg>,
    /// VisPruner: the important (ranked) tokens' share of its budget, 0 to 1; the rest are
    /// chosen for diversity (default 0.5, the paper's).
    #[arg(long, value_name = "R")]
    important_ratio: Option<f64>,
    /// Merge each patch a selection before the projector (STAR stage 1, FasterVLM, VisPruner,
    /// random) drops into the kept patch whose feature is most similar; each kept token becomes
    /// its group's mean.
    #[arg(long)]
    merge: bool,
    /// RoPE positions of the image tokens a selection before the projector keeps: their
    /// patches' own (the text after continues as unpruned), or renumbered one after another.
    #[arg(long, value_enum, default_value_t = PositionsArg::Original)]
    positions: PositionsArg,
}

impl BudgetArgs {
    pub(crate) fn options(&self, method: MethodArg, seed: u64) -> PruneOptions {
        PruneOptions {
            method: method.into(),
            stage1_keep: self.stage1_keep,
            stage1_ratio: self.stage1_ratio,
            keep: self.keep,
            keep_ratio: self.keep_ratio,
            stage2_layer: self.stage2_layer,
            stage1_score: self.stage1_score.map(Into::into),
            important_ratio: self.important_ratio,
            seed,
            positions: self.positions.into(),
            keep_mass: self.keep_mass,
            stage1_keep_mass: self.stage1_keep_mass,
            keep_floor: self.keep_floor,
            merge: self.merge,
        }
    }
}

#[derive(Args)]
struct MemoryArgs {
    /// Model directory (llava-hf layout): its weights' buffers are created, not uploaded.
    #[arg(
        long,
        short = 'm',
        conflicts_with = "preset",
        required_unless_present = "preset"
    )]
    model: Option<PathBuf>,
    /// A model shape without a checkpoint: llava-1.5-7b, llava-1.5-13b, small.
    #[arg(long)]
    preset: Option<String>,
    #[command(flatten)]
    weights: WeightArgs,
    /// KV-cache element type (default: f16 where the adapter has SHADER_F16, else f32).
    #[arg(long, value_enum)]
    kv: Option<KvArg>,
    /// Pruning method (default: both `none` and STAR with its default budgets).
    #[arg(long, value_enum)]
    prune: Option<MethodArg>,
    #[command(flatten)]
    budgets: BudgetArgs,
    /// Tokens the request may generate (each needs a KV row).
    #[arg(short = 'n', long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

impl MemoryArgs {
    /// The settings to measure: the one asked for, or none and STAR at its defaults.
    fn settings(&self) -> Vec<harness::bench::Setting> {
        let Some(method) = self.prune else {
            let star = PruneOptions {
                method: llava_wgpu::prune::Method::Star,
                ..PruneOptions::default()
            };
            return vec![
                harness::bench::Setting {
                    label: "none".into(),
                    prune: PruneOptions::default(),
                },
                harness::bench::Setting {
                    label: "star (defaults)".into(),
                    prune: star,
                },
            ];
        };
        let prune = self.budgets.options(method, 0);
        let label = format!("{method:?}").to_lowercase();
        vec![harness::bench::Setting { label, prune }]
    }
}

fn memory(args: &MemoryArgs) -> Result<()> {
    let mut options = args.device.engine_options(&args.weights);
    options.allocate_only = true;
    options.kv = args.kv.map(Into::into);
    let (engine, label) =
        harness::bench::load_engine(args.model.as_deref(), args.preset.as_deref(), options)?;
    let settings = args.settings();
    // The image is never opened: only the prompt, plan and limits size the buffers.
    let mut request = GenerateRequest::new("(not read)", harness::bench::bench_prompt(&engine));
    request.max_new_tokens = args.max_new_tokens;
    let report = harness::memory::measure(&engine, &label, &settings, &request)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The server on loopback: time to first token (first turn, follow-up, cached image),
    /// concurrent clients, resident memory over many requests.
    Serve(Box<cli::serve::BenchServeArgs>),
    /// Matmul, gemv and attention throughput next to the adapter's copy bandwidth.
    Kernels {
        /// Timed runs per case (the median is reported).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
        repeats: u32,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Run only these sections: matmul, ggml, decode, attention, rows, quantized-gemv,
        /// quantized-matmul (repeatable).
        #[arg(long, value_name = "SECTION")]
        only: Vec<String>,
        /// Draw every case on a roofline of the run's ceilings, to this PNG.
        #[arg(long, value_name = "FILE.png")]
        roofline: Option<PathBuf>,
    },
    /// Many requests with varying pruning, questions and lengths; resident memory after
    /// warm-up and at the end (fails if it grew by more than 1%).
    Soak {
        /// Requests after the warm-up.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
        requests: u32,
        /// Model directory (default: the demo model).
        #[arg(long, short = 'm')]
        model: Option<PathBuf>,
        /// Question set cycled through (default: weights/shapes-heldout/heldout.jsonl).
        #[arg(long)]
        questions: Option<PathBuf>,
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
    if !adapters.iter().any(|a| a.chosen) {
        eprintln!("no adapter matches the --adapter given: a run with it would fail");
    }
    for a in &adapters {
        let mark = if a.chosen {
            "   <- runs use this one"
        } else {
            ""
        };
        println!("[{}] {}{mark}", a.index, a.name);
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

fn bench_kernels(
    device: &DeviceArgs,
    repeats: u32,
    only: &[String],
    json: bool,
    roofline: Option<&Path>,
) -> Result<()> {
    if let Some(path) = roofline {
        check_output_file("--roofline", path)?;
    }
    let gpu = Gpu::new(device.options())?;
    eprintln!("benchmarking on {}", gpu.describe());
    let sections: Vec<&str> = if only.is_empty() {
        harness::bench::kernels::SECTIONS.to_vec()
    } else {
        only.iter().map(String::as_str).collect()
    };
    let report = harness::bench::kernel_sections(&gpu, repeats as usize, &sections, |case| {
        eprintln!("  {case}")
    })
    .context("kernel benchmark failed")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    if let Some(path) = roofline {
        report.roofline(&gpu.describe()).draw(path)?;
        eprintln!("roofline written to {}", path.display());
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
    args.check_arguments()?;
    let model = match &args.model {
        Some(dir) => dir.clone(),
        None => default_model()?,
    };
    let mut options = args.device.engine_options(&args.weights);
    options.kv = args.kv.map(Into::into);
    let engine = Engine::load(&model, options)?;
    let mut request = args.request();
    request.template = args.template.map_or(engine.template, Into::into);
    let json = args.json;
    let profiling = args.profile || args.trace.is_some();
    if profiling {
        engine.gpu.start_profiling();
    }
    let mut printed = false;
    let output = engine.generate(&request, |piece| {
        if !json {
            print!("{piece}");
            printed = true;
            let _ = std::io::stdout().flush();
        }
    });
    // An answer on stdout ends its line before an error goes to stderr.
    if printed && output.is_err() {
        println!();
    }
    let output = output?;
    report_profile(&engine, args, &output)?;
    if let Some(path) = &args.kept_overlay {
        write_kept_overlay(&engine, &request, &output, path)?;
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&run_json(&engine, &request, &output)?)?
        );
    } else {
        println!();
        eprintln!("{}", summary(&output));
    }
    Ok(())
}

/// `run --json`: the request's output with what ran it (DESIGN.md's JSON contract): the model,
/// the adapter, the weight and KV formats, the template, padding and pruning settings.
fn run_json(
    engine: &Engine,
    request: &GenerateRequest,
    output: &GenerateOutput,
) -> Result<serde_json::Value> {
    let mut json = serde_json::to_value(output)?;
    let [weights, vision_weights] = &engine.weight_labels;
    let settings = serde_json::json!({
        "model": engine.model_dir.display().to_string(),
        "adapter": engine.gpu.describe(),
        "weights_format": weights,
        "vision_weights_format": vision_weights,
        "kv_format": engine.kv_dtype.name(),
        "template": request.template.name(),
        "pad_to_square": engine.pads_images(&request.settings()),
    });
    if let (Some(out), serde_json::Value::Object(extra)) = (json.as_object_mut(), settings) {
        out.extend(extra);
    }
    Ok(json)
}

impl RunArgs {
    /// Arguments that cannot work, refused before the model loads: sampling settings, images
    /// that cannot be read, `--logprobs` without `--json`, a `--kept-overlay` with nothing to
    /// draw or nowhere to write.
    fn check_arguments(&self) -> Result<()> {
        self.sampling.check()?;
        if let Some(path) = &self.roofline {
            check_output_file("--roofline", path)?;
        }
        for image in &self.image {
            cli::chat::check_image(image)
                .map_err(|e| anyhow::anyhow!("invalid argument --image: {e}"))?;
        }
        if self.logprobs == Some(0) {
            anyhow::bail!("invalid argument --logprobs: must be at least 1");
        }
        if self.logprobs.is_some() && !self.json {
            anyhow::bail!(
                "invalid argument --logprobs: it is printed in the --json output; add --json"
            );
        }
        self.check_overlay()
    }

    /// `--kept-overlay` is checked before the model loads: it needs pruning, one image and a
    /// file it can create.
    fn check_overlay(&self) -> Result<()> {
        let Some(path) = &self.kept_overlay else {
            return Ok(());
        };
        if self.prune == MethodArg::None {
            anyhow::bail!("invalid argument --kept-overlay: it shows pruned patches, and --prune none drops none");
        }
        if self.image.len() != 1 {
            anyhow::bail!(
                "invalid argument --kept-overlay: it draws one image's patches, and the request has {} images",
                self.image.len()
            );
        }
        check_output_file("--kept-overlay", path)
    }

    fn request(&self) -> GenerateRequest {
        GenerateRequest {
            images: self.image.clone(),
            prompt: self.prompt.clone(),
            system: self.system.clone(),
            max_images: self.max_images,
            template: Template::default(),
            max_new_tokens: self.max_new_tokens,
            sampling: self.sampling.params(),
            logprobs: self.logprobs,
            pad_to_square: match (self.pad_to_square, self.no_pad) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
            ignore_eos: self.ignore_eos,
            capture_outputs: false,
            prune: self.budgets.options(self.prune, self.sampling.seed),
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
    if let Some(path) = &args.roofline {
        // The ceilings on the same clock, right after the request (3 runs each).
        let ceilings = harness::bench::Ceilings::measure(&engine.gpu, 3)?;
        let title = format!("run --profile on {}", engine.gpu.info.name);
        let fma = ceilings.fma_f32_gflops;
        let roofline = Roofline::from_profile(&title, &report, fma, ceilings.copy_gbytes_per_s);
        roofline.draw(path)?;
        eprintln!("roofline written to {}", path.display());
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
    let source = &request.images[0];
    let image = load_image(source)?;
    if let Some(per_view) = &kept.per_view {
        return write_anyres_overlay(engine, request, &image, per_view, path);
    }
    let stages: Vec<&[usize]> = [kept.stage1.as_deref(), kept.stage2.as_deref()]
        .into_iter()
        .flatten()
        .collect();
    let patches = PatchGrid {
        patch_size: engine.config.vision.patch_size,
        grid: engine.config.vision.grid(),
    };
    overlay::write(
        &image,
        source,
        &engine.image_processor,
        engine.pads_images(&request.settings()),
        patches,
        &stages,
        path,
    )?;
    Ok(())
}

/// `--kept-overlay` on LLaVA-NeXT: per stage, the base view and every crop.
fn write_anyres_overlay(
    engine: &Engine,
    request: &GenerateRequest,
    image: &image::DynamicImage,
    per_view: &KeptPerView,
    path: &Path,
) -> Result<()> {
    let layout = engine
        .anyres_layout(image)
        .ok_or_else(|| anyhow::anyhow!("per-view kept patches from a model without anyres"))?;
    let vision = &engine.config.vision;
    let rgb = engine
        .image_processor
        .anyres_rgb8(image, &request.images[0], &layout)?;
    let stages: Vec<Vec<(usize, usize)>> = [&per_view.stage1, &per_view.stage2]
        .into_iter()
        .flatten()
        .map(|kept| kept.iter().map(|p| (p.view, p.index)).collect())
        .collect();
    overlay::write_anyres((&rgb.0, &rgb.1), &layout, vision.patch_size, &stages, path)?;
    Ok(())
}

fn bench_pruning(args: &BenchArgs, device: &DeviceArgs) -> Result<()> {
    if let Some(path) = &args.roofline {
        check_output_file("--roofline", path)?;
    }
    let options = args.engine_options(device);
    let (engine, label) =
        harness::bench::load_engine(args.model.as_deref(), args.preset.as_deref(), options)?;
    eprintln!("benchmarking {label} on {}", engine.gpu.describe());
    let settings = match engine.config.anyres {
        // The bench image is tiled into the most crops: 2,880 visual tokens for llava-hf's list.
        Some(_) => harness::bench::next_settings(harness::bench::bench_visual_tokens(&engine)?),
        None => harness::bench::default_settings(engine.config.image_tokens()),
    };
    let short = harness::bench::short_run(&engine);
    let settings = if short && args.only.is_empty() {
        harness::bench::short_run_settings(settings)
    } else {
        harness::bench::select_settings(settings, &args.only)?
    };
    let plan = args.plan(short);
    if short {
        let labels: Vec<&str> = settings.iter().map(|s| s.label.as_str()).collect();
        eprintln!(
            "a CPU adapter and {}-wide decoder layers: a short run by default ({labels:?}, {} \
             timed request(s) each; --only and --repeats choose more)",
            engine.config.text.hidden_size, plan.repeats
        );
    }
    let report = harness::bench::pruning(&engine, &label, &settings, plan, |what| {
        eprintln!("  {what}")
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    if let Some(path) = &args.roofline {
        report.roofline().draw(path)?;
        eprintln!("roofline written to {}", path.display());
    }
    let format = args.weights.weights.map(Mix::from);
    match format {
        Some(mix) if mix != Mix::Uniform(WeightFormat::F16) => {
            drop(engine);
            decode_against_f16(args, device, &settings, &report, mix)?;
        }
        _ => {}
    }
    Ok(())
}

fn bench_soak(
    requests: u32,
    model: Option<&Path>,
    questions: Option<&Path>,
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
    let examples = harness::eval::read_jsonl(&questions)?;
    let engine = Engine::load(&model, device.engine_options(&WeightArgs::f16()))?;
    eprintln!("soak on {}", engine.gpu.describe());
    let label = model.display().to_string();
    let report = harness::bench::soak(&engine, &label, &examples, requests as usize, |line| {
        eprintln!("  {line}")
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    if !report.within_budget() {
        anyhow::bail!(
            "resident or GPU memory grew by more than {:.0}% (or could not be read)",
            100.0 * harness::bench::soak::MAX_GROWTH
        );
    }
    Ok(())
}

/// With --weights other than f16: the unpruned setting again with f16 language-model weights
/// (same vision weights, same process, same warm-up and repeats, no profile), and the decode
/// speed of both on stderr.
fn decode_against_f16(
    args: &BenchArgs,
    device: &DeviceArgs,
    settings: &[harness::bench::Setting],
    report: &harness::bench::PruningReport,
    format: Mix,
) -> Result<()> {
    // The same engine but for the language model's format: same depth (--layers), KV type and
    // vision weights.
    let mut options = args.engine_options(device);
    options.vision_weight_format = Some(options.vision_format(format)?.into());
    options.weight_format = Some(Mix::Uniform(WeightFormat::F16));
    let (engine, label) =
        harness::bench::load_engine(args.model.as_deref(), args.preset.as_deref(), options)?;
    eprintln!("f16 baseline: {label}");
    let none: Vec<_> = settings
        .iter()
        .filter(|s| s.label == "none")
        .cloned()
        .collect();
    let plan = harness::bench::Plan {
        warmup: report.warmup,
        repeats: report.repeats,
        decode_tokens: report.decode_tokens,
    };
    let base = harness::bench::timed_settings(&engine, &none, plan, |what| {
        eprintln!("  f16 baseline: {what}")
    })?;
    let tps = |settings: &[harness::bench::SettingResult]| {
        settings
            .iter()
            .find(|s| s.label == "none")
            .map_or(0.0, |s| s.median_decode_tokens_per_second)
    };
    let (quantized, f16) = (tps(&report.settings), tps(&base));
    eprintln!(
        "decode tokens/s without pruning: {} {quantized:.2}, f16 {f16:.2} ({:.2}x f16)",
        format.name(),
        quantized / f16
    );
    Ok(())
}

/// An output file `flag` names can be written: its directory exists and is writable, and it
/// is not a directory. Checked before any work, so a long run never fails at its end.
fn check_output_file(flag: &str, path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let writable = std::fs::metadata(dir).is_ok_and(|m| m.is_dir() && !m.permissions().readonly());
    if !writable || path.is_dir() {
        anyhow::bail!(
            "invalid argument {flag}: cannot write {} (its directory must exist and be writable)",
            path.display()
        );
    }
    Ok(())
}

impl EvalArgs {
    /// The methods, budgets and pairing asked for, checked before the model loads.
    fn sweep(&self) -> Result<harness::eval::Sweep> {
        let methods: Vec<Method> = if self.methods.is_empty() {
            harness::eval::METHODS.to_vec()
        } else {
            self.methods.iter().map(|&m| m.into()).collect()
        };
        let paired_with: Method = match self.paired_with {
            Some(method) => method.into(),
            None if methods.contains(&Method::Star) => Method::Star,
            None => methods.first().copied().unwrap_or(Method::Star),
        };
        if !methods.contains(&paired_with) {
            anyhow::bail!(
                "invalid argument --paired-with: {paired_with} is not among the methods evaluated \
                 (add it to --methods)"
            );
        }
        if let Some(path) = &self.plot {
            check_output_file("--plot", path)?;
        }
        if let Some(r) = self.important_ratio.filter(|r| !(0.0..=1.0).contains(r)) {
            anyhow::bail!("invalid argument --important-ratio: {r} is not a share in [0, 1]");
        }
        if self.keep_mass.is_empty() && (self.keep_floor.is_some() || self.adaptive_stage != 2) {
            anyhow::bail!(
                "invalid argument --keep-floor / --adaptive-stage: they set the adaptive rows, \
                 which --keep-mass asks for"
            );
        }
        if let Some(r) = self.stage1_ratio.filter(|r| !(0.0..=1.0).contains(r)) {
            anyhow::bail!("invalid argument --stage1-ratio: {r} is not a ratio in [0, 1]");
        }
        let budgets = if self.budgets.is_empty() {
            harness::eval::BUDGETS.to_vec()
        } else {
            self.budgets.clone()
        };
        Ok(harness::eval::Sweep {
            methods,
            budgets,
            positions: self.positions.into(),
            paired_with,
            masses: self.keep_mass.clone(),
            stage1_score: self.stage1_score.map(Into::into),
            important_ratio: self.important_ratio,
            merge: self.merge,
            stage1_ratio: self.stage1_ratio,
            adaptive_stage1: self.adaptive_stage == 1,
            keep_floor: self.keep_floor,
        })
    }
}

/// `eval --from-json REPORT.json --plot FILE.png`: the plot of an earlier run's report.
fn replot(report: &Path, plot: &Path) -> Result<()> {
    check_output_file("--plot", plot)?;
    let text = std::fs::read_to_string(report).with_context(|| {
        format!(
            "invalid argument --from-json: cannot read {}",
            report.display()
        )
    })?;
    let report: harness::eval::EvalReport = serde_json::from_str(&text).with_context(|| {
        format!(
            "invalid argument --from-json: {} is not an `eval --json` report",
            report.display()
        )
    })?;
    harness::plot::draw_accuracy_plot(&report.plot(), plot)?;
    eprintln!("plot: {}", plot.display());
    Ok(())
}

fn eval(args: &EvalArgs) -> Result<()> {
    if let (Some(report), Some(plot)) = (&args.from_json, &args.plot) {
        return replot(report, plot);
    }
    let model = match &args.model {
        Some(m) => m.clone(),
        None => default_model()?,
    };
    let questions = match &args.questions {
        Some(q) => q.clone(),
        None => shipped_path(DEFAULT_QUESTIONS, "--questions FILE.jsonl", None)?,
    };
    let mut examples = harness::eval::read_jsonl(&questions)?;
    if let Some(n) = args.limit {
        examples.truncate(n.max(1));
    }
    let sweep = args.sweep()?;
    let engine = Engine::load(&model, args.device.engine_options(&args.weights))?;
    let report = harness::eval::run_methods(
        &engine,
        &model.display().to_string(),
        &examples,
        &sweep,
        args.max_new_tokens,
        |line| eprintln!("  {line}"),
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    if let Some(path) = &args.plot {
        harness::plot::draw_accuracy_plot(&report.plot(), path)?;
        eprintln!("plot: {}", path.display());
    }
    if let Some(path) = &args.plot {
        harness::plot::draw_accuracy_plot(&report.plot(), path)?;
        eprintln!("plot: {}", path.display());
    }
    Ok(())
}

fn quantize(
    model: &Path,
    out: &Path,
    format: FileFormatArg,
    weights: QuantizedArg,
    vision: Option<WeightsArg>,
) -> Result<()> {
    match (format, weights) {
        (FileFormatArg::Gguf, weights) => {
            let vision = match vision.map(Mix::from) {
                None => WeightFormat::F16,
                Some(Mix::Uniform(format)) => format,
                Some(mix) => anyhow::bail!(
                    "invalid argument --vision-weights: {} is a mix for the language model",
                    mix.name()
                ),
            };
            let report = gguf::writer::write_pair(model, out, weights.into(), vision)?;
            eprintln!("{report}");
        }
        (FileFormatArg::Safetensors, QuantizedArg::Q8_0 | QuantizedArg::Q4_0) => {
            if vision.is_some() {
                anyhow::bail!("invalid argument --vision-weights: only a GGUF mmproj takes it");
            }
            let block = match weights {
                QuantizedArg::Q8_0 => WeightFormat::Q8_0,
                _ => WeightFormat::Q4_0,
            };
            let report = llava_wgpu::model::quantize::write_checkpoint(model, out, block)?;
            eprintln!("{report}");
        }
        (FileFormatArg::Safetensors, other) => anyhow::bail!(
            "invalid argument --weights: {} is written as GGUF only (--format gguf); \
             safetensors takes q8_0 or q4_0",
            llava_wgpu::model::gguf::writer::TextTypes::from(other).name()
        ),
    }
    Ok(())
}

fn main() -> ExitCode {
    quiet_mesa_without_a_session();
    let cli = Cli::parse();
    let outcome = match &cli.command {
        Command::Run(args) => run(args),
        Command::Serve(args) => cli::serve::serve(args),
        Command::Chat(args) => cli::serve::chat(args),
        Command::Devices { device, json } => devices(device, *json),
        Command::Eval(args) => eval(args),
        Command::Memory(args) => memory(args),
        Command::Quantize {
            model,
            out,
            format,
            weights,
            vision_weights,
        } => quantize(model, out, *format, *weights, *vision_weights),
        Command::Bench {
            what:
                Some(BenchCommand::Kernels {
                    repeats,
                    json,
                    only,
                    roofline,
                }),
            device,
            ..
        } => bench_kernels(device, *repeats, only, *json, roofline.as_deref()),
        Command::Bench {
            what:
                Some(BenchCommand::Soak {
                    requests,
                    model,
                    questions,
                    json,
                }),
            device,
            ..
        } => bench_soak(
            *requests,
            model.as_deref(),
            questions.as_deref(),
            *json,
            device,
        ),
        Command::Bench {
            what: Some(BenchCommand::Serve(args)),
            device,
            ..
        } => cli::serve::bench_serve(args, device),
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

#[cfg(test)]
mod tests {
    /// clap's own checks of the whole command line: no two flags share a name or short form
    /// (`-m`, `-p`, `-i`, `-n`), every default parses.
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
