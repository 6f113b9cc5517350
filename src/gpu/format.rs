//! Weight formats: the float types and ggml's block-quantized types, one description each.
//!
//! A block format is ggml's bytes exactly (`ggml-common.h`): a block of 32 weights (Q4_0, Q4_1,
//! Q5_0, Q5_1, Q8_0) or of 256 (the K-quants Q2_K … Q6_K) with its scales inside. On the GPU
//! every block is split in two so that every load is an aligned 32-bit (mostly vec4) load,
//! since ggml's blocks are 18, 22, 34, 110 or 210 bytes long and WGSL has no 8- or 16-bit
//! storage:
//! - the *body*, the block without its f16 scale field, in one region, block after block (16,
//!   20, 32, 80, 108, 144, 176 or 208 bytes: whole words);
//! - the f16 scale field (`d`; or `d` and `m`/`dmin`, 4 bytes) of every block in a second region
//!   after it. Q4_K and Q5_K blocks keep their scales: 144 and 176 bytes are already whole vec4s.
//!
//! The split moves bytes and changes none, so ggml's blocks come back exactly
//! (`quant::to_ggml_blocks`), and a GGUF tensor runs in the type it is stored in: nothing is
//! requantized. The kernels read these layouts in `shaders/blocks.wgsl`, which names each format
//! by its ggml type number ([`WeightFormat::ggml_type`]).

use crate::error::{Error, Result};

/// Storage format of a weight matrix on the GPU.
#[allow(non_camel_case_types)] // ggml's names: Q4_K, not Q4K.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    F32,
    /// IEEE half, two per u32 word (low half = even column), read with `unpack2x16float`.
    F16,
    /// bfloat16 (the high half of an f32), two per u32 word (low half = even column).
    BF16,
    /// 32 weights: f16 `d`, 16 bytes of nibbles (byte j: element j low, j + 16 high);
    /// weight = d·(q − 8).
    Q4_0,
    /// 32 weights: f16 `d`, f16 `m`, 16 bytes of nibbles as Q4_0; weight = d·q + m.
    Q4_1,
    /// 32 weights: f16 `d`, 4 bytes of fifth bits `qh` (bit i: element i), nibbles as Q4_0;
    /// weight = d·(q − 16).
    Q5_0,
    /// 32 weights: f16 `d`, f16 `m`, `qh` and nibbles as Q5_0; weight = d·q + m.
    Q5_1,
    /// 32 weights: f16 `d`, 32 int8 `q`; weight = d·q.
    Q8_0,
    /// 256 weights in 16 groups of 16: 4-bit scale and min per group, 2-bit quants, f16 `d`
    /// and `dmin`; weight = d·scale·q − dmin·min.
    Q2_K,
    /// 256 weights in 16 groups of 16: a high-bit mask, 2-bit low quants, 6-bit scales, f16 `d`;
    /// weight = d·(scale − 32)·(q − 4).
    Q3_K,
    /// 256 weights in 8 groups of 32: f16 `d` and `dmin`, 6-bit scales and mins, nibbles;
    /// weight = d·scale·q − dmin·min.
    Q4_K,
    /// Q4_K with a fifth bit per weight (`qh`).
    Q5_K,
    /// 256 weights in 16 groups of 16: 4 low and 2 high bits per weight, int8 scales, f16 `d`;
    /// weight = d·scale·(q − 32).
    Q6_K,
}

/// Weights per block of the 32-weight formats (ggml's QK4_0 = QK8_0 = 32): also the unit every
/// block kernel steps by (a K-quant block is 8 such units).
pub const QUANT_BLOCK: usize = 32;

/// Weights per K-quant super-block (ggml's QK_K).
pub const SUPER_BLOCK: usize = 256;

/// How a block format lays out one block, in ggml's bytes and on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLayout {
    /// Weights per block: 32, or 256 for the K-quants.
    pub weights: usize,
    /// Bytes of one ggml block.
    pub bytes: usize,
    /// Where the f16 scale field the GPU keeps in its own region sits in the block.
    pub scale_at: usize,
    /// Its length: 2 (`d`), 4 (`d` and `m`/`dmin`) or 0 (the block stays whole).
    pub scale_bytes: usize,
}

impl BlockLayout {
    /// Bytes of a block on the GPU without its scale field (a multiple of 4).
    pub fn body_bytes(&self) -> usize {
        self.bytes - self.scale_bytes
    }

    /// The block's bytes as the GPU stores them: (body, scale field).
    pub fn split<'a>(&self, block: &'a [u8]) -> (Vec<u8>, &'a [u8]) {
        let scale = &block[self.scale_at..self.scale_at + self.scale_bytes];
        let mut body = Vec::with_capacity(self.body_bytes());
        body.extend_from_slice(&block[..self.scale_at]);
        body.extend_from_slice(&block[self.scale_at + self.scale_bytes..]);
        (body, scale)
    }

    /// The inverse of [`Self::split`]: ggml's block from its body and scale field.
    pub fn join(&self, body: &[u8], scale: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(&body[..self.scale_at]);
        out.extend_from_slice(scale);
        out.extend_from_slice(&body[self.scale_at..]);
    }
}

