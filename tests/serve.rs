//! The OpenAI-compatible server on a loopback port, driven over HTTP.
//!
//! References: answers are compared with `Engine::generate` (what `run` prints) on a second
//! engine loaded in this process; streamed chunks must concatenate to the non-streamed text; a
//! follow-up must equal a one-shot run of the whole conversation (no pruning). Bad requests are
//! checked for their status and OpenAI's error shape, and the server must keep answering after
//! them. A disconnect is observed through the `cancelled` counter of `/health`, not by timing.

mod fixture;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use llava_wgpu::prune::{Method, PruneOptions};
use llava_wgpu::serve::{ServeOptions, Server};
use llava_wgpu::text::Template;
use llava_wgpu::{Engine, EngineOptions, GenerateRequest};

fn demo_dir() -> PathBuf {
    fixture::private_runtime_dir();
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/tiny-llava-shapes")
}

fn load() -> Engine {
    Engine::load(&demo_dir(), EngineOptions::default()).expect("demo model loads")
}

const BODY_LIMIT: usize = 1 << 20;
const CORS_ORIGIN: &str = "http://localhost:3000";

/// One server for the tests that share it (ephemeral port, loopback only).
fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let options = ServeOptions {
            port: 0,
            max_body_bytes: BODY_LIMIT,
            cors: Some(CORS_ORIGIN.into()),
            ..ServeOptions::default()
        };
        Server::start(load(), options).expect("server starts")
    })
}

/// The engine the server's answers are compared with.
fn reference() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(load)
}

fn url(server: &Server, path: &str) -> String {
    format!("http://{}{path}", server.addr)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into()
}

/// POST a body; the status and the parsed JSON answer.
fn post(server: &Server, body: &str) -> (u16, Value) {
    let mut response = agent()
        .post(&url(server, "/v1/chat/completions"))
        .header("Content-Type", "application/json")
        .send(body)
        .expect("the server answers");
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

fn health(server: &Server) -> Value {
    let mut response = agent().get(&url(server, "/health")).call().unwrap();
    serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap()
}

fn data_url(image: &str) -> String {
    let bytes = std::fs::read(demo_dir().join(image)).unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn user_with_image(image: &str, text: &str) -> Value {
    json!({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(image)}},
        {"type": "text", "text": text},
    ]})
}

fn one_shot(
    prompt: &str,
    image: &str,
    max_new: usize,
    prune: PruneOptions,
) -> llava_wgpu::GenerateOutput {
    let mut request = GenerateRequest::new(demo_dir().join(image), prompt);
    request.max_new_tokens = max_new;
    request.prune = prune;
    reference().generate(&request, |_| {}).unwrap()
}

fn content(v: &Value) -> &str {
    v["choices"][0]["message"]["content"].as_str().unwrap()
}

#[test]
fn answers_equal_run_and_streams_concatenate_to_them() {
    let server = server();
    let star = PruneOptions {
        method: Method::Star,
        keep: Some(40),
        stage2_layer: Some(2),
        ..PruneOptions::default()
    };
    let body = json!({
        "model": "tiny-llava-shapes",
        "messages": [user_with_image("example1.png", "Which shape is green?")],
        "max_tokens": 8,
        "temperature": 0,
        "prune": {"method": "star", "keep": 40, "stage2_layer": 2},
    });
    let (status, answer) = post(server, &body.to_string());
    assert_eq!(status, 200, "{answer}");
    let run = one_shot("Which shape is green?", "example1.png", 8, star);
    assert_eq!(content(&answer), run.text);
    assert_eq!(answer["usage"]["prompt_tokens"], run.prompt_tokens);
    assert_eq!(
        answer["usage"]["completion_tokens"],
        run.generated_ids.len()
    );
    assert_eq!(answer["visual_tokens"]["after_stage2"], 40);
    assert_eq!(
        answer["visual_tokens"]["after_stage1"],
        run.visual_tokens.after_stage1
    );
    assert_eq!(answer["object"], "chat.completion");

    // The same request streamed.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let response = agent()
        .post(&url(server, "/v1/chat/completions"))
        .header("Content-Type", "application/json")
        .send(&streamed.to_string())
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let reader = BufReader::new(response.into_body().into_reader());
    let mut text = String::new();
    let mut events = Vec::new();
    for line in reader.lines() {
        let line = line.unwrap();
        if let Some(data) = line.strip_prefix("data: ") {
            events.push(data.to_string());
        }
    }
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    for chunk in &chunks {
        assert!(chunk["object"] == "chat.completion.chunk", "{chunk}");
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(piece);
        }
    }
    assert_eq!(text, content(&answer));
    let finish = chunks
        .iter()
        .find(|c| !c["choices"][0]["finish_reason"].is_null());
    assert_eq!(
        finish.unwrap()["choices"][0]["finish_reason"],
        answer["choices"][0]["finish_reason"]
    );
    assert_eq!(chunks.last().unwrap()["usage"], answer["usage"]);
}

