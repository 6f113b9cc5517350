// O = softmax(Q·Kᵀ·scale + mask)·V per head, fused, f32 throughout, exact normalisation; and an
// optional side output: per-key sums of the attention probabilities over a range of query rows
// and all heads (the visual-token scores of STAR stage 1/2 and FastV).
//
// Work decomposition. The query heads that share one kv head (grouped-query attention, G =
// heads / kv_heads of them) are flattened with the query rows into "virtual rows" v = i·G + g:
// every virtual row of one kv head attends over the same K and V. A workgroup owns one kv head
// and a block of BM = 16 consecutive virtual rows, so each K/V tile it stages through workgroup
// memory serves all 16 rows: 16 query rows of one head for CLIP / MHA prefill, and all G query
// heads of a token during a GQA decode step (the K/V stream, which dominates decode, is then read
// once per kv head instead of once per query head).
//
// Threads: 64 = 4 row quads × 16 columns, and a thread keeps the same 4 rows (4·rq .. 4·rq+3)
// in every phase, so it holds their online-softmax state (running max, partial sum, rescale
// factor) in registers and never needs them from another thread. Per key tile of BN = 32 keys:
//   logits  thread (rq, c) computes keys c and c+16 for its 4 rows (two vec4: 8 dot products per
//           5 workgroup loads), masks them and stores them key-major, rows in the components;
//   softmax every thread reads its quad's 32 logits back as 32 vec4 (broadcast loads), takes
//           the running max, rescales its accumulators and partial sum, and exponentiates only
//           its own 8 logits (no thread exponentiates a value twice);
//   P·V     thread (rq, c) owns the output columns vec4 c and c+16 of its 4 rows (8 vec4
//           accumulators, constant indices only so they stay in registers) and per key does
//           8 vec4 FMAs for 3 workgroup loads.
// The row sums are combined across the 16 threads of a quad once at the end. Online softmax
// (running max and sum, rescaling when the max grows) gives the exact softmax in one pass over
// the keys; Q is pre-multiplied by scale·log2(e) when staged, so the exponentials are exp2.
//
// Workgroup memory (sized for D ≤ 128, whatever the actual D): Q tile 16×33 vec4 (8448 B), one
// K/V tile 32×33 vec4 (16 896 B) that holds K and then V (separate tiles would need 46 KiB,
// over lavapipe's and many GPUs' 32 KiB), logits and probabilities 2 × 32×4 vec4 (4096 B):
// 29 440 bytes. Tile rows are padded to 33 vec4 so threads reading different key rows at the
// same column hit different banks. Tile columns past D are zero up to the width P·V reads.
//
// Causal masking: query row i (0-based in this call) sits at cache position (Tk - Tq) + i and
// sees keys j ≤ (Tk - Tq) + i. A block only loads key tiles up to the last key its last row
// sees (fully masked tiles are skipped), and key 0 is visible to every row, so a row's running
// max is finite after the first tile (no -inf arithmetic: WGSL has no infinities). K/V rows
// past a block's last visible key, in particular cache rows ≥ Tk, are never read (they may hold
// NaN). Row quads with no valid row (decode with few heads) skip the arithmetic but still help
// load tiles, and every barrier sits in uniform control flow.
//
// Score accumulation (entry attention_scored) needs each row's final max and sum before any of
// its probabilities are known, so after the normal pass a block that intersects the query range
// makes a second pass over its keys, recomputing the logits and writing per key the sum of the
// normalised probabilities of its rows in range: one row of `partials` per (kv head, block in
// range), every element written (zeros past the visible keys). attention_scores_reduce then sums
// those rows in a fixed order. No float atomics, so the result is deterministic.
//
// Injected by the host (attention.rs `AttentionTiling`): BM, BN, THREADS, STRIDE (the padded row
// stride of the Q and K/V tiles in vec4) and REDUCE_THREADS (the reduction's workgroup size).
//#inject BM BN THREADS STRIDE REDUCE_THREADS KV_F16
//#include attention_params


@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
// K and V are f32 (KV_F16 = 0, read as bit patterns) or IEEE halves packed two per word
// (KV_F16 = 1, the f16 KV cache, unpacked with unpack2x16float): one declaration for both.
@group(0) @binding(2) var<storage, read> k: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read_write> o: array<f32>;
@group(0) @binding(5) var<storage, read_write> partials: array<f32>;
@group(0) @binding(6) var<storage, read_write> scores: array<f32>;

