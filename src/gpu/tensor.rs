//! GPU tensors: activations ([`Tensor`]) and matrix weights ([`Weight`]).
//!
//! Activations are plain row-major buffers of f32 (or u32 for ids and indices). Weights are the
//! `[N, K]` matrices of linear layers, stored exactly as Hugging Face stores them (output rows,
//! input columns), as f16 packed two per u32 or as f32. Each weight row is padded with zeros to a
//! multiple of 8 halves / 4 floats so kernels can read it with aligned vec4 loads, and a weight
//! larger than the storage-binding limit is split by output rows into chunks, each its own buffer
//! and its own dispatch (LLaVA-7B's embed_tokens and lm_head are 262 MB; many GPUs bind 128 MiB).

use half::f16;

use crate::error::{Error, Result};
use crate::gpu::device::Gpu;
use crate::gpu::memory::{GpuBuffer, MemoryKind};

/// Element type of an activation tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    U32,
    /// IEEE half, two per 32-bit word (low half = even element), as f16 weights are stored:
    /// read with `unpack2x16float`, which needs no optional feature (the f16 KV cache).
    F16,
}

impl DType {
    pub fn bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 => 2,
        }
    }
}

/// Storage format of a weight matrix on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// IEEE half, two per u32 word (low half = even column), read with `unpack2x16float`.
    F16,
    F32,
}

impl WeightFormat {
    pub fn bytes_per_element(self) -> usize {
        match self {
            WeightFormat::F16 => 2,
            WeightFormat::F32 => 4,
        }
    }

    /// Rows are padded to this many elements (one vec4 of 32-bit words).
    pub fn row_alignment(self) -> usize {
        match self {
            WeightFormat::F16 => 8,
            WeightFormat::F32 => 4,
        }
    }
}

const WEIGHT_USAGE: wgpu::BufferUsages =
    wgpu::BufferUsages::STORAGE.union(wgpu::BufferUsages::COPY_DST);

const STORAGE_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// Buffers are rounded up to 16 bytes so the last element can be read as part of a vec4.
pub fn padded_size(bytes: usize) -> u64 {
    (bytes.max(16).div_ceil(16) * 16) as u64
}