#[test]
fn a_follow_up_reuses_the_session_and_equals_a_run_of_the_whole_conversation() {
    let server = server();
    let first = json!({
        "messages": [user_with_image("example2.png", "Which shape is green?")],
        "max_tokens": 6,
        "prune": {"method": "none"},
    });
    let (status, a1) = post(server, &first.to_string());
    assert_eq!(status, 200, "{a1}");
    assert_eq!(a1["llava"]["images"], json!(["encoder"]));
    let follow = json!({
        "messages": [
            user_with_image("example2.png", "Which shape is green?"),
            {"role": "assistant", "content": content(&a1)},
            {"role": "user", "content": "How many objects are in the image?"},
        ],
        "max_tokens": 6,
        "prune": {"method": "none"},
    });
    let (status, a2) = post(server, &follow.to_string());
    assert_eq!(status, 200, "{a2}");
    assert_eq!(a2["llava"]["images"], json!(["session"]));
    assert!(
        a2["llava"]["reused_tokens"].as_u64().unwrap()
            >= a1["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    let whole = Template::LlavaHf
        .render_conversation(
            &[
                llava_wgpu::text::Message::with_images(
                    llava_wgpu::text::Role::User,
                    "Which shape is green?",
                    1,
                ),
                llava_wgpu::text::Message::new(llava_wgpu::text::Role::Assistant, content(&a1)),
                llava_wgpu::text::Message::new(
                    llava_wgpu::text::Role::User,
                    "How many objects are in the image?",
                ),
            ],
            "<image>",
        )
        .unwrap();
    let mut request = GenerateRequest::new(demo_dir().join("example2.png"), whole);
    request.template = Template::Raw;
    request.max_new_tokens = 6;
    let run = reference().generate(&request, |_| {}).unwrap();
    assert_eq!(content(&a2), run.text);
    assert_eq!(a2["usage"]["prompt_tokens"], run.prompt_tokens);

    // A new conversation about the same image: the projector output comes from the cache.
    let (status, a3) = post(server, &first.to_string());
    assert_eq!(status, 200);
    assert_eq!(a3["llava"]["images"], json!(["image_cache"]));
    assert_eq!(content(&a3), content(&a1));
}

/// A question with no image is answered by the language model alone; two images in one
/// message each get their rows; both equal a one-shot run with the same images.
#[test]
fn text_only_and_two_image_requests_equal_one_shot_runs() {
    let server = server();
    let question = "Which color does the cross have?";
    for images in [vec![], vec!["example1.png", "example3.png"]] {
        let mut parts: Vec<Value> = images
            .iter()
            .map(|i| json!({"type": "image_url", "image_url": {"url": data_url(i)}}))
            .collect();
        parts.push(json!({"type": "text", "text": question}));
        let body = json!({
            "messages": [{"role": "user", "content": parts}],
            "max_tokens": 6,
            "prune": {"method": "none"},
        });
        let (status, answer) = post(server, &body.to_string());
        assert_eq!(status, 200, "{answer}");
        assert_eq!(
            answer["llava"]["images"],
            json!(vec!["encoder"; images.len()])
        );
        let paths = images.iter().map(|i| demo_dir().join(i)).collect();
        let mut request = GenerateRequest::with_images(paths, question);
        request.max_new_tokens = 6;
        let run = reference().generate(&request, |_| {}).unwrap();
        assert_eq!(content(&answer), run.text, "{} images", images.len());
        assert_eq!(answer["usage"]["prompt_tokens"], run.prompt_tokens);
    }
}

/// (name, body, status, param it must name)
type BadRequest = (&'static str, String, u16, Option<&'static str>);

/// Every bad request the server must refuse: bodies and settings, then content and images.
fn bad_requests() -> Vec<BadRequest> {
    let mut all = bad_settings();
    all.extend(bad_content());
    all
}

/// Bodies that are not the API, and settings it refuses.
fn bad_settings() -> Vec<BadRequest> {
    let image = user_with_image("example1.png", "Which shape is green?");
    let with = |extra: Value| {
        let mut body = json!({"messages": [image.clone()], "max_tokens": 2});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body.to_string()
    };
    vec![
        ("malformed JSON", "{\"messages\": [".to_string(), 400, None),
        ("not a JSON object", "[1, 2]".to_string(), 400, None),
        ("n > 1", with(json!({"n": 2})), 400, Some("n")),
        (
            "impossible budget",
            with(json!({"prune": {"method": "star", "keep": 5000}})),
            422,
            Some("prune.keep"),
        ),
        (
            "tools",
            with(json!({"tools": [{"type": "function", "function": {"name": "f"}}]})),
            400,
            Some("tools"),
        ),
        (
            "JSON mode",
            with(json!({"response_format": {"type": "json_object"}})),
            400,
            Some("response_format"),
        ),
        (
            "unknown prune field",
            with(json!({"prune": {"kep": 3}})),
            400,
            Some("prune.kep"),
        ),
        (
            "merge that is not a boolean",
            with(json!({"prune": {"method": "star", "merge": "yes"}})),
            400,
            Some("prune.merge"),
        ),
        (
            "merge without a selection before the projector",
            with(json!({"prune": {"method": "fastv", "merge": true}})),
            422,
            Some("prune.merge"),
        ),
        (
            "temperature out of range",
            with(json!({"temperature": 7})),
            400,
            Some("temperature"),
        ),
    ]
}

/// Content parts and images the server refuses.
fn bad_content() -> Vec<BadRequest> {
    let not_image = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(b"this is not a picture at all")
    );
    let part = |p: Value| {
        json!({"messages": [{"role": "user", "content": [p, {"type": "text", "text": "hi"}]}]})
            .to_string()
    };
    vec![
        (
            "unknown content part",
            part(json!({"type": "input_audio", "input_audio": {}})),
            400,
            Some("messages[0].content[0].type"),
        ),
        (
            "http image URL",
            part(json!({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}})),
            400,
            Some("messages[0].content[0].image_url.url"),
        ),
        (
            "local path without --allow-local-images",
            part(json!({"type": "image_url", "image_url": {"url": "/etc/passwd"}})),
            400,
            Some("messages[0].content[0].image_url.url"),
        ),
        (
            "gif data URL",
            part(json!({"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0lG"}})),
            400,
            Some("messages[0].content[0].image_url.url"),
        ),
        (
            "not an image",
            part(json!({"type": "image_url", "image_url": {"url": not_image}})),
            400,
            Some("messages[0].content[0].image_url"),
        ),
        (
            "an image in an assistant message",
            json!({"messages": [
                {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_url("example1.png")}}]},
                {"role": "user", "content": "hi"},
            ]})
            .to_string(),
            400,
            Some("messages[0].content"),
        ),
        (
            "more images than --max-images",
            json!({"messages": [{"role": "user", "content": vec![json!({"type": "image_url", "image_url": {"url": data_url("example1.png")}}); 9]}]})
                .to_string(),
            400,
            Some("messages"),
        ),
    ]
}

