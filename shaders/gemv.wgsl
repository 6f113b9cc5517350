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
// otherwise. On CPU adapters the workgroup is a single subgroup (WG = 8, MAX_SUBGROUPS = 1) and
// the reduction is subgroup adds alone, with no barrier.
//
// Block formats (every ggml type the engine runs; blocks.wgsl): a thread takes whole units of 32
// weights, loads their 32 x values once into registers (with the sums Σx of each half) for its
// ROWS rows, reads each row's unit (mostly aligned vec4<u32> loads), and adds
// d·Σ q·x + m·Σ x per half unit: the integer quants never become weights. Neighbouring threads
// read neighbouring units.
//
// What x is (X_MODE, linear/mod.rs `LinearInput`): the row as stored (X_PLAIN); RMSNorm(x)·γ
// computed on the fly (X_RMS_NORM: x·γ as it is loaded, the sum of squares of x reduced with the row
// sums, and each output scaled by 1/rms at the end, since W·(γ∘x)/rms = W·RMSNorm(x)); or
// silu(gate)·up of a [2K] row, gate first (X_SILU_GATE). The fused forms spare a decode step the
// norm's and the activation's dispatches and their passes over memory: each workgroup reads the
// whole x anyway.
//
// Injected by the host (gemv.rs `GemvShape`, the weight's format as its ggml type number,
// linear/mod.rs flag bits and `LinearInput`):
//#inject WG ROWS MAX_SUBGROUPS FORMAT FLAG_BIAS FLAG_ACCUMULATE X_MODE
//#include blocks

// A thread's partial sums of the ROWS rows, four rows per vec4.
const QUADS: u32 = ROWS / 4u;
alias Sums = array<vec4<f32>, QUADS>;

const X_PLAIN: u32 = 0u;
const X_RMS_NORM: u32 = 1u;
const X_SILU_GATE: u32 = 2u;

struct Params {
    n: u32,            // rows of W in this chunk
    k: u32,
    w_stride: u32,     // 32-bit words per stored W row (floats); blocks per row (block formats)
    x_offset: u32,     // index of x[0] in the x buffer (to use one row of a matrix)
    col_offset: u32,   // first output element (= first W row of this chunk)
    flags: u32,        // FLAG_BIAS: add bias, FLAG_ACCUMULATE: accumulate into y
    y_offset: u32,     // index of y[0] in the y buffer
    scales: u32,       // block formats: word offset of the scales region (0 for floats)
    eps: f32,          // X_RMS_NORM: the norm's epsilon
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
// X_RMS_NORM: the norm's weight γ [K] (another buffer stands in for the other modes).
@group(0) @binding(5) var<storage, read> gamma: array<vec4<f32>>;

// X_RMS_NORM: this thread's share of Σ x² (each x value is loaded once per workgroup).
var<private> sum_squares: f32;

// Row sums, then (row ROWS) the sums of squares of X_RMS_NORM.
//#if SUBGROUPS
var<workgroup> partial: array<f32, (ROWS + 1u) * MAX_SUBGROUPS>;   // [ROWS + 1][MAX_SUBGROUPS]
//#else
var<workgroup> partial: array<f32, (ROWS + 1u) * WG>;              // [ROWS + 1][WG]
//#endif

// buffer[start + k0 .. + 4) of the x buffer, zero where k0 + e ≥ K (x past K may hold anything;
// W's padding is zero but 0 · NaN would still poison the sum). x is bound as vec4s: one load per
// four values when they start on a vec4 boundary (a CPU driver pays per lane load).
fn load4(start: u32, k0: u32) -> vec4<f32> {
    let base = start + k0;
    if (k0 + 4u <= p.k && base % 4u == 0u) {
        return x[base / 4u];
    }
    var v = vec4<f32>(0.0);
    for (var e = 0u; e < 4u; e++) {
        if (k0 + e < p.k) {
            let i = base + e;
            v[e] = x[i / 4u][i % 4u];
        }
    }
    return v;
}

// γ[k0 .. k0 + 4), zero past K.
fn gamma4(k0: u32) -> vec4<f32> {
    if (k0 + 4u <= p.k) {
        return gamma[k0 / 4u];
    }
    var v = vec4<f32>(0.0);
    for (var e = 0u; e < 4u; e++) {
        if (k0 + e < p.k) {
            v[e] = gamma[(k0 + e) / 4u][(k0 + e) % 4u];
        }
    }
    return v;
}

// The input values k0 .. k0 + 4 as X_MODE defines them (every k0 is a multiple of 4, and each
// is asked for once per workgroup).
fn x4(k0: u32) -> vec4<f32> {
    let v = load4(p.x_offset, k0);
    if (X_MODE == X_RMS_NORM) {
        sum_squares += dot(v, v);
        return v * gamma4(k0);
    }
    if (X_MODE == X_SILU_GATE) {
        let up = load4(p.x_offset + p.k, k0);
        return v / (1.0 + exp(-v)) * up;
    }
    return v;
}

fn finish(sums: Sums, row0: u32, tid: u32, lane: u32, sg_id: u32, sg_count: u32) {
//#if SUBGROUPS
    if (MAX_SUBGROUPS == 1u) {
        // The workgroup is one subgroup (CPU adapters): subgroup sums, no workgroup memory and
        // no barrier; lanes 0..3 write a quad's rows.
        let squares = subgroupAdd(sum_squares);
        for (var q = 0u; q < QUADS; q++) {
            let total = subgroupAdd(sums[q]);
            if (lane < 4u) {
                write_row(row0 + 4u * q + lane, total[lane], squares);
            }
        }
        return;
    }
    for (var q = 0u; q < QUADS; q++) {
        let total = subgroupAdd(sums[q]);
        if (lane == 0u) {
            for (var j = 0u; j < 4u; j++) {
                partial[(4u * q + j) * MAX_SUBGROUPS + sg_id] = total[j];
            }
        }
    }
    if (X_MODE == X_RMS_NORM) {
        let squares = subgroupAdd(sum_squares);
        if (lane == 0u) {
            partial[ROWS * MAX_SUBGROUPS + sg_id] = squares;
        }
    }
    workgroupBarrier();
    if (tid < ROWS) {
        var s = 0.0;
        var squares = 0.0;
        for (var i = 0u; i < sg_count; i++) {
            s += partial[tid * MAX_SUBGROUPS + i];
            squares += partial[ROWS * MAX_SUBGROUPS + i];
        }
        write_row(row0 + tid, s, squares);
    }
//#else
    for (var r = 0u; r < ROWS; r++) {
        partial[r * WG + tid] = sums[r / 4u][r % 4u];
    }
    partial[ROWS * WG + tid] = sum_squares;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if (tid < stride) {
            for (var r = 0u; r <= ROWS; r++) {
                partial[r * WG + tid] += partial[r * WG + tid + stride];
            }
        }
        workgroupBarrier();
    }
    if (tid < ROWS) {
        write_row(row0 + tid, partial[tid * WG], partial[ROWS * WG]);
    }
//#endif
}

