//! Every GPU buffer the engine creates, counted where it is created.
//!
//! [`MemoryTracker::create_buffer`] is the one place a buffer comes from: it records the
//! buffer's real size (`wgpu::Buffer::size()`, after any padding the caller asked for) under a
//! [`MemoryKind`] and hands back a [`GpuBuffer`], a cheap-to-clone handle. When the last handle
//! to a buffer drops, its bytes leave the live count. The tracker also keeps the peak of each
//! kind and of the total, so `memory` and `bench` print bytes that were allocated, not a
//! formula over shapes.
//!
//! It counts what the engine asked the driver for. Drivers round allocations up to their own
//! page or block sizes, which no API reports; those few bytes per buffer are not included.

use std::ops::Deref;
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// What a buffer holds, for the memory table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemoryKind {
    /// Model parameters: matrix weights, norms, biases, tables computed at load.
    Weights,
    /// The decoder's key/value cache.
    Kv,
    /// A request's activations: hidden states, projections, scores, gathered rows.
    Activations,
    /// Short-lived helpers: uniform parameter blocks, readback staging, profiler queries.
    Scratch,
}

impl MemoryKind {
    pub const ALL: [MemoryKind; 4] = [
        MemoryKind::Weights,
        MemoryKind::Kv,
        MemoryKind::Activations,
        MemoryKind::Scratch,
    ];

    pub fn name(self) -> &'static str {
        match self {
            MemoryKind::Weights => "weights",
            MemoryKind::Kv => "kv",
            MemoryKind::Activations => "activations",
            MemoryKind::Scratch => "scratch",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Bytes per [`MemoryKind`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BytesByKind {
    pub weights: u64,
    pub kv: u64,
    pub activations: u64,
    pub scratch: u64,
}

impl BytesByKind {
    fn from_array(bytes: [u64; 4]) -> Self {
        Self {
            weights: bytes[0],
            kv: bytes[1],
            activations: bytes[2],
            scratch: bytes[3],
        }
    }

    pub fn get(&self, kind: MemoryKind) -> u64 {
        match kind {
            MemoryKind::Weights => self.weights,
            MemoryKind::Kv => self.kv,
            MemoryKind::Activations => self.activations,
            MemoryKind::Scratch => self.scratch,
        }
    }

    pub fn total(&self) -> u64 {
        self.weights + self.kv + self.activations + self.scratch
    }
}

/// The tracker's counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MemoryStats {
    /// Bytes of the buffers alive now.
    pub live: BytesByKind,
    /// The most bytes of each kind alive at once since the last [`MemoryTracker::reset_peaks`].
    pub peak: BytesByKind,
    /// The most bytes alive at once, all kinds together (not the sum of the per-kind peaks,
    /// which need not coincide).
    pub peak_total: u64,
}

#[derive(Default)]
struct Counters {
    live: [u64; 4],
    peak: [u64; 4],
    peak_total: u64,
}

/// Live and peak bytes per kind of every buffer created through it.
#[derive(Default)]
pub struct MemoryTracker {
    counters: Mutex<Counters>,
}

impl MemoryTracker {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        // The counters stay consistent even if a holder panicked: each update is one step.
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, kind: MemoryKind, bytes: u64) {
        let mut c = self.counters();
        let i = kind.index();
        c.live[i] += bytes;
        c.peak[i] = c.peak[i].max(c.live[i]);
        let total: u64 = c.live.iter().sum();
        c.peak_total = c.peak_total.max(total);
    }

    fn release(&self, kind: MemoryKind, bytes: u64) {
        let mut c = self.counters();
        let i = kind.index();
        c.live[i] = c.live[i].saturating_sub(bytes);
    }

    pub fn stats(&self) -> MemoryStats {
        let c = self.counters();
        MemoryStats {
            live: BytesByKind::from_array(c.live),
            peak: BytesByKind::from_array(c.peak),
            peak_total: c.peak_total,
        }
    }

    /// Start a new peak measurement from what is alive now (e.g. at the start of a request).
    pub fn reset_peaks(&self) {
        let mut c = self.counters();
        c.peak = c.live;
        c.peak_total = c.live.iter().sum();
    }

    /// Create a buffer on `device` and count it under `kind` until its last handle drops.
    pub fn create_buffer(
        self: &Arc<Self>,
        device: &wgpu::Device,
        descriptor: &wgpu::BufferDescriptor,
        kind: MemoryKind,
    ) -> GpuBuffer {
        self.track(device.create_buffer(descriptor), kind)
    }

    /// Create a buffer holding `contents` (see [`wgpu::util::DeviceExt::create_buffer_init`]).
    pub fn create_buffer_init(
        self: &Arc<Self>,
        device: &wgpu::Device,
        descriptor: &wgpu::util::BufferInitDescriptor,
        kind: MemoryKind,
    ) -> GpuBuffer {
        let buffer = wgpu::util::DeviceExt::create_buffer_init(device, descriptor);
        self.track(buffer, kind)
    }

    fn track(self: &Arc<Self>, buffer: wgpu::Buffer, kind: MemoryKind) -> GpuBuffer {
        self.add(kind, buffer.size());
        GpuBuffer(Arc::new(Tracked {
            buffer,
            kind,
            tracker: self.clone(),
        }))
    }
}

struct Tracked {
    buffer: wgpu::Buffer,
    kind: MemoryKind,
    tracker: Arc<MemoryTracker>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.tracker.release(self.kind, self.buffer.size());
    }
}

/// A counted GPU buffer. Clones share the buffer (tensor views, dispatches); the bytes are
/// released when the last clone drops. Dereferences to the `wgpu::Buffer`.
#[derive(Clone)]
pub struct GpuBuffer(Arc<Tracked>);

impl GpuBuffer {
    pub fn kind(&self) -> MemoryKind {
        self.0.kind
    }
}

impl Deref for GpuBuffer {
    type Target = wgpu::Buffer;
    fn deref(&self) -> &wgpu::Buffer {
        &self.0.buffer
    }
}

impl std::fmt::Debug for GpuBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuBuffer")
            .field("size", &self.0.buffer.size())
            .field("kind", &self.0.kind)
            .finish()
    }
}
