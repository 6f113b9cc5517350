//! `llava-wgpu bench serve`: the server on a loopback port, driven by HTTP clients in this
//! process.
//!
//! 1. Time to first token, measured by the client (request sent → first streamed text chunk),
//!    for a first turn on an image never seen, a follow-up turn in the same conversation, and a
//!    new conversation about an image in the image cache; medians over `repeats`, and the first
//!    turn's time divided by each of the others (same run, same server).
//! 2. `clients` concurrent clients × `per_client` requests: every request must be answered
//!    (200) or refused (503); a transport error or any other status counts as lost.
//! 3. Resident memory (the process's RSS) and the GPU bytes alive in the engine's allocation
//!    tracker, both as `/health` reports them, after a warm-up and after `soak` requests of
//!    multi-turn conversations ([`soak`]), with the growth in percent.

use std::io::{BufRead, BufReader, Cursor};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::model::llava::Engine;
use crate::serve::{ServeOptions, Server};

#[derive(Clone, Debug)]
pub struct ServeBenchOptions {
    /// A PNG or JPEG to ask about (variants are made by changing one pixel).
    pub image: std::path::PathBuf,
    pub repeats: usize,
    pub clients: usize,
    pub per_client: usize,
    pub soak: usize,
    pub max_tokens: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServeReport {
    pub ttft_first_turn_ms: f64,
    pub ttft_follow_up_ms: f64,
    pub ttft_cached_image_ms: f64,
    pub follow_up_speedup: f64,
    pub cached_image_speedup: f64,
    pub concurrent_requests: usize,
    pub answered: usize,
    pub refused_503: usize,
    pub lost: usize,
    pub soak_requests: usize,
    /// The request before which the first memory reading was taken (the second is at the end).
    pub soak_first_reading_at: usize,
    pub resident_bytes_start: u64,
    pub resident_bytes_end: u64,
    pub resident_growth_percent: f64,
    pub gpu_bytes_start: Option<u64>,
    pub gpu_bytes_end: Option<u64>,
    pub gpu_growth_percent: Option<f64>,
}

pub fn serve(engine: Engine, options: &ServeBenchOptions) -> Result<ServeReport> {
    let base = std::fs::read(&options.image).map_err(|e| Error::File {
        path: options.image.clone(),
        reason: e.to_string(),
    })?;
    let server_options = ServeOptions {
        port: 0,
        // Half the clients may wait: when they all send at once, the rest are refused, so the
        // 503 path runs (each refused request must carry Retry-After and nothing may be lost).
        queue: (options.clients / 2).max(1),
        ..ServeOptions::default()
    };
    let server = Server::start(engine, server_options)?;
    let client = Client::new(&server);
    let variant = |i: u32| image_variant(&base, i, &options.image);
    // Warm-up: one conversation (pipelines, allocator pools).
    client.ttft(&first_turn(
        &variant(u32::MAX)?,
        "What is in the image?",
        options.max_tokens,
    ))?;
    let (mut first, mut follow, mut cached) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..options.repeats as u32 {
        let image = variant(i)?;
        let body = first_turn(&image, "Which shape is green?", options.max_tokens);
        let (ms, answer) = client.ttft(&body)?;
        first.push(ms);
        let mut next = body.clone();
        let messages = next["messages"].as_array_mut().expect("messages");
        messages.push(json!({"role": "assistant", "content": answer.trim()}));
        messages.push(json!({"role": "user", "content": "How many objects are in the image?"}));
        follow.push(client.ttft(&next)?.0);
        let other = first_turn(
            &image,
            "Which color does the cross have?",
            options.max_tokens,
        );
        cached.push(client.ttft(&other)?.0);
    }
    let (first, follow, cached) = (median(first), median(follow), median(cached));

    let load = concurrent(&client, &variant(7_000_000)?, options);
    let images = (0..SOAK_IMAGES)
        .map(|i| variant(8_000_000 + i))
        .collect::<Result<Vec<_>>>()?;
    let (start, end) = soak(&client, &images, options)?;
    server.shutdown()?;
    Ok(ServeReport {
        ttft_first_turn_ms: first,
        ttft_follow_up_ms: follow,
        ttft_cached_image_ms: cached,
        follow_up_speedup: first / follow,
        cached_image_speedup: first / cached,
        concurrent_requests: options.clients * options.per_client,
        answered: load.0,
        refused_503: load.1,
        lost: load.2,
        soak_requests: soak_plan(options.soak).0,
        soak_first_reading_at: soak_plan(options.soak).1,
        resident_bytes_start: start.resident,
        resident_bytes_end: end.resident,
        resident_growth_percent: (end.resident as f64 / start.resident as f64 - 1.0) * 100.0,
        gpu_bytes_start: start.gpu,
        gpu_bytes_end: end.gpu,
        gpu_growth_percent: start
            .gpu
            .zip(end.gpu)
            .map(|(a, b)| (b as f64 / a as f64 - 1.0) * 100.0),
    })
}

/// The image with pixel (0, 0) changed to encode `i`: other bytes, so the image cache misses.
fn image_variant(base: &[u8], i: u32, path: &std::path::Path) -> Result<String> {
    let fail = |e: String| Error::File {
        path: path.to_path_buf(),
        reason: e,
    };
    let mut image = image::load_from_memory(base)
        .map_err(|e| fail(e.to_string()))?
        .to_rgb8();
    let [r, g, b, _] = i.to_le_bytes();
    image.put_pixel(0, 0, image::Rgb([r, g, b]));
    let mut png = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| fail(e.to_string()))?;
    let data = base64::engine::general_purpose::STANDARD.encode(png);
    Ok(format!("data:image/png;base64,{data}"))
}