/// POST over a raw socket, ignoring a failed write: a server may answer (and close) before it
/// has read a body it refuses.
fn post_raw(server: &Server, body: &str) -> (u16, Value) {
    let mut socket = TcpStream::connect(server.addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = socket.write_all(head.as_bytes());
    let _ = socket.write_all(body.as_bytes());
    let mut answer = Vec::new();
    let _ = socket.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer[9..12].parse().unwrap();
    let json = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(json).unwrap_or(Value::Null))
}

#[test]
fn every_bad_request_gets_its_status_and_the_server_keeps_serving() {
    let server = server();
    for (name, body, status, param) in bad_requests() {
        let (got, answer) = post(server, &body);
        assert_eq!(got, status, "{name}: {answer}");
        let error = &answer["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}: {answer}"
        );
        assert!(error["type"].is_string(), "{name}: {answer}");
        assert!(
            error.get("code").is_some() && error.get("param").is_some(),
            "{name}: {answer}"
        );
        if let Some(param) = param {
            assert_eq!(error["param"], param, "{name}: {answer}");
        }
    }
    let huge = json!({"messages": [], "padding": "x".repeat(BODY_LIMIT)}).to_string();
    let (status, answer) = post_raw(server, &huge);
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["error"]["code"], "body_too_large");
    let good = json!({"messages": [user_with_image("example3.png", "What is in the image?")], "max_tokens": 3});
    let (status, answer) = post(server, &good.to_string());
    assert_eq!(status, 200, "{answer}");
    let mut models = agent().get(&url(server, "/v1/models")).call().unwrap();
    let models: Value = serde_json::from_str(&models.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-llava-shapes");
}

