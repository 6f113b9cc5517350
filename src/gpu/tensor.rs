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
    /// ggml's Q8_0: blocks of 32 weights, one f16 scale `d` and 32 int8 `q`; weight = d·q.
    Q8_0,
    /// ggml's Q4_0: blocks of 32 weights, one f16 scale `d` and 16 bytes of nibbles (byte j:
    /// element j in the low nibble, element j + 16 in the high one); weight = d·(q − 8).
    Q4_0,
}

/// Weights per block of the block-quantized formats (ggml's QK8_0 = QK4_0 = 32).
pub const QUANT_BLOCK: usize = 32;

impl WeightFormat {
    pub const ALL: [WeightFormat; 4] = [
        WeightFormat::F32,
        WeightFormat::F16,
        WeightFormat::Q8_0,
        WeightFormat::Q4_0,
    ];

    /// The lower-case name used in checkpoints' metadata and on the command line ("q4_0").
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F16 => "f16",
            WeightFormat::F32 => "f32",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::Q4_0 => "q4_0",
        }
    }

    /// The format called `name` (see [`Self::name`]).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Whether the format stores blocks of [`QUANT_BLOCK`] weights with a shared scale.
    pub fn is_quantized(self) -> bool {
        matches!(self, WeightFormat::Q8_0 | WeightFormat::Q4_0)
    }

    /// Bytes of one ggml block (f16 scale + quants): 34 for Q8_0, 18 for Q4_0; None otherwise.
    pub fn block_bytes(self) -> Option<usize> {
        self.quant_bytes_per_block().map(|q| 2 + q)
    }

    /// Bytes of a block's quants alone (its scale excluded).
    pub fn quant_bytes_per_block(self) -> Option<usize> {
        match self {
            WeightFormat::Q8_0 => Some(QUANT_BLOCK),
            WeightFormat::Q4_0 => Some(QUANT_BLOCK / 2),
            WeightFormat::F16 | WeightFormat::F32 => None,
        }
    }

    /// Rows of the float formats are padded to this many elements (one vec4 of 32-bit words);
    /// quantized rows are whole blocks, which are already vec4-aligned (see [`Self::storage_bytes`]).
    pub fn row_alignment(self) -> usize {
        match self {
            WeightFormat::F16 => 8,
            WeightFormat::F32 => 4,
            WeightFormat::Q8_0 | WeightFormat::Q4_0 => QUANT_BLOCK,
        }
    }

    /// Bytes of one weight row as a kernel streams it (no padding; scales included).
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            WeightFormat::F16 => cols * 2,
            WeightFormat::F32 => cols * 4,
            WeightFormat::Q8_0 | WeightFormat::Q4_0 => {
                cols.div_ceil(QUANT_BLOCK) * self.block_bytes().unwrap_or(0)
            }
        }
    }

    /// Exact bytes of the GPU buffer holding an `[rows, cols]` weight in this format (no bias),
    /// so buffers can be sized without data. A weight split into row chunks allocates this for
    /// each chunk's rows; the sum equals `storage_bytes(n, cols)` since chunks hold multiples
    /// of 64 rows except the last.
    ///
    /// Float rows are padded to [`Self::row_alignment`]. Quantized weights hold two regions, so
    /// every load is an aligned u32/vec4 load (ggml's 34- and 18-byte blocks are not 4-byte
    /// aligned, and WGSL has no 8- or 16-bit storage): first the quants of every block, row by
    /// row (32 or 16 bytes a block, so each block starts on 16 bytes), then the f16 scales in
    /// the same order, padded to 16 bytes. Block `b` of row `r` is scale `r·nb + b` followed by
    /// quants `r·nb + b`: ggml's block bytes are recovered exactly (`quant::to_ggml_blocks`).
    pub fn storage_bytes(self, rows: usize, cols: usize) -> u64 {
        let bytes = match self {
            WeightFormat::F16 | WeightFormat::F32 => {
                rows * self.row_bytes(cols.next_multiple_of(self.row_alignment()))
            }
            WeightFormat::Q8_0 | WeightFormat::Q4_0 => {
                let blocks = rows * cols.div_ceil(QUANT_BLOCK);
                let quants = blocks * self.quant_bytes_per_block().unwrap_or(0);
                quants + (blocks * 2).next_multiple_of(16)
            }
        };
        bytes as u64
    }

    /// 32-bit words of one stored row in the float formats (None for quantized ones, whose
    /// rows are split over two regions).
    pub fn row_words(self, cols: usize) -> Option<usize> {
        match self {
            WeightFormat::F16 | WeightFormat::F32 => {
                Some(self.row_bytes(cols.next_multiple_of(self.row_alignment())) / 4)
            }
            WeightFormat::Q8_0 | WeightFormat::Q4_0 => None,
        }
    }
}

