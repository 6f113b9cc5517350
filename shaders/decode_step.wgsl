// The decode loop's counter, advanced on the GPU at the end of each step so that a step's
// commands stay the same from token to token (decode_step.rs): step += 1, and the position id
// the next step's RoPE reads becomes first_position + step.
//
// Injected by the host: nothing (one thread).

struct Params {
    first_position: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> step: array<u32>;
@group(0) @binding(2) var<storage, read_write> positions: array<u32>;

@compute @workgroup_size(1)
fn advance() {
    let next = step[0] + 1u;
    step[0] = next;
    positions[0] = p.first_position + next;
}
