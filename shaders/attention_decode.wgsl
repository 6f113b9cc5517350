// Attention for one decode step: one query row per head against the whole KV cache, whose
// length the GPU knows and the host does not (the decode loop is replayed without the host:
// attention_decode.rs). O[h] = softmax(Q[h]·K[0..n)ᵀ·scale)·V[0..n), with n = kv_base + step + 1
// rows, `step` read from the decode loop's counter. Query head h reads kv head h / group.
//
// One workgroup per query head, WG threads. Keys go in tiles of WG, one key per thread: each
// thread scores its key against the head's Q row (held in workgroup memory, pre-scaled by
// scale·log2 e), the tile's maximum and the probabilities are shared through workgroup memory,
// and each thread accumulates its output dimensions (d = t, t + WG, …) over the tile with the
// online-softmax rescale, reading V rows across threads (coalesced). The decode step's cost
// is the weights' GEMVs; this kernel only has to keep a long context from adding host work.
//
// Lavapipe stops an invocation after 65,535 loop iterations; a tile costs a thread about
// 3·WG + HEAD_DIM/4 + DIMS·WG of them, so contexts up to about 12,000 keys run there.
//
// Injected by the host (attention_decode.rs): WG, HEAD_DIM (a multiple of 4), KV_F16.
//#inject WG HEAD_DIM KV_F16

struct Params {
    kv_base: u32,     // cache rows before the loop's first step
    heads: u32,
    kv_heads: u32,
    group: u32,       // heads / kv_heads
    scale_log2: f32,  // scale · log2(e)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> step: array<u32>;
@group(0) @binding(2) var<storage, read> q: array<f32>;
// K and V: f32 (KV_F16 = 0, read as bit patterns) or IEEE halves packed two per word.
@group(0) @binding(3) var<storage, read> k: array<u32>;
@group(0) @binding(4) var<storage, read> v: array<u32>;
@group(0) @binding(5) var<storage, read_write> o: array<f32>;

// Output dimensions per thread.
const DIMS: u32 = (HEAD_DIM + WG - 1u) / WG;
// Stands in for -inf; exp2 of anything near it is 0.
const NEG: f32 = -3.0e38;

var<workgroup> q_row: array<f32, HEAD_DIM>;
var<workgroup> tile: array<f32, WG>;
var<workgroup> kv_rows_shared: u32;

fn half_or_float(word: u32, e: u32) -> f32 {
    if (KV_F16 == 1u) {
        return unpack2x16float(word)[e % 2u];
    }
    return bitcast<f32>(word);
}

fn k_at(e: u32) -> f32 {
    return half_or_float(k[select(e, e / 2u, KV_F16 == 1u)], e);
}

fn v_at(e: u32) -> f32 {
    return half_or_float(v[select(e, e / 2u, KV_F16 == 1u)], e);
}

// Q[h]·K[row] over the head's dimensions (Q pre-scaled).
fn score(row_start: u32) -> f32 {
    var s = vec4<f32>(0.0);
    for (var d = 0u; d < HEAD_DIM; d += 4u) {
        let kk = vec4<f32>(k_at(row_start + d), k_at(row_start + d + 1u),
                           k_at(row_start + d + 2u), k_at(row_start + d + 3u));
        s += vec4<f32>(q_row[d], q_row[d + 1u], q_row[d + 2u], q_row[d + 3u]) * kk;
    }
    return s.x + s.y + s.z + s.w;
}

@compute @workgroup_size(WG)
fn attention_decode(@builtin(workgroup_id) wg: vec3<u32>,
                    @builtin(local_invocation_index) t: u32) {
    let h = wg.x;
    let head = h * HEAD_DIM;
    let kv_col = (h / p.group) * HEAD_DIM;
    let stride = p.kv_heads * HEAD_DIM;
    if (t == 0u) {
        kv_rows_shared = p.kv_base + step[0] + 1u;
    }
    for (var d = t; d < HEAD_DIM; d += WG) {
        q_row[d] = q[head + d] * p.scale_log2;
    }
    let kv_rows = workgroupUniformLoad(&kv_rows_shared);
    var m = NEG;
    var l = 0.0;
    var acc: array<f32, DIMS>;
    for (var start = 0u; start < kv_rows; start += WG) {
        let j = start + t;
        var s = NEG;
        if (j < kv_rows) {
            s = score(j * stride + kv_col);
        }
        tile[t] = s;
        workgroupBarrier();
        var tile_max = NEG;
        for (var i = 0u; i < WG; i++) {
            tile_max = max(tile_max, tile[i]);
        }
        let m_new = max(m, tile_max);
        let alpha = exp2(m - m_new);
        workgroupBarrier();
        tile[t] = exp2(s - m_new);
        workgroupBarrier();
        var l_tile = 0.0;
        for (var i = 0u; i < WG; i++) {
            l_tile += tile[i];
        }
        l = l * alpha + l_tile;
        let keys = min(WG, kv_rows - start);
        for (var x = 0u; x < DIMS; x++) {
            let d = t + x * WG;
            if (d < HEAD_DIM) {
                var a = acc[x] * alpha;
                for (var i = 0u; i < keys; i++) {
                    a += tile[i] * v_at((start + i) * stride + kv_col + d);
                }
                acc[x] = a;
            }
        }
        m = m_new;
        workgroupBarrier();
    }
    for (var x = 0u; x < DIMS; x++) {
        let d = t + x * WG;
        if (d < HEAD_DIM) {
            o[head + d] = acc[x] / l;
        }
    }
}
