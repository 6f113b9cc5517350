// Top-k selection as a mask (topk.wgsl's select_keep: same contract, keys, ties and output),
// spread over many workgroups for long segments on GPUs: LLaVA-NeXT's stage 2 ranks about 2,900
// image rows, and one 256-thread workgroup reading them five times leaves a GPU's other compute
// units idle for the whole selection.
//
// The segment is cut into slices of TILE = WG·ITEMS scores, one workgroup each. The k-th largest
// key T is found by a radix select over three digits of its 32 bits (11, 11 and 10 bits, most
// significant first), each a histogram that every workgroup adds its slice's counts to:
//   pass 1 `histogram_first`  histogram of digit 0 over all keys;
//   pass 2 `histogram_next`   every workgroup decides digit 0 from pass 1's histogram (the same
//                             answer in each), then histograms digit 1 of the keys that match;
//   pass 3 `histogram_next`   the same for digit 1 → digit 2;
//   pass 4 `count_slices`     decides digit 2, so T and how many of its ties to keep, and counts
//                             each slice's keys above T and equal to it;
//   pass 5 `scatter_kept`     each workgroup adds the counts of the slices before its own to an
//                             exclusive scan of its slice and writes its kept rows' slots:
//                             seg_start + (keys above T before it) + min(ties before it, ties).
// Five dispatches whatever n is; a workgroup reads its slice five times and up to 2,048 histogram
// bins three times. Workgroup 0 of each pass records the decision it made (`Decision`) for the
// next pass; a decision is read only by a later dispatch, so no workgroup waits on another.
//
// The scratch buffer starts at zero (the launcher uploads zeros) and is left at zero: the last
// pass clears the histograms it no longer needs, so the same five dispatches can be replayed.
// Layout, in u32 words: the three histograms (2048 + 2048 + 1024 bins), three states of 4 words,
// then two counts per slice.
//
// Injected by the host (topk.rs `MULTI_SHAPE`, `multi_constants`): WG (= 256 threads: each owns
// 8 bins of an 11-bit digit while deciding), ITEMS (consecutive scores per thread), TILE =
// WG * ITEMS (a slice), COUNTS_AT (the scratch word where the per-slice counts start).
//#inject WG ITEMS TILE COUNTS_AT
//#include topk_select
//#include workgroup_scan


struct MultiParams {
    select: SelectParams,
    slices: u32,   // workgroups in every pass: ceil(n / TILE), at least 1
    digit: u32,    // histogram_next: the digit it histograms (1 or 2)
    _pad0: u32,
    _pad1: u32,
}

const HIST_WORDS: u32 = 5120u;     // 2048 + 2048 + 1024 bins
const STATE_AT: u32 = 5120u;       // 3 × (prefix, mask, ties, unused), then the counts

@group(0) @binding(0) var<uniform> p: MultiParams;
@group(0) @binding(1) var<storage, read> scores: array<f32>;
@group(0) @binding(2) var<storage, read_write> keep: array<u32>;
@group(0) @binding(3) var<storage, read_write> scratch: array<atomic<u32>>;

var<workgroup> local_hist: array<atomic<u32>, 2048>;
var<workgroup> chosen: vec2<u32>;          // (digit, ties still to keep)
var<workgroup> slice_counts: array<atomic<u32>, 2>;

// The parameters as every function reads them, laundered through `num_workgroups.z − 1` (0 at
// run time, opaque to the compiler) as topk_lanes.wgsl does: lavapipe compiles a variant per value
// of a uniform that a loop bound depends on alone.
var<private> q: SelectParams;
var<private> slices: u32;

fn launder(zero: u32) {
    let s = p.select;
    q = SelectParams(s.n + zero, s.k + zero, s.score_offset + zero, s.seg_start + zero,
                     s.total + zero, 0u, 0u, 0u);
    slices = p.slices + zero;
}

// k == 0, tested on the uniform block itself (laundered the same way): a value read back from
// the private `q` counts as non-uniform, and the barriers after an early return need uniform
// control flow.
fn nothing_kept(nwg: vec3<u32>) -> bool {
    return p.select.k + nwg.z - 1u == 0u;
}

