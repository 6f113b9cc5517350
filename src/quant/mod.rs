//! Block quantization of weight rows into ggml's Q8_0 and Q4_0 formats, on the host.
//!
//! The rounding follows ggml's reference quantizers (`quantize_row_q8_0_ref`,
//! `quantize_row_q4_0_ref` in ggml-quants.c) step for step in f32, so the bytes match ggml and
//! `gguf.quants` exactly (`tests/quant.rs` compares against bytes recorded from `gguf.quants`
//! by scripts/quant_fixture.py). The block layouts are ggml's, so a GGUF file's blocks and these
//! are interchangeable: see [`WeightFormat`] for the bytes and for how the GPU stores them.

use half::f16;

use crate::error::{Error, Result};
/// Weights per block (ggml's QK8_0 = QK4_0).
pub use crate::gpu::tensor::QUANT_BLOCK as BLOCK;
use crate::gpu::WeightFormat;

/// Quantize `values` (whole rows, their length a multiple of 32) into ggml blocks of `format`.
pub fn quantize(format: WeightFormat, values: &[f32]) -> Result<Vec<u8>> {
    check_blocks(format, values.len())?;
    let mut out = Vec::with_capacity(values.len() / BLOCK * block_bytes(format)?);
    for block in values.chunks_exact(BLOCK) {
        match format {
            WeightFormat::Q8_0 => quantize_block_q8_0(block, &mut out),
            _ => quantize_block_q4_0(block, &mut out),
        }
    }
    Ok(out)
}

/// The f32 values ggml blocks of `format` stand for (ggml's `dequantize_row_*`: d·q, computed
/// in f32).
pub fn dequantize(format: WeightFormat, blocks: &[u8]) -> Result<Vec<f32>> {
    let size = block_bytes(format)?;
    if !blocks.len().is_multiple_of(size) {
        return Err(Error::shape(
            "quantized blocks",
            format!(
                "{} bytes are not whole {format:?} blocks of {size}",
                blocks.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(blocks.len() / size * BLOCK);
    for block in blocks.chunks_exact(size) {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        let quants = &block[2..];
        match format {
            WeightFormat::Q8_0 => out.extend(quants.iter().map(|&q| d * q as i8 as f32)),
            _ => {
                let low = quants.iter().map(|&q| (q & 0x0f) as i32 - 8);
                let high = quants.iter().map(|&q| (q >> 4) as i32 - 8);
                out.extend(low.chain(high).map(|q| d * q as f32));
            }
        }
    }
    Ok(out)
}

fn block_bytes(format: WeightFormat) -> Result<usize> {
    format.block_bytes().ok_or_else(|| {
        Error::shape(
            "quantize",
            format!("{format:?} is not a block-quantized format"),
        )
    })
}

fn check_blocks(format: WeightFormat, len: usize) -> Result<()> {
    block_bytes(format)?;
    if !len.is_multiple_of(BLOCK) {
        return Err(Error::shape(
            "quantize",
            format!("{len} values are not whole blocks of {BLOCK}"),
        ));
    }
    Ok(())
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
    let mut amax = 0f32;
    let mut max = 0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    // `as u8` truncates toward zero like C's `(int8_t)` cast for these non-negative values.
    let q = |v: f32| ((v * id + 8.5) as u8).min(15);
    let half = BLOCK / 2;
    out.extend((0..half).map(|j| q(x[j]) | (q(x[j + half]) << 4)));
}

/// ggml blocks from the GPU layout of one weight chunk (quants of every block, then the f16
/// scales; see [`WeightFormat::storage_bytes`]): the inverse of the split the upload makes.
pub fn to_ggml_blocks(format: WeightFormat, blocks: usize, gpu_bytes: &[u8]) -> Result<Vec<u8>> {
    let size = block_bytes(format)?;
    let quant = size - 2;
    if (gpu_bytes.len() as u64) < format.storage_bytes(blocks, BLOCK) {
        return Err(Error::shape(
            "quantized weight",
            format!(
                "{} bytes cannot hold {blocks} {format:?} blocks",
                gpu_bytes.len()
            ),
        ));
    }
    let (quants, scales) = gpu_bytes.split_at(blocks * quant);
    let mut out = Vec::with_capacity(blocks * size);
    for b in 0..blocks {
        out.extend_from_slice(&scales[b * 2..b * 2 + 2]);
        out.extend_from_slice(&quants[b * quant..(b + 1) * quant]);
    }
    Ok(out)
}
