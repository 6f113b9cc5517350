// Activations: quick_gelu (CLIP MLP), exact-erf gelu (LLaVA projector), SiLU·mul (LLaMA SwiGLU).
//
// WGSL has no erf, so gelu uses Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7, below f32
// resolution at the values that matter). The SwiGLU input is the output of one fused
// [gate | up] projection, [rows, 2·width], so gate and up are read from the same row.
//
// Injected by the host (activation.rs `WORKGROUP`): WG, threads per workgroup, one per element.
//#inject WG

struct Params {
    count: u32,   // elements (in place) or output elements (silu_mul)
    width: u32,   // silu_mul: intermediate width
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;

fn linear_index(wg: vec3<u32>, groups: vec3<u32>, tid: u32) -> u32 {
    return (wg.x + wg.y * groups.x) * WG + tid;
}

fn erf(v: f32) -> f32 {
    let a = abs(v);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    let r = 1.0 - poly * exp(-a * a);
    return select(r, -r, v < 0.0);
}

@compute @workgroup_size(WG)
fn quick_gelu(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
              @builtin(local_invocation_index) tid: u32) {
    let i = linear_index(wg, groups, tid);
    if (i < p.count) {
        let v = x[i];
        x[i] = v / (1.0 + exp(-1.702 * v));
    }
}

@compute @workgroup_size(WG)
fn gelu_erf(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
            @builtin(local_invocation_index) tid: u32) {
    let i = linear_index(wg, groups, tid);
    if (i < p.count) {
        let v = x[i];
        x[i] = 0.5 * v * (1.0 + erf(v * 0.70710678118654752));
    }
}

@group(0) @binding(2) var<storage, read_write> out: array<f32>;

// out[r, j] = silu(x[r, j]) · x[r, width + j]
@compute @workgroup_size(WG)
fn silu_mul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
            @builtin(local_invocation_index) tid: u32) {
    let i = linear_index(wg, groups, tid);
    if (i < p.count) {
        let r = i / p.width;
        let j = i % p.width;
        let gate = x[r * 2u * p.width + j];
        let up = x[r * 2u * p.width + p.width + j];
        out[i] = gate / (1.0 + exp(-gate)) * up;
    }
}
