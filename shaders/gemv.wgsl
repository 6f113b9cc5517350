// y[N] = W[N, K] · x[K] (+ bias) (+ y if accumulating): the M = 1 case of matmul (decode steps,
// lm_head on the last row). Memory bound: every weight byte is read exactly once, with aligned
// vec4 loads, and the small x vector is served from cache.
//
// A workgroup of WG threads computes ROWS output rows, a multiple of 4 kept as vec4 sums: 4 on
// GPUs, 16 on CPU adapters, where each value loaded rather than bandwidth is the cost (gemv.rs
// `GemvShape`). Every thread walks K in vec4 steps for all ROWS rows at once (so each x value
// it loads is reused ROWS times), then the workgroup reduces the ROWS partial sums: with
// subgroup adds when the adapter has subgroups (any subgroup size; MAX_SUBGROUPS = WG / the
// device's smallest subgroup size bounds how many there are), with a shared-memory tree
// otherwise.
//
// Quantized weights (Q8_0, Q4_0; tensor.rs `WeightFormat::storage_bytes`): a thread takes whole
// blocks of 32 weights, loads the 32 x values once into registers for its ROWS rows, reads each
// row's block quants with one (Q4_0) or two (Q8_0) aligned vec4<u32> loads, dequantizes in
// registers and adds d·Σ q·x. Neighbouring threads read neighbouring blocks.
//
// Injected by the host (gemv.rs `GemvShape`, linear/mod.rs flag bits):
//#inject WG ROWS MAX_SUBGROUPS FLAG_BIAS FLAG_ACCUMULATE

// A thread's partial sums of the ROWS rows, four rows per vec4.
const QUADS: u32 = ROWS / 4u;
alias Sums = array<vec4<f32>, QUADS>;

struct Params {
    n: u32,            // rows of W in this chunk
    k: u32,
    w_stride: u32,     // 32-bit words per stored W row (f16/f32); blocks per row (Q8_0/Q4_0)
    x_offset: u32,     // index of x[0] in the x buffer (to use one row of a matrix)
    col_offset: u32,   // first output element (= first W row of this chunk)
    flags: u32,        // FLAG_BIAS: add bias, FLAG_ACCUMULATE: accumulate into y
    y_offset: u32,     // index of y[0] in the y buffer
    scales: u32,       // quantized: word offset of the f16 scales region (0 for f16/f32)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

//#if SUBGROUPS
var<workgroup> partial: array<f32, ROWS * MAX_SUBGROUPS>;   // [ROWS][MAX_SUBGROUPS]
//#else
var<workgroup> partial: array<f32, ROWS * WG>;              // [ROWS][WG]
//#endif

// x[k0 .. k0 + 4), zero past the end (x past K may hold anything; W's padding is zero but
// 0 · NaN would still poison the sum).
fn x4(k0: u32) -> vec4<f32> {
    let base = p.x_offset + k0;
    if (k0 + 4u <= p.k) {
        return vec4<f32>(x[base], x[base + 1u], x[base + 2u], x[base + 3u]);
    }
    var v = vec4<f32>(0.0);
    for (var e = 0u; e < 4u; e++) {
        if (k0 + e < p.k) {
            v[e] = x[base + e];
        }
    }
    return v;
}

fn finish(sums: Sums, row0: u32, tid: u32, lane: u32, sg_id: u32, sg_count: u32) {
//#if SUBGROUPS
    for (var q = 0u; q < QUADS; q++) {
        let total = subgroupAdd(sums[q]);
        if (lane == 0u) {
            for (var j = 0u; j < 4u; j++) {
                partial[(4u * q + j) * MAX_SUBGROUPS + sg_id] = total[j];
            }
        }
    }
    workgroupBarrier();
    if (tid < ROWS) {
        var s = 0.0;
        for (var i = 0u; i < sg_count; i++) {
            s += partial[tid * MAX_SUBGROUPS + i];
        }
        write_row(row0 + tid, s);
    }
//#else
    for (var r = 0u; r < ROWS; r++) {
        partial[r * WG + tid] = sums[r / 4u][r % 4u];
    }
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if (tid < stride) {
            for (var r = 0u; r < ROWS; r++) {
                partial[r * WG + tid] += partial[r * WG + tid + stride];
            }
        }
        workgroupBarrier();
    }
    if (tid < ROWS) {
        write_row(row0 + tid, partial[tid * WG]);
    }
//#endif
}

fn write_row(row: u32, sum: f32) {
    if (row >= p.n) {
        return;
    }
    let out = p.col_offset + row;
    var v = sum;
    if ((p.flags & FLAG_BIAS) != 0u) {
        v += bias[out];
    }
    let at = p.y_offset + out;
    if ((p.flags & FLAG_ACCUMULATE) != 0u) {
        v += y[at];
    }
    y[at] = v;
}

// The ids an entry point receives. Without subgroups the reduction in `finish` uses only
// `tid`, and the subgroup ids read as one lane of one subgroup.
struct Invocation {
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
//#if SUBGROUPS
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_id) sg_id: u32,
    @builtin(num_subgroups) sg_count: u32,
//#endif
}

// The first of the ROWS output rows this workgroup computes (2D grid past the dimension limit).
fn first_row(inv: Invocation) -> u32 {
    return (inv.wg.x + inv.wg.y * inv.groups.x) * ROWS;
}