// Digit r: its width, where it sits in the key, and where its histogram starts.
fn digit_bins(r: u32) -> u32 {
    return select(2048u, 1024u, r == 2u);
}

fn digit_shift(r: u32) -> u32 {
    return select(select(0u, 10u, r == 1u), 21u, r == 0u);
}

fn hist_at(r: u32) -> u32 {
    return 2048u * r;
}

// What the passes before this one decided: the digits fixed so far (`prefix` under `mask`) and
// how many keys that match them are still to be kept. Before digit 0: nothing fixed, k.
struct Decision {
    prefix: u32,
    mask: u32,
    ties: u32,
}

fn read_state(r: u32) -> Decision {
    let at = STATE_AT + 4u * r;
    return Decision(atomicLoad(&scratch[at]), atomicLoad(&scratch[at + 1u]),
                    atomicLoad(&scratch[at + 2u]));
}

fn write_state(r: u32, d: Decision) {
    let at = STATE_AT + 4u * r;
    atomicStore(&scratch[at], d.prefix);
    atomicStore(&scratch[at + 1u], d.mask);
    atomicStore(&scratch[at + 2u], d.ties);
}

// Digit r of the k-th largest key, from the finished histogram of digit r. Thread t owns the
// `per` digits just below the top t·per ones, so a prefix sum over threads counts the keys at or
// above each thread's lowest digit; the thread whose digits hold the k-th walks them.
fn decide(tid: u32, r: u32, before: Decision) -> Decision {
    let bins = digit_bins(r);
    let per = bins / WG;
    let top = hist_at(r) + bins - 1u - tid * per;   // this thread's highest digit's bin
    var sum = 0u;
    for (var j = 0u; j < per; j++) {
        sum += atomicLoad(&scratch[top - j]);
    }
    let at_or_above = scan_inclusive(tid, sum);
    var above = at_or_above - sum;
    if (above < before.ties && at_or_above >= before.ties) {
        for (var j = 0u; j < per; j++) {
            let count = atomicLoad(&scratch[top - j]);
            if (above + count >= before.ties) {
                chosen = vec2<u32>(bins - 1u - tid * per - j, before.ties - above);
                break;
            }
            above += count;
        }
    }
    let c = workgroupUniformLoad(&chosen);
    let shift = digit_shift(r);
    return Decision(before.prefix | (c.x << shift), before.mask | ((bins - 1u) << shift), c.y);
}

fn key_at(i: u32) -> u32 {
    return order_key(scores[q.score_offset + i]);
}

// Adds this slice's histogram of digit r, over the keys that match `d`, to the global one (a
// workgroup histogram first, so a crowded bin costs the global memory one add per workgroup).
fn add_histogram(tid: u32, slice: u32, r: u32, d: Decision) {
    let bins = digit_bins(r);
    for (var b = tid; b < bins; b += WG) {
        atomicStore(&local_hist[b], 0u);
    }
    workgroupBarrier();
    let end = min(slice * TILE + TILE, q.n);
    let shift = digit_shift(r);
    for (var i = slice * TILE + tid; i < end; i += WG) {
        let key = key_at(i);
        if ((key & d.mask) == d.prefix) {
            atomicAdd(&local_hist[(key >> shift) & (bins - 1u)], 1u);
        }
    }
    workgroupBarrier();
    for (var b = tid; b < bins; b += WG) {
        let count = atomicLoad(&local_hist[b]);
        if (count != 0u) {
            atomicAdd(&scratch[hist_at(r) + b], count);
        }
    }
}

fn start_decision() -> Decision {
    return Decision(0u, 0u, q.k);
}

@compute @workgroup_size(WG)
fn histogram_first(@builtin(workgroup_id) wg: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) tid: u32) {
    launder(nwg.z - 1u);
    if (nothing_kept(nwg)) {
        return;
    }
    add_histogram(tid, wg.x, 0u, start_decision());
}

