// LayerNorm (CLIP) and RMSNorm (LLaMA) over the last dimension, one workgroup per row.
//
// Rows are a few thousand floats at most, so one workgroup streams a row from global memory,
// reduces, and streams it again to write. Two layouts (norm.rs `NormLayout`):
// - `layer_norm` / `rms_norm`: WG = 256 threads per row, a tree reduction in workgroup memory;
// - `layer_norm_lanes` / `rms_norm_lanes`: one 8-lane subgroup per row reducing with subgroupAdd
//   and no barrier, for drivers that run shaders on CPU SIMD units, which run a workgroup's
//   barriers as switches between its subgroups (the tree's nine barriers per sum cost more than
//   the row's arithmetic on lavapipe).
// Both read and write whole vec4 when the row width is a multiple of 4 (every row then starts on
// a vec4: one 16-byte access per 4 elements, which a CPU driver pays per access, not per byte),
// and single elements otherwise.
//
// LayerNorm uses the two-pass variance (mean first, then the mean of squared deviations) rather
// than E[x²] − E[x]², which loses precision when the mean is large compared to the spread, as it
// is in CLIP's residual stream.
//
// Injected by the host (norm.rs `WORKGROUP`): WG, threads per workgroup of the first layout.
//#inject WG

struct Params {
    rows: u32,
    cols: u32,
    eps: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> gamma: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> beta: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> y: array<vec4<f32>>;

var<workgroup> partial: array<f32, WG>;

const LANES: u32 = 8u;

// The reductions and entry points take the row's threads as (first thread, count).
struct Row {
    base: u32,     // element offset of the row
    tid: u32,
    threads: u32,
}

fn x_at(e: u32) -> f32 {
    return x[e / 4u][e % 4u];
}

fn vec4s() -> bool {
    return p.cols % 4u == 0u;
}

// The summed quantity of 4 elements: mode 0: x; mode 1: (x − mean)²; mode 2: x². An unaligned
// single element comes as (x, mean, mean, mean) for mode 1 and (x, 0, 0, 0) otherwise.
fn term(v: vec4<f32>, mode: u32, mean: f32) -> f32 {
    switch (mode) {
        case 0u: { return dot(v, vec4<f32>(1.0)); }
        case 1u: { let d = v - vec4<f32>(mean); return dot(d, d); }
        default: { return dot(v, v); }
    }
}

// This thread's share of the row's sum of `term`.
fn thread_sum(r: Row, mode: u32, mean: f32) -> f32 {
    var s = 0.0;
    if (vec4s()) {
        let base4 = r.base / 4u;
        for (var c4 = r.tid; c4 < p.cols / 4u; c4 += r.threads) {
            s += term(x[base4 + c4], mode, mean);
        }
    } else {
        let pad = select(0.0, mean, mode == 1u);
        for (var c = r.tid; c < p.cols; c += r.threads) {
            s += term(vec4<f32>(x_at(r.base + c), pad, pad, pad), mode, mean);
        }
    }
    return s;
}

// y = (x − shift) · scale · gamma (+ beta when `with_beta`), this thread's columns.
fn write_row(r: Row, shift: f32, scale: f32, with_beta: bool) {
    if (vec4s()) {
        let base4 = r.base / 4u;
        for (var c4 = r.tid; c4 < p.cols / 4u; c4 += r.threads) {
            var v = (x[base4 + c4] - vec4<f32>(shift)) * scale * gamma[c4];
            if (with_beta) { v += beta[c4]; }
            y[base4 + c4] = v;
        }
    } else {
        for (var c = r.tid; c < p.cols; c += r.threads) {
            var v = (x_at(r.base + c) - shift) * scale * gamma[c / 4u][c % 4u];
            if (with_beta) { v += beta[c / 4u][c % 4u]; }
            y[(r.base + c) / 4u][(r.base + c) % 4u] = v;
        }
    }
}

// Sum `value` over the workgroup; every thread gets the total.
fn workgroup_sum(value: f32, tid: u32) -> f32 {
    partial[tid] = value;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if (tid < stride) {
            partial[tid] += partial[tid + stride];
        }
        workgroupBarrier();
    }
    let total = partial[0];
    // Everyone must read the total before the next reduction reuses the array.
    workgroupBarrier();
    return total;
}

//#if SUBGROUPS
fn lanes_sum(value: f32, lane: u32) -> f32 {
    return subgroupAdd(value);
}
//#else
// Without subgroups (never chosen by the launcher, kept correct): through workgroup memory.
fn lanes_sum(value: f32, lane: u32) -> f32 {
    partial[lane] = value;
    workgroupBarrier();
    var total = 0.0;
    for (var l = 0u; l < LANES; l++) {
        total += partial[l];
    }
    workgroupBarrier();
    return total;
}
//#endif

fn row_index(wg: vec3<u32>, groups: vec3<u32>) -> u32 {
    return wg.x + wg.y * groups.x;
}

struct Invocation {
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
}

@compute @workgroup_size(WG)
fn layer_norm(inv: Invocation) {
    let row = row_index(inv.wg, inv.groups);
    if (row >= p.rows) {
        return;
    }
    let r = Row(row * p.cols, inv.tid, WG);
    let mean = workgroup_sum(thread_sum(r, 0u, 0.0), inv.tid) / f32(p.cols);
    let variance = workgroup_sum(thread_sum(r, 1u, mean), inv.tid) / f32(p.cols);
    write_row(r, mean, inverseSqrt(variance + p.eps), true);
}

// y = x / sqrt(mean(x²) + eps) · gamma   (beta is bound but unused)
@compute @workgroup_size(WG)
fn rms_norm(inv: Invocation) {
    let row = row_index(inv.wg, inv.groups);
    if (row >= p.rows) {
        return;
    }
    let r = Row(row * p.cols, inv.tid, WG);
    let mean_square = workgroup_sum(thread_sum(r, 2u, 0.0), inv.tid) / f32(p.cols);
    write_row(r, 0.0, inverseSqrt(mean_square + p.eps), false);
}

// A lanes workgroup normalises LANE_ROWS consecutive rows: a CPU driver pays a fixed cost per
// workgroup that is comparable to one short row's work.
const LANE_ROWS: u32 = 8u;

@compute @workgroup_size(8)
fn layer_norm_lanes(inv: Invocation) {
    let first = row_index(inv.wg, inv.groups) * LANE_ROWS;
    for (var row = first; row < min(first + LANE_ROWS, p.rows); row++) {
        let r = Row(row * p.cols, inv.tid, LANES);
        let mean = lanes_sum(thread_sum(r, 0u, 0.0), inv.tid) / f32(p.cols);
        let variance = lanes_sum(thread_sum(r, 1u, mean), inv.tid) / f32(p.cols);
        write_row(r, mean, inverseSqrt(variance + p.eps), true);
    }
}

@compute @workgroup_size(8)
fn rms_norm_lanes(inv: Invocation) {
    let first = row_index(inv.wg, inv.groups) * LANE_ROWS;
    for (var row = first; row < min(first + LANE_ROWS, p.rows); row++) {
        let r = Row(row * p.cols, inv.tid, LANES);
        let mean_square = lanes_sum(thread_sum(r, 2u, 0.0), inv.tid) / f32(p.cols);
        write_row(r, 0.0, inverseSqrt(mean_square + p.eps), false);
    }
}
