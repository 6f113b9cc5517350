//! `serve` and `chat`: the command-line side of the engine's sessions (issue #13).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use llava_wgpu::generate::TurnSettings;
use llava_wgpu::prune::PruneOptions;
use llava_wgpu::serve::{ServeOptions, Server};
use llava_wgpu::Engine;

use super::choices::{MethodArg, WeightsArg};
use crate::{default_model, DeviceArgs};

#[derive(Args)]
pub struct ServeArgs {
    /// Model directory (llava-hf layout); default: the demo model in weights/tiny-llava-shapes.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Address to listen on (loopback by default: the server has no authentication).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Accept `image_url`s that are paths on this machine (otherwise only data URLs).
    #[arg(long)]
    allow_local_images: bool,
    /// Requests that may wait for the GPU worker; more get 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Conversations whose KV cache is kept for follow-up requests.
    #[arg(long, default_value_t = 16)]
    max_sessions: usize,
    /// Largest request body accepted (bytes); larger ones get 413.
    #[arg(long, default_value_t = 20 << 20)]
    max_body_bytes: usize,
    /// Weight format on the GPU.
    #[arg(long, value_enum, default_value_t = WeightsArg::F16)]
    weights: WeightsArg,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
pub struct ChatArgs {
    /// Model directory (llava-hf layout); default: the demo model in weights/tiny-llava-shapes.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The image to talk about (or `/image FILE` in the chat).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Maximum number of tokens per answer.
    #[arg(short = 'n', long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Visual-token pruning for each conversation (`/prune` changes it).
    #[arg(long, value_enum, default_value_t = MethodArg::Star)]
    prune: MethodArg,
    /// Weight format on the GPU.
    #[arg(long, value_enum, default_value_t = WeightsArg::F16)]
    weights: WeightsArg,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn serve(args: &ServeArgs) -> Result<()> {
    let model = match &args.model {
        Some(dir) => dir.clone(),
        None => default_model()?,
    };
    let engine = Engine::load(&model, args.device.engine_options(args.weights.into()))?;
    let options = ServeOptions {
        host: args.host.clone(),
        port: args.port,
        allow_local_images: args.allow_local_images,
        queue: args.queue,
        max_body_bytes: args.max_body_bytes,
        max_sessions: args.max_sessions,
        handle_signals: true,
        ..ServeOptions::default()
    };
    let server = Server::start(engine, options)?;
    eprintln!(
        "serving {} on http://{} (POST /v1/chat/completions, GET /v1/models, GET /health); Ctrl-C stops",
        model.display(),
        server.addr
    );
    server.join()?;
    eprintln!("stopped");
    Ok(())
}

pub fn chat(args: &ChatArgs) -> Result<()> {
    let model = match &args.model {
        Some(dir) => dir.clone(),
        None => default_model()?,
    };
    let mut options = args.device.engine_options(args.weights.into());
    options.progress = false;
    let engine = Engine::load(&model, options)?;
    let settings = TurnSettings {
        max_new_tokens: args.max_new_tokens,
        prune: PruneOptions {
            method: args.prune.into(),
            ..PruneOptions::default()
        },
        ..TurnSettings::default()
    };
    super::chat::run(engine, args.image.clone(), settings)
}
