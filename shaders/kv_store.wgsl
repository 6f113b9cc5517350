// Append rows to an f16 KV cache: f32 rows [rows, width] in, IEEE halves out, packed two per
// u32 word (low half = even element) at row `first_row` of the cache, as f16 weights are
// stored. `pack2x16float` needs no optional feature and rounds to nearest even, so any
// adapter can keep its cache in half the bytes.
//
// Injected by the host (kv_store.rs `WORKGROUP`): WG, threads per workgroup, one per word.
//#inject WG

struct Params {
    words: u32,       // words to write: rows · width / 2
    first_word: u32,  // first_row · width / 2
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<vec2<f32>>;
@group(0) @binding(2) var<storage, read_write> cache: array<u32>;

@compute @workgroup_size(WG)
fn store_f16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
             @builtin(local_invocation_index) tid: u32) {
    let i = (wg.x + wg.y * groups.x) * WG + tid;
    if (i < p.words) {
        cache[p.first_word + i] = pack2x16float(src[i]);
    }
}
