// The top-k kernels' score keys (topk.wgsl, topk_lanes.wgsl): u32 keys whose unsigned order is
// the scores' float order, so a radix or bitwise search over keys ranks the scores.

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
