// Y[M, N] = X[M, K] · W[N, K]ᵀ (+ bias[N]) (+ Y if accumulating), f32 accumulation: the same
// product as matmul.wgsl, laid out for drivers that run shaders on CPU SIMD units (lavapipe,
// SwiftShader, WARP).
//
// Why a second layout: a CPU driver runs a workgroup's invocations a SIMD vector at a time (8
// lanes on AVX2), each lane with its own copy of every variable in vector registers, and it pays
// for every value each lane loads, from a buffer or workgroup memory, even when all lanes load
// the same address. The tiled kernel's 8×8 outputs per thread need 64 accumulators (x86 has 16
// vector registers, so they spill to memory), and its inner loop loads a value per two
// multiply-adds. Here:
// - each thread owns COLUMNS = 2 output columns of the workgroup's ROWS = 8 rows of X (16
//   accumulators: four vec4);
// - per reduction step, each lane loads one X value (row `lane % 8` of the block) and the
//   subgroup shares the eight by broadcasts from constant lanes (register shuffles), so a lane
//   loads 1 X value and 2 weights for 16 multiply-adds;
// - there is no workgroup memory and no barrier.
// The launcher (matmul.rs `MatmulLayout`) picks this layout only on a CPU adapter whose subgroups
// have at least 8 lanes. Without subgroups (the `//#else` branches) each lane loads all 8 rows
// itself: correct anywhere, but slower than the tiled kernel. On a GPU the tiled kernel is the
// right one.
//
// W is stored as in matmul.wgsl: f16 / bf16 rows padded with zeros to a multiple of 8 halves, f32
// rows to 4 floats, block formats as blocks.wgsl reads them (a thread dequantizes one unit of 32
// weights of each of its columns at a time).
// Workgroups are numbered rows-first (x = row block, y = column block), so consecutive
// workgroups reuse the same COLUMNS·THREADS columns of W from the cache.
//
// Injected by the host (matmul.rs, the weight's format as its ggml type number, linear/mod.rs
// flag bits):
//#inject ROWS COLUMNS THREADS FORMAT FLAG_BIAS FLAG_ACCUMULATE
//#include blocks