/// A row-major activation tensor in one GPU buffer.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub buffer: GpuBuffer,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl Tensor {
    fn check_binding(gpu: &Gpu, shape: &[usize], dtype: DType, what: &str) -> Result<usize> {
        let numel: usize = shape.iter().product();
        let bytes = numel * dtype.bytes();
        if bytes as u64 > gpu.adapter_binding_bytes {
            return Err(Error::shape(
                what,
                format!(
                    "a tensor of shape {shape:?} needs {bytes} bytes, more than the device's \
                     storage-binding limit of {} bytes",
                    gpu.adapter_binding_bytes
                ),
            ));
        }
        Ok(numel)
    }

    /// An uninitialised activation tensor (contents unspecified: zero on most drivers, never
    /// relied upon).
    pub fn empty(gpu: &Gpu, shape: &[usize], dtype: DType, label: &str) -> Result<Self> {
        Self::empty_as(gpu, shape, dtype, label, MemoryKind::Activations)
    }

    /// An uninitialised tensor counted under `kind` (e.g. the KV cache).
    pub fn empty_as(
        gpu: &Gpu,
        shape: &[usize],
        dtype: DType,
        label: &str,
        kind: MemoryKind,
    ) -> Result<Self> {
        let numel = Self::check_binding(gpu, shape, dtype, label)?;
        let descriptor = wgpu::BufferDescriptor {
            label: Some(label),
            size: padded_size(numel * dtype.bytes()),
            usage: STORAGE_USAGE,
            mapped_at_creation: false,
        };
        let buffer = gpu.create_buffer(&descriptor, kind);
        Ok(Self {
            buffer,
            shape: shape.to_vec(),
            dtype,
        })
    }

    fn from_words(
        gpu: &Gpu,
        shape: &[usize],
        dtype: DType,
        words: &[u32],
        label: &str,
        kind: MemoryKind,
    ) -> Result<Self> {
        let numel = Self::check_binding(gpu, shape, dtype, label)?;
        if words.len() != numel {
            return Err(Error::shape(
                label,
                format!(
                    "shape {shape:?} holds {numel} elements but {} were given",
                    words.len()
                ),
            ));
        }
        let mut padded = words.to_vec();
        padded.resize(padded_size(numel * 4) as usize / 4, 0);
        let descriptor = wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: bytemuck::cast_slice(&padded),
            usage: STORAGE_USAGE,
        };
        let buffer = gpu.create_buffer_init(&descriptor, kind);
        Ok(Self {
            buffer,
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// An activation tensor holding `data`.
    pub fn from_f32(gpu: &Gpu, shape: &[usize], data: &[f32], label: &str) -> Result<Self> {
        Self::from_f32_as(gpu, shape, data, label, MemoryKind::Activations)
    }

    /// A tensor holding `data`, counted under `kind` (e.g. a norm weight).
    pub fn from_f32_as(
        gpu: &Gpu,
        shape: &[usize],
        data: &[f32],
        label: &str,
        kind: MemoryKind,
    ) -> Result<Self> {
        let words = bytemuck::cast_slice(data);
        Self::from_words(gpu, shape, DType::F32, words, label, kind)
    }

    pub fn from_u32(gpu: &Gpu, shape: &[usize], data: &[u32], label: &str) -> Result<Self> {
        Self::from_words(gpu, shape, DType::U32, data, label, MemoryKind::Activations)
    }

    /// The same buffer seen with another shape of at most as many elements (e.g. the first
    /// `T` rows of a buffer allocated for the longest sequence).
    pub fn view(&self, shape: &[usize]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if (numel * self.dtype.bytes()) as u64 > self.buffer.size() {
            return Err(Error::shape(
                "tensor view",
                format!(
                    "{shape:?} does not fit a buffer of {} bytes (shape {:?})",
                    self.buffer.size(),
                    self.shape
                ),
            ));
        }
        Ok(Tensor {
            buffer: self.buffer.clone(),
            shape: shape.to_vec(),
            dtype: self.dtype,
        })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size in bytes of the logical contents (without the vec4 padding).
    pub fn bytes(&self) -> u64 {
        (self.numel() * self.dtype.bytes()) as u64
    }

    /// Overwrite the contents from the host (queued; ordered before later submissions).
    pub fn write_f32(&self, gpu: &Gpu, data: &[f32]) -> Result<()> {
        self.write_words(gpu, bytemuck::cast_slice(data))
    }

    pub fn write_u32(&self, gpu: &Gpu, data: &[u32]) -> Result<()> {
        self.write_words(gpu, data)
    }

    fn write_words(&self, gpu: &Gpu, words: &[u32]) -> Result<()> {
        if words.len() > self.numel() {
            return Err(Error::shape(
                "tensor write",
                format!(
                    "{} elements do not fit a tensor of shape {:?}",
                    words.len(),
                    self.shape
                ),
            ));
        }
        gpu.queue
            .write_buffer(&self.buffer, 0, bytemuck::cast_slice(words));
        Ok(())
    }

    /// Fill every element (padding included) with NaN, so that a test sees any element a
    /// kernel failed to write.
    pub fn poison(&self, gpu: &Gpu) {
        let words = vec![f32::NAN.to_bits(); (self.buffer.size() / 4) as usize];
        gpu.queue
            .write_buffer(&self.buffer, 0, bytemuck::cast_slice(&words));
    }

    /// The number of rows and the row width of a tensor viewed as a matrix (last dim = width).
    pub fn rows_cols(&self) -> (usize, usize) {
        let cols = self.shape.last().copied().unwrap_or(1);
        let rows = self.numel().checked_div(cols).unwrap_or(0);
        (rows, cols)
    }
}

/// One row-range of a weight matrix in its own buffer.
#[derive(Clone, Debug)]
pub struct WeightChunk {
    pub buffer: GpuBuffer,
    /// First output row of the full matrix that this chunk holds.
    pub first_row: usize,
    pub rows: usize,
}

/// A linear layer's weight `W[N, K]` (HF layout), optionally with a bias `[N]`.
#[derive(Clone, Debug)]
pub struct Weight {
    pub name: String,
    /// Output features (rows).
    pub n: usize,
    /// Input features (columns).
    pub k: usize,
    pub format: WeightFormat,
    /// Elements per stored row (k rounded up to the format's row alignment).
    pub row_stride: usize,
    pub chunks: Vec<WeightChunk>,
    pub bias: Option<Tensor>,
}

impl Weight {
    /// Upload `W[N, K]` given as f32 values, converting to `format` (f16 rounds to nearest even).
    pub fn from_f32(
        gpu: &Gpu,
        name: &str,
        n: usize,
        k: usize,
        data: &[f32],
        format: WeightFormat,
    ) -> Result<Self> {
        if data.len() != n * k {
            return Err(Error::shape(
                name,
                format!(
                    "weight [{n}, {k}] needs {} values, got {}",
                    n * k,
                    data.len()
                ),
            ));
        }
        Self::upload(gpu, name, n, k, format, |row, out| match format {
            WeightFormat::F32 => {
                let src = &data[row * k..(row + 1) * k];
                let dst: &mut [f32] = bytemuck::cast_slice_mut(out);
                dst[..k].copy_from_slice(src);
            }
            WeightFormat::F16 => {
                let src = &data[row * k..(row + 1) * k];
                let dst: &mut [u16] = bytemuck::cast_slice_mut(out);
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = f16::from_f32(*s).to_bits();
                }
            }
        })
    }

    /// Upload `W[N, K]` given as IEEE halves (what f16 checkpoints hold), kept as f16.
    pub fn from_f16(gpu: &Gpu, name: &str, n: usize, k: usize, data: &[f16]) -> Result<Self> {
        if data.len() != n * k {
            return Err(Error::shape(
                name,
                format!(
                    "weight [{n}, {k}] needs {} values, got {}",
                    n * k,
                    data.len()
                ),
            ));
        }
        Self::upload(gpu, name, n, k, WeightFormat::F16, |row, out| {
            let dst: &mut [f16] = bytemuck::cast_slice_mut(out);
            dst[..k].copy_from_slice(&data[row * k..(row + 1) * k]);
        })
    }

    /// Rows per chunk so that one chunk fits a storage binding. Chunks hold a multiple of 64
    /// rows when they can (the matmul tile), so only the last chunk has a partial tile.
    pub fn rows_per_chunk(max_binding_bytes: u64, row_bytes: usize, n: usize) -> Result<usize> {
        let fit = (max_binding_bytes / row_bytes as u64) as usize;
        if fit == 0 {
            return Err(Error::shape(
                "weight",
                format!(
                    "one row of {row_bytes} bytes exceeds the storage-binding limit of \
                     {max_binding_bytes} bytes"
                ),
            ));
        }
        let rows = if fit >= 64 { fit / 64 * 64 } else { fit };
        Ok(rows.min(n.max(1)))
    }

    /// The buffers of `W[N, K]` in `format` with no data written: the same chunks and sizes
    /// an upload creates, for `llava-wgpu memory`, which measures a model without loading it.
    pub fn allocate(
        gpu: &Gpu,
        name: &str,
        n: usize,
        k: usize,
        format: WeightFormat,
    ) -> Result<Self> {
        Self::build(gpu, name, n, k, format, |rows, row_words| {
            let descriptor = wgpu::BufferDescriptor {
                label: Some(name),
                size: (rows * row_words * 4) as u64,
                usage: WEIGHT_USAGE,
                mapped_at_creation: false,
            };
            gpu.create_buffer(&descriptor, MemoryKind::Weights)
        })
    }

    fn upload(
        gpu: &Gpu,
        name: &str,
        n: usize,
        k: usize,
        format: WeightFormat,
        mut fill_row: impl FnMut(usize, &mut [u32]),
    ) -> Result<Self> {
        let mut words = Vec::new();
        let mut first_row = 0;
        Self::build(gpu, name, n, k, format, |rows, row_words| {
            words.clear();
            words.resize(rows * row_words, 0u32);
            for r in 0..rows {
                fill_row(
                    first_row + r,
                    &mut words[r * row_words..(r + 1) * row_words],
                );
            }
            first_row += rows;
            let descriptor = wgpu::util::BufferInitDescriptor {
                label: Some(name),
                contents: bytemuck::cast_slice(&words),
                usage: WEIGHT_USAGE,
            };
            gpu.create_buffer_init(&descriptor, MemoryKind::Weights)
        })
    }

    /// Split `W[N, K]` into chunks that each fit a storage binding and create each chunk's
    /// buffer with `chunk_buffer(rows, words per row)`, in row order.
    fn build(
        gpu: &Gpu,
        name: &str,
        n: usize,
        k: usize,
        format: WeightFormat,
        mut chunk_buffer: impl FnMut(usize, usize) -> GpuBuffer,
    ) -> Result<Self> {
        if n == 0 || k == 0 {
            return Err(Error::shape(name, format!("weight [{n}, {k}] is empty")));
        }
        let row_stride = k.next_multiple_of(format.row_alignment());
        let row_words = row_stride * format.bytes_per_element() / 4;
        let rows_per_chunk = Self::rows_per_chunk(gpu.max_binding_bytes, row_words * 4, n)
            .map_err(|e| Error::shape(name, e.to_string()))?;
        let mut chunks = Vec::new();
        let mut first_row = 0;
        while first_row < n {
            let rows = rows_per_chunk.min(n - first_row);
            chunks.push(WeightChunk {
                buffer: chunk_buffer(rows, row_words),
                first_row,
                rows,
            });
            first_row += rows;
        }
        Ok(Self {
            name: name.to_string(),
            n,
            k,
            format,
            row_stride,
            chunks,
            bias: None,
        })
    }

    pub fn with_bias(mut self, gpu: &Gpu, bias: &[f32]) -> Result<Self> {
        if bias.len() != self.n {
            return Err(Error::shape(
                &self.name,
                format!("bias has {} values for {} output rows", bias.len(), self.n),
            ));
        }
        self.bias = Some(Tensor::from_f32_as(
            gpu,
            &[self.n],
            bias,
            &format!("{}.bias", self.name),
            MemoryKind::Weights,
        )?);
        Ok(self)
    }

    /// Bytes the weight occupies on the GPU (padding included).
    pub fn gpu_bytes(&self) -> u64 {
        let chunks: u64 = self.chunks.iter().map(|c| c.buffer.size()).sum();
        chunks + self.bias.as_ref().map_or(0, |b| b.buffer.size())
    }

    /// Bytes a kernel streams to read the whole weight once (no padding).
    pub fn stream_bytes(&self) -> u64 {
        (self.n * self.k * self.format.bytes_per_element()) as u64
            + self.bias.as_ref().map_or(0, |b| b.bytes())
    }
}
