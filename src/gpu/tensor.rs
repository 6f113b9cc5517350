//! GPU tensors: activations ([`Tensor`]) and matrix weights ([`Weight`]).
//!
//! Activations are plain row-major buffers of f32 (or u32 for ids and indices). Weights are the
//! `[N, K]` matrices of linear layers, stored exactly as Hugging Face stores them (output rows,
//! input columns), as f32, f16 or bf16 (two halves per u32), or as ggml blocks (`format.rs`).
//! Each float row is padded with zeros to a multiple of 8 halves / 4 floats so kernels can read
//! it with aligned vec4 loads, and a weight
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
    /// The lower-case name outputs print (`f16`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::U32 => "u32",
            DType::F16 => "f16",
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 => 2,
        }
    }
}

pub use crate::gpu::format::{WeightFormat, QUANT_BLOCK};

/// COPY_SRC lets a test read a weight's stored layout back (the ggml blocks of a quantized one).
const WEIGHT_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

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

    /// Write `values` at element `offset` of an f32 tensor (queued like any buffer write: it
    /// lands after the work already submitted).
    pub fn write_f32_at(&self, gpu: &Gpu, offset: usize, values: &[f32]) -> Result<()> {
        if self.dtype != DType::F32 || offset + values.len() > self.numel() {
            return Err(Error::shape(
                "tensor write",
                format!(
                    "{} f32 values at element {offset} do not fit a {:?} tensor of shape {:?}",
                    values.len(),
                    self.dtype,
                    self.shape
                ),
            ));
        }
        gpu.queue.write_buffer(
            &self.buffer,
            offset as u64 * 4,
            bytemuck::cast_slice(values),
        );
        Ok(())
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

fn check_len(name: &str, n: usize, per_row: usize, got: usize, what: &str) -> Result<()> {
    if got != n * per_row {
        return Err(Error::shape(
            name,
            format!("weight of {n} rows needs {} {what}, got {got}", n * per_row),
        ));
    }
    Ok(())
}

/// One row-range of a weight matrix in its own buffer.
#[derive(Clone, Debug)]
pub struct WeightChunk {
    pub buffer: GpuBuffer,
    /// First output row of the full matrix that this chunk holds.
    pub first_row: usize,
    pub rows: usize,
    /// How the chunk's rows are stored. One weight's chunks share a format, except in a stack
    /// of weights stored in different types ([`Weight::stack`]).
    pub format: WeightFormat,
}

/// A linear layer's weight `W[N, K]` (HF layout), optionally with a bias `[N]`.
#[derive(Clone, Debug)]
pub struct Weight {
    pub name: String,
    /// Output features (rows).
    pub n: usize,
    /// Input features (columns).
    pub k: usize,
    pub chunks: Vec<WeightChunk>,
    pub bias: Option<Tensor>,
}

impl Weight {
    /// Upload `W[N, K]` given as f32 values, converting to the float `format` (f16 and bf16
    /// round to nearest even). Block formats take their blocks from [`Self::from_blocks`].
    pub fn from_f32(
        gpu: &Gpu,
        name: &str,
        n: usize,
        k: usize,
        data: &[f32],
        format: WeightFormat,
    ) -> Result<Self> {
        check_len(name, n, k, data.len(), "values")?;
        let bits: Vec<u8> = match format {
            WeightFormat::F32 => bytemuck::cast_slice(data).to_vec(),
            WeightFormat::F16 => data
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            WeightFormat::BF16 => data
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
            _ => {
                return Err(Error::shape(
                    name,
                    format!("{format:?} weights are uploaded from their blocks, not from floats"),
                ))
            }
        };
        Self::from_elements(gpu, name, n, k, format, &bits)
    }

    /// Upload `W[N, K]` given as the little-endian elements of the float `format` (f32, f16 or
    /// bf16 bits, as a checkpoint file stores them), each row padded to the format's alignment.
    pub fn from_elements(
        gpu: &Gpu,
        name: &str,
        n: usize,
        k: usize,
        format: WeightFormat,
        bytes: &[u8],
    ) -> Result<Self> {
        let (Some(size), Some(row_words)) = (format.element_bytes(), format.row_words(k)) else {
            return Err(Error::shape(name, format!("{format:?} is a block format")));
        };
        check_len(name, n, k * size, bytes.len(), "bytes")?;
        Self::upload(gpu, name, n, k, format, |first_row, rows, out| {
            let dst: &mut [u8] = bytemuck::cast_slice_mut(out);
            for r in 0..rows {
                let src = &bytes[(first_row + r) * k * size..][..k * size];
                dst[r * row_words * 4..][..k * size].copy_from_slice(src);
            }
        })
    }

    /// Upload `W[N, K]` given as the bytes of `format`: float elements or ggml blocks.
    pub fn from_stored(
        gpu: &Gpu,
        name: &str,
        n: usize,
        k: usize,
        format: WeightFormat,
        bytes: &[u8],
    ) -> Result<Self> {
        if format.is_quantized() {
            Self::from_blocks(gpu, name, n, k, format, bytes)
        } else {
            Self::from_elements(gpu, name, n, k, format, bytes)
        }
    }

    /// Upload `W[N, K]` given as ggml blocks of `format` (row-major: row r holds blocks
    /// `r·K/B ..`), unchanged except for the split into bodies and scale fields that
    /// [`WeightFormat::storage_bytes`] describes. K must be a multiple of the block size.
    pub fn from_blocks(
        gpu: &Gpu,
        name: &str,
        n: usize,
        k: usize,
        format: WeightFormat,
        blocks: &[u8],
    ) -> Result<Self> {
        let Some(layout) = format.blocks() else {
            return Err(Error::shape(
                name,
                format!("{format:?} is not a block format"),
            ));
        };
        format.check_row(name, k)?;
        let per_row = k / layout.weights;
        check_len(name, n, per_row * layout.bytes, blocks.len(), "block bytes")?;
        let body_bytes = layout.body_bytes();
        Self::upload(gpu, name, n, k, format, |first_row, rows, out| {
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(out);
            let count = rows * per_row;
            let (bodies, scales) = bytes.split_at_mut(count * body_bytes);
            let src = &blocks[first_row * per_row * layout.bytes..][..count * layout.bytes];
            for (i, block) in src.chunks_exact(layout.bytes).enumerate() {
                let (body, scale) = layout.split(block);
                bodies[i * body_bytes..(i + 1) * body_bytes].copy_from_slice(&body);
                scales[i * scale.len()..(i + 1) * scale.len()].copy_from_slice(scale);
            }
        })
    }

    /// The weights `parts`, which share K, stacked by rows into one `[Σn, K]` weight: their
    /// chunks, renumbered, each in its own format (a GGUF file may store LLaMA's gate and up
    /// projections in different types). Their biases are not kept.
    pub fn stack(name: &str, parts: Vec<Weight>) -> Result<Self> {
        let k = parts.first().map_or(0, |p| p.k);
        let mut chunks = Vec::new();
        let mut n = 0;
        for part in parts {
            if part.k != k || part.bias.is_some() {
                return Err(Error::shape(
                    name,
                    format!(
                        "cannot stack {} [{}, {}] under K = {k}",
                        part.name, part.n, part.k
                    ),
                ));
            }
            for chunk in part.chunks {
                chunks.push(WeightChunk {
                    first_row: n + chunk.first_row,
                    ..chunk
                });
            }
            n += part.n;
        }
        if n == 0 {
            return Err(Error::shape(name, "a stack of no weights"));
        }
        Ok(Self {
            name: name.to_string(),
            n,
            k,
            chunks,
            bias: None,
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
        format.check_row(name, k)?;
        Self::build(gpu, name, n, k, format, |_, rows| {
            let descriptor = wgpu::BufferDescriptor {
                label: Some(name),
                size: format.storage_bytes(rows, k),
                usage: WEIGHT_USAGE,
                mapped_at_creation: false,
            };
            gpu.create_buffer(&descriptor, MemoryKind::Weights)
        })
    }

    /// Creates the buffers of `W[N, K]` and lets `fill_chunk` write each chunk's words
    /// (`fill_chunk(first_row, rows, words)`; a chunk is [`WeightFormat::storage_bytes`] long).
    fn upload(
        gpu: &Gpu,
        name: &str,
        n: usize,
        k: usize,
        format: WeightFormat,
        mut fill_chunk: impl FnMut(usize, usize, &mut [u32]),
    ) -> Result<Self> {
        let mut words = Vec::new();
        Self::build(gpu, name, n, k, format, |first_row, rows| {
            words.clear();
            words.resize(format.storage_bytes(rows, k) as usize / 4, 0u32);
            fill_chunk(first_row, rows, &mut words);
            let descriptor = wgpu::util::BufferInitDescriptor {
                label: Some(name),
                contents: bytemuck::cast_slice(&words),
                usage: WEIGHT_USAGE,
            };
            gpu.create_buffer_init(&descriptor, MemoryKind::Weights)
        })
    }

    /// The one place weight buffers are created: splits `W[N, K]` into row chunks that each fit
    /// a storage binding and creates each chunk's buffer with `chunk_buffer(first_row, rows)`,
    /// in row order.
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
        // A block format's scales region is padded by up to 14 bytes: keep room for it.
        let (binding, row_bytes) = match format.row_words(k) {
            Some(words) => (gpu.max_binding_bytes, words * 4),
            None => (
                gpu.max_binding_bytes.saturating_sub(16),
                format.row_bytes(k),
            ),
        };
        let rows_per_chunk = Self::rows_per_chunk(binding, row_bytes, n)
            .map_err(|e| Error::shape(name, e.to_string()))?;
        let mut chunks = Vec::new();
        let mut first_row = 0;
        while first_row < n {
            let rows = rows_per_chunk.min(n - first_row);
            chunks.push(WeightChunk {
                buffer: chunk_buffer(first_row, rows),
                first_row,
                rows,
                format,
            });
            first_row += rows;
        }
        Ok(Self {
            name: name.to_string(),
            n,
            k,
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

    /// The formats of the weight's chunks, each once, in row order.
    pub fn formats(&self) -> Vec<WeightFormat> {
        formats_of([self])
    }

    /// The formats' names joined by `+` ("q4_k", or "q4_k+q6_k" for a mixed stack).
    pub fn format_label(&self) -> String {
        let names: Vec<&str> = self.formats().iter().map(|f| f.name()).collect();
        names.join("+")
    }

    /// Bytes the weight occupies on the GPU (padding included).
    pub fn gpu_bytes(&self) -> u64 {
        let chunks: u64 = self.chunks.iter().map(|c| c.buffer.size()).sum();
        chunks + self.bias.as_ref().map_or(0, |b| b.buffer.size())
    }

    /// Bytes a kernel streams to read the whole weight once (no padding).
    pub fn stream_bytes(&self) -> u64 {
        let rows: usize = self
            .chunks
            .iter()
            .map(|c| c.rows * c.format.row_bytes(self.k))
            .sum();
        rows as u64 + self.bias.as_ref().map_or(0, |b| b.bytes())
    }
}

/// The formats of every chunk of `weights`, each once, in order of appearance.
pub fn formats_of<'w>(weights: impl IntoIterator<Item = &'w Weight>) -> Vec<WeightFormat> {
    let mut formats: Vec<WeightFormat> = Vec::new();
    for chunk in weights.into_iter().flat_map(|w| &w.chunks) {
        if !formats.contains(&chunk.format) {
            formats.push(chunk.format);
        }
    }
    formats
}
