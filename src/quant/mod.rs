//! ggml's block formats on the host: the reference quantizers the engine writes blocks with, and
//! the dequantization of every block format it runs (the CPU reference of the GPU kernels).
//!
//! The rounding follows ggml's reference quantizers (`quantize_row_q8_0_ref`,
//! `quantize_row_q4_0_ref`, `quantize_row_q5_0_ref`, `quantize_row_q4_K_ref`,
//! `quantize_row_q5_K_ref`, `quantize_row_q6_K_ref` in ggml-quants.c) step for step in f32, so the bytes match ggml's
//! exactly (`tests/quant.rs` compares against bytes recorded from `gguf.quants` and from ggml's
//! own C code). The block layouts are ggml's, so a GGUF file's blocks and these are
//! interchangeable: see [`WeightFormat`] for the bytes and for how the GPU stores them. [`Mix`]
//! is llama-quantize's choice of types per tensor for Q4_K_M.

mod dequant;
mod kquants;
mod mix;

use half::f16;

pub use mix::{Mix, TensorRole};

use crate::error::{Error, Result};
/// Weights per block of the 32-weight formats (ggml's QK8_0 = QK4_0).
pub use crate::gpu::tensor::QUANT_BLOCK as BLOCK;
use crate::gpu::WeightFormat;

/// The block formats [`quantize`] writes.
pub const QUANTIZERS: [WeightFormat; 6] = [
    WeightFormat::Q8_0,
    WeightFormat::Q4_0,
    WeightFormat::Q5_0,
    WeightFormat::Q4_K,
    WeightFormat::Q5_K,
    WeightFormat::Q6_K,
];

/// Quantize `values` (whole rows, their length a multiple of the block size) into ggml blocks
/// of `format`, one of [`QUANTIZERS`].
pub fn quantize(format: WeightFormat, values: &[f32]) -> Result<Vec<u8>> {
    let layout = layout_of(format)?;
    if !QUANTIZERS.contains(&format) {
        return Err(Error::shape(
            "quantize",
            format!("no quantizer writes {}", format.name()),
        ));
    }
    if !values.len().is_multiple_of(layout.weights) {
        return Err(Error::shape(
            "quantize",
            format!(
                "{} values are not whole blocks of {}",
                values.len(),
                layout.weights
            ),
        ));
    }
    let mut out = Vec::with_capacity(values.len() / layout.weights * layout.bytes);
    for block in values.chunks_exact(layout.weights) {
        match format {
            WeightFormat::Q8_0 => quantize_block_q8_0(block, &mut out),
            WeightFormat::Q4_0 => quantize_block_q4_0(block, &mut out),
            WeightFormat::Q5_0 => quantize_block_q5_0(block, &mut out),
            WeightFormat::Q4_K => kquants::block_q45_k(block, false, &mut out),
            WeightFormat::Q5_K => kquants::block_q45_k(block, true, &mut out),
            _ => kquants::block_q6_k(block, &mut out),
        }
    }
    Ok(out)
}

/// The f32 values ggml blocks of `format` stand for (ggml's `dequantize_row_*`, bit for bit).
pub fn dequantize(format: WeightFormat, blocks: &[u8]) -> Result<Vec<f32>> {
    let layout = layout_of(format)?;
    if !blocks.len().is_multiple_of(layout.bytes) {
        return Err(Error::shape(
            "quantized blocks",
            format!(
                "{} bytes are not whole {} blocks of {}",
                blocks.len(),
                format.name(),
                layout.bytes
            ),
        ));
    }
    let mut out = Vec::with_capacity(blocks.len() / layout.bytes * layout.weights);
    for block in blocks.chunks_exact(layout.bytes) {
        dequant::block(format, block, &mut out);
    }
    Ok(out)
}

fn layout_of(format: WeightFormat) -> Result<crate::gpu::format::BlockLayout> {
    format.blocks().ok_or_else(|| {
        Error::shape(
            "quantize",
            format!("{} is not a block-quantized format", format.name()),
        )
    })
}

/// The value of largest magnitude, with its sign; the first of equal magnitudes (ggml's
/// `if (amax < fabsf(v))` scan).
pub(crate) fn signed_max(x: &[f32]) -> f32 {
    let mut amax = 0f32;
    let mut max = 0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// Q8_0: d = amax / 127, q = round(x · (1/d)) with halves away from zero (C's `roundf`); the
/// quants use the f32 scale, the block stores it rounded to f16 (nearest even).
fn quantize_block_q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    out.extend(x.iter().map(|&v| (v * id).round() as i8 as u8));
}

/// Q4_0: the value of largest magnitude (the first one on ties) keeps its sign, d = max / −8,
/// so it maps to q = 0; q = min(15, trunc(x · (1/d) + 8.5)). Byte j holds element j in its low
/// nibble and element j + 16 in its high nibble.
fn quantize_block_q4_0(x: &[f32], out: &mut Vec<u8>) {
    let d = signed_max(x) / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    // `as u8` truncates toward zero like C's `(int8_t)` cast for these non-negative values.
    let q = |v: f32| ((v * id + 8.5) as u8).min(15);
    let half = BLOCK / 2;
    out.extend((0..half).map(|j| q(x[j]) | (q(x[j + half]) << 4)));
}

/// Q5_0: as Q4_0 with d = max / −16 and q = min(31, trunc(x · (1/d) + 16.5)); the fifth bits go
/// to `qh` (bit j for element j).
fn quantize_block_q5_0(x: &[f32], out: &mut Vec<u8>) {
    let d = signed_max(x) / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    // C's `(int8_t)` truncates toward zero; these values are non-negative.
    let q = |v: f32| ((v * id + 16.5) as i8 as u8).min(31);
    let half = BLOCK / 2;
    let mut qh = 0u32;
    let mut qs = [0u8; 16];
    for j in 0..half {
        let (lo, hi) = (q(x[j]), q(x[j + half]));
        qs[j] = (lo & 0xf) | ((hi & 0xf) << 4);
        qh |= ((lo as u32 & 0x10) >> 4) << j;
        qh |= ((hi as u32 & 0x10) >> 4) << (j + half);
    }
    out.extend_from_slice(&qh.to_le_bytes());
    out.extend_from_slice(&qs);
}

/// ggml blocks from the GPU layout of one weight chunk of `blocks` blocks (every block's body,
/// then the scale fields; see [`WeightFormat::storage_bytes`]): the inverse of the split the
/// upload makes.
pub fn to_ggml_blocks(format: WeightFormat, blocks: usize, gpu_bytes: &[u8]) -> Result<Vec<u8>> {
    let layout = layout_of(format)?;
    let needed = format.storage_bytes(blocks, layout.weights);
    if (gpu_bytes.len() as u64) < needed {
        return Err(Error::shape(
            "quantized weight",
            format!(
                "{} bytes cannot hold {blocks} {} blocks",
                gpu_bytes.len(),
                format.name()
            ),
        ));
    }
    let body = layout.body_bytes();
    let (bodies, scales) = gpu_bytes.split_at(blocks * body);
    let mut out = Vec::with_capacity(blocks * layout.bytes);
    for b in 0..blocks {
        let scale = &scales[b * layout.scale_bytes..(b + 1) * layout.scale_bytes];
        layout.join(&bodies[b * body..(b + 1) * body], scale, &mut out);
    }
    Ok(out)
}
