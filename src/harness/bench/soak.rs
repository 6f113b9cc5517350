//! `llava-wgpu bench soak`: many requests in one process with the pruning method, budget,
//! question, image, length and sampling changing from request to request, reporting resident
//! memory after warm-up and at the end. Growth means something is kept per request.

use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::generate::GenerateRequest;
use crate::harness::eval::{setting, Example, BUDGETS, METHODS};
use crate::model::llava::Engine;
use crate::prune::{Method, PruneOptions};
use crate::sample::SamplingParams;

/// The growth of resident memory from warm-up to the end that `bench soak` accepts.
pub const MAX_GROWTH: f64 = 0.01;

#[derive(Clone, Debug, Serialize)]
pub struct SoakReport {
    pub model: String,
    pub requests: usize,
    /// Untimed requests before the start figures: one per pruning setting.
    pub warmup: usize,
    pub settings: usize,
    pub questions: usize,
    /// Resident set size of this process (VmRSS); None where it cannot be read.
    pub rss_start_bytes: Option<u64>,
    pub rss_end_bytes: Option<u64>,
    /// GPU bytes alive by the engine's allocation tracker (see [`gpu_allocated_bytes`]).
    pub gpu_allocated_start_bytes: Option<u64>,
    pub gpu_allocated_end_bytes: Option<u64>,
    /// (end − start) / start of the resident set size.
    pub rss_growth: Option<f64>,
    pub generated_tokens: usize,
    pub seconds: f64,
}

/// Bytes of this process resident in RAM: `VmRSS` of /proc/self/status (kB), so no page size
/// is assumed. None off Linux.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kb: u64 = line.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// GPU bytes alive now, as the engine's allocation tracker counts every buffer it creates.
pub fn gpu_allocated_bytes(engine: &Engine) -> Option<u64> {
    Some(engine.gpu.memory_stats().live.total())
}

/// Every pruning setting a soak cycles through: none, and every method at every budget below
/// 100%.
fn soak_settings(n0: usize) -> Vec<PruneOptions> {
    let mut settings = vec![setting(Method::None, 1.0, n0, 0, false)];
    for method in METHODS {
        for &budget in BUDGETS.iter().filter(|&&b| b < 1.0) {
            settings.push(setting(method, budget, n0, 0, false));
        }
    }
    settings
}

/// Request `i`: example, setting, length and sampling all vary, on different periods so
/// the combinations change too.
fn soak_request(i: usize, examples: &[Example], settings: &[PruneOptions]) -> GenerateRequest {
    let example = &examples[i % examples.len()];
    let mut request = GenerateRequest::new(&example.image, &example.question);
    request.prune = settings[(i + i / examples.len()) % settings.len()].clone();
    request.prune.seed = i as u64;
    request.max_new_tokens = 1 + i % 6;
    if i % 3 == 2 {
        request.sampling = SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            seed: i as u64,
        };
    }
    request
}

/// Run `requests` varied requests after one warm-up request per setting.
pub fn soak(
    engine: &Engine,
    model_label: &str,
    examples: &[Example],
    requests: usize,
    mut progress: impl FnMut(&str),
) -> Result<SoakReport> {
    if requests == 0 {
        return Err(Error::argument("requests", "must be at least 1"));
    }
    if examples.is_empty() {
        return Err(Error::argument("examples", "give at least one question"));
    }
    let settings = soak_settings(engine.config.image_tokens());
    for i in 0..settings.len() {
        let mut request = soak_request(0, examples, &settings);
        request.prune = settings[i].clone();
        engine.generate(&request, |_| {})?;
    }
    let (rss_start, gpu_start) = (resident_bytes(), gpu_allocated_bytes(engine));
    let started = Instant::now();
    let mut generated_tokens = 0;
    for i in 0..requests {
        let out = engine.generate(&soak_request(i, examples, &settings), |_| {})?;
        generated_tokens += out.generated_ids.len();
        if (i + 1) % 50 == 0 || i + 1 == requests {
            let rss =
                resident_bytes().map_or("?".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0));
            progress(&format!("{}/{requests} requests, resident {rss}", i + 1));
        }
    }
    let (rss_end, gpu_end) = (resident_bytes(), gpu_allocated_bytes(engine));
    Ok(SoakReport {
        model: model_label.to_string(),
        requests,
        warmup: settings.len(),
        settings: settings.len(),
        questions: examples.len(),
        rss_start_bytes: rss_start,
        rss_end_bytes: rss_end,
        gpu_allocated_start_bytes: gpu_start,
        gpu_allocated_end_bytes: gpu_end,
        rss_growth: rss_start
            .zip(rss_end)
            .map(|(s, e)| (e as f64 - s as f64) / s as f64),
        generated_tokens,
        seconds: started.elapsed().as_secs_f64(),
    })
}

impl SoakReport {
    /// Whether resident memory grew by at most [`MAX_GROWTH`] (unknown counts as not).
    /// Both the resident set and the GPU bytes alive grew by at most [`MAX_GROWTH`].
    pub fn within_budget(&self) -> bool {
        let gpu_ok = match (self.gpu_allocated_start_bytes, self.gpu_allocated_end_bytes) {
            (Some(start), Some(end)) => end as f64 <= start as f64 * (1.0 + MAX_GROWTH),
            _ => false,
        };
        gpu_ok && self.rss_growth.is_some_and(|g| g <= MAX_GROWTH)
    }

    pub fn table(&self) -> String {
        let mib = |b: Option<u64>| {
            b.map_or("unavailable".into(), |b| {
                format!("{:.2} MiB", b as f64 / 1048576.0)
            })
        };
        let growth = self
            .rss_growth
            .map_or("unavailable".into(), |g| format!("{:+.3}%", 100.0 * g));
        format!(
            "model: {}\n{} requests over {} pruning settings and {} questions ({} tokens, {:.0} s) after {} warm-up requests\n\
             resident memory: {} after warm-up, {} at the end ({growth}; limit +{:.0}%)\n\
             GPU allocated: {} after warm-up, {} at the end\n",
            self.model,
            self.requests,
            self.settings,
            self.questions,
            self.generated_tokens,
            self.seconds,
            self.warmup,
            mib(self.rss_start_bytes),
            mib(self.rss_end_bytes),
            100.0 * MAX_GROWTH,
            mib(self.gpu_allocated_start_bytes),
            mib(self.gpu_allocated_end_bytes),
        )
    }
}