const fn layout(weights: usize, bytes: usize, scale_at: usize, scale_bytes: usize) -> BlockLayout {
    BlockLayout {
        weights,
        bytes,
        scale_at,
        scale_bytes,
    }
}

impl WeightFormat {
    pub const ALL: [WeightFormat; 13] = [
        WeightFormat::F32,
        WeightFormat::F16,
        WeightFormat::BF16,
        WeightFormat::Q4_0,
        WeightFormat::Q4_1,
        WeightFormat::Q5_0,
        WeightFormat::Q5_1,
        WeightFormat::Q8_0,
        WeightFormat::Q2_K,
        WeightFormat::Q3_K,
        WeightFormat::Q4_K,
        WeightFormat::Q5_K,
        WeightFormat::Q6_K,
    ];

    /// The lower-case name used in checkpoints' metadata and on the command line ("q4_k").
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::F16 => "f16",
            WeightFormat::BF16 => "bf16",
            WeightFormat::Q4_0 => "q4_0",
            WeightFormat::Q4_1 => "q4_1",
            WeightFormat::Q5_0 => "q5_0",
            WeightFormat::Q5_1 => "q5_1",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::Q2_K => "q2_k",
            WeightFormat::Q3_K => "q3_k",
            WeightFormat::Q4_K => "q4_k",
            WeightFormat::Q5_K => "q5_k",
            WeightFormat::Q6_K => "q6_k",
        }
    }

    /// The format called `name` (see [`Self::name`]; ggml's upper-case spelling is accepted).
    pub fn from_name(name: &str) -> Option<Self> {
        let lower = name.to_ascii_lowercase();
        Self::ALL.into_iter().find(|f| f.name() == lower)
    }

    /// ggml's `ggml_type` number (the type field of a GGUF tensor; gguf-py's
    /// `GGMLQuantizationType`). The shaders name formats by these numbers too.
    pub fn ggml_type(self) -> u32 {
        match self {
            WeightFormat::F32 => 0,
            WeightFormat::F16 => 1,
            WeightFormat::Q4_0 => 2,
            WeightFormat::Q4_1 => 3,
            WeightFormat::Q5_0 => 6,
            WeightFormat::Q5_1 => 7,
            WeightFormat::Q8_0 => 8,
            WeightFormat::Q2_K => 10,
            WeightFormat::Q3_K => 11,
            WeightFormat::Q4_K => 12,
            WeightFormat::Q5_K => 13,
            WeightFormat::Q6_K => 14,
            WeightFormat::BF16 => 30,
        }
    }

    /// The format of ggml type number `ty`, if the engine runs it.
    pub fn from_ggml_type(ty: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.ggml_type() == ty)
    }

    /// The block layout of a block format; None for the float formats.
    pub fn blocks(self) -> Option<BlockLayout> {
        Some(match self {
            WeightFormat::F32 | WeightFormat::F16 | WeightFormat::BF16 => return None,
            WeightFormat::Q4_0 => layout(32, 18, 0, 2),
            WeightFormat::Q4_1 => layout(32, 20, 0, 4),
            WeightFormat::Q5_0 => layout(32, 22, 0, 2),
            WeightFormat::Q5_1 => layout(32, 24, 0, 4),
            WeightFormat::Q8_0 => layout(32, 34, 0, 2),
            WeightFormat::Q2_K => layout(256, 84, 80, 4),
            WeightFormat::Q3_K => layout(256, 110, 108, 2),
            WeightFormat::Q4_K => layout(256, 144, 0, 0),
            WeightFormat::Q5_K => layout(256, 176, 0, 0),
            WeightFormat::Q6_K => layout(256, 210, 208, 2),
        })
    }

    /// Whether the format stores blocks of weights with shared scales.
    pub fn is_quantized(self) -> bool {
        self.blocks().is_some()
    }

    /// Bytes of one ggml block; None for the float formats.
    pub fn block_bytes(self) -> Option<usize> {
        self.blocks().map(|b| b.bytes)
    }

    /// Weights per block (1 for the float formats): a row's length must be a multiple.
    pub fn block_weights(self) -> usize {
        self.blocks().map_or(1, |b| b.weights)
    }

    /// Bytes of one element of a float format.
    pub fn element_bytes(self) -> Option<usize> {
        match self {
            WeightFormat::F32 => Some(4),
            WeightFormat::F16 | WeightFormat::BF16 => Some(2),
            _ => None,
        }
    }

    /// Rows of the float formats are padded to this many elements (one vec4 of 32-bit words);
    /// quantized rows are whole blocks (see [`Self::storage_bytes`]).
    pub fn row_alignment(self) -> usize {
        match self {
            WeightFormat::F16 | WeightFormat::BF16 => 8,
            WeightFormat::F32 => 4,
            _ => self.block_weights(),
        }
    }

    /// Bytes of one weight row as a kernel streams it (no padding; scales included): ggml's
    /// row size.
    pub fn row_bytes(self, cols: usize) -> usize {
        match (self.element_bytes(), self.blocks()) {
            (Some(size), _) => cols * size,
            (None, Some(b)) => cols.div_ceil(b.weights) * b.bytes,
            (None, None) => unreachable!("every format is either float or blocks"),
        }
    }

    /// Exact bytes of the GPU buffer holding an `[rows, cols]` weight in this format (no bias),
    /// so buffers can be sized without data. A weight split into row chunks allocates this for
    /// each chunk's rows.
    ///
    /// Float rows are padded to [`Self::row_alignment`]. Block formats hold the bodies of every
    /// block, row by row, then the scale fields in the same order, padded to 16 bytes (see the
    /// module documentation): block `b` of row `r` is body and scale field `r·nb + b`.
    pub fn storage_bytes(self, rows: usize, cols: usize) -> u64 {
        let bytes = match self.blocks() {
            None => rows * self.row_bytes(cols.next_multiple_of(self.row_alignment())),
            Some(b) => {
                let blocks = rows * cols.div_ceil(b.weights);
                blocks * b.body_bytes() + (blocks * b.scale_bytes).next_multiple_of(16)
            }
        };
        bytes as u64
    }

    /// 32-bit words of one stored row in the float formats (None for block formats, whose
    /// rows are split over two regions).
    pub fn row_words(self, cols: usize) -> Option<usize> {
        self.element_bytes()
            .map(|_| self.row_bytes(cols.next_multiple_of(self.row_alignment())) / 4)
    }

    /// Check that rows of `cols` weights are whole blocks of this format.
    pub fn check_row(self, what: &str, cols: usize) -> Result<()> {
        let weights = self.block_weights();
        if cols.is_multiple_of(weights) {
            return Ok(());
        }
        Err(Error::shape(
            what,
            format!(
                "rows of {cols} values are not whole {} blocks of {weights}",
                self.name()
            ),
        ))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The sizes of ggml-common.h's block structs, and the offset of the f16 field the GPU
    /// moves out (`d` first in the 32-weight blocks, last in Q2_K / Q3_K / Q6_K).
    #[test]
    fn block_layouts_are_ggmls() {
        let sizes = [
            (WeightFormat::Q4_0, 2 + 16),
            (WeightFormat::Q4_1, 2 + 2 + 16),
            (WeightFormat::Q5_0, 2 + 4 + 16),
            (WeightFormat::Q5_1, 2 + 2 + 4 + 16),
            (WeightFormat::Q8_0, 2 + 32),
            (WeightFormat::Q2_K, 16 + 64 + 2 + 2),
            (WeightFormat::Q3_K, 32 + 64 + 12 + 2),
            (WeightFormat::Q4_K, 2 + 2 + 12 + 128),
            (WeightFormat::Q5_K, 2 + 2 + 12 + 32 + 128),
            (WeightFormat::Q6_K, 128 + 64 + 16 + 2),
        ];
        for (format, bytes) in sizes {
            let b = format.blocks().unwrap();
            assert_eq!(b.bytes, bytes, "{format:?}");
            assert_eq!(b.body_bytes() % 4, 0, "{format:?} body is not whole words");
        }
    }

    #[test]
    fn split_and_join_are_inverse() {
        for format in WeightFormat::ALL {
            let Some(b) = format.blocks() else { continue };
            let block: Vec<u8> = (0..b.bytes).map(|i| (i * 7 + 3) as u8).collect();
            let (body, scale) = b.split(&block);
            assert_eq!(body.len(), b.body_bytes());
            let mut back = Vec::new();
            b.join(&body, scale, &mut back);
            assert_eq!(back, block, "{format:?}");
        }
    }

    #[test]
    fn names_and_type_numbers_round_trip() {
        for format in WeightFormat::ALL {
            assert_eq!(WeightFormat::from_name(format.name()), Some(format));
            assert_eq!(
                WeightFormat::from_ggml_type(format.ggml_type()),
                Some(format)
            );
        }
        assert_eq!(WeightFormat::from_name("Q4_K"), Some(WeightFormat::Q4_K));
        // IQ4_NL (20) and TQ1_0 (34) are not run.
        assert_eq!(WeightFormat::from_ggml_type(20), None);
        assert_eq!(WeightFormat::from_ggml_type(34), None);
    }
}
