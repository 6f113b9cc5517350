// Rotary position embedding in place on Q or K rows [T, H·D], Hugging Face's rotate-half
// convention: for i < D/2 the pair is (x[i], x[i + D/2]), not adjacent elements.
//
// Angles come from a host-built table [positions, D/2] of (cos, sin): the host computes them the
// way transformers does (f32 inverse frequencies and f32 angle products) and then takes cos and
// sin in f64, because GPU sin/cos lose accuracy for the large angles of late positions. Each row
// has an explicit position id, so rows whose neighbours were pruned keep their original position.
//
// Injected by the host (rope.rs `WORKGROUP`): WG, threads per workgroup, one per rotated pair.
//#inject WG

struct Params {
    rows: u32,
    heads: u32,
    head_dim: u32,
    table_rows: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> positions: array<u32>;
@group(0) @binding(2) var<storage, read> table: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(WG)
fn rope(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let half_dim = p.head_dim / 2u;
    let index = (wg.x + wg.y * groups.x) * WG + tid;
    if (index >= p.rows * p.heads * half_dim) {
        return;
    }
    let i = index % half_dim;
    let head = (index / half_dim) % p.heads;
    let row = index / (half_dim * p.heads);
    // The launcher cannot see the ids (they are already on the GPU); generate/prepare.rs keeps
    // prompt + new tokens within max_position_embeddings, the table's length. The clamp only
    // guarantees that a bad id reads a wrong angle instead of outside the table.
    let pos = min(positions[row], p.table_rows - 1u);
    let cs = table[pos * half_dim + i];
    let base = row * p.heads * p.head_dim + head * p.head_dim;
    let x1 = x[base + i];
    let x2 = x[base + i + half_dim];
    x[base + i] = x1 * cs.x - x2 * cs.y;
    x[base + i + half_dim] = x2 * cs.x + x1 * cs.y;
}
