// Weight formats as the linear kernels read them: one place for every format's dequantization.
// Included (`//#include blocks`) by gemv.wgsl, matmul.wgsl and matmul_lanes.wgsl, which declare
// what these functions read: the weight buffer `w: array<vec4<u32>>` and, in `p`, `w_stride`
// (blocks per row of a block format) and `scales` (the word where the scale fields start).
//
// Formats are named by their ggml type numbers (format.rs `WeightFormat::ggml_type`); a kernel
// is compiled for one of them (its injected FORMAT), so every `switch format` below folds away.
//
// Block formats (format.rs has the byte layouts): a chunk holds the *bodies* of all its blocks
// (the block without its f16 scale field), row by row, then the scale fields in the same order
// from word `p.scales`. Every block is read as units of 32 consecutive weights (one block of the
// 32-weight formats, an eighth of a K-quant super-block), each with two (scale, offset) pairs,
// for its weights 0..16 and 16..32: weight = d·q + m with q an integer quant.

const W_F32: u32 = 0u;
const W_F16: u32 = 1u;
const W_Q4_0: u32 = 2u;
const W_Q4_1: u32 = 3u;
const W_Q5_0: u32 = 6u;
const W_Q5_1: u32 = 7u;
const W_Q8_0: u32 = 8u;
const W_Q2_K: u32 = 10u;
const W_Q3_K: u32 = 11u;
const W_Q4_K: u32 = 12u;
const W_Q5_K: u32 = 13u;
const W_Q6_K: u32 = 14u;
const W_BF16: u32 = 30u;

// One unit of 32 weights: weight 4i + j is d[i / 4]·q[i][j] + m[i / 4].
struct Unit {
    q: array<vec4<f32>, 8>,
    d: vec2<f32>,
    m: vec2<f32>,
}

// ---- float formats --------------------------------------------------------------------------

// Two 16-bit floats of a word (low half first): IEEE halves, or bfloat16 (an f32's high half).
fn halves(format: u32, word: u32) -> vec2<f32> {
    if (format == W_BF16) {
        return vec2<f32>(bitcast<f32>(word << 16u), bitcast<f32>(word & 0xffff0000u));
    }
    return unpack2x16float(word);
}

// ---- addressing -----------------------------------------------------------------------------

fn is_k_quant(format: u32) -> bool {
    return format >= W_Q2_K && format <= W_Q6_K;
}

// Words of a block's body (format.rs `BlockLayout::body_bytes` / 4).
fn body_words(format: u32) -> u32 {
    switch format {
        case W_Q4_0, W_Q4_1: { return 4u; }
        case W_Q5_0, W_Q5_1: { return 5u; }
        case W_Q8_0: { return 8u; }
        case W_Q2_K: { return 20u; }
        case W_Q3_K: { return 27u; }
        case W_Q4_K: { return 36u; }
        case W_Q5_K: { return 44u; }
        default: { return 52u; }     // Q6_K
    }
}

fn word_at(i: u32) -> u32 {
    return w[i / 4u][i % 4u];
}

// A 2-byte scale field (f16 `d`): half of a word of the scales region.
fn scale16(blk: u32) -> f32 {
    return unpack2x16float(word_at(p.scales + blk / 2u))[blk % 2u];
}

// A 4-byte scale field (`d` and `m`, or `d` and `dmin`): one word of the scales region.
fn scale32(blk: u32) -> vec2<f32> {
    return unpack2x16float(word_at(p.scales + blk));
}

// 4 bytes → 4 floats.
fn u8x4(v: u32) -> vec4<f32> {
    return vec4<f32>(unpack4xU8(v));
}

// Bit `bit` of each byte of `v`, as 0 or 1.
fn bit_of_bytes(v: u32, bit: u32) -> vec4<f32> {
    return u8x4((v >> bit) & 0x01010101u);
}

// ---- the 32-weight formats ------------------------------------------------------------------

// Q4_0 / Q4_1 / Q5_0 / Q5_1 nibbles: byte j of the 16 holds weight j (low) and j + 16 (high).
fn nibbles(unit: ptr<function, Unit>, qs: vec4<u32>) {
    for (var i = 0u; i < 4u; i++) {
        (*unit).q[i] = u8x4(qs[i] & 0x0f0f0f0fu);
        (*unit).q[i + 4u] = u8x4((qs[i] >> 4u) & 0x0f0f0f0fu);
    }
}

// The fifth bits of Q5_0 / Q5_1: bit e of `qh` belongs to weight e.
fn fifth_bits(unit: ptr<function, Unit>, qh: u32) {
    for (var i = 0u; i < 8u; i++) {
        let bits = (qh >> (4u * i)) & 0xfu;
        (*unit).q[i] += 16.0 * vec4<f32>(f32(bits & 1u), f32((bits >> 1u) & 1u),
                                         f32((bits >> 2u) & 1u), f32(bits >> 3u));
    }
}

fn same_halves(unit: ptr<function, Unit>, d: f32, m: f32) {
    (*unit).d = vec2<f32>(d);
    (*unit).m = vec2<f32>(m);
}

