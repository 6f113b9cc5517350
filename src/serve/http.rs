//! The HTTP side: routes, reading bodies within the limit, handing jobs to the worker, and
//! turning its events into a JSON answer or a stream of server-sent events.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::sync::Notify;
use tokio_stream::Stream;
use tower_http::cors::CorsLayer;

use crate::error::{Error, Result};
use crate::generate::ImageFrom;
use crate::text::Template;

use super::api::{self, ApiError, ChatRequest, Policy};
use super::connections::LimitedListener;
use super::worker::{Event, Finished, Job, Stats};
use super::ServeOptions;

pub struct App {
    model: String,
    /// The model's prompt format, set once the GPU worker has loaded the engine.
    ready: Arc<OnceLock<Template>>,
    options: ServeOptions,
    jobs: SyncSender<Job>,
    stats: Arc<Stats>,
    ids: AtomicU64,
}

impl App {
    pub fn new(
        (model, ready): (String, Arc<OnceLock<Template>>),
        options: ServeOptions,
        jobs: SyncSender<Job>,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            model,
            ready,
            options,
            jobs,
            stats,
            ids: AtomicU64::new(0),
        }
    }
}

type Shared = Arc<App>;

/// Serve until `stop` is notified (or a signal, with `options.handle_signals`), then let open
/// connections finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: App,
    stop: Arc<Notify>,
    options: ServeOptions,
) -> Result<()> {
    let mut router = Router::new()
        .route(
            "/v1/chat/completions",
            post(chat).fallback(method_not_allowed),
        )
        .route("/v1/models", get(models).fallback(method_not_allowed))
        .route("/v1/models/{id}", get(model).fallback(method_not_allowed))
        .route("/health", get(health).fallback(method_not_allowed))
        .fallback(not_found)
        .with_state(Arc::new(app));
    if let Some(origin) = &options.cors {
        router = router.layer(cors(origin)?);
    }
    let shutdown = async move {
        if options.handle_signals {
            tokio::select! {
                _ = stop.notified() => {}
                _ = signal() => eprintln!("shutting down: finishing the answers in flight"),
            }
        } else {
            stop.notified().await;
        }
    };
    let listener = LimitedListener::new(listener, options.max_connections);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::argument("serve", format!("the server stopped: {e}")))
}

/// CORS for one origin: the methods and headers an OpenAI client in a browser sends.
fn cors(origin: &str) -> Result<CorsLayer> {
    let origin = header::HeaderValue::from_str(origin).map_err(|_| {
        Error::argument(
            "cors",
            format!("'{origin}' is not a valid origin header value"),
        )
    })?;
    Ok(CorsLayer::new()
        .allow_origin(origin)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION]))
}

async fn not_found(request: Request) -> Response {
    error_response(&ApiError {
        status: 404,
        message: format!("no route for {} {}", request.method(), request.uri().path()),
        kind: "invalid_request_error",
        param: None,
        code: Some("not_found"),
    })
}

async fn method_not_allowed(request: Request) -> Response {
    error_response(&ApiError {
        status: 405,
        message: format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
        kind: "invalid_request_error",
        param: None,
        code: Some("method_not_allowed"),
    })
}

/// SIGINT or SIGTERM.
async fn signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, axum::Json(e.body())).into_response();
    if e.status == 503 {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    response
}

fn model_object(app: &App) -> Value {
    json!({"id": app.model, "object": "model", "created": 0, "owned_by": "llava-wgpu"})
}

async fn models(State(app): State<Shared>) -> Response {
    axum::Json(json!({"object": "list", "data": [model_object(&app)]})).into_response()
}

async fn model(State(app): State<Shared>, Path(id): Path<String>) -> Response {
    if id != app.model {
        return error_response(&ApiError {
            status: 404,
            message: format!(
                "the model '{id}' does not exist: this server serves '{}'",
                app.model
            ),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        });
    }
    axum::Json(model_object(&app)).into_response()
}

