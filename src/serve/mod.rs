//! `llava-wgpu serve`: an OpenAI-compatible HTTP server on axum/tokio.
//!
//! - `POST /v1/chat/completions` (`api.rs` checks the body; streaming answers are server-sent
//!   events in OpenAI's chunk format ending with `data: [DONE]`);
//! - `GET /v1/models`, `GET /health` (status and counters).
//!
//! One GPU worker thread owns the engine (`worker.rs`); handlers hand it jobs through a bounded
//! queue and answer 503 with `Retry-After` when it is full. A client that goes away sets its
//! job's cancel flag (a dropped response stream, or a dropped receiver of the worker's text),
//! which the decode loop checks before every token. SIGINT/SIGTERM stop accepting connections,
//! let the answers in flight finish, and stop the worker.

pub mod api;
mod http;
pub mod worker;

use std::net::SocketAddr;
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::model::llava::Engine;

pub use worker::Stats;

/// How the server listens and what it accepts.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub host: String,
    /// 0 picks a free port (tests).
    pub port: u16,
    /// Read `image_url`s that are local paths.
    pub allow_local_images: bool,
    /// Requests waiting for the worker at most (beyond the one it answers); more get 503.
    pub queue: usize,
    /// Request bodies larger than this get 413.
    pub max_body_bytes: usize,
    /// Conversations whose KV cache is kept for follow-ups.
    pub max_sessions: usize,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// Stop on SIGINT/SIGTERM (the command line; tests stop the server themselves).
    pub handle_signals: bool,
    /// The most images a conversation may hold.
    pub max_images: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            allow_local_images: false,
            queue: 64,
            max_body_bytes: 20 << 20,
            max_sessions: 16,
            default_max_tokens: 256,
            handle_signals: false,
            max_images: crate::generate::DEFAULT_MAX_IMAGES,
        }
    }
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    shutdown: Option<oneshot::Sender<()>>,
    http: JoinHandle<Result<()>>,
    worker: JoinHandle<()>,
}

impl Server {
    /// Bind, start the worker and the HTTP runtime, and return once connections are accepted.
    pub fn start(engine: Engine, options: ServeOptions) -> Result<Self> {
        let model = (model_name(&engine), engine.template);
        let stats = Arc::new(Stats::default());
        let (jobs, queue) = sync_channel(options.queue);
        let worker = worker::Worker::new(engine, options.max_sessions, stats.clone());
        let worker = std::thread::Builder::new()
            .name("gpu-worker".into())
            .spawn(move || worker.run(queue))
            .map_err(|e| Error::gpu("starting the GPU worker", e))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| Error::argument("serve", format!("cannot start tokio: {e}")))?;
        let address = format!("{}:{}", options.host, options.port);
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(&address))
            .map_err(|e| Error::argument("port", format!("cannot listen on {address}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::argument("port", e.to_string()))?;
        let (shutdown, stop) = oneshot::channel();
        let app = http::App::new(model, options.clone(), jobs, stats.clone());
        let http = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || runtime.block_on(http::serve(listener, app, stop, options)))
            .map_err(|e| Error::gpu("starting the HTTP thread", e))?;
        Ok(Self {
            addr,
            stats,
            shutdown: Some(shutdown),
            http,
            worker,
        })
    }

    /// Stop gracefully: no new connections, answers in flight finish, the worker stops.
    pub fn shutdown(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.join()
    }

    /// Wait until the server stops (by a signal, with `handle_signals`).
    pub fn join(self) -> Result<()> {
        let result = self
            .http
            .join()
            .unwrap_or_else(|_| Err(Error::gpu("serve", "the HTTP thread panicked")));
        // The queue's sender went with the HTTP app: the worker ends after its last job.
        let _ = self.worker.join();
        result
    }
}

/// The model's name in responses: its directory's name.
fn model_name(engine: &Engine) -> String {
    engine
        .model_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "llava".into())
}
