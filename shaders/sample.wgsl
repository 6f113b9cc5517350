// Greedy sampling: the index of the largest logit in one row of a [rows, V] tensor, written as a
// u32 token id. Ties go to the lower index, NaN logits are ignored; a row with no non-NaN logit
// gives 0xffffffff, which the host rejects (never a silently valid-looking id).
//
// Values are compared as u32 order keys (the float order, -0 == +0) rather than as floats: WGSL
// lets implementations assume floats are never NaN, so float compares and `v != v` are not a
// reliable way to skip NaN, while the bit test is. Keys also make the subgroup path a plain
// u32 max followed by a u32 min over the indices that hold it.
//
// One 256-thread workgroup per row: V is at most a few hundred thousand floats (1 MB), read once
// with consecutive threads on consecutive words; the whole kernel is noise next to the lm_head
// gemv that produced the row (V x d halves), so a second dispatch and scratch buffer for a
// multi-workgroup reduction would buy nothing. Each thread keeps its best (key, index) over a
// strided walk (indices increase, so "strictly greater" keeps the lowest index of a tie), then
// the workgroup reduces 256 candidates: by subgroup max/min plus a pass over the per-subgroup
// winners when the adapter has subgroups, by a shared-memory tree otherwise.
//
// Injected by the host (sample.rs `WORKGROUP`): WG, threads per workgroup (a power of two).
//#inject WG

struct Params {
    v: u32,            // logits per row
    row_offset: u32,   // index of the row's first logit
    out_offset: u32,   // element of `out` that receives the id
    _pad: u32,
}

const NONE: u32 = 0xffffffffu;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

// One candidate per thread (shared-memory tree) or per subgroup (subgroup path).
var<workgroup> best_keys: array<u32, WG>;
var<workgroup> best_ids: array<u32, WG>;

// Float order as unsigned order; callers skip NaN first. Real keys are >= 0x007fffff (-inf),
// so the empty candidate (0, NONE) loses to any of them.
fn order_key(x: f32) -> u32 {
    let bits = bitcast<u32>(x);
    if ((bits & 0x7fffffffu) == 0u) {
        return 0x80000000u;
    }
    if ((bits & 0x80000000u) != 0u) {
        return ~bits;
    }
    return bits | 0x80000000u;
}

fn is_nan(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

// (key_b, id_b) beats (key_a, id_a): larger key, or equal key and lower id.
fn beats(key_b: u32, id_b: u32, key_a: u32, id_a: u32) -> bool {
    return key_b > key_a || (key_b == key_a && id_b < id_a);
}

@compute @workgroup_size(WG)
fn argmax(
    @builtin(local_invocation_index) tid: u32,
//#if SUBGROUPS
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_id) sg_id: u32,
    @builtin(num_subgroups) sg_count: u32,
//#endif
) {
    var key = 0u;
    var id = NONE;
    for (var i = tid; i < p.v; i += WG) {
        let x = logits[p.row_offset + i];
        let k = order_key(x);
        if (!is_nan(x) && k > key) {
            key = k;
            id = i;
        }
    }
//#if SUBGROUPS
    let top = subgroupMax(key);
    let top_id = subgroupMin(select(NONE, id, key == top));
    if (lane == 0u) {
        best_keys[sg_id] = top;
        best_ids[sg_id] = top_id;
    }
    workgroupBarrier();
    if (tid == 0u) {
        var k = best_keys[0];
        var b = best_ids[0];
        for (var s = 1u; s < sg_count; s++) {
            if (beats(best_keys[s], best_ids[s], k, b)) {
                k = best_keys[s];
                b = best_ids[s];
            }
        }
        out[p.out_offset] = b;
    }
//#else
    best_keys[tid] = key;
    best_ids[tid] = id;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if (tid < stride) {
            let kb = best_keys[tid + stride];
            let ib = best_ids[tid + stride];
            if (beats(kb, ib, best_keys[tid], best_ids[tid])) {
                best_keys[tid] = kb;
                best_ids[tid] = ib;
            }
        }
        workgroupBarrier();
    }
    if (tid == 0u) {
        out[p.out_offset] = best_ids[0];
    }
//#endif
}
