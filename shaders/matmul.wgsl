// Y[M, N] = X[M, K] · W[N, K]ᵀ (+ bias[N]) (+ Y if accumulating), f32 accumulation.
//
// W is stored as Hugging Face stores it (output rows, input columns), row-padded with zeros to a
// multiple of 8 halves (f16, packed two per u32) or 4 floats (f32), so each row is read with
// aligned vec4 loads. One dispatch covers one row-chunk of W (chunks exist when W exceeds the
// storage-binding limit); it writes the output columns [col_offset, col_offset + n).
//
// Tiling: a 256-thread workgroup computes a 64×64 output tile; each thread owns a 4×4 block of it
// spread with stride 16 (so neighbouring threads read neighbouring shared-memory words). The K
// loop stages a 64×32 slice of X and of W through workgroup memory, transposed so the inner
// product reads them with unit stride. Edge tiles are bounds-checked, so any M, N, K work.

struct Params {
    m: u32,            // rows of X and Y
    n: u32,            // rows of W in this chunk (= output columns written)
    k: u32,            // reduction length
    w_stride: u32,     // 32-bit words per stored W row
    x_stride: u32,     // floats per X row (normally k)
    y_stride: u32,     // floats per Y row (the full N)
    col_offset: u32,   // first output column (= first W row of this chunk)
    flags: u32,        // bit 0: add bias, bit 1: accumulate into Y
}

const TILE_M: u32 = 64u;
const TILE_N: u32 = 64u;
const TILE_K: u32 = 32u;
// One extra word per shared row removes bank conflicts on the transposed stores.
const SHARED_STRIDE: u32 = 65u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
// f16 weights are two halves per word; f32 weights are read as raw bits and bitcast.
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

var<workgroup> x_tile: array<f32, 2080>;   // [TILE_K][SHARED_STRIDE]
var<workgroup> w_tile: array<f32, 2080>;   // [TILE_K][SHARED_STRIDE]

fn load_x_tile(row0: u32, k0: u32, tid: u32) {
    // 64 rows × 32 columns = 2048 values, 8 per thread, consecutive threads along K (coalesced).
    for (var i = 0u; i < 8u; i++) {
        let idx = tid + i * 256u;
        let r = idx / TILE_K;
        let kk = idx % TILE_K;
        let row = row0 + r;
        let col = k0 + kk;
        var v = 0.0;
        if (row < p.m && col < p.k) {
            v = x[row * p.x_stride + col];
        }
        x_tile[kk * SHARED_STRIDE + r] = v;
    }
}

// f16 weights: 64 rows × 32 halves = 64 rows × 4 vec4<u32>, one vec4 per thread.
fn load_w_tile_f16(n0: u32, k0: u32, tid: u32) {
    let r = tid / 4u;
    let q = tid % 4u;
    let row = n0 + r;
    let col = k0 + q * 8u;               // first half in this vec4
    var words = vec4<u32>(0u);
    if (row < p.n && col / 2u < p.w_stride) {
        words = w[(row * p.w_stride + col / 2u) / 4u];
    }
    let base = q * 8u;
    let h0 = unpack2x16float(words.x);
    let h1 = unpack2x16float(words.y);
    let h2 = unpack2x16float(words.z);
    let h3 = unpack2x16float(words.w);
    w_tile[(base + 0u) * SHARED_STRIDE + r] = h0.x;
    w_tile[(base + 1u) * SHARED_STRIDE + r] = h0.y;
    w_tile[(base + 2u) * SHARED_STRIDE + r] = h1.x;
    w_tile[(base + 3u) * SHARED_STRIDE + r] = h1.y;
    w_tile[(base + 4u) * SHARED_STRIDE + r] = h2.x;
    w_tile[(base + 5u) * SHARED_STRIDE + r] = h2.y;
    w_tile[(base + 6u) * SHARED_STRIDE + r] = h3.x;
    w_tile[(base + 7u) * SHARED_STRIDE + r] = h3.y;
}

// f32 weights: 64 rows × 32 floats = 64 rows × 8 vec4, two per thread.
fn load_w_tile_f32(n0: u32, k0: u32, tid: u32) {
    for (var i = 0u; i < 2u; i++) {
        let idx = tid + i * 256u;
        let r = idx / 8u;
        let q = idx % 8u;
        let row = n0 + r;
        let col = k0 + q * 4u;
        var v = vec4<f32>(0.0);
        if (row < p.n && col < p.w_stride) {
            v = bitcast<vec4<f32>>(w[(row * p.w_stride + col) / 4u]);
        }
        let base = q * 4u;
        w_tile[(base + 0u) * SHARED_STRIDE + r] = v.x;
        w_tile[(base + 1u) * SHARED_STRIDE + r] = v.y;
        w_tile[(base + 2u) * SHARED_STRIDE + r] = v.z;
        w_tile[(base + 3u) * SHARED_STRIDE + r] = v.w;
    }
}

fn store(acc: ptr<function, array<vec4<f32>, 4>>, row0: u32, n0: u32, tx: u32, ty: u32) {
    for (var i = 0u; i < 4u; i++) {
        let row = row0 + ty + i * 16u;
        if (row >= p.m) {
            continue;
        }
        let values = (*acc)[i];
        for (var j = 0u; j < 4u; j++) {
            let col = n0 + tx + j * 16u;
            if (col >= p.n) {
                continue;
            }
            var v = values[j];
            let out_col = p.col_offset + col;
            if ((p.flags & 1u) != 0u) {
                v += bias[out_col];
            }
            let at = row * p.y_stride + out_col;
            if ((p.flags & 2u) != 0u) {
                v += y[at];
            }
            y[at] = v;
        }
    }
}

fn multiply_tile(acc: ptr<function, array<vec4<f32>, 4>>, tx: u32, ty: u32) {
    for (var kk = 0u; kk < TILE_K; kk++) {
        let base = kk * SHARED_STRIDE;
        let b = vec4<f32>(w_tile[base + tx], w_tile[base + tx + 16u],
                          w_tile[base + tx + 32u], w_tile[base + tx + 48u]);
        (*acc)[0] += x_tile[base + ty] * b;
        (*acc)[1] += x_tile[base + ty + 16u] * b;
        (*acc)[2] += x_tile[base + ty + 32u] * b;
        (*acc)[3] += x_tile[base + ty + 48u] * b;
    }
}

@compute @workgroup_size(256)
fn matmul_f16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let n0 = wg.x * TILE_N;
    let row0 = wg.y * TILE_M;
    let tx = tid % 16u;
    let ty = tid / 16u;
    var acc = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    for (var k0 = 0u; k0 < p.k; k0 += TILE_K) {
        load_x_tile(row0, k0, tid);
        load_w_tile_f16(n0, k0, tid);
        workgroupBarrier();
        multiply_tile(&acc, tx, ty);
        workgroupBarrier();
    }
    store(&acc, row0, n0, tx, ty);
}

@compute @workgroup_size(256)
fn matmul_f32(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let n0 = wg.x * TILE_N;
    let row0 = wg.y * TILE_M;
    let tx = tid % 16u;
    let ty = tid / 16u;
    var acc = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    for (var k0 = 0u; k0 < p.k; k0 += TILE_K) {
        load_x_tile(row0, k0, tid);
        load_w_tile_f32(n0, k0, tid);
        workgroupBarrier();
        multiply_tile(&acc, tx, ty);
        workgroupBarrier();
    }
    store(&acc, row0, n0, tx, ty);
}
