// Residual add: a[i] += b[i]. (Most residual adds are fused into the preceding matmul's
// accumulate flag; this kernel covers the rest, e.g. CLIP's position embeddings.)
//
// Injected by the host (elementwise.rs `WORKGROUP`): WG, threads per workgroup, one per element.
//#inject WG

struct Params {
    count: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;

@compute @workgroup_size(WG)
fn add_in_place(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                @builtin(local_invocation_index) tid: u32) {
    let i = (wg.x + wg.y * groups.x) * WG + tid;
    if (i < p.count) {
        a[i] = a[i] + b[i];
    }
}
