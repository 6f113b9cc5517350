// O = softmax(Q·Kᵀ·scale + mask)·V per head, and the optional per-key probability sums of the
// visual-token scores: the same results as attention.wgsl, laid out for drivers that run shaders
// on CPU SIMD units (lavapipe, SwiftShader, WARP), as matmul_lanes.wgsl is for the matmul.
//
// Why a second layout: a CPU driver runs a workgroup's invocations a SIMD vector at a time (8
// lanes on AVX2), pays for every value each lane loads even when all lanes load the same address,
// spills register blocks that a GPU keeps, and runs a workgroup with barriers as coroutines that
// switch between its subgroups (measured on lavapipe: a third of the tiled kernel's time went to
// its barriers). Here a workgroup is one subgroup of 8 lanes, with no workgroup memory and no
// barrier: lanes exchange values by broadcasts from constant lanes (register shuffles) and
// subgroup reductions.
//
// Work decomposition. As in attention.wgsl, the query heads sharing a kv head are flattened with
// the query rows into virtual rows v = i·G + g. A workgroup owns one kv head and ROWS = 8
// consecutive virtual rows; lane r loads row r's Q once into registers. Per pass over 16 keys:
//   logits  lane t computes keys k0 + t and k0 + 8 + t for the 8 rows: per dimension each lane
//           broadcasts its Q value, so a lane loads 2 K values per 16 multiply-adds;
//   softmax the rows' max over the pass (subgroupMax), the rescale factor, and each lane's 16
//           probabilities exp2(logit − max): every logit is exponentiated once; each lane keeps
//           its share of the row sums;
//   P·V     lane t owns output dimensions 16c + 2t and 16c + 2t + 1 of the 8 rows for every
//           chunk c of 16 dimensions (the accumulators of all chunks stay in a private array);
//           per key the lanes broadcast its 8 probabilities from the lane that computed them
//           and each lane loads its 2 values of V: 16 multiply-adds per 8 shuffles and a load.
// Online softmax (running max and sum, rescaling when the max grows) gives the exact softmax in
// one pass over the keys; logits are in log2 units (scale·log2(e)), so the exponentials are exp2.
//
// Causal masking as in attention.wgsl: query row i sees keys j ≤ (Tk − Tq) + i; a block reads
// keys up to the last one its last row sees; key 0 is visible to every row, so a row's running
// max is finite after the first pass. Rows past the last virtual row repeat it (the broadcasts
// need every lane) and are not stored. Keys past a row's end get a logit of NEG and probability
// 0; K and V rows past the block's last key are never read (the loads clamp to it).
//
// Score accumulation (entry attention_lanes_scored): after the main pass every lane knows the
// rows' final max and sum, so a block in the score range recomputes its logits per pass and
// writes per key the sum of its in-range rows' normalised probabilities into its row of
// `partials` (zeros past its last key): no float atomics. attention.wgsl's
// attention_scores_reduce sums the rows in a fixed order.
//
// Loops: lavapipe stops an invocation after 65,535 loop iterations in all (its loop limiter);
// a pass over 16 keys costs about D/4 + D/16 of them (and D/4 more with scores), so a block
// stays under it up to about 13,000 keys at D = 128 with scores (tests/attention.rs checks a
// full 4,096-key context).
//
// Without subgroups (the `//#else` branches) the lanes exchange values through workgroup memory
// with barriers: correct anywhere, far slower; the launcher picks this layout only on a CPU
// adapter with subgroups of at least 8 lanes.
//
// Injected by the host (attention.rs `LANES`): HEAD_DIM (D: loops over it have constant bounds
// and the unaligned paths compile away) and KV_F16.
//#inject HEAD_DIM KV_F16
//#include attention_params