var<workgroup> q_tile: array<vec4<f32>, BM * STRIDE>;
var<workgroup> kv_tile: array<vec4<f32>, BN * STRIDE>;
var<workgroup> s_tile: array<vec4<f32>, BN * BM / 4u>;  // logits [BN][row quad], rows in components
var<workgroup> p_tile: array<vec4<f32>, BN * BM / 4u>;  // probabilities, same layout

// Per-thread state for its 4 rows (components) and columns c, c + 16.
var<private> acc: array<vec4<f32>, 8>;   // acc[2i + j]: row 4·rq + i, column vec4 c + 16·j
var<private> row_max: vec4<f32>;
var<private> part_sum: vec4<f32>;        // this thread's share of the row sums
var<private> s_lo: vec4<f32>;            // logits of key c
var<private> s_hi: vec4<f32>;            // logits of key c + 16

struct Thread {
    rq: u32,          // row quad
    c: u32,           // key (logits) / column (P·V) index
    busy: bool,       // the quad holds at least one valid row
    ends: vec4<u32>,  // per row: keys [0, end) are visible; 0 for rows past the block's end
}

fn thread_of(v0: u32, tid: u32) -> Thread {
    var t: Thread;
    t.rq = tid / 16u;
    t.c = tid % 16u;
    let first = v0 + t.rq * 4u;
    t.busy = first < p.vrows;
    let rows = vec4<u32>(first, first + 1u, first + 2u, first + 3u);
    let causal_ends = vec4<u32>(p.kv_rows - p.q_rows + 1u) + rows / p.group;
    let ends = select(vec4<u32>(p.kv_rows), causal_ends, p.causal != 0u);
    t.ends = select(vec4<u32>(0u), ends, rows < vec4<u32>(p.vrows));
    return t;
}

fn d4_count() -> u32 {
    return (p.head_dim + 3u) / 4u;
}

// Columns (vec4) that P·V reads and that tiles must therefore hold (zeros past D).
fn tile_width() -> u32 {
    return select(32u, 16u, d4_count() <= 16u);
}

// Q, K and V are bound as vec4 arrays so that the common case (D and the row strides multiples
// of 4, so every head row starts on a vec4) is one aligned 16-byte load per 4 elements. Any other
// D reads the two vec4 that straddle the 4 wanted elements. Tensor buffers are padded to 16
// bytes, and the second vec4 is only read when it holds a wanted element.
fn shift4(a: vec4<f32>, b: vec4<f32>, s: u32) -> vec4<f32> {
    switch (s) {
        case 1u: { return vec4<f32>(a.yzw, b.x); }
        case 2u: { return vec4<f32>(a.zw, b.xy); }
        default: { return vec4<f32>(a.w, b.xyz); }
    }
}

// Elements e .. e + n - 1 (1 ≤ n ≤ 4), zeros after them.
fn keep_first(x: vec4<f32>, n: u32) -> vec4<f32> {
    return select(vec4<f32>(0.0), x, vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(n));
}

fn load4_q(e: u32, n: u32) -> vec4<f32> {
    let w = e / 4u;
    let s = e % 4u;
    if (s == 0u) {
        return keep_first(q[w], n);
    }
    var b = vec4<f32>(0.0);
    if (s + n > 4u) { b = q[w + 1u]; }
    return keep_first(shift4(q[w], b, s), n);
}

// Half `e` of an f16 K (or V) buffer: word e / 2 is component (e / 2) % 4 of vec4 e / 8.
fn half_k(e: u32) -> f32 {
    let w = e / 2u;
    return unpack2x16float(k[w / 4u][w % 4u])[e % 2u];
}

fn half_v(e: u32) -> f32 {
    let w = e / 2u;
    return unpack2x16float(v[w / 4u][w % 4u])[e % 2u];
}

fn load4_k(e: u32, n: u32) -> vec4<f32> {
    if (KV_F16 == 1u) {
        var x = vec4<f32>(0.0);
        for (var i = 0u; i < n; i++) { x[i] = half_k(e + i); }
        return x;
    }
    let w = e / 4u;
    let s = e % 4u;
    let a = bitcast<vec4<f32>>(k[w]);
    if (s == 0u) {
        return keep_first(a, n);
    }
    var b = vec4<f32>(0.0);
    if (s + n > 4u) { b = bitcast<vec4<f32>>(k[w + 1u]); }
    return keep_first(shift4(a, b, s), n);
}

