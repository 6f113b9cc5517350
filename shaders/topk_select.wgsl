// What the three top-k select kernels (topk.wgsl's select_keep, topk_lanes.wgsl,
// topk_multi.wgsl) share: the uniform block topk.rs's `SelectParams` mirrors, and the score keys,
// u32 whose unsigned order is the scores' float order, so a radix or bitwise search over keys
// ranks the scores.

struct SelectParams {
    n: u32,             // scores in the segment
    k: u32,             // how many to keep, k <= n
    score_offset: u32,  // index of the segment's first score in `scores`
    seg_start: u32,     // first row of the segment in the sequence
    total: u32,         // rows in the sequence, >= seg_start + n
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

// Unsigned order of the keys = float order, NaN lowest, -0 == +0. Done on the bits: WGSL lets
// implementations assume floats are finite, so `v != v` is not a reliable NaN test.
fn order_key(v: f32) -> u32 {
    let bits = bitcast<u32>(v);
    let magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) {
        return 0u;
    }
    if (magnitude == 0u) {
        return 0x80000000u;
    }
    if ((bits & 0x80000000u) != 0u) {
        return ~bits;
    }
    return bits | 0x80000000u;
}