const ROWS: u32 = 8u;
const D4: u32 = (HEAD_DIM + 3u) / 4u;
// Output dimensions per chunk: 2 per lane.
const CHUNKS: u32 = (HEAD_DIM + 15u) / 16u;
// Every Q, K and V row starts on a vec4 (and a lane's two V dimensions on a vec2).
const ALIGNED: bool = HEAD_DIM % 4u == 0u;
const EVEN: bool = HEAD_DIM % 2u == 0u;


@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
// K and V: f32 (KV_F16 = 0, read as bit patterns) or IEEE halves packed two per word (KV_F16 = 1).
@group(0) @binding(2) var<storage, read> k: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read_write> o: array<f32>;
@group(0) @binding(5) var<storage, read_write> partials: array<f32>;

// Two columns (keys a and b, or output dimensions a and b) of the block's 8 rows: rows 0..3 and
// 4..7 in the components of two vectors.
struct Pairs {
    a_lo: vec4<f32>,
    a_hi: vec4<f32>,
    b_lo: vec4<f32>,
    b_hi: vec4<f32>,
}

// This lane's Q row (row `lane` of the block), pre-multiplied by scale·log2(e).
var<private> q_mine: array<vec4<f32>, D4>;
// The output accumulators of every chunk of 16 dimensions: this lane's 2 dimensions × 8 rows.
var<private> acc: array<Pairs, CHUNKS>;
// Running max of each row (the same in every lane), and this lane's share of each row's sum.
var<private> m_lo: vec4<f32>;
var<private> m_hi: vec4<f32>;
var<private> l_lo: vec4<f32>;
var<private> l_hi: vec4<f32>;

struct Block {
    kh: u32,         // kv head
    v0: u32,         // first virtual row
    kend: u32,       // keys the last row sees: [0, kend)
    ends_lo: vec4<u32>,
    ends_hi: vec4<u32>,
}

// Query row and head-in-group of virtual row `vr` (clamped to the last one).
fn row_of(vr: u32) -> vec2<u32> {
    let r = min(vr, p.vrows - 1u);
    return vec2<u32>(r / p.group, r % p.group);
}

fn row_end(vr: u32) -> u32 {
    let i = row_of(vr).x;
    return select(p.kv_rows, p.kv_rows - p.q_rows + i + 1u, p.causal != 0u);
}

// Element offset of Q (and O) row r of block `b`.
fn q_offset(b: Block, r: u32) -> u32 {
    let ih = row_of(b.v0 + r);
    return ih.x * p.heads * HEAD_DIM + (b.kh * p.group + ih.y) * HEAD_DIM;
}

fn block_of(lin: u32) -> Block {
    var b: Block;
    b.kh = lin / p.blocks;
    b.v0 = (lin % p.blocks) * ROWS;
    b.kend = row_end(b.v0 + ROWS - 1u);
    let r = b.v0;
    b.ends_lo = vec4<u32>(row_end(r), row_end(r + 1u), row_end(r + 2u), row_end(r + 3u));
    b.ends_hi = vec4<u32>(row_end(r + 4u), row_end(r + 5u), row_end(r + 6u), row_end(r + 7u));
    return b;
}

// ---- element access

fn q_at(e: u32) -> f32 {
    return q[e / 4u][e % 4u];
}

fn k_at(e: u32) -> f32 {
    let w = select(e, e / 2u, KV_F16 == 1u);
    let word = k[w / 4u][w % 4u];
    if (KV_F16 == 1u) {
        return unpack2x16float(word)[e % 2u];
    }
    return bitcast<f32>(word);
}

fn v_at(e: u32) -> f32 {
    let w = select(e, e / 2u, KV_F16 == 1u);
    let word = v[w / 4u][w % 4u];
    if (KV_F16 == 1u) {
        return unpack2x16float(word)[e % 2u];
    }
    return bitcast<f32>(word);
}