fn load4_v(e: u32, n: u32) -> vec4<f32> {
    if (KV_F16 == 1u) {
        var x = vec4<f32>(0.0);
        for (var i = 0u; i < n; i++) { x[i] = half_v(e + i); }
        return x;
    }
    let w = e / 4u;
    let s = e % 4u;
    let a = bitcast<vec4<f32>>(v[w]);
    if (s == 0u) {
        return keep_first(a, n);
    }
    var b = vec4<f32>(0.0);
    if (s + n > 4u) { b = bitcast<vec4<f32>>(v[w + 1u]); }
    return keep_first(shift4(a, b, s), n);
}

// Stage the block's query rows, pre-scaled by scale·log2(e); rows past the end are zero.
// Neighbouring threads read neighbouring vec4 of a row (coalesced); no integer division.
fn load_q_tile(kh: u32, v0: u32, tid: u32) {
    let d4n = d4_count();
    let width = tile_width();
    let c4 = tid % width;
    let q_stride = p.heads * p.head_dim;
    for (var r = tid / width; r < BM; r += THREADS / width) {
        let vr = v0 + r;
        var x = vec4<f32>(0.0);
        if (vr < p.vrows && c4 < d4n) {
            let i = vr / p.group;
            let h = kh * p.group + vr % p.group;
            let col = c4 * 4u;
            x = load4_q(i * q_stride + h * p.head_dim + col, min(4u, p.head_dim - col));
            x *= p.scale_log2;
        }
        q_tile[r * STRIDE + c4] = x;
    }
}

// Stage keys (or values) [k0, k0 + BN) of kv head kh; keys ≥ kend are zero and never read.
fn load_kv_tile(use_v: bool, kh: u32, k0: u32, kend: u32, tid: u32) {
    let d4n = d4_count();
    let width = tile_width();
    let c4 = tid % width;
    let kv_stride = p.kv_heads * p.head_dim;
    for (var key = tid / width; key < BN; key += THREADS / width) {
        let j = k0 + key;
        var x = vec4<f32>(0.0);
        if (j < kend && c4 < d4n) {
            let col = c4 * 4u;
            let e = j * kv_stride + kh * p.head_dim + col;
            let n = min(4u, p.head_dim - col);
            if (use_v) {
                x = load4_v(e, n);
            } else {
                x = load4_k(e, n);
            }
        }
        kv_tile[key * STRIDE + c4] = x;
    }
}

// s_lo / s_hi = logits (log2 units) of keys c and c + 16 of the tile for the thread's 4 rows.
fn logits(t: Thread) {
    let d4n = d4_count();
    let qb = t.rq * 4u * STRIDE;
    let ka = t.c * STRIDE;
    let kb = (t.c + 16u) * STRIDE;
    var lo = vec4<f32>(0.0);
    var hi = vec4<f32>(0.0);
    for (var c4 = 0u; c4 < d4n; c4++) {
        let q0 = q_tile[qb + c4];
        let q1 = q_tile[qb + STRIDE + c4];
        let q2 = q_tile[qb + 2u * STRIDE + c4];
        let q3 = q_tile[qb + 3u * STRIDE + c4];
        let a = kv_tile[ka + c4];
        let b = kv_tile[kb + c4];
        lo += vec4<f32>(dot(q0, a), dot(q1, a), dot(q2, a), dot(q3, a));
        hi += vec4<f32>(dot(q0, b), dot(q1, b), dot(q2, b), dot(q3, b));
    }
    s_lo = lo;
    s_hi = hi;
}

fn visible(t: Thread, key: u32) -> vec4<bool> {
    return vec4<u32>(key) < t.ends;
}

fn store_logits(t: Thread, k0: u32) {
    logits(t);
    s_tile[t.c * 4u + t.rq] = select(vec4<f32>(NEG), s_lo, visible(t, k0 + t.c));
    s_tile[(t.c + 16u) * 4u + t.rq] = select(vec4<f32>(NEG), s_hi, visible(t, k0 + t.c + 16u));
}

// Online softmax step for keys [k0, k0 + nk): new running max, rescaled state, and this
// thread's two probabilities per row into p_tile.
fn softmax_update(t: Thread, k0: u32, nk: u32) {
    var tile_max = vec4<f32>(NEG);
    for (var key = 0u; key < nk; key++) {
        tile_max = max(tile_max, s_tile[key * 4u + t.rq]);
    }
    let m_new = max(row_max, tile_max);
    let alpha = exp2(row_max - m_new);
    row_max = m_new;
    let p_lo = select(vec4<f32>(0.0), exp2(s_lo - m_new), visible(t, k0 + t.c));
    let p_hi = select(vec4<f32>(0.0), exp2(s_hi - m_new), visible(t, k0 + t.c + 16u));
    p_tile[t.c * 4u + t.rq] = p_lo;
    p_tile[(t.c + 16u) * 4u + t.rq] = p_hi;
    part_sum = part_sum * alpha + p_lo + p_hi;
    acc[0] *= alpha.x;
    acc[1] *= alpha.x;
    acc[2] *= alpha.y;
    acc[3] *= alpha.y;
    acc[4] *= alpha.z;
    acc[5] *= alpha.z;
    acc[6] *= alpha.w;
    acc[7] *= alpha.w;
}