// Passes 2 and 3: decide digit `p.digit − 1`, then histogram digit `p.digit`.
@compute @workgroup_size(WG)
fn histogram_next(@builtin(workgroup_id) wg: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) tid: u32) {
    launder(nwg.z - 1u);
    if (nothing_kept(nwg)) {
        return;
    }
    let r = p.digit + nwg.z - 1u;
    var before = start_decision();
    if (r == 2u) {
        before = read_state(0u);
    }
    let d = decide(tid, r - 1u, before);
    if (wg.x == 0u && tid == 0u) {
        write_state(r - 1u, d);
    }
    add_histogram(tid, wg.x, r, d);
}

@compute @workgroup_size(WG)
fn count_slices(@builtin(workgroup_id) wg: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) tid: u32) {
    launder(nwg.z - 1u);
    if (nothing_kept(nwg)) {
        return;
    }
    let d = decide(tid, 2u, read_state(1u));
    if (wg.x == 0u && tid == 0u) {
        write_state(2u, d);
    }
    if (tid < 2u) {
        atomicStore(&slice_counts[tid], 0u);
    }
    workgroupBarrier();
    let threshold = d.prefix;
    let end = min(wg.x * TILE + TILE, q.n);
    var above = 0u;
    var ties = 0u;
    for (var i = wg.x * TILE + tid; i < end; i += WG) {
        let key = key_at(i);
        above += select(0u, 1u, key > threshold);
        ties += select(0u, 1u, key == threshold);
    }
    atomicAdd(&slice_counts[0], above);
    atomicAdd(&slice_counts[1], ties);
    workgroupBarrier();
    if (tid < 2u) {
        atomicStore(&scratch[COUNTS_AT + 2u * wg.x + tid], atomicLoad(&slice_counts[tid]));
    }
}

// Rows outside the segment are always kept: in place before it, shifted after it. Spread over
// every workgroup of the last pass.
fn keep_outside(tid: u32, slice: u32) {
    let stride = slices * WG;
    for (var r = slice * WG + tid; r < q.seg_start; r += stride) {
        keep[r] = r;
    }
    let after = q.seg_start + q.n;
    for (var r = after + slice * WG + tid; r < q.total; r += stride) {
        keep[r - q.n + q.k] = r;
    }
}

// The slice's kept rows: an exclusive scan of (above, tie) flags packed 16 bits each (a slice
// holds at most 65,535 scores), on top of the counts of the slices before it.
fn scatter_slice(tid: u32, slice: u32) {
    let s = read_state(2u);
    let threshold = s.prefix;
    var base_above = 0u;
    var base_ties = 0u;
    for (var w = 0u; w < slice; w++) {
        base_above += atomicLoad(&scratch[COUNTS_AT + 2u * w]);
        base_ties += atomicLoad(&scratch[COUNTS_AT + 2u * w + 1u]);
    }
    let first = slice * TILE + tid * ITEMS;
    var flags: array<u32, ITEMS>;
    var sum = 0u;
    for (var j = 0u; j < ITEMS; j++) {
        var f = 0u;
        if (first + j < q.n) {
            let key = key_at(first + j);
            f = select(0u, 1u, key > threshold) + select(0u, 0x10000u, key == threshold);
        }
        flags[j] = f;
        sum += f;
    }
    var running = scan_inclusive(tid, sum) - sum;
    for (var j = 0u; j < ITEMS; j++) {
        let f = flags[j];
        let above_before = base_above + (running & 0xffffu);
        let ties_before = base_ties + (running >> 16u);
        let is_above = (f & 1u) != 0u;
        let is_tie = (f >> 16u) != 0u;
        if (is_above || (is_tie && ties_before < s.ties)) {
            keep[q.seg_start + above_before + min(ties_before, s.ties)] = q.seg_start + first + j;
        }
        running += f;
    }
}

@compute @workgroup_size(WG)
fn scatter_kept(@builtin(workgroup_id) wg: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) tid: u32) {
    launder(nwg.z - 1u);
    keep_outside(tid, wg.x);
    if (nothing_kept(nwg)) {
        return;
    }
    scatter_slice(tid, wg.x);
    // Leave the histograms at zero for the next selection (no pass reads them any more).
    for (var b = wg.x * WG + tid; b < HIST_WORDS; b += slices * WG) {
        atomicStore(&scratch[b], 0u);
    }
}
