//! Shader-level profiling: a GPU timestamp around every dispatch, grouped into a per-kernel
//! table and written as a Chrome trace (Perfetto, chrome://tracing).
//!
//! Three ways to time, best first: timestamps written between dispatches inside one compute
//! pass (TIMESTAMP_QUERY_INSIDE_PASSES); one pass per dispatch with pass-boundary timestamps
//! (TIMESTAMP_QUERY); or, without timestamp queries, submitting each dispatch alone and timing
//! it on the CPU, which includes submission overhead (a warning says so).
//!
//! This module sits below device.rs (the device owns the active profiler), so it takes the
//! wgpu handles it needs rather than a `Gpu`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::gpu::memory::{GpuBuffer, MemoryKind, MemoryTracker};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum TimingMode {
    InsidePasses,
    PassPerDispatch,
    CpuWallClock,
}

/// What is known about a dispatch when it is recorded.
#[derive(Clone, Debug)]
pub(crate) struct DispatchMeta {
    pub stage: &'static str,
    pub kernel: &'static str,
    pub shape: String,
    pub flops: u64,
    pub bytes: u64,
}

/// One timed dispatch. Times are nanoseconds on the profiler's clock.
#[derive(Clone, Debug, Serialize)]
pub struct KernelEvent {
    pub stage: &'static str,
    pub kernel: &'static str,
    pub shape: String,
    pub flops: u64,
    pub bytes: u64,
    pub start_ns: f64,
    pub end_ns: f64,
}

impl KernelEvent {
    pub fn duration_ns(&self) -> f64 {
        (self.end_ns - self.start_ns).max(0.0)
    }
}

/// Timestamps written into a buffer by one submission, read back at the end.
pub(crate) struct PendingBatch {
    pub readback: GpuBuffer,
    pub metas: Vec<DispatchMeta>,
}

pub struct Profiler {
    pub mode: TimingMode,
    /// Nanoseconds per timestamp tick.
    period_ns: f64,
    origin: Instant,
    pub(crate) pending: Vec<PendingBatch>,
    pub events: Vec<KernelEvent>,
    /// Host-side stages (preprocessing), in milliseconds.
    pub cpu_stages: Vec<(&'static str, f64)>,
}

impl Profiler {
    /// A profiler timing with `mode`; `period_ns` is the queue's nanoseconds per timestamp tick.
    pub fn new(mode: TimingMode, period_ns: f64) -> Self {
        if mode == TimingMode::CpuWallClock {
            eprintln!(
                "warning: the adapter has no timestamp queries; timing each dispatch on the CPU \
                 (includes submission overhead, and serialises the GPU)"
            );
        }
        Self {
            mode,
            period_ns,
            origin: Instant::now(),
            pending: Vec::new(),
            events: Vec::new(),
            cpu_stages: Vec::new(),
        }
    }

    pub(crate) fn cpu_now_ns(&self) -> f64 {
        self.origin.elapsed().as_nanos() as f64
    }

    /// Resolve the queries of `count` timestamps into a mappable buffer (encoded by the caller).
    pub(crate) fn resolve(
        memory: &Arc<MemoryTracker>,
        device: &wgpu::Device,
        encoder: &mut wgpu::CommandEncoder,
        set: &wgpu::QuerySet,
        count: u32,
    ) -> GpuBuffer {
        let size = count as u64 * 8;
        let buffer = |label, usage| {
            let descriptor = wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            };
            memory.create_buffer(device, &descriptor, MemoryKind::Scratch)
        };
        let resolve = buffer(
            "timestamps.resolve",
            wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
        );
        let readback = buffer(
            "timestamps.readback",
            wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ,
        );
        encoder.resolve_query_set(set, 0..count, &resolve, 0);
        encoder.copy_buffer_to_buffer(&resolve, 0, &readback, 0, size);
        readback
    }

