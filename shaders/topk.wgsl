// Top-k selection as a mask, and the order-preserving row gather that applies it (STAR pruning).
//
// select_keep: from the n scores of a segment, keep the k largest (ties -> lower index) and write
// the ascending row-index list of a sequence of `total` rows in which the segment occupies rows
// [seg_start, seg_start + n): every row outside the segment, plus seg_start + i for each kept i.
// Stage 1 is the degenerate case seg_start = 0, total = n (the list is just the kept indices).
//
// Why radix select rather than a sort or pairwise ranks: the contract is a mask in raster order,
// so nothing needs sorting, only the k-th largest value T and how many of its ties to keep.
// Scores map to u32 keys whose unsigned order is the float order (NaN -> 0, below -inf, so NaN is
// the smallest value; -0 and +0 share one key, as they compare equal). Four 8-bit histogram
// passes, most significant digit first, narrow the candidates to exactly the key T: O(n) work
// per pass, exact, deterministic, no data-dependent memory. The pairwise-rank alternative is
// O(n^2) (16.7M comparisons at n = 4096) and much slower on small or software devices.
//
// The mask is then "key > T, or key == T and fewer than `ties` equal keys precede it", and the
// output slot of a kept element is (#greater before it) + min(#ties before it, ties): one
// exclusive scan over two counters packed into one u32 (16 bits each; a tile holds 1024
// elements) gives both the mask and the scatter address, so selection, prefix sum and scatter
// are a single pass.
//
// One 256-thread workgroup does it all, looping over the scores (4 histogram passes + 1 scan
// pass read them 5 times). Up to a couple of thousand scores one dispatch of one workgroup
// costs microseconds on a GPU; past 2,048 the launcher spreads the same select over many
// workgroups (topk_multi.wgsl). Any n < 2^32 works here, only slower.
//
// gather_rows: dst[r, :] = src[idx[r], :] for r < rows, 32-bit words (f32 or u32 alike, bound as
// u32 so NaN payloads are copied bit-for-bit). A workgroup copies one whole row when rows are
// wide (hidden states, KV caches: one index load, consecutive threads on consecutive words, no
// per-word division, which software and many GPU ALUs do slowly), or a block of about 1024
// words made of several rows when rows are narrow (position ids), so no thread idles. Work
// groups spread over a 2D grid when they exceed the per-dimension limit. An index >= src_rows
// (a bug the GPU cannot report) writes a row of zeros rather than reading out of bounds.
//
// Injected by the host (topk.rs `TopkShape`): WG (threads per workgroup, = 256, one per digit
// value), ITEMS (consecutive scores per thread in the scan pass), TILE = WG * ITEMS.
//#inject WG ITEMS TILE
//#include topk_select
//#include workgroup_scan


const NONE: u32 = 0xffffffffu;    // "no key": above every real key (the largest is +inf's)

@group(0) @binding(0) var<uniform> p: SelectParams;
@group(0) @binding(1) var<storage, read> scores: array<f32>;
@group(0) @binding(2) var<storage, read_write> keep: array<u32>;

var<workgroup> hist: array<atomic<u32>, WG>;   // one counter per digit value
var<workgroup> chosen: vec2<u32>;   // (digit, ties still to keep) decided by one thread

