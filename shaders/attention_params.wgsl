// What both attention shaders (attention.wgsl, attention_lanes.wgsl) and the score reduction
// share: the uniform block attention.rs's `Params` mirrors, and the stand-in for -inf.

struct Params {
    q_rows: u32,       // Tq
    kv_rows: u32,      // Tk (valid cache rows)
    heads: u32,        // H
    kv_heads: u32,     // Hkv
    head_dim: u32,     // D ≤ 128 (attention_lanes.wgsl compiles it in as HEAD_DIM)
    group: u32,        // G = H / Hkv
    vrows: u32,        // Tq·G virtual rows per kv head
    blocks: u32,       // workgroups per kv head = ceil(vrows / rows per block: BM or ROWS)
    num_groups: u32,   // Hkv · blocks (the grid may overshoot)
    causal: u32,
    scale_log2: f32,   // scale · log2(e)
    q_start: u32,      // score range of query rows [q_start, q_end)
    q_end: u32,
    first_block: u32,  // first block intersecting the score range
    range_blocks: u32, // blocks intersecting the score range (partial rows per kv head)
    partial_rows: u32, // rows of `partials` to reduce (Hkv · range_blocks)
}

// Stands in for -inf; exp2 of anything near it is 0.
const NEG: f32 = -3.0e38;