    /// Read every pending batch's timestamps into events; `wait` blocks until the GPU is idle
    /// (and reports its errors).
    pub fn collect(&mut self, mut wait: impl FnMut() -> Result<()>) -> Result<()> {
        for batch in std::mem::take(&mut self.pending) {
            let (sender, receiver) = std::sync::mpsc::channel();
            batch.readback.map_async(wgpu::MapMode::Read, .., move |r| {
                let _ = sender.send(r);
            });
            wait()?;
            receiver
                .recv()
                .map_err(|e| Error::gpu("profiler", e))?
                .map_err(|e| Error::gpu("profiler", e))?;
            let view = batch
                .readback
                .get_mapped_range(..)
                .map_err(|e| Error::gpu("profiler", e))?;
            let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&view[..]);
            drop(view);
            batch.readback.unmap();
            for (i, meta) in batch.metas.into_iter().enumerate() {
                self.events.push(KernelEvent {
                    stage: meta.stage,
                    kernel: meta.kernel,
                    shape: meta.shape,
                    flops: meta.flops,
                    bytes: meta.bytes,
                    start_ns: ticks[2 * i] as f64 * self.period_ns,
                    end_ns: ticks[2 * i + 1] as f64 * self.period_ns,
                });
            }
        }
        Ok(())
    }

    pub fn report(&self) -> ProfileReport {
        ProfileReport::new(self)
    }
}

/// One row of the per-kernel table.
#[derive(Clone, Debug, Serialize)]
pub struct KernelRow {
    pub stage: String,
    pub kernel: String,
    pub shape: String,
    pub count: usize,
    pub total_us: f64,
    pub mean_us: f64,
    /// Fraction of the stage's kernel time.
    pub share_of_stage: f64,
    pub gflops: f64,
    pub gbytes_per_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct StageTotal {
    pub stage: String,
    /// Sum of the stage's kernel times (GPU) or its wall time (host stages).
    pub total_us: f64,
    pub dispatches: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProfileReport {
    pub mode: TimingMode,
    pub rows: Vec<KernelRow>,
    pub stages: Vec<StageTotal>,
    #[serde(skip)]
    events: Vec<KernelEvent>,
}

/// (stage rank, stage, kernel, shape) of a table row.
type GroupKey<'a> = (usize, &'a str, &'a str, &'a str);
/// (count, nanoseconds, flops, bytes) summed over a group.
type GroupSum = (usize, f64, u64, u64);

/// Order in which stages appear in tables and traces.
const STAGE_ORDER: [&str; 8] = [
    "preprocess",
    "vision",
    "stage 1",
    "projector",
    "prefill",
    "stage 2",
    "first token",
    "decode",
];

fn stage_rank(stage: &str) -> usize {
    STAGE_ORDER
        .iter()
        .position(|s| *s == stage)
        .unwrap_or(STAGE_ORDER.len())
}

impl ProfileReport {
    fn new(p: &Profiler) -> Self {
        let mut stage_time: BTreeMap<(usize, &str), (f64, usize)> = BTreeMap::new();
        for e in &p.events {
            let entry = stage_time
                .entry((stage_rank(e.stage), e.stage))
                .or_default();
            entry.0 += e.duration_ns();
            entry.1 += 1;
        }
        let mut groups: BTreeMap<GroupKey, GroupSum> = BTreeMap::new();
        for e in &p.events {
            let g = groups
                .entry((stage_rank(e.stage), e.stage, e.kernel, e.shape.as_str()))
                .or_default();
            g.0 += 1;
            g.1 += e.duration_ns();
            g.2 += e.flops;
            g.3 += e.bytes;
        }
        let mut rows: Vec<KernelRow> = groups
            .into_iter()
            .map(
                |((rank, stage, kernel, shape), (count, ns, flops, bytes))| {
                    let stage_ns = stage_time[&(rank, stage)].0;
                    let secs = ns / 1e9;
                    KernelRow {
                        stage: stage.to_string(),
                        kernel: kernel.to_string(),
                        shape: shape.to_string(),
                        count,
                        total_us: ns / 1e3,
                        mean_us: ns / 1e3 / count as f64,
                        share_of_stage: if stage_ns > 0.0 { ns / stage_ns } else { 0.0 },
                        gflops: if secs > 0.0 {
                            flops as f64 / secs / 1e9
                        } else {
                            0.0
                        },
                        gbytes_per_s: if secs > 0.0 {
                            bytes as f64 / secs / 1e9
                        } else {
                            0.0
                        },
                    }
                },
            )
            .collect();
        // Within a stage, the most expensive first.
        rows.sort_by(|a, b| {
            stage_rank(&a.stage)
                .cmp(&stage_rank(&b.stage))
                .then(b.total_us.total_cmp(&a.total_us))
        });
        let mut stages: Vec<StageTotal> = p
            .cpu_stages
            .iter()
            .map(|(s, ms)| StageTotal {
                stage: s.to_string(),
                total_us: ms * 1e3,
                dispatches: 0,
            })
            .collect();
        stages.extend(
            stage_time
                .into_iter()
                .map(|((_, stage), (ns, n))| StageTotal {
                    stage: stage.to_string(),
                    total_us: ns / 1e3,
                    dispatches: n,
                }),
        );
        stages.sort_by_key(|s| stage_rank(&s.stage));
        Self {
            mode: p.mode,
            rows,
            stages,
            events: p.events.clone(),
        }
    }