fn unit_q4_0(blk: u32) -> Unit {
    var unit: Unit;
    nibbles(&unit, w[blk]);
    let d = scale16(blk);
    same_halves(&unit, d, -8.0 * d);
    return unit;
}

fn unit_q4_1(blk: u32) -> Unit {
    var unit: Unit;
    nibbles(&unit, w[blk]);
    let dm = scale32(blk);
    same_halves(&unit, dm.x, dm.y);
    return unit;
}

// Q5_0 / Q5_1 bodies: `qh` (one word), then the nibbles (four words), 5 words a block.
fn unit_q5(format: u32, blk: u32) -> Unit {
    var unit: Unit;
    let base = blk * 5u;
    nibbles(&unit, vec4<u32>(word_at(base + 1u), word_at(base + 2u), word_at(base + 3u),
                             word_at(base + 4u)));
    fifth_bits(&unit, word_at(base));
    if (format == W_Q5_0) {
        let d = scale16(blk);
        same_halves(&unit, d, -16.0 * d);
    } else {
        let dm = scale32(blk);
        same_halves(&unit, dm.x, dm.y);
    }
    return unit;
}

fn unit_q8_0(blk: u32) -> Unit {
    var unit: Unit;
    let a = w[blk * 2u];
    let b = w[blk * 2u + 1u];
    for (var i = 0u; i < 4u; i++) {
        unit.q[i] = vec4<f32>(unpack4xI8(a[i]));
        unit.q[i + 4u] = vec4<f32>(unpack4xI8(b[i]));
    }
    same_halves(&unit, scale16(blk), 0.0);
    return unit;
}

// ---- K-quants: unit `sub` (0..8) of super-block `blk` -----------------------------------------

// Byte `i` of four words.
fn byte_of(v: vec4<u32>, i: u32) -> u32 {
    return (v[i / 4u] >> (8u * (i % 4u))) & 0xffu;
}

// Q2_K body: 16 scale bytes (low nibble scale, high nibble min; one per 16 weights), then 64
// bytes of 2-bit quants. Unit `sub` = 32·sub.. takes bits 2·(sub % 4) of quant bytes
// 32·(sub / 4) .. + 32, and scale bytes 2·sub and 2·sub + 1. Scale field: `d`, `dmin`.
fn unit_q2_k(blk: u32, sub: u32) -> Unit {
    var unit: Unit;
    let base = blk * 5u;                       // 20 words = 5 vec4
    let scales = w[base];
    let shift = 2u * (sub % 4u);
    let qa = w[base + 1u + 2u * (sub / 4u)];
    let qb = w[base + 2u + 2u * (sub / 4u)];
    for (var i = 0u; i < 4u; i++) {
        unit.q[i] = u8x4((qa[i] >> shift) & 0x03030303u);
        unit.q[i + 4u] = u8x4((qb[i] >> shift) & 0x03030303u);
    }
    let dm = scale32(blk);
    let lo = byte_of(scales, 2u * sub);
    let hi = byte_of(scales, 2u * sub + 1u);
    unit.d = dm.x * vec2<f32>(f32(lo & 0xfu), f32(hi & 0xfu));
    unit.m = -dm.y * vec2<f32>(f32(lo >> 4u), f32(hi >> 4u));
    return unit;
}

// Q3_K body (27 words, not vec4-aligned): 32 bytes of high bits (bit `sub` of byte e belongs to
// weight e of unit `sub`), 64 bytes of 2-bit low quants (as Q2_K), 12 bytes packing sixteen
// 6-bit scales (ggml's kmask unpacking: scale word k = low nibbles of word k % 2 shifted by
// 4·(k / 2), high bits from word 2 shifted by 2k). Weight = d·(scale − 32)·(low + 4·high − 4).
fn unit_q3_k(blk: u32, sub: u32) -> Unit {
    var unit: Unit;
    let base = blk * 27u;
    let shift = 2u * (sub % 4u);
    for (var i = 0u; i < 8u; i++) {
        let low = (word_at(base + 8u + 8u * (sub / 4u) + i) >> shift) & 0x03030303u;
        let high = (word_at(base + i) >> sub) & 0x01010101u;
        unit.q[i] = u8x4(low + 4u * high);
    }
    let k = sub / 2u;
    let packed = word_at(base + 24u + k % 2u);
    let high_bits = word_at(base + 26u);
    let word = ((packed >> (4u * (k / 2u))) & 0x0f0f0f0fu) | (((high_bits >> (2u * k)) & 0x03030303u) << 4u);
    let byte = 2u * (sub % 2u);
    let scales = vec2<f32>(f32((word >> (8u * byte)) & 0x3fu),
                           f32((word >> (8u * byte + 8u)) & 0x3fu)) - 32.0;
    unit.d = scale16(blk) * scales;
    unit.m = -4.0 * unit.d;
    return unit;
}

