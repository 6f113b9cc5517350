//! Copies small results (token ids, a logits row, scores) back to the host.

use crate::error::{Error, Result};
use crate::gpu::device::Gpu;
use crate::gpu::memory::{GpuBuffer, MemoryKind};
use crate::gpu::tensor::Tensor;

impl Gpu {
    /// Read `count` 32-bit words starting at word `offset` of `buffer`. Waits for all work
    /// submitted before it.
    pub fn read_words(
        &self,
        buffer: &wgpu::Buffer,
        offset: usize,
        count: usize,
    ) -> Result<Vec<u32>> {
        let size = (count * 4) as u64;
        let start = (offset * 4) as u64;
        if start + size > buffer.size() {
            return Err(Error::shape(
                "readback",
                format!(
                    "words {offset}..{} are outside a buffer of {} bytes",
                    offset + count,
                    buffer.size()
                ),
            ));
        }
        if count == 0 {
            return Ok(Vec::new());
        }
        // Copy sizes must be multiples of 4 bytes (always true here) and the staging buffer is
        // rounded up to the copy alignment.
        let staging = self.staging_buffer(size);
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("readback"),
            });
        encoder.copy_buffer_to_buffer(buffer, start, &staging, 0, size);
        self.queue.submit([encoder.finish()]);
        let (sender, receiver) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |result| {
            let _ = sender.send(result);
        });
        self.wait("readback")?;
        receiver
            .recv()
            .map_err(|e| Error::gpu("readback", e))?
            .map_err(|e| Error::gpu("readback", e))?;
        let view = staging
            .get_mapped_range(..)
            .map_err(|e| Error::gpu("readback", e))?;
        let words = bytemuck::cast_slice::<u8, u32>(&view[..size as usize]).to_vec();
        drop(view);
        staging.unmap();
        Ok(words)
    }

    /// A mappable buffer that `bytes` are copied into to be read on the host (rounded up to the
    /// copy alignment), counted as scratch.
    pub fn staging_buffer(&self, bytes: u64) -> GpuBuffer {
        let descriptor = wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes.next_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT),
            usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ,
            mapped_at_creation: false,
        };
        self.create_buffer(&descriptor, MemoryKind::Scratch)
    }

    /// The whole tensor as f32 values.
    pub fn read_f32(&self, tensor: &Tensor) -> Result<Vec<f32>> {
        let words = self.read_words(&tensor.buffer, 0, tensor.numel())?;
        Ok(words.into_iter().map(f32::from_bits).collect())
    }

    /// The whole tensor as u32 values.
    pub fn read_u32(&self, tensor: &Tensor) -> Result<Vec<u32>> {
        self.read_words(&tensor.buffer, 0, tensor.numel())
    }

    /// One row of a matrix-shaped tensor (e.g. the last logits row).
    pub fn read_row_f32(&self, tensor: &Tensor, row: usize) -> Result<Vec<f32>> {
        self.read_rows_f32(tensor, row..row + 1)
    }

    /// Rows `[start, end)` of a matrix-shaped f32 tensor, one after another.
    pub fn read_rows_f32(&self, tensor: &Tensor, rows: std::ops::Range<usize>) -> Result<Vec<f32>> {
        let (total, cols) = tensor.rows_cols();
        if rows.end > total || rows.start > rows.end {
            return Err(Error::shape(
                "readback",
                format!("rows {rows:?} of a {total}-row tensor"),
            ));
        }
        let words = self.read_words(&tensor.buffer, rows.start * cols, rows.len() * cols)?;
        Ok(words.into_iter().map(f32::from_bits).collect())
    }
}

/// A few words that submitted work copies into a staging buffer, read while the GPU goes on
/// with later submissions (the decode loop reads each token this way, a few steps behind the
/// GPU). Collect reads in the order they were started.
pub struct PendingRead {
    staging: GpuBuffer,
    bytes: u64,
    submission: wgpu::SubmissionIndex,
    mapped: std::sync::mpsc::Receiver<std::result::Result<(), wgpu::BufferAsyncError>>,
}

impl PendingRead {
    /// Start mapping the first `bytes` of `staging`, which the submission `submission` fills.
    pub fn start(staging: &GpuBuffer, bytes: u64, submission: wgpu::SubmissionIndex) -> Self {
        let (sender, mapped) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, ..bytes, move |result| {
            let _ = sender.send(result);
        });
        Self {
            staging: staging.clone(),
            bytes,
            submission,
            mapped,
        }
    }

    /// Wait for its submission only (not for later ones) and return the words.
    pub fn wait(self, gpu: &Gpu) -> Result<Vec<u32>> {
        gpu.device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(self.submission),
                timeout: None,
            })
            .map_err(|e| Error::gpu("readback", e))?;
        gpu.check_errors("readback")?;
        self.mapped
            .recv()
            .map_err(|e| Error::gpu("readback", e))?
            .map_err(|e| Error::gpu("readback", e))?;
        let view = self
            .staging
            .get_mapped_range(..self.bytes)
            .map_err(|e| Error::gpu("readback", e))?;
        let words = bytemuck::cast_slice::<u8, u32>(&view).to_vec();
        drop(view);
        self.staging.unmap();
        Ok(words)
    }
}