struct Params {
    m: u32,            // rows of X and Y
    n: u32,            // rows of W in this chunk (= output columns written)
    k: u32,            // reduction length
    w_stride: u32,     // 32-bit words per stored W row (floats); blocks per row (block formats)
    x_stride: u32,     // floats per X row (normally k)
    y_stride: u32,     // floats per Y row (the full N)
    col_offset: u32,   // first output column (= first W row of this chunk)
    flags: u32,        // FLAG_BIAS: add bias, FLAG_ACCUMULATE: accumulate into Y
    scales: u32,       // block formats: word offset of the scales region (0 for floats)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

// The thread's 16 outputs: rows 0..3 and 4..7 of the workgroup's block, in its two columns.
struct Acc {
    lo_a: vec4<f32>,
    hi_a: vec4<f32>,
    lo_b: vec4<f32>,
    hi_b: vec4<f32>,
}

// Where X rows start: `mine` is the row this lane reads for the subgroup (lane i of each 8 reads
// row i of the block); `lo`/`hi` are all 8, for devices without subgroups. Rows past M repeat
// row M - 1; their results are not stored.
struct Rows {
    mine: u32,
    lo: vec4<u32>,
    hi: vec4<u32>,
}

fn row_starts(row0: u32, lane: u32) -> Rows {
    let last = p.m - 1u;
    let r = vec4<u32>(row0) + vec4<u32>(0u, 1u, 2u, 3u);
    return Rows(min(row0 + lane % ROWS, last) * p.x_stride,
                min(r, vec4<u32>(last)) * p.x_stride,
                min(r + 4u, vec4<u32>(last)) * p.x_stride);
}

// X[rows, col] of the block's 8 rows, as rows 0..3 and 4..7.
struct XColumn {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

//#if SUBGROUPS
// Each lane loads one X value and the subgroup shares them: a CPU driver pays for every value a
// lane loads, while a broadcast from a constant lane is a register shuffle.
fn x_column(rows: Rows, col: u32) -> XColumn {
    let mine = x[rows.mine + col];
    return XColumn(vec4<f32>(subgroupBroadcast(mine, 0u), subgroupBroadcast(mine, 1u),
                             subgroupBroadcast(mine, 2u), subgroupBroadcast(mine, 3u)),
                   vec4<f32>(subgroupBroadcast(mine, 4u), subgroupBroadcast(mine, 5u),
                             subgroupBroadcast(mine, 6u), subgroupBroadcast(mine, 7u)));
}
//#else
fn x_column(rows: Rows, col: u32) -> XColumn {
    return XColumn(vec4<f32>(x[rows.lo.x + col], x[rows.lo.y + col], x[rows.lo.z + col],
                             x[rows.lo.w + col]),
                   vec4<f32>(x[rows.hi.x + col], x[rows.hi.y + col], x[rows.hi.z + col],
                             x[rows.hi.w + col]));
}
//#endif

// acc += X[rows, col] · (wa, wb): one weight of each of the thread's columns.
fn add_one(acc: ptr<function, Acc>, rows: Rows, col: u32, wa: f32, wb: f32) {
    let xc = x_column(rows, col);
    (*acc).lo_a += wa * xc.lo;
    (*acc).hi_a += wa * xc.hi;
    (*acc).lo_b += wb * xc.lo;
    (*acc).hi_b += wb * xc.hi;
}

// Four consecutive weights of each column, k = col .. col + 4.
fn add_four(acc: ptr<function, Acc>, rows: Rows, col: u32, wa: vec4<f32>, wb: vec4<f32>) {
    add_one(acc, rows, col, wa.x, wb.x);
    add_one(acc, rows, col + 1u, wa.y, wb.y);
    add_one(acc, rows, col + 2u, wa.z, wb.z);
    add_one(acc, rows, col + 3u, wa.w, wb.w);
}

fn half_at(n: u32, k: u32) -> f32 {
    return halves(FORMAT, word_at(n * p.w_stride + k / 2u))[k % 2u];
}

fn four_halves(v: vec2<u32>) -> vec4<f32> {
    return vec4<f32>(halves(FORMAT, v.x), halves(FORMAT, v.y));
}

// f16 / bf16: 8 halves (one vec4<u32>) per step over the whole 8-element steps of K, then the
// rest one by one so X is never read past its row.
fn columns_halves(acc: ptr<function, Acc>, rows: Rows, a: u32, b: u32) {
    let base_a = a * p.w_stride / 4u;
    let base_b = b * p.w_stride / 4u;
    let whole = p.k / 8u;
    for (var s = 0u; s < whole; s++) {
        let va = w[base_a + s];
        let vb = w[base_b + s];
        let k0 = s * 8u;
        add_four(acc, rows, k0, four_halves(va.xy), four_halves(vb.xy));
        add_four(acc, rows, k0 + 4u, four_halves(va.zw), four_halves(vb.zw));
    }
    for (var k = whole * 8u; k < p.k; k++) {
        add_one(acc, rows, k, half_at(a, k), half_at(b, k));
    }
}

fn f32_at(n: u32, k: u32) -> f32 {
    return bitcast<f32>(word_at(n * p.w_stride + k));
}

// f32: 4 floats per step, then the rest one by one.
fn columns_f32(acc: ptr<function, Acc>, rows: Rows, a: u32, b: u32) {
    let base_a = a * p.w_stride / 4u;
    let base_b = b * p.w_stride / 4u;
    let whole = p.k / 4u;
    for (var s = 0u; s < whole; s++) {
        add_four(acc, rows, s * 4u, bitcast<vec4<f32>>(w[base_a + s]),
                 bitcast<vec4<f32>>(w[base_b + s]));
    }
    for (var k = whole * 4u; k < p.k; k++) {
        add_one(acc, rows, k, f32_at(a, k), f32_at(b, k));
    }
}

// Block formats: one unit of 32 weights of each column at a time, dequantized in registers.
fn columns_blocks(acc: ptr<function, Acc>, rows: Rows, a: u32, b: u32) {
    let units = p.k / 32u;
    for (var u = 0u; u < units; u++) {
        let ua = load_unit(FORMAT, a, u);
        let ub = load_unit(FORMAT, b, u);
        for (var i = 0u; i < 8u; i++) {
            add_four(acc, rows, u * 32u + 4u * i, unit_values(FORMAT, ua, i),
                     unit_values(FORMAT, ub, i));
        }
    }
}

fn store_one(row: u32, col: u32, value: f32) {
    if (row >= p.m) {
        return;
    }
    var v = value;
    let out_col = p.col_offset + col;
    if ((p.flags & FLAG_BIAS) != 0u) {
        v += bias[out_col];
    }
    let at = row * p.y_stride + out_col;
    if ((p.flags & FLAG_ACCUMULATE) != 0u) {
        v += y[at];
    }
    y[at] = v;
}

// A thread's COLUMNS = 2 columns are `a` and `a + THREADS` of the workgroup's COLUMNS·THREADS. Every lane of a
// subgroup must take part in the broadcasts, so threads past the last column compute a copy of
// it and only skip the store.
fn matmul_columns(wg: vec3<u32>, tid: u32, lane: u32) {
    let row0 = wg.x * ROWS;
    let col_a = wg.y * COLUMNS * THREADS + tid;
    let col_b = col_a + THREADS;
    let rows = row_starts(row0, lane);
    let a = min(col_a, p.n - 1u);
    let b = min(col_b, p.n - 1u);
    var acc = Acc(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    switch FORMAT {
        case W_F32: { columns_f32(&acc, rows, a, b); }
        case W_F16, W_BF16: { columns_halves(&acc, rows, a, b); }
        default: { columns_blocks(&acc, rows, a, b); }
    }
    store_column(row0, col_a, acc.lo_a, acc.hi_a);
    store_column(row0, col_b, acc.lo_b, acc.hi_b);
}

fn store_column(row0: u32, col: u32, lo: vec4<f32>, hi: vec4<f32>) {
    if (col >= p.n) {
        return;
    }
    for (var i = 0u; i < 4u; i++) {
        store_one(row0 + i, col, lo[i]);
        store_one(row0 + 4u + i, col, hi[i]);
    }
}

// The ids an entry point receives; without subgroups the lane is unused.
struct Invocation {
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
//#if SUBGROUPS
    @builtin(subgroup_invocation_id) lane: u32,
//#endif
}

fn lane_of(inv: Invocation) -> u32 {
//#if SUBGROUPS
    return inv.lane;
//#else
    return 0u;
//#endif
}

@compute @workgroup_size(THREADS)
fn matmul_lanes(inv: Invocation) {
    matmul_columns(inv.wg, inv.tid, lane_of(inv));
}
