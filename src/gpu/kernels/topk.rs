//! Top-k selection and order-preserving row compaction (STAR pruning): the launchers for
//! shaders/topk.wgsl, topk_lanes.wgsl and topk_multi.wgsl, and their CPU references.
//!
//! Pruning is three steps on the GPU, with nothing read back:
//! 1. [`select`] turns the scores of a segment of rows into the ascending row-index list of the
//!    rows that survive: every row outside the segment plus the `k` best-scored rows inside it
//!    (ties go to the lower index, NaN counts as the smallest score). Stage 1 (the segment is the
//!    whole list of patch tokens) and stage 2 (the visual segment of a text+image sequence) are
//!    the same call with a different [`Segment`]; [`topk`] is the stage-1 shorthand.
//! 2. [`gather_rows`] copies `dst[r] = src[idx[r]]` for each buffer that must shrink: hidden
//!    states `[T, d]`, K/V caches `[C, Hkv·D]` (the first `T − n + k` rows), position ids `[T]`.
//! 3. The caller swaps the compacted buffers in.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::device::Gpu;
use crate::gpu::kernels::{check_lanes, grid, Constants, Dispatch, KernelCall, Shader, LANE_WIDTH};
use crate::gpu::tensor::{DType, Tensor};

/// How topk.wgsl and topk_multi.wgsl split the work (their WG, ITEMS and TILE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopkShape {
    /// Threads per workgroup, for every entry point: 256. topk.wgsl's radix select gives each
    /// thread one of the 256 values of an 8-bit digit; topk_multi.wgsl's gives each 8 (or 4) of
    /// the 2,048 (or 1,024) values of its 11- (or 10-) bit digits.
    pub workgroup: u32,
    /// Consecutive scores per thread in a scan (topk.wgsl) or a slice (topk_multi.wgsl).
    pub items: u32,
}

pub const SHAPE: TopkShape = TopkShape {
    workgroup: 256,
    items: 4,
};

impl TopkShape {
    /// Scores per scan tile; the scan packs two per-tile counts in 16 bits each.
    pub const fn tile(&self) -> u32 {
        self.workgroup * self.items
    }

    pub fn constants(&self) -> Constants {
        Constants::new(&[
            ("WG", self.workgroup),
            ("ITEMS", self.items),
            ("TILE", self.tile()),
        ])
    }
}

/// How topk_multi.wgsl splits a segment (its WG, ITEMS and TILE): one slice of
/// `workgroup · items` scores per workgroup.
pub const MULTI_SHAPE: TopkShape = TopkShape {
    workgroup: 256,
    items: 2,
};

/// Segments longer than this use the multi-workgroup select on devices that do not prefer the
/// lanes layouts: from 2,048 scores one 256-thread workgroup reads 8 or more per thread in each of
/// its five passes while the rest of a GPU waits, and the multi-workgroup select's four extra
/// launches cost a few microseconds. LLaVA-NeXT's stage 2 (about 2,900 image rows) is above it;
/// stage 1 (576 patches per view) and LLaVA-1.5 are below.
pub const MULTI_FROM_SCORES: usize = 2048;

/// u32 words of topk_multi.wgsl's scratch before the per-slice counts (its COUNTS_AT): three
/// histograms (2,048, 2,048 and 1,024 bins) and three decisions of 4 words.
const MULTI_FIXED_WORDS: usize = 5120 + 12;

/// The constants of topk_multi.wgsl.
pub fn multi_constants() -> Constants {
    MULTI_SHAPE
        .constants()
        .with(Constants::new(&[("COUNTS_AT", MULTI_FIXED_WORDS as u32)]))
}

/// Words a gather workgroup copies at least (several rows per workgroup when rows are narrower).
const GATHER_WORDS_PER_WORKGROUP: usize = 1024;

/// Where the scored rows sit in a sequence: rows `[start, start + len)` of a `total`-row
/// sequence, so the selected index list is `total − len + k` long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub total: usize,
    pub start: usize,
    pub len: usize,
}

impl Segment {
    /// The whole list is the segment (stage 1: the list is the kept patch indices).
    pub fn whole(len: usize) -> Self {
        Self {
            total: len,
            start: 0,
            len,
        }
    }