fn accumulate_pv(t: Thread, nk: u32) {
    if (d4_count() > 16u) {
        for (var key = 0u; key < nk; key++) {
            let pk = p_tile[key * 4u + t.rq];
            let vb = key * STRIDE + t.c;
            let a = kv_tile[vb];
            let b = kv_tile[vb + 16u];
            acc[0] += pk.x * a;
            acc[1] += pk.x * b;
            acc[2] += pk.y * a;
            acc[3] += pk.y * b;
            acc[4] += pk.z * a;
            acc[5] += pk.z * b;
            acc[6] += pk.w * a;
            acc[7] += pk.w * b;
        }
    } else {
        for (var key = 0u; key < nk; key++) {
            let pk = p_tile[key * 4u + t.rq];
            let a = kv_tile[key * STRIDE + t.c];
            acc[0] += pk.x * a;
            acc[2] += pk.y * a;
            acc[4] += pk.z * a;
            acc[6] += pk.w * a;
        }
    }
}

// Write up to 4 output elements of column vec4 c4 of one row.
fn store4(base: u32, c4: u32, x: vec4<f32>) {
    let col = c4 * 4u;
    if (col + 4u <= p.head_dim) {
        o[base + col] = x.x;
        o[base + col + 1u] = x.y;
        o[base + col + 2u] = x.z;
        o[base + col + 3u] = x.w;
    } else if (col < p.head_dim) {
        o[base + col] = x.x;
        if (col + 1u < p.head_dim) { o[base + col + 1u] = x.y; }
        if (col + 2u < p.head_dim) { o[base + col + 2u] = x.z; }
    }
}

fn write_output(kh: u32, v0: u32, t: Thread, row_sum: vec4<f32>) {
    let inv = 1.0 / row_sum;
    let d4n = d4_count();
    for (var i = 0u; i < 4u; i++) {
        let vr = v0 + t.rq * 4u + i;
        if (vr >= p.vrows) {
            break;
        }
        let row = vr / p.group;
        let h = kh * p.group + vr % p.group;
        let base = row * p.heads * p.head_dim + h * p.head_dim;
        // Constant accumulator indices only: pick the row's pair with selects.
        let lo = select(select(acc[4], acc[6], i == 3u), select(acc[0], acc[2], i == 1u), i < 2u);
        let hi = select(select(acc[5], acc[7], i == 3u), select(acc[1], acc[3], i == 1u), i < 2u);
        if (t.c < d4n) {
            store4(base, t.c, lo * inv[i]);
        }
        if (t.c + 16u < d4n) {
            store4(base, t.c + 16u, hi * inv[i]);
        }
    }
}

fn init_state() {
    row_max = vec4<f32>(NEG);
    part_sum = vec4<f32>(0.0);
    acc = array<vec4<f32>, 8>();
}

// The main pass is written out in both attention entry points (barriers must sit in the entry
// point's own uniform control flow); the work between barriers is in the helpers above.

@compute @workgroup_size(THREADS)
fn attention(@builtin(workgroup_id) wg: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) tid: u32) {
    let lin = wg.x + wg.y * nwg.x;
    if (lin >= p.num_groups) {
        return;
    }
    let kh = lin / p.blocks;
    let v0 = (lin % p.blocks) * BM;
    // Keys the block's last row sees; tiles past them are skipped.
    let last_i = (min(v0 + BM, p.vrows) - 1u) / p.group;
    let kend = select(p.kv_rows, p.kv_rows - p.q_rows + last_i + 1u, p.causal != 0u);
    let t = thread_of(v0, tid);
    init_state();
    load_q_tile(kh, v0, tid);
    for (var k0 = 0u; k0 < kend; k0 += BN) {
        let nk = min(BN, kend - k0);
        load_kv_tile(false, kh, k0, kend, tid);
        workgroupBarrier();
        if (t.busy) { store_logits(t, k0); }
        workgroupBarrier();
        load_kv_tile(true, kh, k0, kend, tid);
        if (t.busy) { softmax_update(t, k0, nk); }
        workgroupBarrier();
        if (t.busy) { accumulate_pv(t, nk); }
        workgroupBarrier();
    }
    // Combine the 16 partial sums of each row quad (fixed order).
    s_tile[t.c * 4u + t.rq] = part_sum;
    workgroupBarrier();
    var row_sum = vec4<f32>(0.0);
    for (var c = 0u; c < 16u; c++) {
        row_sum += s_tile[c * 4u + t.rq];
    }
    if (t.busy) { write_output(kh, v0, t, row_sum); }
}

