// Y[M, N] = X[M, K] · W[N, K]ᵀ (+ bias[N]) (+ Y if accumulating), f32 accumulation.
//
// W is stored as Hugging Face stores it (output rows, input columns), row-padded with zeros to a
// multiple of 8 halves (f16 or bf16, packed two per u32) or 4 floats (f32), so each row is read with
// aligned vec4 loads. One dispatch covers one row-chunk of W (chunks exist when W exceeds the
// storage-binding limit); it writes the output columns [col_offset, col_offset + n).
//
// Tiling: a workgroup of THREADS = 64 threads computes a TILE_M×TILE_N = 64×64 output tile; the
// threads form an 8×8 grid and each owns an 8×8 block of the tile. The K loop stages a
// 64×TILE_K slice of X and of W through workgroup memory, transposed so the inner product reads
// them with unit stride. Edge tiles are bounds-checked, so any M, N, K work. The per-thread
// loops below are written for exactly this tiling (matmul.rs tests the relations).
//
// Block formats (every ggml type the engine runs; blocks.wgsl): TILE_K = 32 is one unit of 32
// weights, so a K step has each thread dequantize one unit of one of the tile's 64 rows in
// registers on the way into w_tile; the multiply is the float one.
//
// What X is (X_MODE, linear/mod.rs `LinearInput`), as gemv.wgsl reads it, so a prefill's norms
// and MLP activation need no pass of their own wherever this kernel runs (GPUs; CPU adapters
// without subgroups):
// - X_PLAIN: the rows as stored.
// - X_RMS_NORM: RMSNorm(x)·γ. The tile of X stays raw and γ goes into the staged weights
//   (W·(γ∘x) = (W∘γ)·x); each thread sums the squares of its 8 rows from the X values it
//   multiplies anyway (two vec4 FMAs per k beside the product's 16), and scales its outputs by
//   1/rms at the end.
//   The norm's write and second read of X are gone; each workgroup along N recomputes Σx².
// - X_SILU_GATE: silu(gate)·up of rows of 2K values, gate first, computed as the X tile is
//   staged (one exp per staged value, so once per 64 output columns).
//
// Injected by the host (matmul.rs `MatmulTiling`, the weight's format as its ggml type number,
// linear/mod.rs flag bits and `LinearInput`):
//#inject TILE_M TILE_N TILE_K THREADS FORMAT FLAG_BIAS FLAG_ACCUMULATE X_MODE
//#include blocks

const X_PLAIN: u32 = 0u;
const X_RMS_NORM: u32 = 1u;
const X_SILU_GATE: u32 = 2u;