fn first_turn(image: &str, question: &str, max_tokens: usize) -> Value {
    json!({
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}},
            {"type": "text", "text": question},
        ]}],
        "max_tokens": max_tokens,
        "stream": true,
    })
}

struct Client {
    url: String,
    health: String,
    agent: ureq::Agent,
}

impl Client {
    fn new(server: &Server) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(600)))
            .build()
            .into();
        Self {
            url: format!("http://{}/v1/chat/completions", server.addr),
            health: format!("http://{}/health", server.addr),
            agent,
        }
    }

    /// Stream `body`: milliseconds until the first chunk with text, and the whole answer.
    fn ttft(&self, body: &Value) -> Result<(f64, String)> {
        let start = Instant::now();
        let response = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/json")
            .send(&body.to_string())
            .map_err(|e| Error::argument("bench serve", e.to_string()))?;
        if response.status() != 200 {
            return Err(Error::argument(
                "bench serve",
                format!("status {}", response.status()),
            ));
        }
        let mut first = None;
        let mut text = String::new();
        for line in BufReader::new(response.into_body().into_reader()).lines() {
            let line = line.map_err(|e| Error::argument("bench serve", e.to_string()))?;
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                break;
            }
            let chunk: Value = serde_json::from_str(data).unwrap_or(Value::Null);
            if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
                if !piece.is_empty() && first.is_none() {
                    first = Some(start.elapsed());
                }
                text.push_str(piece);
            }
        }
        let first = first.unwrap_or_else(|| start.elapsed());
        Ok((first.as_secs_f64() * 1e3, text))
    }

    /// A short non-streamed request: its status (0 for a transport error).
    fn status(&self, body: &str) -> u16 {
        match self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/json")
            .send(body)
        {
            Ok(mut r) => {
                let _ = r.body_mut().read_to_string();
                r.status().as_u16()
            }
            Err(_) => 0,
        }
    }

    /// The server's resident and tracked GPU bytes, as `/health` reports them.
    fn memory(&self) -> Result<Memory> {
        let mut r = self
            .agent
            .get(&self.health)
            .call()
            .map_err(|e| Error::argument("bench serve", e.to_string()))?;
        let v: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap_or_default())
            .unwrap_or(Value::Null);
        let resident = v["resident_bytes"]
            .as_u64()
            .ok_or_else(|| Error::argument("bench serve", "/health reports no resident_bytes"))?;
        Ok(Memory {
            resident,
            gpu: v["gpu_live_bytes"].as_u64(),
        })
    }
}