// `squares`: Σ x² over the row (X_RMS_NORM), which scales the sum by 1/rms(x).
fn write_row(row: u32, sum: f32, squares: f32) {
    if (row >= p.n) {
        return;
    }
    let out = p.col_offset + row;
    var v = sum;
    if (X_MODE == X_RMS_NORM) {
        v *= inverseSqrt(squares / f32(p.k) + p.eps);
    }
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

// This thread's partial sums of ROWS rows of an f16 or bf16 weight.
fn half_sums(row0: u32, tid: u32) -> Sums {
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
                let wa = vec4<f32>(halves(FORMAT, q.x), halves(FORMAT, q.y));
                let wb = vec4<f32>(halves(FORMAT, q.z), halves(FORMAT, q.w));
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

// Σ q·x over weights 16·half .. 16·half + 16 of a unit (`half` a constant at each call).
fn half_dot(unit: Unit, xs: array<vec4<f32>, 8>, half: u32) -> f32 {
    let i = 4u * half;
    return dot(quads(FORMAT, unit, i), xs[i]) + dot(quads(FORMAT, unit, i + 1u), xs[i + 1u])
         + dot(quads(FORMAT, unit, i + 2u), xs[i + 2u])
         + dot(quads(FORMAT, unit, i + 3u), xs[i + 3u]);
}

// This thread's partial sums of ROWS rows of a weight in ggml blocks, unit by unit.
fn block_sums(row0: u32, tid: u32) -> Sums {
    var sums: Sums;
    let units = p.k / 32u;
    for (var u = tid; u < units; u += WG) {
        let k0 = u * 32u;
        let xs = array<vec4<f32>, 8>(x4(k0), x4(k0 + 4u), x4(k0 + 8u), x4(k0 + 12u),
                                     x4(k0 + 16u), x4(k0 + 20u), x4(k0 + 24u), x4(k0 + 28u));
        let ones = vec4<f32>(1.0);
        let x_sums = vec2<f32>(dot(xs[0] + xs[1] + xs[2] + xs[3], ones),
                               dot(xs[4] + xs[5] + xs[6] + xs[7], ones));
        for (var r = 0u; r < ROWS; r++) {
            let row = row0 + r;
            if (row < p.n) {
                let unit = load_unit(FORMAT, row, u);
                let qx = vec2<f32>(half_dot(unit, xs, 0u), half_dot(unit, xs, 1u));
                sums[r / 4u][r % 4u] += dot(unit.d, qx) + dot(unit.m, x_sums);
            }
        }
    }
    return sums;
}

@compute @workgroup_size(WG)
fn gemv(inv: Invocation) {
    var sums: Sums;
    let row0 = first_row(inv);
    switch FORMAT {
        case W_F32: { sums = f32_sums(row0, inv.tid); }
        case W_F16, W_BF16: { sums = half_sums(row0, inv.tid); }
        default: { sums = block_sums(row0, inv.tid); }
    }
    reduce_and_write(inv, sums);
}