/// `ok` once the model is loaded; until then `loading`, with status 503.
async fn health(State(app): State<Shared>) -> Response {
    let s = &app.stats;
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
    if app.ready.get().is_none() {
        let body = json!({"status": "loading", "model": app.model});
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    }
    axum::Json(json!({
        "status": "ok",
        "model": app.model,
        "queued": n(&s.queued),
        "completed": n(&s.completed),
        "failed": n(&s.failed),
        "cancelled": n(&s.cancelled),
        "session_hits": n(&s.session_hits),
        "resident_bytes": resident_bytes(),
        "gpu_live_bytes": n(&s.gpu_live_bytes),
    }))
    .into_response()
}

/// The process's resident set in bytes (Linux: /proc/self/statm; None elsewhere).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// The body, refused with 413 past the limit (by its Content-Length, or as it arrives).
async fn read_body(request: Request, limit: usize) -> std::result::Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::bad_request(
            None,
            format!("the request body is larger than the {limit}-byte limit"),
        )
        .with_status(413)
        .with_code("body_too_large")
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|_| too_large())
}

/// Sets the job's cancel flag when dropped before the answer ended (the client went away).
struct CancelOnDrop {
    cancel: Arc<AtomicBool>,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.cancel.store(true, Ordering::Relaxed);
        }
    }
}

async fn chat(State(app): State<Shared>, request: Request) -> Response {
    let Some(&template) = app.ready.get() else {
        return error_response(&ApiError {
            status: 503,
            message: "the model is still loading; retry shortly".into(),
            kind: "server_error",
            param: None,
            code: Some("model_loading"),
        });
    };
    let policy = Policy {
        allow_local_images: app.options.allow_local_images.clone(),
        default_max_tokens: app.options.default_max_tokens,
        template,
        max_images: app.options.max_images,
    };
    let parsed = match read_body(request, app.options.max_body_bytes).await {
        // Parsing reads local images (with --allow-local-images): off the async threads, and
        // before the queue, so a slow file never holds up the GPU worker.
        Ok(body) => tokio::task::spawn_blocking(move || api::parse(&body, &policy))
            .await
            .unwrap_or_else(|_| Err(worker_gone())),
        Err(e) => Err(e),
    };
    let request = match parsed {
        Ok(r) => r,
        Err(e) => return error_response(&e),
    };
    let (mut rx, mut guard) = match enqueue(&app, &request) {
        Ok(queued) => queued,
        Err(e) => return error_response(&e),
    };
    let meta = Meta::new(&app, &request);
    // Wait for the first event so that a request the model refuses gets its status code.
    let first = match rx.recv().await {
        Some(Event::Failed(e)) => {
            guard.armed = false;
            return error_response(&e);
        }
        Some(event) => event,
        None => return error_response(&worker_gone()),
    };
    if request.stream {
        return stream_response(meta, first, rx, guard);
    }
    let mut event = first;
    loop {
        match event {
            Event::Text(_) => {}
            Event::Done(finished) => {
                guard.armed = false;
                return axum::Json(meta.completion(&finished)).into_response();
            }
            Event::Failed(e) => {
                guard.armed = false;
                return error_response(&e);
            }
        }
        event = match rx.recv().await {
            Some(e) => e,
            None => return error_response(&worker_gone()),
        };
    }
}

/// Hand `request` to the GPU worker's queue: the receiver of its events and the guard that
/// cancels it if the client goes away, or 503 when the queue is full.
fn enqueue(
    app: &App,
    request: &ChatRequest,
) -> std::result::Result<(UnboundedReceiver<Event>, CancelOnDrop), ApiError> {
    let (events, rx) = unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let job = Job {
        conversation: request.conversation.clone(),
        settings: request.settings.clone(),
        stop: request.stop.clone(),
        top_logprobs: request.logprobs.unwrap_or(0),
        cancel: cancel.clone(),
        events,
    };
    app.stats.queued.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = app.jobs.try_send(job) {
        app.stats.queued.fetch_sub(1, Ordering::Relaxed);
        let message = match e {
            TrySendError::Full(_) => "the server is busy: the queue is full, retry shortly",
            TrySendError::Disconnected(_) => "the server is shutting down",
        };
        return Err(ApiError {
            status: 503,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: Some("overloaded"),
        });
    }
    let guard = CancelOnDrop {
        cancel,
        armed: true,
    };
    Ok((rx, guard))
}

