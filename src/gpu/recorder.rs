//! Records dispatches into compute passes and submits them in batches.
//!
//! Consecutive dispatches share one compute pass (wgpu inserts the storage-buffer barriers
//! between them); a buffer copy ends the pass. Work is submitted every `batch` commands so the
//! GPU starts on the first layers while the CPU is still recording the last ones.

use crate::error::Result;
use crate::gpu::device::Gpu;
use crate::gpu::kernels::Dispatch;

/// Commands are submitted in groups of this many unless the caller chooses otherwise.
pub const DEFAULT_BATCH: usize = 48;

enum Command {
    Dispatch(Dispatch),
    Copy {
        src: wgpu::Buffer,
        src_offset: u64,
        dst: wgpu::Buffer,
        dst_offset: u64,
        size: u64,
    },
}

pub struct Recorder<'g> {
    gpu: &'g Gpu,
    pending: Vec<Command>,
    batch: usize,
    submitted: usize,
}

impl<'g> Recorder<'g> {
    pub fn new(gpu: &'g Gpu) -> Self {
        Self::with_batch(gpu, DEFAULT_BATCH)
    }

    pub fn with_batch(gpu: &'g Gpu, batch: usize) -> Self {
        Self {
            gpu,
            pending: Vec::new(),
            batch: batch.max(1),
            submitted: 0,
        }
    }

    pub fn gpu(&self) -> &'g Gpu {
        self.gpu
    }

    /// Queue one dispatch.
    pub fn dispatch(&mut self, dispatch: Dispatch) {
        self.pending.push(Command::Dispatch(dispatch));
        if self.pending.len() >= self.batch {
            self.submit();
        }
    }

    /// Queue several dispatches in order.
    pub fn dispatch_all(&mut self, dispatches: impl IntoIterator<Item = Dispatch>) {
        for d in dispatches {
            self.dispatch(d);
        }
    }

    /// Queue a buffer-to-buffer copy, ordered with the dispatches around it.
    pub fn copy(
        &mut self,
        src: &wgpu::Buffer,
        src_offset: u64,
        dst: &wgpu::Buffer,
        dst_offset: u64,
        size: u64,
    ) {
        self.pending.push(Command::Copy {
            src: src.clone(),
            src_offset,
            dst: dst.clone(),
            dst_offset,
            size,
        });
        if self.pending.len() >= self.batch {
            self.submit();
        }
    }

    /// Number of dispatches and copies submitted so far.
    pub fn submitted(&self) -> usize {
        self.submitted
    }

    /// Encode and submit everything pending (does not wait).
    pub fn submit(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut encoder = self
            .gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("recorder"),
            });
        let commands = std::mem::take(&mut self.pending);
        let mut i = 0;
        while i < commands.len() {
            match &commands[i] {
                Command::Copy {
                    src,
                    src_offset,
                    dst,
                    dst_offset,
                    size,
                } => {
                    encoder.copy_buffer_to_buffer(src, *src_offset, dst, *dst_offset, *size);
                    i += 1;
                }
                Command::Dispatch(_) => {
                    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some("kernels"),
                        timestamp_writes: None,
                    });
                    while let Some(Command::Dispatch(d)) = commands.get(i) {
                        pass.set_pipeline(&d.pipeline);
                        pass.set_bind_group(0, &d.bind_group, &[]);
                        let [x, y, z] = d.workgroups;
                        pass.dispatch_workgroups(x, y, z);
                        i += 1;
                    }
                }
            }
        }
        self.submitted += commands.len();
        self.gpu.queue.submit([encoder.finish()]);
    }

    /// Drop everything pending without running it (used to compile pipelines ahead of time).
    pub fn discard(mut self) {
        self.pending.clear();
    }

    /// Submit everything and wait for the GPU to finish it, surfacing any GPU error.
    pub fn finish(mut self, context: &str) -> Result<()> {
        self.submit();
        self.gpu.wait(context)
    }
}

impl Drop for Recorder<'_> {
    fn drop(&mut self) {
        // Work recorded but never finished is still submitted, so that it is never silently lost.
        self.submit();
    }
}
