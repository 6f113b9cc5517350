//! ggml's reference K-quant quantizers, `quantize_row_q4_K_ref`, `quantize_row_q5_K_ref` and
//! `quantize_row_q6_K_ref` (ggml-quants.c; what llama-quantize runs without an importance
//! matrix), ported step for step
//! in f32 with the same order of operations, so the bytes match ggml's (`tests/quant.rs`
//! compares them with blocks recorded from ggml's own C code by scripts/ggml_reference.sh).

use half::f16;

use super::dequant::scale_min_k4;

/// ggml's `nearest_int`: round half to even through the 1.5·2²³ trick (valid for |x| < 2²²).
fn nearest_int(x: f32) -> i32 {
    let bits = (x + 12_582_912.0f32).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

/// Below this a group counts as all zeros (ggml's GROUP_MAX_EPS).
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `make_qkx2_quants`: quants `l` in 0..=nmax and (scale, −min) of a group with an offset,
/// searching `nstep + 1` scales around the range for the least weighted error.
struct Qkx2 {
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
}

impl Qkx2 {
    fn quantize(&self, x: &[f32], weights: &[f32], levels: &mut [u8]) -> (f32, f32) {
        let n = x.len();
        let mut min = x[0];
        let mut max = x[0];
        let mut sum_w = weights[0];
        let mut sum_x = sum_w * x[0];
        for i in 1..n {
            min = min.min_c(x[i]);
            max = max.max_c(x[i]);
            let w = weights[i];
            sum_w += w;
            sum_x += w * x[i];
        }
        if min > 0.0 {
            min = 0.0;
        }
        if max == min {
            levels.fill(0);
            return (0.0, -min);
        }
        let nmax = self.nmax as f32;
        let mut iscale = nmax / (max - min);
        let mut scale = 1.0 / iscale;
        let mut best_error = 0f32;
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, self.nmax);
            levels[i] = l as u8;
            let diff = scale * levels[i] as f32 + min - x[i];
            best_error += weights[i] * (diff * diff);
        }
        let mut aux = [0u8; 32];
        for is in 0..=self.nstep {
            iscale = (self.rmin + self.rdelta * is as f32 + nmax) / (max - min);
            let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
            for i in 0..n {
                let l = nearest_int(iscale * (x[i] - min)).clamp(0, self.nmax);
                aux[i] = l as u8;
                let (w, l) = (weights[i], l as f32);
                sum_l += w * l;
                sum_l2 += w * l * l;
                sum_xl += w * l * x[i];
            }
            let det = sum_w * sum_l2 - sum_l * sum_l;
            if det > 0.0 {
                let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
                let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
                if this_min > 0.0 {
                    this_min = 0.0;
                    this_scale = sum_xl / sum_l2;
                }
                let mut cur_error = 0f32;
                for i in 0..n {
                    let diff = this_scale * aux[i] as f32 + this_min - x[i];
                    cur_error += weights[i] * (diff * diff);
                }
                if cur_error < best_error {
                    levels.copy_from_slice(&aux[..n]);
                    best_error = cur_error;
                    scale = this_scale;
                    min = this_min;
                }
            }
        }
        (scale, -min)
    }
}

/// C's `x < min ? x : min` comparisons as ggml writes them (`if (x[i] < min) min = x[i]`), which
/// differ from `f32::min` only for NaN.
trait CompareLikeC {
    fn min_c(self, x: f32) -> f32;
    fn max_c(self, x: f32) -> f32;
}

impl CompareLikeC for f32 {
    fn min_c(self, x: f32) -> f32 {
        if x < self {
            x
        } else {
            self
        }
    }
    fn max_c(self, x: f32) -> f32 {
        if x > self {
            x
        } else {
            self
        }
    }
}