    /// The summed time of every timed dispatch, in microseconds.
    pub fn kernel_us(&self) -> f64 {
        self.rows.iter().map(|r| r.total_us).sum()
    }

    /// The table `--profile` prints on stderr.
    pub fn table(&self) -> String {
        let mut out = format!("GPU profile ({:?})\n", self.mode);
        out.push_str(&format!(
            "{:<12} {:<18} {:<26} {:>6} {:>11} {:>10} {:>7} {:>8} {:>7}\n",
            "stage",
            "kernel",
            "shape",
            "count",
            "total ms",
            "mean µs",
            "% stage",
            "GFLOP/s",
            "GB/s"
        ));
        for r in &self.rows {
            out.push_str(&format!(
                "{:<12} {:<18} {:<26} {:>6} {:>11.3} {:>10.1} {:>6.1}% {:>8.2} {:>7.2}\n",
                r.stage,
                r.kernel,
                truncate(&r.shape, 26),
                r.count,
                r.total_us / 1e3,
                r.mean_us,
                100.0 * r.share_of_stage,
                r.gflops,
                r.gbytes_per_s
            ));
        }
        out.push_str("\nstage totals (GPU kernel time; preprocess is host time):\n");
        for s in &self.stages {
            out.push_str(&format!(
                "  {:<12} {:>10.3} ms  ({} dispatches)\n",
                s.stage,
                s.total_us / 1e3,
                s.dispatches
            ));
        }
        out
    }

    /// Chrome trace JSON: one track of stage spans, one of kernels; each stage span covers its
    /// kernels and records their summed time in `args.kernel_total_us`.
    pub fn chrome_trace(&self) -> serde_json::Value {
        let origin = self
            .events
            .iter()
            .map(|e| e.start_ns)
            .fold(f64::INFINITY, f64::min);
        let origin = if origin.is_finite() { origin } else { 0.0 };
        let mut trace = Vec::new();
        let mut spans: BTreeMap<(usize, &str), (f64, f64, f64)> = BTreeMap::new();
        for e in &self.events {
            let span = spans.entry((stage_rank(e.stage), e.stage)).or_insert((
                f64::INFINITY,
                f64::NEG_INFINITY,
                0.0,
            ));
            span.0 = span.0.min(e.start_ns);
            span.1 = span.1.max(e.end_ns);
            span.2 += e.duration_ns();
            trace.push(serde_json::json!({
                "name": e.kernel,
                "cat": "kernel",
                "ph": "X",
                "pid": 1,
                "tid": 2,
                "ts": (e.start_ns - origin) / 1e3,
                "dur": e.duration_ns() / 1e3,
                "args": { "stage": e.stage, "shape": e.shape, "flops": e.flops, "bytes": e.bytes },
            }));
        }
        for ((_, stage), (start, end, total)) in spans {
            trace.push(serde_json::json!({
                "name": stage,
                "cat": "stage",
                "ph": "X",
                "pid": 1,
                "tid": 1,
                "ts": (start - origin) / 1e3,
                "dur": (end - start) / 1e3,
                "args": { "kernel_total_us": total / 1e3 },
            }));
        }
        trace.push(serde_json::json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": 1, "args": {"name": "stages"}}));
        trace.push(serde_json::json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": 2, "args": {"name": "kernels"}}));
        serde_json::json!({ "traceEvents": trace, "displayTimeUnit": "ms" })
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).chain(std::iter::once('…')).collect()
    }
}
