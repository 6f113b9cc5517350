// Top-k selection as a mask (topk.wgsl's select_keep, same contract and output), laid out for
// drivers that run shaders on CPU SIMD units: one 8-lane subgroup, no workgroup memory, no
// barrier. topk.wgsl's 256-thread radix select passes two dozen barriers, which such a driver
// runs as switches between the workgroup's 32 subgroups (3.7 ms for 196 scores on lavapipe,
// longer than the whole projector).
//
// The k-th largest key T is found bit by bit, most significant first: T keeps a bit when at
// least k keys are ≥ T with that bit set. 33 counting passes over the scores (score i = lane +
// 8j), each a comparison per score and one subgroupAdd; the scores stay in the CPU's cache. (A
// private array holding them took lavapipe's LLVM five seconds to compile.) The keys, the ties
// and the output slots are topk.wgsl's: a kept score's slot is seg_start + (keys above T
// before it) + min(ties before it, ties to keep), from subgroup exclusive scans in index order.
//
// Segments of at most 8·MAX_STEPS scores only (the launcher uses topk.wgsl beyond): lavapipe
// stops any invocation after 65,535 loop iterations in all (its loop limiter), which 35 passes
// over 1,024 steps stay under.
//
// Without subgroups (never chosen by the launcher, kept correct) the sums and scans go through
// workgroup memory with barriers.
//
// Injected by the host (topk.rs `LANE_STEPS`): MAX_STEPS, the most 8-score steps.
//#inject MAX_STEPS
//#include topk_select


const LANES: u32 = 8u;

@group(0) @binding(0) var<uniform> p: SelectParams;
@group(0) @binding(1) var<storage, read> scores: array<f32>;
@group(0) @binding(2) var<storage, read_write> keep: array<u32>;


// The parameters as every function reads them: `p`'s fields plus `opaque_zero`, 0 at run time
// but not a constant a compiler can see (num_workgroups.z - 1). lavapipe compiles a new variant
// of a shader for every value of a uniform that a loop bound or a branch depends on alone
// ("inline uniforms"); with n and k in them, every new segment length cost seconds of LLVM.
var<private> q: SelectParams;

fn launder(zero: u32) {
    q = SelectParams(p.n + zero, p.k + zero, p.score_offset + zero, p.seg_start + zero,
                     p.total + zero, 0u, 0u, 0u);
}

//#if SUBGROUPS
fn lanes_sum(x: u32) -> u32 {
    return subgroupAdd(x);
}

fn lanes_before(x: u32) -> u32 {
    return subgroupExclusiveAdd(x);
}
//#else
var<workgroup> swap: array<u32, LANES>;
var<private> lane_id: u32;

fn lanes_sum(x: u32) -> u32 {
    swap[lane_id] = x;
    workgroupBarrier();
    var total = 0u;
    for (var l = 0u; l < LANES; l++) {
        total += swap[l];
    }
    workgroupBarrier();
    return total;
}

fn lanes_before(x: u32) -> u32 {
    swap[lane_id] = x;
    workgroupBarrier();
    var before = 0u;
    for (var l = 0u; l < lane_id; l++) {
        before += swap[l];
    }
    workgroupBarrier();
    return before;
}
//#endif

// Score steps: step j covers scores 8j .. 8j + 7, this lane's is lane + 8j (≤ MAX_STEPS).
fn steps() -> u32 {
    return min((q.n + LANES - 1u) / LANES, MAX_STEPS);
}

// This lane's key of step j (a score past the segment reads its last one, and is not counted).
fn key_of(lane: u32, j: u32) -> u32 {
    return order_key(scores[q.score_offset + min(lane + LANES * j, q.n - 1u)]);
}

// How many of the segment's keys are ≥ `at` (`strict`: > `at`).
fn count_keys(lane: u32, at: u32, strict: bool) -> u32 {
    var c = 0u;
    for (var j = 0u; j < steps(); j++) {
        let key = key_of(lane, j);
        let counted = select(key >= at, key > at, strict);
        c += select(0u, 1u, lane + LANES * j < q.n && counted);
    }
    return lanes_sum(c);
}

// The k-th largest key: the largest T with at least k keys ≥ T, built a bit at a time.
fn kth_key(lane: u32) -> u32 {
    var t = 0u;
    for (var bit = 32u; bit > 0u; bit--) {
        let candidate = t | (1u << (bit - 1u));
        if (count_keys(lane, candidate, false) >= q.k) {
            t = candidate;
        }
    }
    return t;
}

@compute @workgroup_size(8)
fn select_keep_lanes(@builtin(local_invocation_index) tid: u32,
                     @builtin(num_workgroups) nwg: vec3<u32>,
//#if SUBGROUPS
                     @builtin(subgroup_invocation_id) sg_lane: u32,
//#endif
) {
//#if SUBGROUPS
    let lane = sg_lane;
//#else
    let lane = tid;
    lane_id = tid;
//#endif
    launder(nwg.z - 1u);
    // Rows outside the segment are always kept, in place before it and shifted after it.
    for (var r = lane; r < q.seg_start; r += LANES) {
        keep[r] = r;
    }
    let after = q.seg_start + q.n;
    for (var r = after + lane; r < q.total; r += LANES) {
        keep[r - q.n + q.k] = r;
    }
    if (q.k == 0u) {
        return;
    }
    let threshold = kth_key(lane);
    let ties = q.k - count_keys(lane, threshold, true);
    // In index order: each step's 8 scores, their kept slots from exclusive scans.
    var above_done = 0u;
    var ties_done = 0u;
    for (var j = 0u; j < steps(); j++) {
        let i = lane + LANES * j;
        let key = key_of(lane, j);
        let is_above = i < q.n && key > threshold;
        let is_tie = i < q.n && key == threshold;
        let above_before = above_done + lanes_before(select(0u, 1u, is_above));
        let ties_before = ties_done + lanes_before(select(0u, 1u, is_tie));
        if (is_above || (is_tie && ties_before < ties)) {
            keep[q.seg_start + above_before + min(ties_before, ties)] = q.seg_start + i;
        }
        above_done += lanes_sum(select(0u, 1u, is_above));
        ties_done += lanes_sum(select(0u, 1u, is_tie));
    }
}