// Reduce every thread's `sums` over the workgroup and write the ROWS rows.
fn reduce_and_write(inv: Invocation, sums: Sums) {
//#if SUBGROUPS
    finish(sums, first_row(inv), inv.tid, inv.lane, inv.sg_id, inv.sg_count);
//#else
    finish(sums, first_row(inv), inv.tid, 0u, 0u, 1u);
//#endif
}

// This thread's partial sums of ROWS rows of an f16 weight.
fn f16_sums(row0: u32, tid: u32) -> Sums {
    var sums: Sums;
    // One vec4<u32> holds 8 halves; w_stride / 4 of them per row.
    let chunks = p.w_stride / 4u;
    for (var c = tid; c < chunks; c += WG) {
        let k0 = c * 8u;
        let xa = x4(k0);
        let xb = x4(k0 + 4u);
        for (var r = 0u; r < ROWS; r++) {
            let row = row0 + r;
            if (row < p.n) {
                let q = w[row * chunks + c];
                let wa = vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y));
                let wb = vec4<f32>(unpack2x16float(q.z), unpack2x16float(q.w));
                sums[r / 4u][r % 4u] += dot(wa, xa) + dot(wb, xb);
            }
        }
    }
    return sums;
}

// This thread's partial sums of ROWS rows of an f32 weight.
fn f32_sums(row0: u32, tid: u32) -> Sums {
    var sums: Sums;
    let chunks = p.w_stride / 4u;
    for (var c = tid; c < chunks; c += WG) {
        let xa = x4(c * 4u);
        for (var r = 0u; r < ROWS; r++) {
            let row = row0 + r;
            if (row < p.n) {
                sums[r / 4u][r % 4u] += dot(bitcast<vec4<f32>>(w[row * chunks + c]), xa);
            }
        }
    }
    return sums;
}

// Scale of block `blk` (row-major over the chunk) of a quantized weight: f16 pairs in u32 words.
fn block_scale(blk: u32) -> f32 {
    let word = p.scales + blk / 2u;
    return unpack2x16float(w[word / 4u][word % 4u])[blk % 2u];
}

// 4 signed bytes → 4 floats (Q8_0 quants, element order = byte order).
fn i8x4(v: u32) -> vec4<f32> {
    return vec4<f32>(unpack4xI8(v));
}

// Q4_0 word i of a block: its low nibbles are elements 4i.., its high nibbles 16 + 4i...
fn q4_low(v: u32) -> vec4<f32> {
    return vec4<f32>(unpack4xU8(v & 0x0f0f0f0fu)) - 8.0;
}

fn q4_high(v: u32) -> vec4<f32> {
    return vec4<f32>(unpack4xU8((v >> 4u) & 0x0f0f0f0fu)) - 8.0;
}

const W_Q8_0: u32 = 2u;
const W_Q4_0: u32 = 3u;

// Σ q·x over block `blk` (without its scale) of a weight stored in `format`; `xs` are the
// block's 32 x values.
fn block_dot(format: u32, blk: u32, xs: array<vec4<f32>, 8>) -> f32 {
    if (format == W_Q8_0) {
        let qa = w[blk * 2u];
        let qb = w[blk * 2u + 1u];
        return dot(i8x4(qa.x), xs[0]) + dot(i8x4(qa.y), xs[1]) + dot(i8x4(qa.z), xs[2])
             + dot(i8x4(qa.w), xs[3]) + dot(i8x4(qb.x), xs[4]) + dot(i8x4(qb.y), xs[5])
             + dot(i8x4(qb.z), xs[6]) + dot(i8x4(qb.w), xs[7]);
    }
    let q = w[blk];
    return dot(q4_low(q.x), xs[0]) + dot(q4_low(q.y), xs[1]) + dot(q4_low(q.z), xs[2])
         + dot(q4_low(q.w), xs[3]) + dot(q4_high(q.x), xs[4]) + dot(q4_high(q.y), xs[5])
         + dot(q4_high(q.z), xs[6]) + dot(q4_high(q.w), xs[7]);
}

// This thread's partial sums of ROWS rows of a weight in ggml blocks (`format` is a constant
// at every call, so only its dequantization stays in the loop).
fn quantized_sums(format: u32, row0: u32, tid: u32) -> Sums {
    var sums: Sums;
    let blocks = p.w_stride;
    for (var b = tid; b < blocks; b += WG) {
        let k0 = b * 32u;
        let xs = array<vec4<f32>, 8>(x4(k0), x4(k0 + 4u), x4(k0 + 8u), x4(k0 + 12u),
                                     x4(k0 + 16u), x4(k0 + 20u), x4(k0 + 24u), x4(k0 + 28u));
        for (var r = 0u; r < ROWS; r++) {
            let row = row0 + r;
            if (row < p.n) {
                let blk = row * blocks + b;
                sums[r / 4u][r % 4u] += block_scale(blk) * block_dot(format, blk, xs);
            }
        }
    }
    return sums;
}

@compute @workgroup_size(WG)
fn gemv_f16(inv: Invocation) {
    reduce_and_write(inv, f16_sums(first_row(inv), inv.tid));
}

@compute @workgroup_size(WG)
fn gemv_f32(inv: Invocation) {
    reduce_and_write(inv, f32_sums(first_row(inv), inv.tid));
}

@compute @workgroup_size(WG)
fn gemv_q8_0(inv: Invocation) {
    reduce_and_write(inv, quantized_sums(W_Q8_0, first_row(inv), inv.tid));
}

@compute @workgroup_size(WG)
fn gemv_q4_0(inv: Invocation) {
    reduce_and_write(inv, quantized_sums(W_Q4_0, first_row(inv), inv.tid));
}