@compute @workgroup_size(WG)
fn select_keep(@builtin(local_invocation_index) tid: u32) {
    // Rows outside the segment are always kept, in place before it and shifted after it.
    for (var r = tid; r < p.seg_start; r += WG) {
        keep[r] = r;
    }
    let after = p.seg_start + p.n;
    for (var r = after + tid; r < p.total; r += WG) {
        keep[r - p.n + p.k] = r;
    }
    if (p.k == 0u) {
        return;
    }

    // Radix select of the k-th largest key: `prefix` holds the digits fixed so far, `ties` how
    // many of the keys that match them are still to be kept.
    var prefix = 0u;
    var mask = 0u;
    var ties = p.k;
    for (var round = 0u; round < 4u; round++) {
        let shift = 24u - 8u * round;
        atomicStore(&hist[tid], 0u);
        workgroupBarrier();
        for (var i = tid; i < p.n; i += WG) {
            let key = order_key(scores[p.score_offset + i]);
            if ((key & mask) == prefix) {
                atomicAdd(&hist[(key >> shift) & 255u], 1u);
            }
        }
        workgroupBarrier();
        // Thread t looks at digit 255 - t, so an inclusive prefix sum over threads counts the
        // candidates with a digit >= that digit.
        let digit = 255u - tid;
        let count = atomicLoad(&hist[digit]);
        let at_or_above = scan_inclusive(tid, count);
        let above = at_or_above - count;
        if (above < ties && at_or_above >= ties) {
            chosen = vec2<u32>(digit, ties - above);
        }
        workgroupBarrier();
        let c = chosen;
        prefix |= c.x << shift;
        mask |= 255u << shift;
        ties = c.y;
        workgroupBarrier();
    }
    let threshold = prefix;

    // Mask + exclusive scan + scatter, one tile of 1024 consecutive scores at a time. Low 16
    // bits count keys above the threshold, high 16 bits keys equal to it.
    var base_above = 0u;
    var base_ties = 0u;
    for (var tile = 0u; tile < p.n; tile += TILE) {
        var flags: array<u32, ITEMS>;
        var sum = 0u;
        for (var j = 0u; j < ITEMS; j++) {
            let i = tile + tid * ITEMS + j;
            var f = 0u;
            if (i < p.n) {
                let key = order_key(scores[p.score_offset + i]);
                f = select(0u, 1u, key > threshold) + select(0u, 0x10000u, key == threshold);
            }
            flags[j] = f;
            sum += f;
        }
        let inclusive = scan_inclusive(tid, sum);
        let tile_total = scan_buf[WG - 1u];
        var running = inclusive - sum;
        for (var j = 0u; j < ITEMS; j++) {
            let f = flags[j];
            let above_before = base_above + (running & 0xffffu);
            let ties_before = base_ties + (running >> 16u);
            let is_above = (f & 1u) != 0u;
            let is_tie = (f >> 16u) != 0u;
            if (is_above || (is_tie && ties_before < ties)) {
                let i = tile + tid * ITEMS + j;
                keep[p.seg_start + above_before + min(ties_before, ties)] = p.seg_start + i;
            }
            running += f;
        }
        base_above += tile_total & 0xffffu;
        base_ties += tile_total >> 16u;
        workgroupBarrier();
    }
}

struct GatherParams {
    rows: u32,            // output rows
    width: u32,           // 32-bit words per row
    src_rows: u32,        // rows in src (indices at or past it give zero rows)
    idx_offset: u32,      // index of idx[0] in the index buffer
    rows_per_group: u32,  // rows one workgroup copies: 1 for rows of >= 512 words
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> g: GatherParams;
@group(0) @binding(1) var<storage, read> idx: array<u32>;
@group(0) @binding(2) var<storage, read> src: array<u32>;
@group(0) @binding(3) var<storage, read_write> dst: array<u32>;

fn source_row(r: u32) -> u32 {
    return idx[g.idx_offset + r];
}

@compute @workgroup_size(WG)
fn gather_rows(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let first = (wg.x + wg.y * groups.x) * g.rows_per_group;
    if (first >= g.rows) {
        return;
    }
    if (g.rows_per_group == 1u) {
        // Wide rows: the whole workgroup walks one row, one index load, no division.
        let s = source_row(first);
        let valid = s < g.src_rows;
        for (var c = tid; c < g.width; c += WG) {
            var v = 0u;
            if (valid) {
                v = src[s * g.width + c];
            }
            dst[first * g.width + c] = v;
        }
        return;
    }
    // Narrow rows (position ids, small heads): several rows per workgroup, flat over words.
    let count = min(g.rows_per_group, g.rows - first) * g.width;
    for (var i = tid; i < count; i += WG) {
        let r = first + i / g.width;
        let c = i % g.width;
        let s = source_row(r);
        var v = 0u;
        if (s < g.src_rows) {
            v = src[s * g.width + c];
        }
        dst[r * g.width + c] = v;
    }
}
