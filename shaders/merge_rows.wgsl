// merge_rows: dst[g, :] = mean of src[m, :] over the members m of group g, for g < groups.
//
// The groups come as one u32 list: `groups + 1` offsets, then the member rows, so group g's
// members are list[list[g] .. list[g + 1]] read from `groups + 1` on (CSR). A selection that
// merges what it drops (docs/pruning.md, "Merging the dropped patches") puts each kept patch
// first in its group, followed by the dropped patches that are most like it.
//
// One workgroup per group (a 2D grid past the per-dimension limit): its threads walk the row's
// columns as vec4s, consecutive threads on consecutive words, and each sums its columns over the
// members in list order, so the sum is the same whatever the GPU. Member lists are short (the
// dropped patches spread over the kept ones), so a group's sum is one pass over its members.
// A member >= src_rows (a bug the GPU cannot report) counts as a row of zeros; an empty group
// writes zeros.
//
// Injected by the host (merge.rs `WORKGROUP`): WG, threads per workgroup.
//#inject WG

struct Params {
    groups: u32,
    width4: u32,    // row width in vec4s (the launcher checks width % 4 == 0)
    src_rows: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> list: array<u32>;
@group(0) @binding(2) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> dst: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn merge_rows(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) grid: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let g = wg.x + wg.y * grid.x;
    if (g >= p.groups) {
        return;
    }
    let first = list[g];
    let end = list[g + 1u];
    let base = p.groups + 1u;
    let scale = 1.0 / f32(max(end - first, 1u));
    for (var c = tid; c < p.width4; c += WG) {
        var sum = vec4<f32>(0.0);
        for (var i = first; i < end; i += 1u) {
            let row = list[base + i];
            if (row < p.src_rows) {
                sum += src[row * p.width4 + c];
            }
        }
        dst[g * p.width4 + c] = sum * scale;
    }
}
