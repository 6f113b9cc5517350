// Weight formats as the linear kernels read them: one place for every format's dequantization.
// Included (`//#include blocks`) by gemv.wgsl, matmul.wgsl, matmul_lanes.wgsl and embedding.wgsl, which declare
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

// One unit of 32 weights as loaded: the raw words its quants are in (up to four vec4, no
// arrays, so that every value stays in registers on drivers that would spill arrays to memory)
// and the scale and offset of its two halves. `quads(format, unit, i)` turns the raw words into
// the integer quants of weights 4i .. 4i + 4; weight 4i + j = d[i / 4]·q + m[i / 4]. The
// formats with a fixed offset (Q4_0's −8, Q5_0's −16, Q3_K's −4, Q6_K's −32) give centred
// quants and m = 0, so a sum never cancels d·Σq·x against m·Σx; Q4_1, Q5_1, Q2_K, Q4_K and
// Q5_K store a minimum per group, and m is it.
struct Unit {
    a: vec4<u32>,
    b: vec4<u32>,
    c: vec4<u32>,
    e: vec4<u32>,
    // A shift or bit index within the raw words (which part of a shared byte is this unit's).
    w: u32,
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

// ---- loading a unit ---------------------------------------------------------------------

fn zero_unit() -> Unit {
    return Unit(vec4<u32>(0u), vec4<u32>(0u), vec4<u32>(0u), vec4<u32>(0u), 0u, vec2<f32>(0.0),
                vec2<f32>(0.0));
}

// Q4_0 / Q4_1 bodies: 16 bytes of nibbles (byte j: weight j low, j + 16 high), one vec4.
// Q5_0 / Q5_1 bodies: `qh` (bit e: the fifth bit of weight e), then the nibbles: 5 words.
// Q8_0 bodies: 32 int8, two vec4. Scale fields: `d` (Q4_0 m = −8d, Q5_0 m = −16d, Q8_0 m = 0),
// or `d`, `m` (Q4_1, Q5_1).
fn unit_legacy(format: u32, blk: u32) -> Unit {
    var u = zero_unit();
    switch format {
        case W_Q4_0, W_Q4_1: { u.a = w[blk]; }
        case W_Q8_0: {
            u.a = w[blk * 2u];
            u.b = w[blk * 2u + 1u];
        }
        default: {
            let base = blk * 5u;
            u.w = word_at(base);
            u.a = vec4<u32>(word_at(base + 1u), word_at(base + 2u), word_at(base + 3u),
                            word_at(base + 4u));
        }
    }
    if (format == W_Q4_1 || format == W_Q5_1) {
        let dm = scale32(blk);
        u.d = vec2<f32>(dm.x);
        u.m = vec2<f32>(dm.y);
    } else {
        u.d = vec2<f32>(scale16(blk));
    }
    return u;
}

// Byte `i` of four words.
fn byte_of(v: vec4<u32>, i: u32) -> u32 {
    return (v[i / 4u] >> (8u * (i % 4u))) & 0xffu;
}

// Q2_K body: 16 scale bytes (low nibble scale, high nibble min; one per 16 weights), then 64
// bytes of 2-bit quants. Unit `sub` = weights 32·sub .. takes bits 2·(sub % 4) of quant bytes
// 32·(sub / 4) .. + 32, and scale bytes 2·sub and 2·sub + 1. Scale field: `d`, `dmin`.
fn unit_q2_k(blk: u32, sub: u32) -> Unit {
    var u = zero_unit();
    let base = blk * 5u;                       // 20 words = 5 vec4
    let scales = w[base];
    u.a = w[base + 1u + 2u * (sub / 4u)];
    u.b = w[base + 2u + 2u * (sub / 4u)];
    u.w = 2u * (sub % 4u);
    let dm = scale32(blk);
    let lo = byte_of(scales, 2u * sub);
    let hi = byte_of(scales, 2u * sub + 1u);
    u.d = dm.x * vec2<f32>(f32(lo & 0xfu), f32(hi & 0xfu));
    u.m = -dm.y * vec2<f32>(f32(lo >> 4u), f32(hi >> 4u));
    return u;
}

// Q3_K body (27 words, not vec4-aligned): 32 bytes of high bits (bit `sub` of byte e belongs to
// weight e of unit `sub`), 64 bytes of 2-bit low quants (as Q2_K), 12 bytes packing sixteen
// 6-bit scales (ggml's kmask unpacking: scale word k = low nibbles of word k % 2 shifted by
// 4·(k / 2), high bits from word 2 shifted by 2k). Weight = d·(scale − 32)·(low + 4·high − 4).
fn unit_q3_k(blk: u32, sub: u32) -> Unit {
    var u = zero_unit();
    let base = blk * 27u;
    let low = base + 8u + 8u * (sub / 4u);
    u.a = vec4<u32>(word_at(low), word_at(low + 1u), word_at(low + 2u), word_at(low + 3u));
    u.b = vec4<u32>(word_at(low + 4u), word_at(low + 5u), word_at(low + 6u), word_at(low + 7u));
    u.c = vec4<u32>(word_at(base), word_at(base + 1u), word_at(base + 2u), word_at(base + 3u));
    u.e = vec4<u32>(word_at(base + 4u), word_at(base + 5u), word_at(base + 6u),
                    word_at(base + 7u));
    u.w = sub;
    let k = sub / 2u;
    let packed = word_at(base + 24u + k % 2u);
    let high_bits = word_at(base + 26u);
    let word = ((packed >> (4u * (k / 2u))) & 0x0f0f0f0fu) | (((high_bits >> (2u * k)) & 0x03030303u) << 4u);
    let byte = 2u * (sub % 2u);
    let scales = vec2<f32>(f32((word >> (8u * byte)) & 0x3fu),
                           f32((word >> (8u * byte + 8u)) & 0x3fu)) - 32.0;
    u.d = scale16(blk) * scales;
    return u;
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
    var u = zero_unit();
    let five = format == W_Q5_K;
    let base = blk * select(9u, 11u, five);
    let head = w[base];
    let qs = base + select(1u, 3u, five) + 2u * (sub / 2u);
    u.a = w[qs];
    u.b = w[qs + 1u];
    if (five) {
        u.c = w[base + 1u];
        u.e = w[base + 2u];
        u.w = sub;
    } else {
        u.w = 4u * (sub % 2u);
    }
    let dm = unpack2x16float(head.x);
    let sm = scale_min_k4(vec4<u32>(head.y, head.z, head.w, 0u), sub);
    u.d = vec2<f32>(dm.x * sm.x);
    u.m = vec2<f32>(-dm.y * sm.y);
    return u;
}

// Q6_K body (13 vec4): 128 bytes of low nibbles, 64 bytes of high bit pairs, 16 int8 scales (one
// per 16 weights). Unit `sub` = weights 128·n + 32·t .. (n = sub / 4, t = sub % 4) takes nibble
// t / 2 of low bytes 64·n + 32·(t % 2) .., bits 2t of high bytes 32·n .., and scales 8n + 2t,
// 8n + 2t + 1. Weight = d·scale·(q − 32).
fn unit_q6_k(blk: u32, sub: u32) -> Unit {
    var u = zero_unit();
    let base = blk * 13u;
    let n = sub / 4u;
    let t = sub % 4u;
    let low = base + 4u * n + 2u * (t % 2u);
    u.a = w[low];
    u.b = w[low + 1u];
    u.c = w[base + 8u + 2u * n];
    u.e = w[base + 9u + 2u * n];
    u.w = t;
    let scales = w[base + 12u];
    let s = 8u * n + 2u * t;
    let sc = vec2<f32>(f32(extractBits(i32(byte_of(scales, s)), 0u, 8u)),
                       f32(extractBits(i32(byte_of(scales, s + 1u)), 0u, 8u)));
    u.d = scale16(blk) * sc;
    return u;
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
    return unit_legacy(format, row * p.w_stride + unit);
}

// Bits `bit`.. of four consecutive weights' flags, one per byte: bits e + 0..4 of `flags` as
// bit 0 of bytes 0..4.
fn spread4(flags: u32, bit: u32) -> u32 {
    let f = flags >> bit;
    return (f & 1u) | ((f & 2u) << 7u) | ((f & 4u) << 14u) | ((f & 8u) << 21u);
}

// The integer quants of weights 4i .. 4i + 4 of a unit, as four floats.
fn quads(format: u32, u: Unit, i: u32) -> vec4<f32> {
    // Word i of the unit's first 8 raw words (a, b), and of the second 8 (c, e).
    let first = select(u.b[i % 4u], u.a[i % 4u], i < 4u);
    let second = select(u.e[i % 4u], u.c[i % 4u], i < 4u);
    switch format {
        case W_Q8_0: { return vec4<f32>(unpack4xI8(first)); }
        case W_Q4_0, W_Q4_1: {
            let q = u8x4((u.a[i % 4u] >> (4u * (i / 4u))) & 0x0f0f0f0fu);
            return select(q, q - 8.0, format == W_Q4_0);
        }
        case W_Q5_0, W_Q5_1: {
            let nibbles = (u.a[i % 4u] >> (4u * (i / 4u))) & 0x0f0f0f0fu;
            let q = u8x4(nibbles | (spread4(u.w, 4u * i) << 4u));
            return select(q, q - 16.0, format == W_Q5_0);
        }
        case W_Q2_K: { return u8x4((first >> u.w) & 0x03030303u); }
        case W_Q3_K: {
            let low = (first >> (2u * (u.w % 4u))) & 0x03030303u;
            return u8x4(low + 4u * ((second >> u.w) & 0x01010101u)) - 4.0;
        }
        case W_Q4_K: { return u8x4((first >> u.w) & 0x0f0f0f0fu); }
        case W_Q5_K: {
            let fifth = (second >> u.w) & 0x01010101u;
            return u8x4(((first >> (4u * (u.w % 2u))) & 0x0f0f0f0fu) | (fifth << 4u));
        }
        default: {
            // Q6_K: nibble t / 2 of the low bytes, bits 2t of the high bytes.
            let lo = (first >> (4u * (u.w / 2u))) & 0x0f0f0f0fu;
            return u8x4(lo | (((second >> (2u * u.w)) & 0x03030303u) << 4u)) - 32.0;
        }
    }
}

// Weights 4i .. 4i + 4 of a unit.
fn unit_values(format: u32, unit: Unit, i: u32) -> vec4<f32> {
    let second = i >= 4u;
    return select(unit.d.x, unit.d.y, second) * quads(format, unit, i)
         + select(unit.m.x, unit.m.y, second);
}