impl std::str::FromStr for WeightFormat {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        Self::from_name(name).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|f| f.name()).collect();
            Error::argument(
                "weight_format",
                format!("'{name}' is not one of {}", names.join(", ")),
            )
        })
    }
}

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
    /// Quantized formats take their blocks from [`Self::from_blocks`] instead.
    pub fn from_f32(
        gpu: &Gpu,
        name: &str,
        n: usize,
        k: usize,
        data: &[f32],
        format: WeightFormat,
    ) -> Result<Self> {
        check_len(name, n, k, data.len(), "values")?;
        let row_words = match format.row_words(k) {
            Some(words) if !format.is_quantized() => words,
            _ => {
                return Err(Error::shape(
                    name,
                    format!("{format:?} weights are uploaded from their blocks, not from floats"),
                ))
            }
        };
        Self::upload(gpu, name, n, k, format, |first_row, rows, out| {
            for r in 0..rows {
                let src = &data[(first_row + r) * k..(first_row + r + 1) * k];
                let dst = &mut out[r * row_words..(r + 1) * row_words];
                if format == WeightFormat::F32 {
                    bytemuck::cast_slice_mut::<u32, f32>(dst)[..k].copy_from_slice(src);
                } else {
                    let halves: &mut [u16] = bytemuck::cast_slice_mut(dst);
                    for (d, s) in halves.iter_mut().zip(src) {
                        *d = f16::from_f32(*s).to_bits();
                    }
                }
            }
        })
    }

    /// Upload `W[N, K]` given as IEEE halves (what f16 checkpoints hold), kept as f16.
    pub fn from_f16(gpu: &Gpu, name: &str, n: usize, k: usize, data: &[f16]) -> Result<Self> {
        check_len(name, n, k, data.len(), "values")?;
        let row_words = WeightFormat::F16.row_words(k).unwrap_or(0);
        Self::upload(
            gpu,
            name,
            n,
            k,
            WeightFormat::F16,
            |first_row, rows, out| {
                for r in 0..rows {
                    let dst: &mut [f16] =
                        bytemuck::cast_slice_mut(&mut out[r * row_words..(r + 1) * row_words]);
                    dst[..k].copy_from_slice(&data[(first_row + r) * k..(first_row + r + 1) * k]);
                }
            },
        )
    }

    /// Upload `W[N, K]` given as ggml blocks (Q8_0 or Q4_0, row-major: row r holds blocks
    /// `r·K/32 ..`), unchanged except for the split into the quants and scales regions that
    /// [`WeightFormat::storage_bytes`] describes. K must be a multiple of 32.
    pub fn from_blocks(
        gpu: &Gpu,
        name: &str,
        n: usize,
        k: usize,
        format: WeightFormat,
        blocks: &[u8],
    ) -> Result<Self> {
        let (Some(block_bytes), Some(quant_bytes)) =
            (format.block_bytes(), format.quant_bytes_per_block())
        else {
            return Err(Error::shape(
                name,
                format!("{format:?} is not a block format"),
            ));
        };
        if !k.is_multiple_of(QUANT_BLOCK) {
            return Err(Error::shape(
                name,
                format!("rows of {k} values are not whole blocks of {QUANT_BLOCK}"),
            ));
        }
        let per_row = k / QUANT_BLOCK;
        check_len(name, n, per_row * block_bytes, blocks.len(), "block bytes")?;
        Self::upload(gpu, name, n, k, format, |first_row, rows, out| {
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(out);
            let count = rows * per_row;
            let (quants, scales) = bytes.split_at_mut(count * quant_bytes);
            let src = &blocks[first_row * per_row * block_bytes..][..count * block_bytes];
            for (i, block) in src.chunks_exact(block_bytes).enumerate() {
                scales[i * 2..i * 2 + 2].copy_from_slice(&block[..2]);
                quants[i * quant_bytes..(i + 1) * quant_bytes].copy_from_slice(&block[2..]);
            }
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
        let row_stride = k.next_multiple_of(format.row_alignment());
        // A quantized chunk's scales region is padded by up to 14 bytes: keep room for it.
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
        (self.n * self.format.row_bytes(self.k)) as u64
            + self.bias.as_ref().map_or(0, |b| b.bytes())
    }
}