#[test]
fn a_client_that_disconnects_cancels_its_generation() {
    let server = server();
    let before = health(server)["cancelled"].as_u64().unwrap();
    let body = json!({
        "messages": [user_with_image("example1.png", "What is in the image?")],
        "max_tokens": 900,
        "ignore_eos": true,
        "stream": true,
    })
    .to_string();
    let mut socket = TcpStream::connect(server.addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    write!(
        socket,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Read until the first content chunk has arrived, then hang up.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    // The role chunk, then at least one chunk of text.
    while String::from_utf8_lossy(&seen)
        .matches("chat.completion.chunk")
        .count()
        < 2
    {
        let n = socket.read(&mut buf).unwrap();
        assert!(n > 0, "the server closed the stream early");
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    drop(socket);
    // The worker notices at its next token; 900 tokens would take minutes on lavapipe.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let h = health(server);
        if h["cancelled"].as_u64().unwrap() > before {
            break;
        }
        assert!(Instant::now() < deadline, "no cancellation observed: {h}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_full_queue_answers_503_with_retry_after_and_shutdown_is_graceful() {
    let options = ServeOptions {
        port: 0,
        queue: 1,
        ..ServeOptions::default()
    };
    let server = Server::start(load(), options).unwrap();
    let body = json!({
        "messages": [user_with_image("example1.png", "What is in the image?")],
        "max_tokens": 12,
        "ignore_eos": true,
    })
    .to_string();
    let addr = server.addr;
    let clients: Vec<_> = (0..5)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || {
                let mut response = agent()
                    .post(&format!("http://{addr}/v1/chat/completions"))
                    .header("Content-Type", "application/json")
                    .send(&body)
                    .unwrap();
                let retry = response.headers().get("retry-after").is_some();
                let status = response.status().as_u16();
                let text = response.body_mut().read_to_string().unwrap();
                (status, retry, text)
            })
        })
        .collect();
    let results: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let busy = results.iter().filter(|r| r.0 == 503).count();
    // One answered by the worker, one waiting in the queue: the rest are refused.
    assert!(busy >= 3, "{results:?}");
    for (status, retry, text) in &results {
        assert!(
            *status == 200 || (*status == 503 && *retry),
            "{status} {text}"
        );
    }
    server.shutdown().unwrap();
    assert!(
        TcpStream::connect(addr).is_err(),
        "still listening after shutdown"
    );
}

/// OpenAI's routes and conventions beyond the chat endpoint: a model by id, JSON errors for
/// unknown paths and methods, CORS for the configured origin, logprob tokens as decoded text
/// with their bytes, and `response_format: text` accepted.
#[test]
fn models_errors_cors_and_logprobs_follow_openai() {
    let server = server();
    let get = |path: &str| {
        let mut r = agent().get(&url(server, path)).call().unwrap();
        let status = r.status().as_u16();
        let body: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        (status, body)
    };
    let (status, model) = get("/v1/models/tiny-llava-shapes");
    assert_eq!(
        (status, model["id"].as_str()),
        (200, Some("tiny-llava-shapes"))
    );
    let (status, missing) = get("/v1/models/gpt-4o");
    assert_eq!(status, 404);
    assert_eq!(missing["error"]["code"], "model_not_found");
    let (status, nowhere) = get("/v2/nothing");
    assert_eq!(status, 404);
    assert_eq!(nowhere["error"]["code"], "not_found");
    let (status, wrong) = get("/v1/chat/completions");
    assert_eq!(status, 405);
    assert_eq!(wrong["error"]["code"], "method_not_allowed");

    // A browser's preflight from the allowed origin, and a request from another one.
    let preflight = agent()
        .options(&url(server, "/v1/chat/completions"))
        .header("Origin", CORS_ORIGIN)
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "content-type")
        .call()
        .unwrap();
    let allowed = preflight.headers().get("access-control-allow-origin");
    assert_eq!(allowed.and_then(|v| v.to_str().ok()), Some(CORS_ORIGIN));
    let other = agent()
        .get(&url(server, "/v1/models"))
        .header("Origin", "http://evil.example")
        .call()
        .unwrap();
    let header = other.headers().get("access-control-allow-origin");
    assert!(header.is_none_or(|v| v != "http://evil.example"));

    let body = json!({
        "messages": [user_with_image("example1.png", "Which color does the cross have?")],
        "max_tokens": 4,
        "logprobs": true,
        "top_logprobs": 3,
        "response_format": {"type": "text"},
    });
    let (status, answer) = post(server, &body.to_string());
    assert_eq!(status, 200, "{answer}");
    let steps = answer["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    let mut all_bytes = Vec::new();
    for step in steps {
        let bytes: Vec<u8> = step["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(
            step["token"].as_str().unwrap(),
            String::from_utf8_lossy(&bytes)
        );
        assert!(
            !step["token"].as_str().unwrap().contains('\u{2581}'),
            "{step}"
        );
        for top in step["top_logprobs"].as_array().unwrap() {
            assert!(top["bytes"].is_array(), "{top}");
        }
        all_bytes.extend(bytes);
    }
    // The tokens' bytes spell the answer (SentencePiece drops the first token's space).
    let spelled = String::from_utf8(all_bytes).unwrap();
    assert_eq!(spelled.trim_start(), content(&answer).trim_start());
}

/// The port is bound before the model loads: /health says `loading` (503) and chat requests get
/// 503 until the engine is ready; then the server answers.
#[test]
fn the_server_listens_while_the_model_loads() {
    let (release, wait) = std::sync::mpsc::channel::<()>();
    let options = ServeOptions {
        port: 0,
        ..ServeOptions::default()
    };
    let server = Server::start_loading("tiny-llava-shapes".into(), options, move || {
        wait.recv_timeout(Duration::from_secs(120)).ok();
        Ok(load())
    })
    .unwrap();
    let mut r = agent().get(&url(&server, "/health")).call().unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let body: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(body["status"], "loading");
    let question = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1});
    let (status, refused) = post(&server, &question.to_string());
    assert_eq!(status, 503);
    assert_eq!(refused["error"]["code"], "model_loading");
    release.send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while health_status(&server) != 200 {
        assert!(Instant::now() < deadline, "the model never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(health(&server)["status"], "ok");
    let (status, answer) = post(&server, &question.to_string());
    assert_eq!(status, 200, "{answer}");
    server.shutdown().unwrap();
    // A server started with a loaded engine is ready before its first connection (it once
    // answered 503 to a request that beat the worker thread).
    let options = ServeOptions {
        port: 0,
        ..ServeOptions::default()
    };
    let ready = Server::start(load(), options).unwrap();
    assert_eq!(health_status(&ready), 200);
    ready.shutdown().unwrap();
}

fn health_status(server: &Server) -> u16 {
    let r = agent().get(&url(server, "/health")).call().unwrap();
    r.status().as_u16()
}

/// A host that does not resolve, or is no address of this machine, is reported as the host;
/// the model is never loaded.
#[test]
fn a_bad_host_is_named_before_loading() {
    for host in ["no-such-host.invalid", "203.0.113.7"] {
        let options = ServeOptions {
            host: host.into(),
            port: 0,
            ..ServeOptions::default()
        };
        let err = Server::start_loading("x".into(), options, || panic!("loaded before binding"))
            .err()
            .unwrap();
        let text = err.to_string();
        assert!(text.starts_with("invalid argument host"), "{host}: {text}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llava-wgpu"))
        .args([
            "serve",
            "--host",
            "no-such-host.invalid",
            "--model",
            "/nonexistent/model",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("invalid argument --host"), "{stderr}");
}

/// `--allow-local-images DIR` reads only regular files under DIR, checks their size before
/// reading, reads them before the queue (a FIFO once blocked the server until it was killed),
/// and names the JSON field in its errors, not the path.
#[test]
fn local_images_are_regular_files_under_the_allowed_directory() {
    let root = std::env::temp_dir().join(format!("llava-wgpu-local-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let allowed = root.join("allowed");
    std::fs::create_dir_all(allowed.join("sub")).unwrap();
    std::fs::copy(demo_dir().join("example1.png"), allowed.join("cross.png")).unwrap();
    std::fs::copy(demo_dir().join("example1.png"), root.join("outside.png")).unwrap();
    std::os::unix::fs::symlink(root.join("outside.png"), allowed.join("link.png")).unwrap();
    let fifo = allowed.join("fifo.png");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let huge = std::fs::File::create(allowed.join("huge.png")).unwrap();
    huge.set_len(llava_wgpu::vision::preprocess::MAX_IMAGE_FILE_BYTES + 1)
        .unwrap();

    let missing = ServeOptions {
        port: 0,
        allow_local_images: Some(root.join("no-such-dir")),
        ..ServeOptions::default()
    };
    let err = Server::start_loading("x".into(), missing, || panic!("never loads")).err();
    assert!(err.unwrap().to_string().contains("allow_local_images"));

    let options = ServeOptions {
        port: 0,
        allow_local_images: Some(allowed.clone()),
        ..ServeOptions::default()
    };
    let server = Server::start(load(), options).unwrap();
    let ask = |url: &str| {
        let body = json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "Which color does the cross have?"},
        ]}], "max_tokens": 2});
        post(&server, &body.to_string())
    };
    let absolute = allowed.join("cross.png").display().to_string();
    for good in [
        absolute.clone(),
        format!("file://{absolute}"),
        "cross.png".into(),
    ] {
        let (status, answer) = ask(&good);
        assert_eq!(status, 200, "{good}: {answer}");
    }
    let param = "messages[0].content[0].image_url.url";
    let refused = [
        ("sub/../cross.png", "'..'"),
        ("link.png", "outside the directory"),
        (
            &root.join("outside.png").display().to_string(),
            "outside the directory",
        ),
        ("fifo.png", "not a regular file"),
        ("sub", "not a regular file"),
        ("huge.png", "byte limit"),
        ("nothing.png", "cannot open"),
    ];
    for (url, why) in refused {
        let (status, answer) = ask(url);
        assert_eq!(status, 400, "{url}: {answer}");
        assert_eq!(answer["error"]["param"], param, "{url}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(why), "{url}: {message}");
    }
    // The FIFO was never opened: the server still answers.
    assert_eq!(ask(&absolute).0, 200);
    server.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(&root);
}

