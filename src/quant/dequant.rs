//! ggml's `dequantize_row_*` for every block format the engine runs, in f32 with ggml's order of
//! operations, so the values equal ggml's and gguf-py's bit for bit (`tests/quant.rs` checks
//! both against recorded blocks). This is the CPU reference the GPU kernels are tested against.

use half::f16;

use crate::gpu::WeightFormat;

fn f16_at(block: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

/// Append the weights of one ggml `block` of `format` to `out`.
pub(super) fn block(format: WeightFormat, block: &[u8], out: &mut Vec<f32>) {
    match format {
        WeightFormat::Q4_0 => q4_0(block, out),
        WeightFormat::Q4_1 => q4_1(block, out),
        WeightFormat::Q5_0 | WeightFormat::Q5_1 => q5(format, block, out),
        WeightFormat::Q8_0 => {
            let d = f16_at(block, 0);
            out.extend(block[2..34].iter().map(|&q| q as i8 as f32 * d));
        }
        WeightFormat::Q2_K => q2_k(block, out),
        WeightFormat::Q3_K => q3_k(block, out),
        WeightFormat::Q4_K | WeightFormat::Q5_K => q45_k(format, block, out),
        WeightFormat::Q6_K => q6_k(block, out),
        WeightFormat::F32 | WeightFormat::F16 | WeightFormat::BF16 => {
            unreachable!("float formats have no blocks")
        }
    }
}

/// Q4_0: byte j holds weight j (low nibble) and j + 16 (high); weight = (q − 8)·d.
fn q4_0(block: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(block, 0);
    let qs = &block[2..18];
    out.extend(qs.iter().map(|&q| ((q & 0xf) as i32 - 8) as f32 * d));
    out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
}

/// Q4_1: weight = q·d + m.
fn q4_1(block: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (f16_at(block, 0), f16_at(block, 2));
    let qs = &block[4..20];
    out.extend(qs.iter().map(|&q| (q & 0xf) as f32 * d + m));
    out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
}

/// Q5_0 (weight = (q − 16)·d) and Q5_1 (weight = q·d + m): the nibbles of Q4_0 / Q4_1 with a
/// fifth bit, bit i of `qh` for weight i.
fn q5(format: WeightFormat, block: &[u8], out: &mut Vec<f32>) {
    let (d, m, at) = match format {
        WeightFormat::Q5_0 => (f16_at(block, 0), None, 2),
        _ => (f16_at(block, 0), Some(f16_at(block, 2)), 4),
    };
    let qh = u32::from_le_bytes(block[at..at + 4].try_into().expect("4 bytes"));
    let qs = &block[at + 4..at + 20];
    let weight = |q: u32| match m {
        None => (q as i32 - 16) as f32 * d,
        Some(m) => q as f32 * d + m,
    };
    for (j, &q) in qs.iter().enumerate() {
        out.push(weight((q & 0xf) as u32 | ((qh >> j) & 1) << 4));
    }
    for (j, &q) in qs.iter().enumerate() {
        out.push(weight((q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4));
    }
}

/// Q2_K: 16 scale bytes, 64 quant bytes, `d`, `dmin`. Weight 128n + 32s + l (l < 32) is bits 2s
/// of quant byte 32n + l, with scale byte 8n + 2s + l / 16: dl·q − ml.
fn q2_k(block: &[u8], out: &mut Vec<f32>) {
    let (scales, qs) = (&block[..16], &block[16..80]);
    let (d, min) = (f16_at(block, 80), f16_at(block, 82));
    for n in 0..2 {
        for shift in 0..4 {
            for half in 0..2 {
                let sc = scales[8 * n + 2 * shift + half];
                let dl = d * (sc & 0xf) as f32;
                let ml = min * (sc >> 4) as f32;
                for l in 0..16 {
                    let q = (qs[32 * n + 16 * half + l] >> (2 * shift)) & 3;
                    out.push(dl * q as f32 - ml);
                }
            }
        }
    }
}

/// The sixteen 6-bit scales of a Q3_K block from their 12 packed bytes (ggml's kmask unpacking).
fn q3_k_scales(packed: &[u8]) -> [u8; 16] {
    let word = |i: usize| u32::from_le_bytes(packed[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    let (a0, a1, tmp) = (word(0), word(1), word(2));
    let aux = [
        (a0 & 0x0f0f0f0f) | ((tmp & 0x03030303) << 4),
        (a1 & 0x0f0f0f0f) | (((tmp >> 2) & 0x03030303) << 4),
        ((a0 >> 4) & 0x0f0f0f0f) | (((tmp >> 4) & 0x03030303) << 4),
        ((a1 >> 4) & 0x0f0f0f0f) | (((tmp >> 6) & 0x03030303) << 4),
    ];
    let mut out = [0u8; 16];
    for (i, v) in aux.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    out
}

/// Q3_K: 32 bytes of high bits, 64 of 2-bit low quants, 12 of scales, `d`. Weight
/// 128n + 32s + l: low bits 2s of byte 32n + l, high bit 4n + s of byte l;
/// weight = d·(scale − 32)·(low − (high ? 0 : 4)).
fn q3_k(block: &[u8], out: &mut Vec<f32>) {
    let (hmask, qs) = (&block[..32], &block[32..96]);
    let scales = q3_k_scales(&block[96..108]);
    let d_all = f16_at(block, 108);
    for n in 0..2 {
        for shift in 0..4 {
            let bit = 1u8 << (4 * n + shift);
            for half in 0..2 {
                let dl = d_all * (scales[8 * n + 2 * shift + half] as i8 as i32 - 32) as f32;
                for l in 16 * half..16 * half + 16 {
                    let low = ((qs[32 * n + l] >> (2 * shift)) & 3) as i32;
                    let high = if hmask[l] & bit != 0 { 0 } else { 4 };
                    out.push(dl * (low - high) as f32);
                }
            }
        }
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` of a Q4_K / Q5_K block.
pub(super) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Q4_K (`d`, `dmin`, 12 scale bytes, 128 nibble bytes) and Q5_K (32 bytes of fifth bits before
/// the nibbles). Sub-block j (weights 32j..) takes nibble j % 2 of bytes 32·(j / 2)..; Q5_K's bit
/// j of byte l adds 16. Weight = d·scale·q − dmin·min.
fn q45_k(format: WeightFormat, block: &[u8], out: &mut Vec<f32>) {
    let (d, min) = (f16_at(block, 0), f16_at(block, 2));
    let scales = &block[4..16];
    let (qh, qs) = match format {
        WeightFormat::Q5_K => (Some(&block[16..48]), &block[48..176]),
        _ => (None, &block[16..144]),
    };
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, scales);
        let dj = d * sc as f32;
        let mj = min * m as f32;
        for l in 0..32 {
            let nibble = (qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0xf;
            let fifth = qh.map_or(0, |qh| if qh[l] & (1 << j) != 0 { 16 } else { 0 });
            out.push(dj * (nibble + fifth) as f32 - mj);
        }
    }
}

/// Q6_K: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, `d`. Weight
/// 128n + 32t + l: nibble t / 2 of low byte 64n + 32·(t % 2) + l, bits 2t of high byte 32n + l,
/// scale 8n + 2t + l / 16; weight = d·scale·(q − 32).
fn q6_k(block: &[u8], out: &mut Vec<f32>) {
    let (ql, qh, sc) = (&block[..128], &block[128..192], &block[192..208]);
    let d = f16_at(block, 208);
    for n in 0..2 {
        for t in 0..4 {
            for l in 0..32 {
                let low = (ql[64 * n + 32 * (t % 2) + l] >> (4 * (t / 2))) & 0xf;
                let high = (qh[32 * n + l] >> (2 * t)) & 3;
                let q = (low | high << 4) as i32 - 32;
                let scale = sc[8 * n + 2 * t + l / 16] as i8 as f32;
                out.push(d * scale * q as f32);
            }
        }
    }
}
