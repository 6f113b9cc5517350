//! `llava-wgpu serve`: an OpenAI-compatible HTTP server on axum/tokio.
//!
//! - `POST /v1/chat/completions` (`api.rs` checks the body; streaming answers are server-sent
//!   events in OpenAI's chunk format ending with `data: [DONE]`);
//! - `GET /v1/models`, `GET /v1/models/{id}`, `GET /health` (status and counters; `loading`
//!   while the model loads, after the port is bound);
//! - every other path or method: a JSON error body (404, 405); `--cors ORIGIN` adds CORS
//!   headers for one origin.
//!
//! One GPU worker thread owns the engine (`worker.rs`); handlers hand it jobs through a bounded
//! queue and answer 503 with `Retry-After` when it is full. A client that goes away sets its
//! job's cancel flag (a dropped response stream, or a dropped receiver of the worker's text),
//! which the decode loop checks before every token. SIGINT/SIGTERM stop accepting connections,
//! let the answers in flight finish, and stop the worker.

pub mod api;
mod connections;
mod http;
pub mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use tokio::sync::Notify;

use crate::error::{Error, Result};
use crate::model::llava::Engine;

pub use worker::Stats;

/// How the server listens and what it accepts.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub host: String,
    /// 0 picks a free port (tests).
    pub port: u16,
    /// Read `image_url`s that are paths of regular files under this directory.
    pub allow_local_images: Option<PathBuf>,
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
    /// The origin browsers may call the server from (CORS), if any.
    pub cors: Option<String>,
    /// Connections open at once at most; more wait to be accepted.
    pub max_connections: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            allow_local_images: None,
            queue: 64,
            max_body_bytes: 20 << 20,
            max_sessions: 16,
            default_max_tokens: 256,
            handle_signals: false,
            max_images: crate::generate::DEFAULT_MAX_IMAGES,
            cors: None,
            max_connections: 256,
        }
    }
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    stop: Arc<Notify>,
    http: JoinHandle<Result<()>>,
    worker: JoinHandle<Result<()>>,
}

impl Server {
    /// Bind, start the worker and the HTTP runtime, and return once connections are accepted.
    pub fn start(engine: Engine, options: ServeOptions) -> Result<Self> {
        // Ready before the first connection: the engine is loaded already.
        let ready = Arc::new(OnceLock::from(engine.template));
        let name = model_name(&engine.model_dir);
        Self::launch(name, options, ready, move || Ok(engine))
    }

    /// Bind first, then load the model with `load` on the GPU worker's thread: the port is
    /// taken (or its error reported) at once, and `/health` says `loading` (chat requests get
    /// 503) until the engine is ready. A failed load stops the server; [`Server::join`] returns
    /// its error.
    pub fn start_loading(
        model: String,
        options: ServeOptions,
        load: impl FnOnce() -> Result<Engine> + Send + 'static,
    ) -> Result<Self> {
        Self::launch(model, options, Arc::new(OnceLock::new()), load)
    }

    /// Bind, then start the GPU worker (which runs `load` and sets `ready` to the model's
    /// prompt format once it has the engine) and the HTTP runtime.
    fn launch(
        model: String,
        mut options: ServeOptions,
        ready: Arc<OnceLock<crate::text::Template>>,
        load: impl FnOnce() -> Result<Engine> + Send + 'static,
    ) -> Result<Self> {
        if let Some(dir) = &options.allow_local_images {
            options.allow_local_images = Some(image_directory(dir)?);
        }
        let stats = Arc::new(Stats::default());
        let (jobs, queue) = sync_channel(options.queue);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| Error::argument("serve", format!("cannot start tokio: {e}")))?;
        let listener = runtime.block_on(bind(&options.host, options.port))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::argument("port", e.to_string()))?;
        let stop = Arc::new(Notify::new());
        let worker = {
            let (stats, ready, stop) = (stats.clone(), ready.clone(), stop.clone());
            let max_sessions = options.max_sessions;
            std::thread::Builder::new()
                .name("gpu-worker".into())
                .spawn(move || {
                    let engine = load().inspect_err(|_| stop.notify_one())?;
                    let _ = ready.set(engine.template);
                    worker::Worker::new(engine, max_sessions, stats).run(queue);
                    Ok(())
                })
                .map_err(|e| Error::gpu("starting the GPU worker", e))?
        };
        let app = http::App::new((model, ready), options.clone(), jobs, stats.clone());
        let http = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("http".into())
                .spawn(move || runtime.block_on(http::serve(listener, app, stop, options)))
                .map_err(|e| Error::gpu("starting the HTTP thread", e))?
        };
        Ok(Self {
            addr,
            stats,
            stop,
            http,
            worker,
        })
    }

    /// Stop gracefully: no new connections, answers in flight finish, the worker stops.
    pub fn shutdown(self) -> Result<()> {
        self.stop.notify_one();
        self.join()
    }

    /// Wait until the server stops (by a signal, with `handle_signals`, or a failed load).
    pub fn join(self) -> Result<()> {
        let result = self
            .http
            .join()
            .unwrap_or_else(|_| Err(Error::gpu("serve", "the HTTP thread panicked")));
        // The queue's sender went with the HTTP app: the worker ends after its last job.
        let loaded = self
            .worker
            .join()
            .unwrap_or_else(|_| Err(Error::gpu("serve", "the GPU worker panicked")));
        loaded.and(result)
    }
}

/// The canonical form of `--allow-local-images`' directory (image paths are checked to lie
/// under it once their links are resolved).
fn image_directory(dir: &std::path::Path) -> Result<PathBuf> {
    let fail = |reason: String| {
        Error::argument("allow_local_images", format!("{}: {reason}", dir.display()))
    };
    let real = dir.canonicalize().map_err(|e| fail(e.to_string()))?;
    if !real.is_dir() {
        return Err(fail("not a directory".into()));
    }
    Ok(real)
}

/// Listen on `host`:`port`. An error names the argument at fault: the host when it does not
/// resolve or is no address of this machine, the port when it is taken or not allowed.
async fn bind(host: &str, port: u16) -> Result<tokio::net::TcpListener> {
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| Error::argument("host", format!("cannot resolve '{host}': {e}")))?
        .collect();
    let Some(&address) = addresses.first() else {
        return Err(Error::argument("host", format!("'{host}' has no address")));
    };
    tokio::net::TcpListener::bind(address).await.map_err(|e| {
        let field = match e.kind() {
            std::io::ErrorKind::AddrNotAvailable => "host",
            _ => "port",
        };
        Error::argument(field, format!("cannot listen on {address}: {e}"))
    })
}

/// The model's name in responses: its directory's (or file's) name.
pub fn model_name(model: &std::path::Path) -> String {
    model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "llava".into())
}