/// (answered, refused with 503, lost) for `clients` threads × `per_client` requests.
fn concurrent(client: &Client, image: &str, options: &ServeBenchOptions) -> (usize, usize, usize) {
    let client = Arc::new(Client {
        url: client.url.clone(),
        health: client.health.clone(),
        agent: client.agent.clone(),
    });
    let threads: Vec<_> = (0..options.clients)
        .map(|c| {
            let client = client.clone();
            let bodies: Vec<String> = (0..options.per_client)
                .map(|r| {
                    let mut body = first_turn(
                        image,
                        &format!("Question {c}-{r}: which shape is green?"),
                        2,
                    );
                    body["stream"] = json!(false);
                    body.to_string()
                })
                .collect();
            std::thread::spawn(move || bodies.iter().map(|b| client.status(b)).collect::<Vec<_>>())
        })
        .collect();
    let statuses: Vec<u16> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap_or_default())
        .collect();
    let answered = statuses.iter().filter(|&&s| s == 200).count();
    let refused = statuses.iter().filter(|&&s| s == 503).count();
    let total = options.clients * options.per_client;
    (answered, refused, total - answered - refused)
}

/// Distinct images the soak's conversations are about (the image cache holds them all).
const SOAK_IMAGES: u32 = 4;
/// Turns per soak conversation: a first question, then follow-ups in the same session.
const SOAK_TURNS: usize = 4;
/// Requests until the soak's conversations repeat their pattern: one per image.
const SOAK_CYCLE: usize = SOAK_TURNS * SOAK_IMAGES as usize;

/// What `/health` reports about memory at one point of the soak.
#[derive(Clone, Copy)]
struct Memory {
    resident: u64,
    gpu: Option<u64>,
}

/// Memory after about a tenth of `soak` requests (warm-up) and at the end, both read at the
/// start of a cycle of the soak (every image's conversation done, [`SOAK_CYCLE`] requests), so
/// the two readings hold the same sessions at the same turns. The requests are conversations of
/// [`SOAK_TURNS`] turns (a first question, then follow-ups that reuse its session) about
/// [`SOAK_IMAGES`] images in turn, so sessions, KV growth and the image cache fill and evict as
/// in use. Answers are one token, so the soak measures memory, not decoding.
fn soak(
    client: &Client,
    images: &[String],
    options: &ServeBenchOptions,
) -> Result<(Memory, Memory)> {
    let (requests, warm) = soak_plan(options.soak);
    let mut start = None;
    let mut conversation = Value::Null;
    for i in 0..requests {
        if i == warm {
            start = Some(client.memory()?);
        }
        // Distinct questions (as a server sees), of one length: the readings hold equal token counts.
        let question = format!("Question {i:07}: what is in the image?");
        if i % SOAK_TURNS == 0 {
            let image = &images[(i / SOAK_TURNS) % images.len()];
            conversation = first_turn(image, &question, 1);
        } else {
            let messages = conversation["messages"].as_array_mut().expect("messages");
            messages.push(json!({"role": "user", "content": question}));
        }
        let (_, answer) = client
            .ttft(&conversation)
            .map_err(|e| Error::argument("bench serve", format!("soak request {i}: {e}")))?;
        let messages = conversation["messages"].as_array_mut().expect("messages");
        messages.push(json!({"role": "assistant", "content": answer.trim()}));
    }
    let end = client.memory()?;
    Ok((start.unwrap_or(end), end))
}

/// The soak's length (`soak` rounded down to whole cycles, at least two) and the request before
/// which memory is first read (about a tenth of the way, at a cycle's start).
fn soak_plan(soak: usize) -> (usize, usize) {
    let cycles = (soak / SOAK_CYCLE).max(2);
    (cycles * SOAK_CYCLE, (cycles / 10).max(1) * SOAK_CYCLE)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
