// One row of an embedding table, dequantized on the GPU: out[0, c] = E[id, c] for the id that an
// earlier kernel left in `ids[p.id_index]` (the decode loop's argmax), so the next token's
// embedding never visits the host. The table is stored like a linear layer's weight, in any
// format blocks.wgsl reads (as the checkpoint stores it: f16, bf16, f32 or a GGUF block type),
// split into chunks of rows when it is larger than one binding; each chunk's dispatch writes
// the row only when the id falls in its rows, and an id outside the table writes nothing (the
// host rejects such an id when it reads it back).
//
// One thread per unit of 32 values (a 32-weight block, or an eighth of a K-quant super-block):
// the row is a handful of kilobytes, so the kernel is one short pass over it.
//
// Injected by the host (embedding.rs, the table's format as its ggml type number):
//#inject WG FORMAT
//#include blocks

struct Params {
    rows: u32,        // rows of E in this chunk
    k: u32,           // values per row
    w_stride: u32,    // 32-bit words per stored row (floats); blocks per row (block formats)
    scales: u32,      // block formats: word offset of the scales region (0 for floats)
    first_row: u32,   // the chunk's first row of the whole table
    id_index: u32,    // which element of `ids` holds the token id
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

// Value c of stored float row `row`: an f32 bit pattern, or one of a word's two halves.
fn float_value(row: u32, c: u32) -> f32 {
    if (FORMAT == W_F32) {
        return bitcast<f32>(word_at(row * p.w_stride + c));
    }
    return halves(FORMAT, word_at(row * p.w_stride + c / 2u))[c % 2u];
}

@compute @workgroup_size(WG)
fn embed_row(@builtin(global_invocation_id) gid: vec3<u32>) {
    let id = ids[p.id_index];
    if (id < p.first_row || id - p.first_row >= p.rows) {
        return;
    }
    let row = id - p.first_row;
    let unit = gid.x;
    let c0 = unit * 32u;
    if (c0 >= p.k) {
        return;
    }
    if (FORMAT == W_F32 || FORMAT == W_F16 || FORMAT == W_BF16) {
        for (var c = c0; c < min(c0 + 32u, p.k); c++) {
            out[c] = float_value(row, c);
        }
        return;
    }
    // Block formats: K is whole blocks, so a unit is 32 values of the row.
    let u = load_unit(FORMAT, row, unit);
    for (var i = 0u; i < 8u; i++) {
        let values = unit_values(FORMAT, u, i);
        for (var j = 0u; j < 4u; j++) {
            out[c0 + 4u * i + j] = values[j];
        }
    }
}