/// One Q4_K block (144 bytes) of 256 weights: `quantize_row_q4_K_ref`; or with `fifth_bit`
/// one Q5_K block (176 bytes): `quantize_row_q5_K_ref`, the same with 5-bit quants, a narrower
/// scale search, and the fifth bits in `qh` (bit 2c or 2c + 1 of byte l for sub-block 2c or
/// 2c + 1).
pub(super) fn block_q45_k(x: &[f32], fifth_bit: bool, out: &mut Vec<u8>) {
    let search = if fifth_bit {
        Qkx2 {
            nmax: 31,
            rmin: -0.5,
            rdelta: 0.1,
            nstep: 15,
        }
    } else {
        Qkx2 {
            nmax: 15,
            rmin: -1.0,
            rdelta: 0.1,
            nstep: 20,
        }
    };
    let mut levels = [0u8; 256];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let group = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in group {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: Vec<f32> = group.iter().map(|v| av_x + v.abs()).collect();
        let (scale, min) = search.quantize(group, &weights, &mut levels[32 * j..32 * j + 32]);
        scales[j] = scale;
        mins[j] = min;
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }
    let packed = pack_scales_mins(&scales, &mins, max_scale, max_min);
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &packed);
        let dj = d.to_f32() * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for i in 0..32 {
            levels[32 * j + i] = nearest_int((x[32 * j + i] + dm) / dj).clamp(0, search.nmax) as u8;
        }
    }
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
    out.extend_from_slice(&packed);
    if fifth_bit {
        let mut qh = [0u8; 32];
        for (c, n) in (0..256).step_by(64).enumerate() {
            for (l, bits) in qh.iter_mut().enumerate() {
                *bits |= (levels[n + l] >> 4) << (2 * c);
                *bits |= (levels[n + l + 32] >> 4) << (2 * c + 1);
            }
        }
        out.extend_from_slice(&qh);
    }
    for j in (0..256).step_by(64) {
        out.extend((0..32).map(|l| (levels[j + l] & 0xf) | ((levels[j + l + 32] & 0xf) << 4)));
    }
}

/// The 8 scales and mins of a Q4_K / Q5_K block as 6-bit values relative to the largest, packed
/// into 12 bytes as `get_scale_min_k4` reads them.
fn pack_scales_mins(scales: &[f32; 8], mins: &[f32; 8], max_scale: f32, max_min: f32) -> [u8; 12] {
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        // C stores nearest_int's int into a uint8_t (modulo 256), then clamps to 63.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xf) | ((lm & 0xf) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    packed
}

/// ggml's `make_qx_quants` with `rmse_type = 1` and no importance weights (what Q6_K uses):
/// signed quants `l + nmax` and the scale, searching 18 scales around `−nmax / max`.
fn make_qx_quants(x: &[f32], nmax: i32, levels: &mut [i8]) -> f32 {
    let max = super::signed_max(x);
    if max.abs() < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let quant = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    // rmse_type 1 weighs each value by its square.
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for &v in x {
            let l = quant(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let mut iscale = -(nmax as f32) / max;
    for (level, &v) in levels.iter_mut().zip(x) {
        *level = (quant(iscale, v) + nmax) as i8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (level, &v) in levels.iter_mut().zip(x) {
                *level = (quant(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// One Q6_K block (210 bytes) of 256 weights: `quantize_row_q6_K_ref`.
pub(super) fn block_q6_k(x: &[f32], out: &mut Vec<u8>) {
    let mut levels = [0i8; 256];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let scale = make_qx_quants(&x[16 * ib..16 * ib + 16], 32, &mut levels[16 * ib..][..16]);
        scales[ib] = scale;
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        out.extend(std::iter::repeat_n(0u8, 210));
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = f16::from_f32(1.0 / iscale);
    let mut sc = [0i8; 16];
    for ib in 0..16 {
        sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
    }
    for j in 0..16 {
        let dj = d.to_f32() * sc[j] as f32;
        if dj == 0.0 {
            continue;
        }
        for i in 0..16 {
            let l = nearest_int(x[16 * j + i] / dj).clamp(-32, 31);
            levels[16 * j + i] = (l + 32) as i8;
        }
    }
    let level = |i: usize| levels[i] as u8;
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for (n, j) in (0..256).step_by(128).enumerate() {
        for l in 0..32 {
            let q = [
                level(j + l),
                level(j + l + 32),
                level(j + l + 64),
                level(j + l + 96),
            ];
            ql[64 * n + l] = (q[0] & 0xf) | ((q[2] & 0xf) << 4);
            ql[64 * n + l + 32] = (q[1] & 0xf) | ((q[3] & 0xf) << 4);
            qh[32 * n + l] =
                (q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&s| s as u8));
    out.extend_from_slice(&d.to_le_bytes());
}
