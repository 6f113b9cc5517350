// The arithmetic ceiling `bench` measures kernels against: independent chains of fused
// multiply-adds and nothing else, so the time is the device's FMA throughput.
//
// Each thread runs 16 chains (four vec4 accumulators, enough independent work to hide the FMA
// latency), starting at start[i] + 0..15, and applies x <- fma(x, m, c) `iterations` times.
// m and c come from the uniform block, so the compiler cannot fold the loop. With |m| < 1 the
// chain is contractive, so rounding errors do not grow and the result can be checked against
// the same chain computed in f64 (fma.rs `reference`). The 16 final values are written out,
// which keeps every chain live.
//
// fma_f16 does the same in f16 arithmetic (`enable f16;`, added by the preprocessor) on devices
// with SHADER_F16; it converts only at the start and the end.
//
// Injected by the host (fma.rs `WORKGROUP`): WG, threads per workgroup.
//#inject WG

struct Params {
    count: u32,       // threads that run a chain (the rest of the last workgroup return)
    iterations: u32,  // FMAs per chain
    m: f32,           // multiplier, |m| < 1
    c: f32,           // addend
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> start: array<f32>;
// [count, 16]: the 16 chains' final values per thread.
@group(0) @binding(2) var<storage, read_write> out: array<vec4<f32>>;

fn thread_index(wg: vec3<u32>, groups: vec3<u32>, tid: u32) -> u32 {
    return (wg.x + wg.y * groups.x) * WG + tid;
}

@compute @workgroup_size(WG)
fn fma_f32(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
           @builtin(local_invocation_index) tid: u32) {
    let i = thread_index(wg, groups, tid);
    if (i >= p.count) {
        return;
    }
    let x = start[i];
    let m = vec4<f32>(p.m);
    let c = vec4<f32>(p.c);
    var a0 = vec4<f32>(x, x + 1.0, x + 2.0, x + 3.0);
    var a1 = a0 + 4.0;
    var a2 = a0 + 8.0;
    var a3 = a0 + 12.0;
    for (var n = 0u; n < p.iterations; n++) {
        a0 = fma(a0, m, c);
        a1 = fma(a1, m, c);
        a2 = fma(a2, m, c);
        a3 = fma(a3, m, c);
    }
    out[4u * i] = a0;
    out[4u * i + 1u] = a1;
    out[4u * i + 2u] = a2;
    out[4u * i + 3u] = a3;
}

//#if F16
@compute @workgroup_size(WG)
fn fma_f16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
           @builtin(local_invocation_index) tid: u32) {
    let i = thread_index(wg, groups, tid);
    if (i >= p.count) {
        return;
    }
    let x = f16(start[i]);
    let m = vec4<f16>(f16(p.m));
    let c = vec4<f16>(f16(p.c));
    var a0 = vec4<f16>(x, x + 1.0h, x + 2.0h, x + 3.0h);
    var a1 = a0 + 4.0h;
    var a2 = a0 + 8.0h;
    var a3 = a0 + 12.0h;
    for (var n = 0u; n < p.iterations; n++) {
        a0 = fma(a0, m, c);
        a1 = fma(a1, m, c);
        a2 = fma(a2, m, c);
        a3 = fma(a3, m, c);
    }
    out[4u * i] = vec4<f32>(a0);
    out[4u * i + 1u] = vec4<f32>(a1);
    out[4u * i + 2u] = vec4<f32>(a2);
    out[4u * i + 3u] = vec4<f32>(a3);
}
//#endif