struct Params {
    m: u32,            // rows of X and Y
    n: u32,            // rows of W in this chunk (= output columns written)
    k: u32,            // reduction length
    w_stride: u32,     // 32-bit words per stored W row (floats); blocks per row (block formats)
    x_stride: u32,     // floats per X row (k; 2k for X_SILU_GATE)
    y_stride: u32,     // floats per Y row (the full N)
    col_offset: u32,   // first output column (= first W row of this chunk)
    flags: u32,        // FLAG_BIAS: add bias, FLAG_ACCUMULATE: accumulate into Y
    scales: u32,       // block formats: word offset of the scales region (0 for floats)
    eps: f32,          // X_RMS_NORM: the norm's epsilon
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
// f16 weights are two halves per word; f32 weights are read as raw bits and bitcast.
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
// X_RMS_NORM: the norm's weight γ [K] (another buffer stands in for the other modes).
@group(0) @binding(5) var<storage, read> gamma: array<f32>;

// Both tiles are stored K-major ([TILE_K][64] floats as 16 vec4 per k) so the inner product
// reads a thread's 8 rows and 8 columns as two vec4 loads each.
var<workgroup> x_tile: array<vec4<f32>, TILE_K * TILE_M / 4u>;
var<workgroup> w_tile: array<vec4<f32>, TILE_K * TILE_N / 4u>;

fn x_at(row: u32, col: u32) -> f32 {
    if (row >= p.m || col >= p.k) {
        return 0.0;
    }
    let v = x[row * p.x_stride + col];
    if (X_MODE == X_SILU_GATE) {
        return v / (1.0 + exp(-v)) * x[row * p.x_stride + p.k + col];
    }
    return v;
}

// What a staged weight at reduction index k is multiplied by: γ[k] for X_RMS_NORM (0 past K,
// where the weights are padding), else 1.
fn w_scale(k: u32) -> f32 {
    if (X_MODE != X_RMS_NORM) {
        return 1.0;
    }
    if (k < p.k) {
        return gamma[k];
    }
    return 0.0;
}

// Each thread fills whole vec4s (4 consecutive rows at one k), so no store needs a dynamic
// vector component. 32 k × 16 row-quads = 512 vec4, 8 per thread; neighbouring threads read
// neighbouring k of the same rows.
fn load_x_tile(row0: u32, k0: u32, tid: u32) {
    for (var i = 0u; i < 8u; i++) {
        let idx = tid + i * THREADS;
        let kk = idx % TILE_K;
        let quad = idx / TILE_K;
        let row = row0 + quad * 4u;
        let col = k0 + kk;
        x_tile[kk * 16u + quad] = vec4<f32>(x_at(row, col), x_at(row + 1u, col),
                                            x_at(row + 2u, col), x_at(row + 3u, col));
    }
}

fn w_words(row: u32, word: u32) -> vec4<u32> {
    if (row < p.n && word < p.w_stride) {
        return w[(row * p.w_stride + word) / 4u];
    }
    return vec4<u32>(0u);
}

// f16 / bf16 weights: thread = (row-quad, 8-half group): 16 × 4 = 64 units, one per thread. It
// loads one vec4<u32> (8 halves) from each of 4 rows and writes 8 vec4 columns (one per k).
fn load_w_tile_halves(n0: u32, k0: u32, tid: u32) {
    let quad = tid / 4u;
    let q = tid % 4u;
    let row = n0 + quad * 4u;
    let word = (k0 + q * 8u) / 2u;
    let a = w_words(row, word);
    let b = w_words(row + 1u, word);
    let c = w_words(row + 2u, word);
    let d = w_words(row + 3u, word);
    let base = q * 8u * 16u + quad;
    for (var j = 0u; j < 4u; j++) {
        let ha = halves(FORMAT, a[j]);
        let hb = halves(FORMAT, b[j]);
        let hc = halves(FORMAT, c[j]);
        let hd = halves(FORMAT, d[j]);
        let k = k0 + q * 8u + 2u * j;
        w_tile[base + (2u * j) * 16u] = vec4<f32>(ha.x, hb.x, hc.x, hd.x) * w_scale(k);
        w_tile[base + (2u * j + 1u) * 16u] = vec4<f32>(ha.y, hb.y, hc.y, hd.y) * w_scale(k + 1u);
    }
}

// f32 weights: (row-quad, 4-float group) = 16 × 8 = 128 units, two per thread.
fn load_w_tile_f32(n0: u32, k0: u32, tid: u32) {
    for (var i = 0u; i < 2u; i++) {
        let unit = tid + i * THREADS;
        let quad = unit / 8u;
        let q = unit % 8u;
        let row = n0 + quad * 4u;
        let word = k0 + q * 4u;
        let a = bitcast<vec4<f32>>(w_words(row, word));
        let b = bitcast<vec4<f32>>(w_words(row + 1u, word));
        let c = bitcast<vec4<f32>>(w_words(row + 2u, word));
        let d = bitcast<vec4<f32>>(w_words(row + 3u, word));
        let base = q * 4u * 16u + quad;
        let k = k0 + q * 4u;
        w_tile[base] = vec4<f32>(a.x, b.x, c.x, d.x) * w_scale(k);
        w_tile[base + 16u] = vec4<f32>(a.y, b.y, c.y, d.y) * w_scale(k + 1u);
        w_tile[base + 32u] = vec4<f32>(a.z, b.z, c.z, d.z) * w_scale(k + 2u);
        w_tile[base + 48u] = vec4<f32>(a.w, b.w, c.w, d.w) * w_scale(k + 3u);
    }
}

// Block formats: thread t dequantizes unit k0 / 32 of tile row t (THREADS = TILE_N) into column
// t of the 32 k-rows of w_tile. Consecutive threads write consecutive words.
fn load_w_tile_blocks(n0: u32, k0: u32, tid: u32) {
    let row = n0 + tid;
    var unit = zero_unit();
    if (row < p.n) {
        unit = load_unit(FORMAT, row, k0 / TILE_K);
    }
    for (var i = 0u; i < 8u; i++) {
        let v = unit_values(FORMAT, unit, i);
        for (var j = 0u; j < 4u; j++) {
            w_tile[(4u * i + j) * 16u + tid / 4u][tid % 4u] = v[j] * w_scale(k0 + 4u * i + j);
        }
    }
}

// Write one output row's 8 columns (tx·8 .. tx·8+8), given as two vec4, times `scale` (the
// row's 1/rms for X_RMS_NORM, else 1).
fn store_row(row: u32, col0: u32, lo: vec4<f32>, hi: vec4<f32>, scale: f32) {
    if (row >= p.m) {
        return;
    }
    for (var j = 0u; j < 8u; j++) {
        let col = col0 + j;
        if (col >= p.n) {
            return;
        }
        var v = select(hi[j - 4u], lo[j], j < 4u) * scale;
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
}

// The scale of each of the thread's 8 rows: 1/rms(x) of the row from its Σx² (X_RMS_NORM).
struct RowScales {
    a: vec4<f32>,
    b: vec4<f32>,
}

fn row_scales(squares: RowScales) -> RowScales {
    if (X_MODE != X_RMS_NORM) {
        return RowScales(vec4<f32>(1.0), vec4<f32>(1.0));
    }
    let k = f32(p.k);
    return RowScales(inverseSqrt(squares.a / k + p.eps), inverseSqrt(squares.b / k + p.eps));
}

// acc[2i], acc[2i+1] hold output row ty·8 + i. Only constant indices touch `acc`, so compilers
// keep it in registers (a dynamic index would push the whole array to memory).
fn store(acc: ptr<function, array<vec4<f32>, 16>>, s: RowScales, row0: u32, n0: u32, tx: u32,
         ty: u32) {
    let r = row0 + ty * 8u;
    let c = n0 + tx * 8u;
    store_row(r + 0u, c, (*acc)[0], (*acc)[1], s.a.x);
    store_row(r + 1u, c, (*acc)[2], (*acc)[3], s.a.y);
    store_row(r + 2u, c, (*acc)[4], (*acc)[5], s.a.z);
    store_row(r + 3u, c, (*acc)[6], (*acc)[7], s.a.w);
    store_row(r + 4u, c, (*acc)[8], (*acc)[9], s.b.x);
    store_row(r + 5u, c, (*acc)[10], (*acc)[11], s.b.y);
    store_row(r + 6u, c, (*acc)[12], (*acc)[13], s.b.z);
    store_row(r + 7u, c, (*acc)[14], (*acc)[15], s.b.w);
}

// `squares` gathers Σx² of the thread's 8 rows (used by X_RMS_NORM only).
fn multiply_tile(acc: ptr<function, array<vec4<f32>, 16>>, squares: ptr<function, RowScales>,
                 tx: u32, ty: u32) {
    for (var kk = 0u; kk < TILE_K; kk++) {
        let xa = x_tile[kk * 16u + ty * 2u];
        let xb = x_tile[kk * 16u + ty * 2u + 1u];
        if (X_MODE == X_RMS_NORM) {
            (*squares).a += xa * xa;
            (*squares).b += xb * xb;
        }
        let wa = w_tile[kk * 16u + tx * 2u];
        let wb = w_tile[kk * 16u + tx * 2u + 1u];
        (*acc)[0] += xa.x * wa;  (*acc)[1] += xa.x * wb;
        (*acc)[2] += xa.y * wa;  (*acc)[3] += xa.y * wb;
        (*acc)[4] += xa.z * wa;  (*acc)[5] += xa.z * wb;
        (*acc)[6] += xa.w * wa;  (*acc)[7] += xa.w * wb;
        (*acc)[8] += xb.x * wa;  (*acc)[9] += xb.x * wb;
        (*acc)[10] += xb.y * wa; (*acc)[11] += xb.y * wb;
        (*acc)[12] += xb.z * wa; (*acc)[13] += xb.z * wb;
        (*acc)[14] += xb.w * wa; (*acc)[15] += xb.w * wb;
    }
}

fn load_w_tile(n0: u32, k0: u32, tid: u32) {
    switch FORMAT {
        case W_F32: { load_w_tile_f32(n0, k0, tid); }
        case W_F16, W_BF16: { load_w_tile_halves(n0, k0, tid); }
        default: { load_w_tile_blocks(n0, k0, tid); }
    }
}

// One workgroup's 64x64 output tile.
@compute @workgroup_size(THREADS)
fn matmul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let n0 = wg.x * TILE_N;
    let row0 = wg.y * TILE_M;
    let tx = tid % 8u;
    let ty = tid / 8u;
    var acc: array<vec4<f32>, 16>;
    var squares = RowScales(vec4<f32>(0.0), vec4<f32>(0.0));
    for (var k0 = 0u; k0 < p.k; k0 += TILE_K) {
        load_x_tile(row0, k0, tid);
        load_w_tile(n0, k0, tid);
        workgroupBarrier();
        multiply_tile(&acc, &squares, tx, ty);
        workgroupBarrier();
    }
    store(&acc, row_scales(squares), row0, n0, tx, ty);
}
