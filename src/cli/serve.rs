//! `serve` and `chat`: the command-line side of the engine's sessions (issue #13).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use llava_wgpu::generate::{TurnSettings, DEFAULT_MAX_IMAGES};
use llava_wgpu::harness::bench::serve::ServeReport;
use llava_wgpu::serve::{ServeOptions, Server};
use llava_wgpu::Engine;

use super::choices::{MethodArg, TemplateArg};
use crate::{default_model, BudgetArgs, DeviceArgs, SamplingArgs, WeightArgs};

#[derive(Args)]
pub struct ServeArgs {
    /// Model directory (llava-hf layout); default: the demo model in weights/tiny-llava-shapes.
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
    /// Address to listen on (loopback by default: the server has no authentication).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Accept `image_url`s that are paths of regular files under this directory (otherwise
    /// only data URLs).
    #[arg(long, value_name = "DIR")]
    allow_local_images: Option<PathBuf>,
    /// Requests that may wait for the GPU worker; more get 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Conversations whose KV cache is kept for follow-up requests.
    #[arg(long, default_value_t = 16)]
    max_sessions: usize,
    /// Largest request body accepted (bytes); larger ones get 413.
    #[arg(long, default_value_t = 20 << 20)]
    max_body_bytes: usize,
    /// The most images a conversation may hold; more get 400 too_many_images.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_IMAGES)]
    max_images: usize,
    /// Connections open at once at most; more wait to be accepted.
    #[arg(long, value_name = "N", default_value_t = 256)]
    max_connections: usize,
    /// Let pages from this origin call the server from a browser (CORS), e.g.
    /// http://localhost:3000.
    #[arg(long, value_name = "ORIGIN")]
    cors: Option<String>,
    #[command(flatten)]
    weights: WeightArgs,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
pub struct ChatArgs {
    /// Model directory (llava-hf layout) or GGUF; default: the demo model in
    /// weights/tiny-llava-shapes.
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
    /// An image the first question is about (repeat for several); `/image FILE` in the chat
    /// adds one to the next question.
    #[arg(long, short = 'i')]
    image: Vec<PathBuf>,
    /// A system message that opens every conversation.
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// Maximum number of tokens per answer.
    #[arg(short = 'n', long, default_value_t = 256)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Visual-token pruning for each conversation (`/prune` changes it).
    #[arg(long, value_enum, default_value_t = MethodArg::Star)]
    prune: MethodArg,
    #[command(flatten)]
    budgets: BudgetArgs,
    /// Prompt format (default: the one the model ships).
    #[arg(long, value_enum)]
    template: Option<TemplateArg>,
    /// The most images a conversation may hold.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_IMAGES)]
    max_images: usize,
    #[command(flatten)]
    weights: WeightArgs,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn serve(args: &ServeArgs) -> Result<()> {
    let model = match &args.model {
        Some(dir) => dir.clone(),
        None => default_model()?,
    };
    let options = ServeOptions {
        host: args.host.clone(),
        port: args.port,
        allow_local_images: args.allow_local_images.clone(),
        queue: args.queue,
        max_body_bytes: args.max_body_bytes,
        max_sessions: args.max_sessions,
        max_images: args.max_images,
        cors: args.cors.clone(),
        max_connections: args.max_connections,
        handle_signals: true,
        ..ServeOptions::default()
    };
    let engine_options = args.device.engine_options(&args.weights);
    let name = llava_wgpu::serve::model_name(&model);
    // The port is bound before the model loads: a taken port fails at once, and clients see
    // `loading` on /health meanwhile.
    let loading = model.clone();
    let server = Server::start_loading(name, options, move || {
        Engine::load(&loading, engine_options)
    })?;
    eprintln!(
        "listening on http://{} (POST /v1/chat/completions, GET /v1/models, GET /health); loading {}; Ctrl-C stops",
        server.addr,
        model.display()
    );
    server.join()?;
    eprintln!("stopped");
    Ok(())
}

pub fn chat(args: &ChatArgs) -> Result<()> {
    args.sampling.check()?;
    for image in &args.image {
        super::chat::check_image(image)
            .map_err(|e| anyhow::anyhow!("invalid argument --image: {e}"))?;
    }
    if args.image.len() > args.max_images {
        anyhow::bail!(
            "invalid argument --image: {} images given, --max-images allows {}",
            args.image.len(),
            args.max_images
        );
    }
    let model = match &args.model {
        Some(dir) => dir.clone(),
        None => default_model()?,
    };
    let mut options = args.device.engine_options(&args.weights);
    options.progress = false;
    let engine = Engine::load(&model, options)?;
    let settings = TurnSettings {
        template: args.template.map_or(engine.template, Into::into),
        max_new_tokens: args.max_new_tokens,
        sampling: args.sampling.params(),
        prune: args.budgets.options(args.prune, args.sampling.seed()),
        max_images: args.max_images,
        ..TurnSettings::default()
    };
    engine
        .check_prune(&settings.prune)
        .map_err(|e| anyhow::anyhow!(super::flags::in_flags(&e)))?;
    let start = super::chat::Start {
        images: args.image.clone(),
        system: args.system.clone(),
    };
    super::chat::run(engine, start, settings)
}

#[derive(Args)]
pub struct BenchServeArgs {
    /// Model directory; default: the demo model in weights/tiny-llava-shapes.
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
    /// The image asked about; default: the demo model's example1.png.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Conversations timed for time to first token (medians are reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    #[arg(long, default_value_t = 32)]
    clients: usize,
    #[arg(long, default_value_t = 4)]
    requests_per_client: usize,
    /// Requests of the resident-memory soak.
    #[arg(long, default_value_t = 1000)]
    soak: usize,
    /// Tokens per timed answer.
    #[arg(long, default_value_t = 8)]
    max_tokens: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn bench_serve(args: &BenchServeArgs, device: &DeviceArgs) -> Result<()> {
    use llava_wgpu::harness::bench::serve::{serve, ServeBenchOptions};
    let model = match &args.model {
        Some(dir) => dir.clone(),
        None => default_model()?,
    };
    let image = args
        .image
        .clone()
        .unwrap_or_else(|| model.join("example1.png"));
    let mut engine_options = device.engine_options(&WeightArgs::f16());
    engine_options.progress = false;
    let engine = Engine::load(&model, engine_options)?;
    let options = ServeBenchOptions {
        image,
        repeats: args.repeats,
        clients: args.clients,
        per_client: args.requests_per_client,
        soak: args.soak,
        max_tokens: args.max_tokens,
    };
    let r = serve(engine, &options)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print_serve_report(&r, args);
    }
    check_serve_report(&r)
}

/// The goals `bench serve` checks: no request lost, and memory flat over the soak.
fn check_serve_report(r: &ServeReport) -> Result<()> {
    let gpu_growth = r.gpu_growth_percent.unwrap_or(0.0);
    if r.lost > 0 || r.resident_growth_percent > MAX_SOAK_GROWTH || gpu_growth > MAX_SOAK_GROWTH {
        anyhow::bail!(
            "bench serve: {} requests lost, resident memory {:+.2}%, GPU bytes {:+.2}% over the soak (allowed: none lost, {MAX_SOAK_GROWTH}% growth)",
            r.lost,
            r.resident_growth_percent,
            gpu_growth
        );
    }
    Ok(())
}

/// Growth of resident memory or GPU bytes over the soak that counts as a leak, in percent.
const MAX_SOAK_GROWTH: f64 = 1.0;

fn print_serve_report(r: &ServeReport, args: &BenchServeArgs) {
    println!(
        "time to first token (client-side, median of {}):",
        args.repeats
    );
    println!(
        "  first turn (new image)      {:9.1} ms",
        r.ttft_first_turn_ms
    );
    println!(
        "  follow-up turn              {:9.1} ms  ({:.2}x faster)",
        r.ttft_follow_up_ms, r.follow_up_speedup
    );
    println!(
        "  new conversation, cached    {:9.1} ms  ({:.2}x faster)",
        r.ttft_cached_image_ms, r.cached_image_speedup
    );
    println!(
        "{} concurrent requests ({} clients x {}): {} answered, {} refused (503), {} lost",
        r.concurrent_requests,
        args.clients,
        args.requests_per_client,
        r.answered,
        r.refused_503,
        r.lost
    );
    println!(
        "resident memory from request {} to {}: {} -> {} bytes ({:+.2}%); GPU bytes alive: {} -> {} ({})",
        r.soak_first_reading_at,
        r.soak_requests,
        r.resident_bytes_start,
        r.resident_bytes_end,
        r.resident_growth_percent,
        r.gpu_bytes_start.map_or("?".to_string(), |b| b.to_string()),
        r.gpu_bytes_end.map_or("?".to_string(), |b| b.to_string()),
        r.gpu_growth_percent
            .map_or("?".to_string(), |g| format!("{g:+.2}%")),
    );
}