// Elements d .. d + 3 of the row starting at element `row` of K; zeros past D.
fn k4(row: u32, d: u32) -> vec4<f32> {
    if (!ALIGNED) {
        var x = vec4<f32>(0.0);
        for (var c = 0u; c < 4u; c++) {
            if (d + c < HEAD_DIM) { x[c] = k_at(row + d + c); }
        }
        return x;
    }
    let e = row + d;
    if (KV_F16 == 1u) {
        let words = k[e / 8u];
        let pair = select(words.xy, words.zw, e % 8u != 0u);
        return vec4<f32>(unpack2x16float(pair.x), unpack2x16float(pair.y));
    }
    return bitcast<vec4<f32>>(k[e / 4u]);
}

// V elements e and e + 1 (e + 1 only read when it is a dimension of the same row).
fn v2(e: u32, second: bool) -> vec2<f32> {
    if (!EVEN) {
        return vec2<f32>(v_at(e), select(0.0, v_at(e + 1u), second));
    }
    if (KV_F16 == 1u) {
        return unpack2x16float(v[e / 8u][(e / 2u) % 4u]);
    }
    let words = v[e / 4u];
    return bitcast<vec2<f32>>(select(words.xy, words.zw, e % 4u != 0u));
}

// ---- exchanges between the 8 lanes