@compute @workgroup_size(THREADS)
fn attention_scored(@builtin(workgroup_id) wg: vec3<u32>,
                    @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) tid: u32) {
    let lin = wg.x + wg.y * nwg.x;
    if (lin >= p.num_groups) {
        return;
    }
    let kh = lin / p.blocks;
    let block = lin % p.blocks;
    let v0 = block * BM;
    let last_i = (min(v0 + BM, p.vrows) - 1u) / p.group;
    let kend = select(p.kv_rows, p.kv_rows - p.q_rows + last_i + 1u, p.causal != 0u);
    let t = thread_of(v0, tid);
    init_state();
    load_q_tile(kh, v0, tid);
    for (var k0 = 0u; k0 < kend; k0 += BN) {
        let nk = min(BN, kend - k0);
        load_kv_tile(false, kh, k0, kend, tid);
        workgroupBarrier();
        if (t.busy) { store_logits(t, k0); }
        workgroupBarrier();
        load_kv_tile(true, kh, k0, kend, tid);
        if (t.busy) { softmax_update(t, k0, nk); }
        workgroupBarrier();
        if (t.busy) { accumulate_pv(t, nk); }
        workgroupBarrier();
    }
    s_tile[t.c * 4u + t.rq] = part_sum;
    workgroupBarrier();
    var row_sum = vec4<f32>(0.0);
    for (var c = 0u; c < 16u; c++) {
        row_sum += s_tile[c * 4u + t.rq];
    }
    if (t.busy) { write_output(kh, v0, t, row_sum); }

    // Second pass: normalised probabilities of the rows in range, summed per key.
    if (block < p.first_block || block >= p.first_block + p.range_blocks) {
        return;
    }
    let prow = (kh * p.range_blocks + block - p.first_block) * p.kv_rows;
    let first = v0 + t.rq * 4u;
    let rows = vec4<u32>(first, first + 1u, first + 2u, first + 3u) / p.group;
    let in_range = rows >= vec4<u32>(p.q_start) & rows < vec4<u32>(p.q_end);
    var scored = t;
    scored.ends = select(vec4<u32>(0u), t.ends, in_range);
    scored.busy = t.busy && any(in_range & t.ends > vec4<u32>(0u));
    let inv = 1.0 / row_sum;
    for (var k0 = 0u; k0 < p.kv_rows; k0 += BN) {
        if (k0 < kend) {
            load_kv_tile(false, kh, k0, kend, tid);
            workgroupBarrier();
            var p_lo = vec4<f32>(0.0);
            var p_hi = vec4<f32>(0.0);
            if (scored.busy) {
                logits(scored);
                p_lo = select(vec4<f32>(0.0), exp2(s_lo - row_max) * inv, visible(scored, k0 + t.c));
                p_hi = select(vec4<f32>(0.0), exp2(s_hi - row_max) * inv,
                              visible(scored, k0 + t.c + 16u));
            }
            p_tile[t.c * 4u + t.rq] = p_lo;
            p_tile[(t.c + 16u) * 4u + t.rq] = p_hi;
            workgroupBarrier();
            if (tid < BN && k0 + tid < p.kv_rows) {
                let ones = vec4<f32>(1.0);
                partials[prow + k0 + tid] = dot(p_tile[tid * 4u], ones) + dot(p_tile[tid * 4u + 1u], ones)
                    + dot(p_tile[tid * 4u + 2u], ones) + dot(p_tile[tid * 4u + 3u], ones);
            }
            workgroupBarrier();
        } else if (tid < BN && k0 + tid < p.kv_rows) {
            partials[prow + k0 + tid] = 0.0;
        }
    }
}

// scores[j] = Σ over the partial rows of partials[row][j], in row order.
@compute @workgroup_size(REDUCE_THREADS)
fn attention_scores_reduce(@builtin(workgroup_id) wg: vec3<u32>,
                           @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) tid: u32) {
    let j = (wg.x + wg.y * nwg.x) * REDUCE_THREADS + tid;
    if (j >= p.kv_rows) {
        return;
    }
    var sum = 0.0;
    for (var r = 0u; r < p.partial_rows; r++) {
        sum += partials[r * p.kv_rows + j];
    }
    scores[j] = sum;
}