/// At most `max_connections` connections are open: a third client waits in the backlog until
/// one of two idle connections closes, then is answered.
#[test]
fn open_connections_are_bounded() {
    let options = ServeOptions {
        port: 0,
        max_connections: 2,
        ..ServeOptions::default()
    };
    let server = Server::start(load(), options).unwrap();
    let first = TcpStream::connect(server.addr).unwrap();
    let _second = TcpStream::connect(server.addr).unwrap();
    let waiting = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_millis(1500)))
        .build();
    let waiting: ureq::Agent = waiting.into();
    assert!(
        waiting.get(&url(&server, "/health")).call().is_err(),
        "a third connection was served while two were open"
    );
    drop(first);
    assert_eq!(health_status(&server), 200);
    server.shutdown().unwrap();
}

/// A body is limited as it streams in: a chunked upload that never ends, past the limit, gets
/// 413 without the server waiting for its end.
#[test]
fn an_endless_chunked_body_is_refused_as_it_arrives() {
    let server = server();
    let mut socket = TcpStream::connect(server.addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    socket.write_all(head.as_bytes()).unwrap();
    let chunk = "x".repeat(64 << 10);
    // Twice the limit, and no terminating chunk: only a server that counts as it reads answers.
    for _ in 0..(2 * BODY_LIMIT / chunk.len()) {
        let framed = format!("{:x}\r\n{chunk}\r\n", chunk.len());
        if socket.write_all(framed.as_bytes()).is_err() {
            break;
        }
    }
    let mut answer = Vec::new();
    let _ = socket.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");
}