struct RowValues {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

//#if SUBGROUPS
// Row r's value is `mine` of lane r.
fn share(mine: f32) -> RowValues {
    return RowValues(vec4<f32>(subgroupBroadcast(mine, 0u), subgroupBroadcast(mine, 1u),
                               subgroupBroadcast(mine, 2u), subgroupBroadcast(mine, 3u)),
                     vec4<f32>(subgroupBroadcast(mine, 4u), subgroupBroadcast(mine, 5u),
                               subgroupBroadcast(mine, 6u), subgroupBroadcast(mine, 7u)));
}

fn rows_max(x: RowValues) -> RowValues {
    return RowValues(subgroupMax(x.lo), subgroupMax(x.hi));
}

fn rows_sum(x: RowValues) -> RowValues {
    return RowValues(subgroupAdd(x.lo), subgroupAdd(x.hi));
}
//#else
var<workgroup> swap: array<RowValues, ROWS>;
var<private> lane_id: u32;

// Row r's value is `mine` of lane r, through workgroup memory.
fn share(mine: f32) -> RowValues {
    swap[lane_id].lo.x = mine;
    workgroupBarrier();
    var x: RowValues;
    for (var r = 0u; r < 4u; r++) {
        x.lo[r] = swap[r].lo.x;
        x.hi[r] = swap[r + 4u].lo.x;
    }
    workgroupBarrier();
    return x;
}

fn rows_reduce(x: RowValues, take_max: bool) -> RowValues {
    swap[lane_id] = x;
    workgroupBarrier();
    var y = swap[0];
    for (var l = 1u; l < ROWS; l++) {
        let z = swap[l];
        if (take_max) {
            y = RowValues(max(y.lo, z.lo), max(y.hi, z.hi));
        } else {
            y = RowValues(y.lo + z.lo, y.hi + z.hi);
        }
    }
    workgroupBarrier();
    return y;
}

fn rows_max(x: RowValues) -> RowValues {
    return rows_reduce(x, true);
}

fn rows_sum(x: RowValues) -> RowValues {
    return rows_reduce(x, false);
}
//#endif

// ---- logits

fn load_q(b: Block, lane: u32) {
    let row = q_offset(b, lane);
    for (var d4 = 0u; d4 < D4; d4++) {
        var x = vec4<f32>(0.0);
        if (ALIGNED) {
            x = q[(row + 4u * d4) / 4u];
        } else {
            for (var c = 0u; c < 4u; c++) {
                if (4u * d4 + c < HEAD_DIM) { x[c] = q_at(row + 4u * d4 + c); }
            }
        }
        q_mine[d4] = x * p.scale_log2;
    }
}

fn add_one(s: ptr<function, Pairs>, x: RowValues, wa: f32, wb: f32) {
    (*s).a_lo += wa * x.lo;
    (*s).a_hi += wa * x.hi;
    (*s).b_lo += wb * x.lo;
    (*s).b_hi += wb * x.hi;
}

fn masked(x: vec4<f32>, key: u32, ends: vec4<u32>) -> vec4<f32> {
    return select(vec4<f32>(NEG), x, vec4<u32>(key) < ends);
}

// Logits (log2 units, masked) of keys ka = k0 + lane and kb = k0 + 8 + lane for the 8 rows.
fn pass_logits(b: Block, k0: u32, lane: u32) -> Pairs {
    let ka = k0 + lane;
    let kb = ka + 8u;
    let kv_stride = p.kv_heads * HEAD_DIM;
    let row_a = min(ka, b.kend - 1u) * kv_stride + b.kh * HEAD_DIM;
    let row_b = min(kb, b.kend - 1u) * kv_stride + b.kh * HEAD_DIM;
    var s = Pairs(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    for (var d4 = 0u; d4 < D4; d4++) {
        let mine = q_mine[d4];
        let wa = k4(row_a, 4u * d4);
        let wb = k4(row_b, 4u * d4);
        add_one(&s, share(mine.x), wa.x, wb.x);
        add_one(&s, share(mine.y), wa.y, wb.y);
        add_one(&s, share(mine.z), wa.z, wb.z);
        add_one(&s, share(mine.w), wa.w, wb.w);
    }
    s.a_lo = masked(s.a_lo, ka, b.ends_lo);
    s.a_hi = masked(s.a_hi, ka, b.ends_hi);
    s.b_lo = masked(s.b_lo, kb, b.ends_lo);
    s.b_hi = masked(s.b_hi, kb, b.ends_hi);
    return s;
}

fn prob(s: vec4<f32>, m: vec4<f32>) -> vec4<f32> {
    return select(vec4<f32>(0.0), exp2(s - m), s > vec4<f32>(NEG * 0.5));
}

// Online softmax over the pass: new running max, this lane's probabilities (returned), its
// rescaled share of the sums; the rescale factor of every row for the accumulators.
fn softmax_pass(s: Pairs, alpha: ptr<function, RowValues>) -> Pairs {
    let tile = rows_max(RowValues(max(s.a_lo, s.b_lo), max(s.a_hi, s.b_hi)));
    let new_lo = max(m_lo, tile.lo);
    let new_hi = max(m_hi, tile.hi);
    *alpha = RowValues(exp2(m_lo - new_lo), exp2(m_hi - new_hi));
    m_lo = new_lo;
    m_hi = new_hi;
    let e = Pairs(prob(s.a_lo, new_lo), prob(s.a_hi, new_hi), prob(s.b_lo, new_lo),
                  prob(s.b_hi, new_hi));
    l_lo = l_lo * (*alpha).lo + e.a_lo + e.b_lo;
    l_hi = l_hi * (*alpha).hi + e.a_hi + e.b_hi;
    return e;
}

// ---- P·V

fn add_key(a: ptr<function, Pairs>, p_lo: vec4<f32>, p_hi: vec4<f32>, w: vec2<f32>) {
    (*a).a_lo += w.x * p_lo;
    (*a).a_hi += w.x * p_hi;
    (*a).b_lo += w.y * p_lo;
    (*a).b_hi += w.y * p_hi;
}

// Element offset of dimension d of V row `key` of the block's kv head.
fn v_offset(b: Block, key: u32, d: u32) -> u32 {
    return key * p.kv_heads * HEAD_DIM + b.kh * HEAD_DIM + d;
}

//#if SUBGROUPS
// acc += P[:, 8 keys] · V[keys, dims]: key j's probabilities are lane j's `pl`/`ph`, its V
// elements start at e0 + j·step, clamped to `last` (the block's last key: keys past it have
// probability 0 and are never read).
fn pv_eight(a: ptr<function, Pairs>, pl: vec4<f32>, ph: vec4<f32>, e0: u32, step: u32, last: u32,
            second: bool) {
    add_key(a, subgroupBroadcast(pl, 0u), subgroupBroadcast(ph, 0u), v2(min(e0, last), second));
    add_key(a, subgroupBroadcast(pl, 1u), subgroupBroadcast(ph, 1u),
            v2(min(e0 + step, last), second));
    add_key(a, subgroupBroadcast(pl, 2u), subgroupBroadcast(ph, 2u),
            v2(min(e0 + 2u * step, last), second));
    add_key(a, subgroupBroadcast(pl, 3u), subgroupBroadcast(ph, 3u),
            v2(min(e0 + 3u * step, last), second));
    add_key(a, subgroupBroadcast(pl, 4u), subgroupBroadcast(ph, 4u),
            v2(min(e0 + 4u * step, last), second));
    add_key(a, subgroupBroadcast(pl, 5u), subgroupBroadcast(ph, 5u),
            v2(min(e0 + 5u * step, last), second));
    add_key(a, subgroupBroadcast(pl, 6u), subgroupBroadcast(ph, 6u),
            v2(min(e0 + 6u * step, last), second));
    add_key(a, subgroupBroadcast(pl, 7u), subgroupBroadcast(ph, 7u),
            v2(min(e0 + 7u * step, last), second));
}
//#else
var<workgroup> p_swap: array<RowValues, ROWS>;

fn pv_eight(a: ptr<function, Pairs>, pl: vec4<f32>, ph: vec4<f32>, e0: u32, step: u32, last: u32,
            second: bool) {
    p_swap[lane_id] = RowValues(pl, ph);
    workgroupBarrier();
    for (var j = 0u; j < ROWS; j++) {
        let x = p_swap[j];
        add_key(a, x.lo, x.hi, v2(min(e0 + j * step, last), second));
    }
    workgroupBarrier();
}
//#endif

// acc = acc · alpha + P[:, keys k0 .. k0 + 16) · V over every chunk.
fn pass_pv(b: Block, k0: u32, lane: u32, e: Pairs, alpha: RowValues) {
    let step = p.kv_heads * HEAD_DIM;
    // A lane's dimensions past D load the last valid ones (and are not stored).
    let d_max = select(HEAD_DIM - 1u, max(HEAD_DIM, 2u) - 2u, EVEN);
    for (var c = 0u; c < CHUNKS; c++) {
        let d = min(16u * c + 2u * lane, d_max);
        let second = d + 1u < HEAD_DIM;
        let last = v_offset(b, b.kend - 1u, d);
        var a = acc[c];
        a.a_lo *= alpha.lo;
        a.a_hi *= alpha.hi;
        a.b_lo *= alpha.lo;
        a.b_hi *= alpha.hi;
        pv_eight(&a, e.a_lo, e.a_hi, v_offset(b, k0, d), step, last, second);
        if (k0 + 8u < b.kend) {
            pv_eight(&a, e.b_lo, e.b_hi, v_offset(b, k0 + 8u, d), step, last, second);
        }
        acc[c] = a;
    }
}

// ---- entry points

struct Invocation {
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
//#if SUBGROUPS
    @builtin(subgroup_invocation_id) lane: u32,
//#endif
}

fn lane_of(inv: Invocation) -> u32 {
//#if SUBGROUPS
    return inv.lane;
//#else
    lane_id = inv.tid;
    return inv.tid;
//#endif
}

// The main pass of block `b`: afterwards `acc` holds the unnormalised outputs, m the rows' max
// and the returned values each row's 1 / sum.
fn main_pass(b: Block, lane: u32) -> RowValues {
    load_q(b, lane);
    m_lo = vec4<f32>(NEG);
    m_hi = vec4<f32>(NEG);
    l_lo = vec4<f32>(0.0);
    l_hi = vec4<f32>(0.0);
    for (var c = 0u; c < CHUNKS; c++) {
        acc[c] = Pairs(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    }
    for (var k0 = 0u; k0 < b.kend; k0 += 16u) {
        var alpha: RowValues;
        let e = softmax_pass(pass_logits(b, k0, lane), &alpha);
        pass_pv(b, k0, lane, e, alpha);
    }
    let sum = rows_sum(RowValues(l_lo, l_hi));
    return RowValues(1.0 / sum.lo, 1.0 / sum.hi);
}

fn write_output(b: Block, lane: u32, inv: RowValues) {
    for (var c = 0u; c < CHUNKS; c++) {
        let d = 16u * c + 2u * lane;
        let a = acc[c];
        for (var r = 0u; r < ROWS; r++) {
            if (b.v0 + r >= p.vrows) {
                break;
            }
            let base = q_offset(b, r);
            let i = r % 4u;
            let lo = r < 4u;
            let scale = select(inv.hi[i], inv.lo[i], lo);
            if (d < HEAD_DIM) { o[base + d] = select(a.a_hi[i], a.a_lo[i], lo) * scale; }
            if (d + 1u < HEAD_DIM) { o[base + d + 1u] = select(a.b_hi[i], a.b_lo[i], lo) * scale; }
        }
    }
}

// The two entry points repeat their first lines rather than share a function: only the scored
// one may use `partials`, or the plain one's pipeline layout would need it bound.

@compute @workgroup_size(8)
fn attention_lanes(inv: Invocation) {
    let lin = inv.wg.x + inv.wg.y * inv.nwg.x;
    if (lin >= p.num_groups) {
        return;
    }
    let lane = lane_of(inv);
    let b = block_of(lin);
    write_output(b, lane, main_pass(b, lane));
}

@compute @workgroup_size(8)
fn attention_lanes_scored(inv: Invocation) {
    let lin = inv.wg.x + inv.wg.y * inv.nwg.x;
    if (lin >= p.num_groups) {
        return;
    }
    let lane = lane_of(inv);
    let b = block_of(lin);
    let inv_sum = main_pass(b, lane);
    write_output(b, lane, inv_sum);
    let block = lin % p.blocks;
    if (block >= p.first_block && block < p.first_block + p.range_blocks) {
        score_block(b, block, lane, inv_sum);
    }
}

// Weight of each row in the scores: its 1 / sum when it is a real row in the query range.
fn score_weights(b: Block, inv_sum: RowValues) -> RowValues {
    var w = RowValues(vec4<f32>(0.0), vec4<f32>(0.0));
    for (var r = 0u; r < 4u; r++) {
        for (var h = 0u; h < 2u; h++) {
            let vr = b.v0 + r + 4u * h;
            let i = vr / p.group;
            if (vr < p.vrows && i >= p.q_start && i < p.q_end) {
                if (h == 0u) { w.lo[r] = inv_sum.lo[r]; } else { w.hi[r] = inv_sum.hi[r]; }
            }
        }
    }
    return w;
}

// Second pass of a block in the score range: its rows' normalised probabilities summed per key.
fn score_block(b: Block, block: u32, lane: u32, inv_sum: RowValues) {
    let prow = (b.kh * p.range_blocks + block - p.first_block) * p.kv_rows;
    let w = score_weights(b, inv_sum);
    for (var k0 = 0u; k0 < p.kv_rows; k0 += 16u) {
        var sa = 0.0;
        var sb = 0.0;
        if (k0 < b.kend) {
            let s = pass_logits(b, k0, lane);
            sa = dot(prob(s.a_lo, m_lo), w.lo) + dot(prob(s.a_hi, m_hi), w.hi);
            sb = dot(prob(s.b_lo, m_lo), w.lo) + dot(prob(s.b_hi, m_hi), w.hi);
        }
        if (k0 + lane < p.kv_rows) { partials[prow + k0 + lane] = sa; }
        if (k0 + 8u + lane < p.kv_rows) { partials[prow + k0 + 8u + lane] = sb; }
    }
}
