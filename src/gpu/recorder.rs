//! Records dispatches into compute passes and submits them in batches.
//!
//! Consecutive dispatches share one compute pass (wgpu inserts the storage-buffer barriers
//! between them); a buffer copy ends the pass. Work is submitted every `batch` commands so the
//! GPU starts on the first layers while the CPU is still recording the last ones.

use std::sync::Arc;

use crate::error::Result;
use crate::gpu::device::Gpu;
use crate::gpu::kernels::Dispatch;
use crate::gpu::profiler::{DispatchMeta, KernelEvent, PendingBatch, Profiler, TimingMode};

/// Commands are submitted in groups of this many unless the caller chooses otherwise.
pub const DEFAULT_BATCH: usize = 48;

enum Command {
    /// A dispatch and the stage it was recorded in (shared, so a replayed plan records its
    /// dispatches without copying them).
    Dispatch(Arc<Dispatch>, &'static str),
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
    stage: &'static str,
    /// Only build pipelines: never submit (see [`Recorder::compile_only`]).
    compile_only: bool,
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
            stage: "gpu",
            compile_only: false,
        }
    }

    /// A recorder whose dispatches are built (so their pipelines compile) and then dropped:
    /// nothing it records ever runs, however many dispatches a batch would submit.
    pub fn compile_only(gpu: &'g Gpu) -> Self {
        let mut rec = Self::new(gpu);
        rec.compile_only = true;
        rec
    }

    pub fn gpu(&self) -> &'g Gpu {
        self.gpu
    }

    /// Name the pipeline stage later dispatches belong to (profiles group by it).
    pub fn set_stage(&mut self, stage: &'static str) {
        self.stage = stage;
    }

    /// Queue one dispatch.
    pub fn dispatch(&mut self, dispatch: Dispatch) {
        self.dispatch_shared(&Arc::new(dispatch));
    }

    /// Queue a dispatch that is kept to be recorded again (a replayed decode step): only its
    /// reference count moves, however many times it is recorded.
    pub fn dispatch_shared(&mut self, dispatch: &Arc<Dispatch>) {
        self.pending
            .push(Command::Dispatch(Arc::clone(dispatch), self.stage));
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

    /// Encode and submit everything pending (does not wait). Returns the queue's index of the
    /// last submission, which a caller can wait for alone (`None` when nothing was pending).
    pub fn submit(&mut self) -> Option<wgpu::SubmissionIndex> {
        if self.compile_only {
            self.pending.clear();
        }
        if self.pending.is_empty() {
            return None;
        }
        let commands = std::mem::take(&mut self.pending);
        let mut profiler = self.gpu.profiler.lock().unwrap_or_else(|p| p.into_inner());
        Some(match profiler.as_mut() {
            Some(p) if p.mode == TimingMode::CpuWallClock => self.submit_one_by_one(&commands, p),
            p => self.submit_timed(&commands, p),
        })
    }

    fn encoder(&self) -> wgpu::CommandEncoder {
        self.gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("recorder"),
            })
    }

    fn set_and_dispatch(pass: &mut wgpu::ComputePass<'_>, d: &Dispatch) {
        pass.set_pipeline(&d.pipeline);
        pass.set_bind_group(0, &d.bind_group, &[]);
        let [x, y, z] = d.workgroups;
        pass.dispatch_workgroups(x, y, z);
    }

    /// Consecutive dispatches share one compute pass; copies go between passes. With a profiler
    /// in a timestamp mode, every dispatch is bracketed by two timestamps: written inside the
    /// pass when the adapter allows it, else at the boundaries of one pass per dispatch.
    fn submit_timed(
        &self,
        commands: &[Command],
        mut profiler: Option<&mut Profiler>,
    ) -> wgpu::SubmissionIndex {
        let dispatches = commands
            .iter()
            .filter(|c| matches!(c, Command::Dispatch(..)))
            .count() as u32;
        let timing = profiler.as_ref().filter(|_| dispatches > 0).map(|p| {
            let set = self.gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2 * dispatches,
            });
            (set, p.mode == TimingMode::InsidePasses)
        });
        let one_pass_per_dispatch = matches!(timing, Some((_, false)));
        let mut encoder = self.encoder();
        let mut metas = Vec::with_capacity(dispatches as usize);
        let mut i = 0;
        while i < commands.len() {
            if let Command::Copy {
                src,
                src_offset,
                dst,
                dst_offset,
                size,
            } = &commands[i]
            {
                encoder.copy_buffer_to_buffer(src, *src_offset, dst, *dst_offset, *size);
                i += 1;
                continue;
            }
            let q = 2 * metas.len() as u32;
            let boundary_writes = match &timing {
                Some((set, false)) => Some(wgpu::ComputePassTimestampWrites {
                    query_set: set,
                    beginning_of_pass_write_index: Some(q),
                    end_of_pass_write_index: Some(q + 1),
                }),
                _ => None,
            };
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("kernels"),
                timestamp_writes: boundary_writes,
            });
            while let Some(Command::Dispatch(d, stage)) = commands.get(i) {
                let q = 2 * metas.len() as u32;
                if let Some((set, true)) = &timing {
                    pass.write_timestamp(set, q);
                }
                Self::set_and_dispatch(&mut pass, d);
                if let Some((set, true)) = &timing {
                    pass.write_timestamp(set, q + 1);
                }
                if timing.is_some() {
                    metas.push(meta(d, stage));
                }
                i += 1;
                if one_pass_per_dispatch {
                    break;
                }
            }
        }
        let readback = timing.as_ref().map(|(set, _)| {
            Profiler::resolve(
                &self.gpu.memory,
                &self.gpu.device,
                &mut encoder,
                set,
                2 * dispatches,
            )
        });
        let index = self.gpu.queue.submit([encoder.finish()]);
        if let (Some(readback), Some(p)) = (readback, profiler.as_mut()) {
            p.pending.push(PendingBatch { readback, metas });
        }
        index
    }

    /// Without timestamp queries: submit and wait for each dispatch alone, timed on the CPU.
    fn submit_one_by_one(
        &self,
        commands: &[Command],
        profiler: &mut Profiler,
    ) -> wgpu::SubmissionIndex {
        let mut last = None;
        for command in commands {
            let mut encoder = self.encoder();
            match command {
                Command::Copy {
                    src,
                    src_offset,
                    dst,
                    dst_offset,
                    size,
                } => {
                    encoder.copy_buffer_to_buffer(src, *src_offset, dst, *dst_offset, *size);
                    last = Some(self.gpu.queue.submit([encoder.finish()]));
                }
                Command::Dispatch(d, stage) => {
                    {
                        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                            label: Some(d.kernel),
                            timestamp_writes: None,
                        });
                        Self::set_and_dispatch(&mut pass, d);
                    }
                    let start_ns = profiler.cpu_now_ns();
                    last = Some(self.gpu.queue.submit([encoder.finish()]));
                    // A failed wait surfaces at the next `Gpu::wait`.
                    let _ = self.gpu.device.poll(wgpu::PollType::wait_indefinitely());
                    let m = meta(d, stage);
                    profiler.events.push(KernelEvent {
                        stage: m.stage,
                        kernel: m.kernel,
                        shape: m.shape,
                        flops: m.flops,
                        bytes: m.bytes,
                        start_ns,
                        end_ns: profiler.cpu_now_ns(),
                    });
                }
            }
        }
        last.expect("called with at least one command")
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

fn meta(d: &Dispatch, stage: &'static str) -> DispatchMeta {
    DispatchMeta {
        stage,
        kernel: d.kernel,
        shape: d.shape.clone(),
        flops: d.flops,
        bytes: d.bytes,
    }
}

impl Drop for Recorder<'_> {
    fn drop(&mut self) {
        // Work recorded but never finished is still submitted, so that it is never silently lost.
        self.submit();
    }
}
