// Append rows to the KV cache. `store_f16`: f32 rows [rows, width] in, IEEE halves out, packed
// two per u32 word (low half = even element) at row `first_row` of the cache, as f16 weights
// are stored. `pack2x16float` needs no optional feature and rounds to nearest even, so any
// adapter can keep its cache in half the bytes.
//
// The `_step` entries are the decode loop's: the row is `first_row + step[0]`, the counter the
// GPU advances each step (decode_step.wgsl), so one recorded step serves every token. An f32
// cache takes the values as they are (prefill copies them with a buffer copy instead).
//
// Injected by the host (kv_store.rs `WORKGROUP`): WG, threads per workgroup, one per word pair.
//#inject WG

struct Params {
    pairs: u32,       // value pairs to write: rows · width / 2
    first_word: u32,  // first_row · (words per row)
    row_words: u32,   // words per cache row: width / 2 (f16) or width (f32)
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<vec2<f32>>;
@group(0) @binding(2) var<storage, read_write> cache: array<u32>;
@group(0) @binding(3) var<storage, read> step: array<u32>;

fn pair_index(wg: vec3<u32>, groups: vec3<u32>, tid: u32) -> u32 {
    return (wg.x + wg.y * groups.x) * WG + tid;
}

@compute @workgroup_size(WG)
fn store_f16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
             @builtin(local_invocation_index) tid: u32) {
    let i = pair_index(wg, groups, tid);
    if (i < p.pairs) {
        cache[p.first_word + i] = pack2x16float(src[i]);
    }
}

@compute @workgroup_size(WG)
fn store_f16_step(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                  @builtin(local_invocation_index) tid: u32) {
    let i = pair_index(wg, groups, tid);
    if (i < p.pairs) {
        cache[p.first_word + step[0] * p.row_words + i] = pack2x16float(src[i]);
    }
}

@compute @workgroup_size(WG)
fn store_f32_step(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                  @builtin(local_invocation_index) tid: u32) {
    let i = pair_index(wg, groups, tid);
    if (i < p.pairs) {
        let at = p.first_word + step[0] * p.row_words + 2u * i;
        cache[at] = bitcast<u32>(src[i].x);
        cache[at + 1u] = bitcast<u32>(src[i].y);
    }
}
