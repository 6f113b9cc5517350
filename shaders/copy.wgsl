// The bandwidth ceiling `bench` measures kernels against: a streaming copy of vec4<f32>, one
// element per thread, every byte read once and written once. A compute kernel rather than
// copy_buffer_to_buffer, so it is timed by the same timestamps as the kernels it bounds.
//
// Injected by the host (copy.rs `WORKGROUP`): WG, threads per workgroup.
//#inject WG

struct Params {
    count: u32,  // vec4 elements
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn copy_vec4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
             @builtin(local_invocation_index) tid: u32) {
    let i = (wg.x + wg.y * groups.x) * WG + tid;
    if (i < p.count) {
        dst[i] = src[i];
    }
}