fn worker_gone() -> ApiError {
    ApiError {
        status: 500,
        message: "the GPU worker stopped before answering".into(),
        kind: "server_error",
        param: None,
        code: None,
    }
}

/// What every response of one request repeats.
struct Meta {
    id: String,
    created: u64,
    model: String,
    logprobs: Option<usize>,
    stream_usage: bool,
}

impl Meta {
    fn new(app: &App, request: &ChatRequest) -> Self {
        Self {
            id: format!("chatcmpl-{}", app.ids.fetch_add(1, Ordering::Relaxed)),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: app.model.clone(),
            logprobs: request.logprobs,
            stream_usage: request.stream_usage,
        }
    }

    fn completion(&self, f: &Finished) -> Value {
        let logprobs = self.logprobs.and(f.logprobs.clone());
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": f.text},
                "logprobs": logprobs,
                "finish_reason": f.finish_reason,
            }],
            "usage": usage(f),
            "visual_tokens": f.output.visual_tokens,
            "llava": extension(f),
        })
    }

    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
        })
    }
}

fn usage(f: &Finished) -> Value {
    let (prompt, completion) = (f.output.prompt_tokens, f.output.generated_ids.len());
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The server's own report on a turn: where each image's rows came from and how much of the
/// conversation's KV cache was reused.
fn extension(f: &Finished) -> Value {
    let from = |image: &ImageFrom| match image {
        ImageFrom::Encoder => "encoder",
        ImageFrom::Cache => "image_cache",
        ImageFrom::Session => "session",
    };
    let images: Vec<&str> = f.output.turn.images.iter().map(from).collect();
    json!({
        "images": images,
        "reused_tokens": f.output.turn.reused_tokens,
        "timings_ms": f.output.timings_ms,
    })
}

/// The server-sent events of a streamed answer: a role chunk, a chunk per text piece, a last
/// chunk with the finish reason, optionally a usage chunk, then `[DONE]`.
struct EventStream {
    meta: Meta,
    pending: VecDeque<Bytes>,
    rx: UnboundedReceiver<Event>,
    guard: CancelOnDrop,
    done: bool,
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

fn stream_response(
    meta: Meta,
    first: Event,
    rx: UnboundedReceiver<Event>,
    guard: CancelOnDrop,
) -> Response {
    let role = sse(&meta.chunk(json!({"role": "assistant", "content": ""}), None));
    let mut stream = EventStream {
        meta,
        pending: VecDeque::from([role]),
        rx,
        guard,
        done: false,
    };
    stream.take(first);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| error_response(&worker_gone()))
}

impl EventStream {
    /// Queue the events `event` sends (in order).
    fn take(&mut self, event: Event) {
        match event {
            Event::Text(piece) => {
                let chunk = self.meta.chunk(json!({"content": piece}), None);
                self.pending.push_back(sse(&chunk));
            }
            Event::Done(finished) => {
                let mut last = self.meta.chunk(json!({}), Some(finished.finish_reason));
                last["visual_tokens"] = json!(finished.output.visual_tokens);
                last["llava"] = extension(&finished);
                self.pending.push_back(sse(&last));
                if self.meta.stream_usage {
                    let mut chunk = self.meta.chunk(json!({}), None);
                    chunk["choices"] = json!([]);
                    chunk["usage"] = usage(&finished);
                    self.pending.push_back(sse(&chunk));
                }
                self.finish();
            }
            Event::Failed(e) => {
                self.pending.push_back(sse(&e.body()));
                self.finish();
            }
        }
    }

    fn finish(&mut self) {
        self.pending
            .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        self.guard.armed = false;
        self.done = true;
    }
}

impl Stream for EventStream {
    type Item = std::result::Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(bytes) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(bytes)));
            }
            if self.done {
                return Poll::Ready(None);
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(event)) => {
                    self.take(event);
                }
                Poll::Ready(None) => {
                    let e = worker_gone();
                    self.take(Event::Failed(e));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