    /// Length of the row-index list that keeps `k` rows of the segment.
    pub fn kept_rows(&self, k: usize) -> usize {
        (self.total + k).saturating_sub(self.len)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SelectParams {
    n: u32,
    k: u32,
    score_offset: u32,
    seg_start: u32,
    total: u32,
    _pad: [u32; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct GatherParams {
    rows: u32,
    width: u32,
    src_rows: u32,
    idx_offset: u32,
    rows_per_group: u32,
    _pad: [u32; 3],
}

fn to_u32(name: &str, value: usize) -> Result<u32> {
    u32::try_from(value).map_err(|_| {
        Error::argument(
            name,
            format!("{value} does not fit the kernels' 32-bit indices"),
        )
    })
}

/// Which select kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectLayout {
    /// topk.wgsl's `select_keep`: one 256-thread workgroup, a radix select over 8-bit digits.
    Workgroup,
    /// topk_lanes.wgsl: one 8-lane subgroup, the k-th key found bit by bit with subgroup sums,
    /// no barrier. For drivers that run shaders on CPU SIMD lanes.
    Lanes,
    /// topk_multi.wgsl: five dispatches of one workgroup per 512-score slice, a radix select
    /// whose histograms every workgroup adds to. For long segments where the lanes layout does
    /// not run (GPUs).
    Multi,
}

impl SelectLayout {
    /// `Lanes` for up to [`LANES_MAX_SCORES`] scores on a CPU adapter whose subgroups hold its 8
    /// lanes (the rule of `MatmulLayout::for_device`); elsewhere `Multi` past
    /// [`MULTI_FROM_SCORES`] scores and `Workgroup` up to it.
    pub fn for_device(gpu: &Gpu, n: usize) -> Self {
        if gpu.caps.prefers_lanes(LANE_WIDTH) && n <= LANES_MAX_SCORES {
            SelectLayout::Lanes
        } else if n > MULTI_FROM_SCORES {
            SelectLayout::Multi
        } else {
            SelectLayout::Workgroup
        }
    }
}

/// The most 8-score steps topk_lanes.wgsl takes (MAX_STEPS): 35 passes over them stay under
/// lavapipe's limit of 65,535 loop iterations per invocation.
pub const LANE_STEPS: u32 = 1024;

/// The longest segment topk_lanes.wgsl selects from: 8 lanes × [`LANE_STEPS`].
pub const LANES_MAX_SCORES: usize = 8 * LANE_STEPS as usize;

/// The constants of topk_lanes.wgsl.
pub fn lanes_constants() -> Constants {
    Constants::new(&[("MAX_STEPS", LANE_STEPS)])
}

/// Select the `k` largest of `scores[score_offset .. score_offset + segment.len]` and write the
/// ascending row-index list of `segment` (every row outside it, and `segment.start + i` for
/// each kept score `i`) into `out[0 .. segment.kept_rows(k)]`; later elements of `out` are left
/// untouched.
///
/// Ties go to the lower index; NaN scores are smaller than every other value (also −∞) and tie
/// with each other; −0 and +0 are equal. Exact for any length the u32 indices hold, in the
/// layout this device runs best ([`SelectLayout::for_device`]; see the shaders): one dispatch
/// of one workgroup, or five of many for a long segment where the lanes layout does not run.
pub fn select(
    gpu: &Gpu,
    scores: &Tensor,
    score_offset: usize,
    segment: Segment,
    k: usize,
    out: &Tensor,
) -> Result<Vec<Dispatch>> {
    let layout = SelectLayout::for_device(gpu, segment.len);
    select_in(gpu, layout, scores, score_offset, segment, k, out)
}

/// [`select`] with the layout the caller chooses (tests and `bench kernels` run every one).
#[allow(clippy::too_many_arguments)]
pub fn select_in(
    gpu: &Gpu,
    layout: SelectLayout,
    scores: &Tensor,
    score_offset: usize,
    segment: Segment,
    k: usize,
    out: &Tensor,
) -> Result<Vec<Dispatch>> {
    check_select(scores, score_offset, segment, k, out)?;
    let n = segment.len;
    if layout == SelectLayout::Lanes {
        check_lanes(gpu, "top-k")?;
    }
    if layout == SelectLayout::Lanes && n > LANES_MAX_SCORES {
        return Err(Error::argument(
            "layout",
            format!("the lanes top-k takes at most {LANES_MAX_SCORES} scores, not {n}"),
        ));
    }
    let params = SelectParams {
        n: to_u32("n", n)?,
        k: to_u32("k", k)?,
        score_offset: to_u32("score_offset", score_offset)?,
        seg_start: to_u32("segment.start", segment.start)?,
        total: to_u32("segment.total", segment.total)?,
        _pad: [0; 3],
    };
    let shape = format!("n={n} k={k} T={}", segment.total);
    let list_bytes = 4 * segment.kept_rows(k) as u64;
    let (call, passes, name) = match layout {
        // Four histogram passes and one scan pass, each a comparison per score. Neither entry
        // point of topk.wgsl has a feature-specific path: one module serves every device.
        SelectLayout::Workgroup => (
            KernelCall::new(gpu, Shader::Topk, "select_keep")
                .flags(Default::default())
                .constants(SHAPE.constants()),
            5,
            "topk_select",
        ),
        // 33 counting passes and one scan pass, each reading the scores.
        SelectLayout::Lanes => (
            KernelCall::new(gpu, Shader::TopkLanes, "select_keep_lanes")
                .constants(lanes_constants()),
            34,
            "topk_select_lanes",
        ),
        SelectLayout::Multi => return select_multi(gpu, &params, scores, out, shape, list_bytes),
    };
    let d = call
        .params(&params)
        .read(&scores.buffer)
        .read_write(&out.buffer)
        .build(
            name,
            shape,
            [1, 1, 1],
            passes * n as u64,
            passes * 4 * n as u64 + list_bytes,
        )?;
    Ok(vec![d])
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct MultiParams {
    select: SelectParams,
    slices: u32,
    digit: u32,
    _pad: [u32; 2],
}

/// topk_multi.wgsl's five passes over one slice of scores per workgroup, with their scratch
/// (histograms, decisions, per-slice counts) uploaded as zeros; the last pass leaves the
/// histograms at zero again, so the list can be replayed.
fn select_multi(
    gpu: &Gpu,
    select: &SelectParams,
    scores: &Tensor,
    out: &Tensor,
    shape: String,
    list_bytes: u64,
) -> Result<Vec<Dispatch>> {
    let n = select.n as usize;
    let slices = n.div_ceil(MULTI_SHAPE.tile() as usize).max(1);
    let words = MULTI_FIXED_WORDS + 2 * slices;
    let scratch = Tensor::from_u32(gpu, &[words], &vec![0; words], "topk_multi scratch")?;
    let groups = [to_u32("slices", slices)?, 1, 1];
    let pass = |entry: &'static str, name: &'static str, digit: u32, reads: u64| {
        let params = MultiParams {
            select: *select,
            slices: groups[0],
            digit,
            _pad: [0; 2],
        };
        KernelCall::new(gpu, Shader::TopkMulti, entry)
            .flags(Default::default())
            .constants(multi_constants())
            .params(&params)
            .read(&scores.buffer)
            .read_write(&out.buffer)
            .read_write(&scratch.buffer)
            .build(name, shape.clone(), groups, reads, 4 * reads)
    };
    let n = n as u64;
    let mut last = pass("scatter_kept", "topk_multi_scatter", 0, n)?;
    last.bytes += list_bytes;
    Ok(vec![
        pass("histogram_first", "topk_multi_histogram", 0, n)?,
        pass("histogram_next", "topk_multi_histogram", 1, n)?,
        pass("histogram_next", "topk_multi_histogram", 2, n)?,
        pass("count_slices", "topk_multi_count", 0, n)?,
        last,
    ])
}

/// The arguments of [`select`] fit together: k ≤ n, the segment lies in the sequence, the scores
/// in their tensor, and `out` holds the whole index list.
fn check_select(
    scores: &Tensor,
    score_offset: usize,
    segment: Segment,
    k: usize,
    out: &Tensor,
) -> Result<()> {
    let Segment {
        total,
        start,
        len: n,
    } = segment;
    if k > n {
        return Err(Error::argument(
            "k",
            format!("cannot keep {k} of the {n} scored rows (k must be at most n)"),
        ));
    }
    if start.checked_add(n).is_none_or(|end| end > total) {
        return Err(Error::argument(
            "segment",
            format!(
                "rows {start}..{} lie outside a sequence of {total} rows",
                start.saturating_add(n)
            ),
        ));
    }
    if scores.dtype != DType::F32 {
        return Err(Error::shape(
            "topk select",
            format!("scores must be f32, got {:?}", scores.dtype),
        ));
    }
    if score_offset
        .checked_add(n)
        .is_none_or(|end| end > scores.numel())
    {
        return Err(Error::shape(
            "topk select",
            format!(
                "scores {score_offset}..{} lie outside the scores tensor of shape {:?}",
                score_offset.saturating_add(n),
                scores.shape
            ),
        ));
    }
    let len = segment.kept_rows(k);
    if out.dtype != DType::U32 || out.numel() < len {
        return Err(Error::shape(
            "topk select",
            format!(
                "the index list needs a u32 tensor of at least {len} elements, got {:?} {:?}",
                out.dtype, out.shape
            ),
        ));
    }
    Ok(())
}

/// Stage-1 shorthand: the ascending indices (in `0..n`) of the `k` largest of
/// `scores[score_offset .. score_offset + n]`, written to `out[0..k]`.
pub fn topk(
    gpu: &Gpu,
    scores: &Tensor,
    score_offset: usize,
    n: usize,
    k: usize,
    out: &Tensor,
) -> Result<Vec<Dispatch>> {
    select(gpu, scores, score_offset, Segment::whole(n), k, out)
}

/// Rows and words per row of a tensor viewed as rows along its first dimension.
fn rows_width(t: &Tensor) -> (usize, usize) {
    let rows = t.shape.first().copied().unwrap_or(1);
    let width = t.shape.iter().skip(1).product();
    (rows, width)
}

/// `dst[r, ..] = src[idx[idx_offset + r], ..]` for `r < rows`. Rows run along the first
/// dimension (`[T]`, `[T, d]`, `[C, H, D]` alike), `src` and `dst` must have the same dtype and
/// row width and be different buffers; the copy is bitwise. Rows of `dst` past `rows` are left
/// untouched (a KV cache compacts only its first rows). An index that is not below `src`'s
/// row count gives a row of zeros (the GPU cannot report it).
pub fn gather_rows(
    gpu: &Gpu,
    src: &Tensor,
    idx: &Tensor,
    idx_offset: usize,
    rows: usize,
    dst: &Tensor,
) -> Result<Dispatch> {
    check_gather(src, idx, idx_offset, rows, dst)?;
    let (src_rows, width) = rows_width(src);
    let rows_per_group = gather_rows_per_group(width);
    let params = GatherParams {
        rows: rows as u32,
        width: width as u32,
        src_rows: src_rows as u32,
        idx_offset: to_u32("idx_offset", idx_offset)?,
        rows_per_group: rows_per_group as u32,
        _pad: [0; 3],
    };
    let groups = rows.div_ceil(rows_per_group) as u32;
    let bytes = 8 * (rows * width) as u64 + 4 * rows as u64;
    let kernel = match src.dtype {
        DType::F32 => "gather_rows_f32",
        DType::U32 => "gather_rows_u32",
        DType::F16 => {
            return Err(Error::shape(
                "gather_rows",
                "gathers 32-bit elements; an f16 tensor's rows are not gathered",
            ))
        }
    };
    KernelCall::new(gpu, Shader::Topk, "gather_rows")
        .flags(Default::default())
        .constants(SHAPE.constants())
        .params(&params)
        .read(&idx.buffer)
        .read(&src.buffer)
        .read_write(&dst.buffer)
        .build(
            kernel,
            format!("rows={rows} width={width}"),
            grid(
                groups.max(1),
                gpu.limits.max_compute_workgroups_per_dimension,
            ),
            0,
            bytes,
        )
}

/// Rows one gather workgroup copies: a whole workgroup per row from half a workgroup-load of
/// words up, else blocks of about [`GATHER_WORDS_PER_WORKGROUP`] words.
fn gather_rows_per_group(width: usize) -> usize {
    if width >= GATHER_WORDS_PER_WORKGROUP / 2 || width == 0 {
        1
    } else {
        GATHER_WORDS_PER_WORKGROUP / width
    }
}

/// The arguments of [`gather_rows`] fit together and every offset fits the shader's u32s.
fn check_gather(
    src: &Tensor,
    idx: &Tensor,
    idx_offset: usize,
    rows: usize,
    dst: &Tensor,
) -> Result<()> {
    let (width, (dst_rows, dst_width)) = (rows_width(src).1, rows_width(dst));
    if src.dtype != dst.dtype || width != dst_width {
        return Err(Error::shape(
            "gather_rows",
            format!(
                "src {:?} {:?} and dst {:?} {:?} need the same dtype and row width",
                src.dtype, src.shape, dst.dtype, dst.shape
            ),
        ));
    }
    if rows > dst_rows {
        return Err(Error::argument(
            "rows",
            format!("{rows} rows do not fit dst of shape {:?}", dst.shape),
        ));
    }
    if idx.dtype != DType::U32
        || idx_offset
            .checked_add(rows)
            .is_none_or(|end| end > idx.numel())
    {
        return Err(Error::shape(
            "gather_rows",
            format!(
                "indices {idx_offset}..{} must lie in a u32 index tensor, got {:?} {:?}",
                idx_offset.saturating_add(rows),
                idx.dtype,
                idx.shape
            ),
        ));
    }
    if *src.buffer == *dst.buffer {
        return Err(Error::argument(
            "dst",
            "must be a different buffer from src (gather is not in place)",
        ));
    }
    let words = rows * width;
    // The shader computes word offsets in 32 bits.
    if words > u32::MAX as usize || rows > u32::MAX as usize || src.numel() > u32::MAX as usize {
        return Err(Error::shape(
            "gather_rows",
            format!("{rows} rows of {width} words are too many for 32-bit indexing"),
        ));
    }
    Ok(())
}

/// The one CPU top-k: [`select`]'s reference and the host selections' (`prune::top_k`, used by
/// VisPruner). The ascending indices of the `k` largest scores (every index if `k` ≥ the
/// length), by a stable sort on descending score: ties go to the lower index, −0 and +0 are
/// equal, NaN of either sign is smaller than every number (−∞ included) and ties with other
/// NaNs, exactly as on the GPU.
pub fn reference(scores: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // Stable: equal scores keep ascending index order.
    order.sort_by(|&a, &b| {
        let (x, y) = (scores[a], scores[b]);
        match (x.is_nan(), y.is_nan()) {
            (true, true) => std::cmp::Ordering::Equal,
            (true, false) => std::cmp::Ordering::Greater,
            (false, true) => std::cmp::Ordering::Less,
            (false, false) => y.partial_cmp(&x).expect("not NaN"),
        }
    });
    let mut kept = order[..k.min(scores.len())].to_vec();
    kept.sort_unstable();
    kept
}

/// CPU reference for [`select`]: the row-index list of `segment` keeping the top `k` of
/// `scores` (the segment's `segment.len` scores).
pub fn reference_sequence(scores: &[f32], segment: Segment, k: usize) -> Vec<u32> {
    assert_eq!(scores.len(), segment.len, "one score per segment row");
    let mut list: Vec<u32> = (0..segment.start as u32).collect();
    list.extend(
        reference(scores, k)
            .into_iter()
            .map(|i| (segment.start + i) as u32),
    );
    list.extend((segment.start + segment.len) as u32..segment.total as u32);
    list
}

/// CPU reference for [`gather_rows`] on raw 32-bit words: `width` words per row.
pub fn gather_reference(src: &[u32], width: usize, idx: &[u32]) -> Vec<u32> {
    let mut out = Vec::with_capacity(idx.len() * width);
    for &i in idx {
        out.extend_from_slice(&src[i as usize * width..(i as usize + 1) * width]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// topk.wgsl's and topk_multi.wgsl's radix selects and scans assume these relations.
    #[test]
    fn shader_structure_matches_the_shape() {
        // One thread per value of an 8-bit digit (the histogram is [WG]).
        assert_eq!(SHAPE.workgroup, 256);
        // Per-tile counts are packed 16 bits each.
        assert!(SHAPE.tile() < 1 << 16);
        // Each thread owns a whole number of the 2,048 and 1,024 bins while deciding a digit.
        assert_eq!(2048 % MULTI_SHAPE.workgroup, 0);
        assert_eq!(1024 % MULTI_SHAPE.workgroup, 0);
        assert!(MULTI_SHAPE.tile() < 1 << 16);
        // The counts start after the histograms and the three 4-word decisions.
        assert_eq!(MULTI_FIXED_WORDS, 2048 + 2048 + 1024 + 3 * 4);
    }
}
