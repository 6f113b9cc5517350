// LayerNorm (CLIP) and RMSNorm (LLaMA) over the last dimension, one workgroup per row.
//
// Rows are a few thousand floats at most, so one 256-thread workgroup streams a row from global
// memory, reduces in workgroup memory, and streams it again to write. LayerNorm uses the
// two-pass variance (mean first, then the mean of squared deviations) rather than E[x²] − E[x]²,
// which loses precision when the mean is large compared to the spread, as it is in CLIP's
// residual stream.
//
// Injected by the host (norm.rs `WORKGROUP`): WG, threads per workgroup.
//#inject WG

struct Params {
    rows: u32,
    cols: u32,
    eps: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> gamma: array<f32>;
@group(0) @binding(3) var<storage, read> beta: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

var<workgroup> partial: array<f32, WG>;

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

fn row_index(wg: vec3<u32>, groups: vec3<u32>) -> u32 {
    return wg.x + wg.y * groups.x;
}

@compute @workgroup_size(WG)
fn layer_norm(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let row = row_index(wg, groups);
    if (row >= p.rows) {
        return;
    }
    let base = row * p.cols;
    var s = 0.0;
    for (var c = tid; c < p.cols; c += WG) {
        s += x[base + c];
    }
    let mean = workgroup_sum(s, tid) / f32(p.cols);
    var sq = 0.0;
    for (var c = tid; c < p.cols; c += WG) {
        let d = x[base + c] - mean;
        sq += d * d;
    }
    let variance = workgroup_sum(sq, tid) / f32(p.cols);
    let inv = inverseSqrt(variance + p.eps);
    for (var c = tid; c < p.cols; c += WG) {
        y[base + c] = (x[base + c] - mean) * inv * gamma[c] + beta[c];
    }
}

// y = x / sqrt(mean(x²) + eps) · gamma   (beta is bound but unused)
@compute @workgroup_size(WG)
fn rms_norm(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let row = row_index(wg, groups);
    if (row >= p.rows) {
        return;
    }
    let base = row * p.cols;
    var sq = 0.0;
    for (var c = tid; c < p.cols; c += WG) {
        let v = x[base + c];
        sq += v * v;
    }
    let inv = inverseSqrt(workgroup_sum(sq, tid) / f32(p.cols) + p.eps);
    for (var c = tid; c < p.cols; c += WG) {
        y[base + c] = x[base + c] * inv * gamma[c];
    }
}