// Q4_K / Q5_K 6-bit scale and min of sub-block j from the 12 scale bytes (ggml's
// get_scale_min_k4): (scale, min).
fn scale_min_k4(s: vec4<u32>, j: u32) -> vec2<f32> {
    if (j < 4u) {
        return vec2<f32>(f32(byte_of(s, j) & 63u), f32(byte_of(s, j + 4u) & 63u));
    }
    let sc = (byte_of(s, j + 4u) & 0xfu) | ((byte_of(s, j - 4u) >> 6u) << 4u);
    let mn = (byte_of(s, j + 4u) >> 4u) | ((byte_of(s, j) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(mn));
}

// Q4_K body (9 vec4): `d`, `dmin` (word 0), 12 scale bytes (words 1..4), 128 bytes of
// nibbles: unit `sub` takes the low (even sub) or high (odd sub) nibbles of bytes
// 32·(sub / 2) .. + 32. Q5_K (11 vec4) has 32 bytes of fifth bits after the scales: bit `sub` of
// byte e belongs to weight e of unit `sub`.
fn unit_q45_k(format: u32, blk: u32, sub: u32) -> Unit {
    var unit: Unit;
    let five = format == W_Q5_K;
    let base = blk * select(9u, 11u, five);
    let head = w[base];
    let qs = base + select(1u, 3u, five) + 2u * (sub / 2u);
    let qa = w[qs];
    let qb = w[qs + 1u];
    let shift = 4u * (sub % 2u);
    for (var i = 0u; i < 4u; i++) {
        unit.q[i] = u8x4((qa[i] >> shift) & 0x0f0f0f0fu);
        unit.q[i + 4u] = u8x4((qb[i] >> shift) & 0x0f0f0f0fu);
    }
    if (five) {
        let ha = w[base + 1u];
        let hb = w[base + 2u];
        for (var i = 0u; i < 4u; i++) {
            unit.q[i] += 16.0 * bit_of_bytes(ha[i], sub);
            unit.q[i + 4u] += 16.0 * bit_of_bytes(hb[i], sub);
        }
    }
    let dm = unpack2x16float(head.x);
    let sm = scale_min_k4(vec4<u32>(head.y, head.z, head.w, 0u), sub);
    same_halves(&unit, dm.x * sm.x, -dm.y * sm.y);
    return unit;
}

// Q6_K body (13 vec4): 128 bytes of low nibbles, 64 bytes of high bit pairs, 16 int8 scales (one
// per 16 weights). Unit `sub` = 128·n + 32·t (n = sub / 4, t = sub % 4) takes nibble t / 2 of
// low bytes 64·n + 32·(t % 2) .., bits 2t of high bytes 32·n .., and scales 8n + 2t, 8n + 2t + 1.
// Weight = d·scale·(q − 32).
fn unit_q6_k(blk: u32, sub: u32) -> Unit {
    var unit: Unit;
    let base = blk * 13u;
    let n = sub / 4u;
    let t = sub % 4u;
    let low = base + 4u * n + 2u * (t % 2u);
    let high = base + 8u + 2u * n;
    for (var h = 0u; h < 2u; h++) {
        let ql = w[low + h];
        let qh = w[high + h];
        for (var i = 0u; i < 4u; i++) {
            let lo = (ql[i] >> (4u * (t / 2u))) & 0x0f0f0f0fu;
            let hi = ((qh[i] >> (2u * t)) & 0x03030303u) << 4u;
            unit.q[4u * h + i] = u8x4(lo | hi);
        }
    }
    let scales = w[base + 12u];
    let s = 8u * n + 2u * t;
    let sc = vec2<f32>(f32(extractBits(i32(byte_of(scales, s)), 0u, 8u)),
                       f32(extractBits(i32(byte_of(scales, s + 1u)), 0u, 8u)));
    unit.d = scale16(blk) * sc;
    unit.m = -32.0 * unit.d;
    return unit;
}

// Unit `unit` (weights 32·unit .. + 32) of row `row` of the chunk, for a block `format`.
fn load_unit(format: u32, row: u32, unit: u32) -> Unit {
    if (is_k_quant(format)) {
        let blk = row * p.w_stride + unit / 8u;
        let sub = unit % 8u;
        switch format {
            case W_Q2_K: { return unit_q2_k(blk, sub); }
            case W_Q3_K: { return unit_q3_k(blk, sub); }
            case W_Q6_K: { return unit_q6_k(blk, sub); }
            default: { return unit_q45_k(format, blk, sub); }
        }
    }
    let blk = row * p.w_stride + unit;
    switch format {
        case W_Q4_0: { return unit_q4_0(blk); }
        case W_Q4_1: { return unit_q4_1(blk); }
        case W_Q8_0: { return unit_q8_0(blk); }
        default: { return unit_q5(format, blk); }
    }
}

// Weights 4i .. 4i + 4 of a unit.
fn unit_values(unit: Unit, i: u32) -> vec4<f32> {
    let h = i / 4u;
    return unit.d[h] * unit.q[i] + unit.m[h];
}
