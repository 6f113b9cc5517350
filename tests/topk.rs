//! Top-k selection, the sequence index list and the row gather against CPU references: random
//! scores, scores with many ties, NaN and infinities, scores at an offset, the full
//! select → gather pipeline (bit-for-bit), and the errors for bad arguments. Every selection runs
//! in all three layouts (one 256-thread workgroup; one 8-lane subgroup for CPU adapters; one
//! workgroup per 512-score slice, run twice to show its scratch is left ready for a replay).

mod common;

use common::*;
use llava_wgpu::gpu::kernels::topk::{self, Segment, SelectLayout};
use llava_wgpu::gpu::kernels::Dispatch;
use llava_wgpu::gpu::{DType, Gpu, Recorder, Tensor};
use llava_wgpu::Error;
use rand::Rng;

/// What a poisoned (never written) u32 element reads back as.
const POISON: u32 = 0x7fc0_0000;

/// Run `select` on `scores[offset..offset + segment.len]` in every layout (the lanes one up to
/// its largest segment) and return the list, checking that each kernel wrote exactly
/// `segment.kept_rows(k)` elements and nothing past them, and that the lists are the same.
fn run_select(
    gpu: &Gpu,
    scores: &Tensor,
    offset: usize,
    segment: Segment,
    k: usize,
    seed: u64,
) -> Vec<u32> {
    let run = |layout| run_select_in(gpu, layout, scores, offset, segment, k, seed);
    let workgroup = run(SelectLayout::Workgroup);
    let mut others = vec![SelectLayout::Multi];
    if segment.len <= topk::LANES_MAX_SCORES {
        others.push(SelectLayout::Lanes);
    }
    for layout in others {
        assert_eq!(
            workgroup,
            run(layout),
            "{segment:?} k={k}: {layout:?} disagrees with Workgroup (seed {seed})"
        );
    }
    workgroup
}

/// One layout's list, poisoning the output first. The multi-workgroup select's dispatches run
/// twice (poisoned again in between): the second run must give the same list, so the scratch it
/// leaves behind is ready for the next selection.
fn run_select_in(
    gpu: &Gpu,
    layout: SelectLayout,
    scores: &Tensor,
    offset: usize,
    segment: Segment,
    k: usize,
    seed: u64,
) -> Vec<u32> {
    let len = segment.kept_rows(k);
    let out = Tensor::empty(gpu, &[len + 2], DType::U32, "keep").unwrap();
    let dispatches = topk::select_in(gpu, layout, scores, offset, segment, k, &out).unwrap();
    let runs = if layout == SelectLayout::Multi { 2 } else { 1 };
    let mut lists = Vec::new();
    for _ in 0..runs {
        out.poison(gpu);
        let mut rec = Recorder::new(gpu);
        rec.dispatch_all(dispatches.clone());
        rec.finish("topk test").unwrap();
        let mut got = gpu.read_u32(&out).unwrap();
        assert_eq!(
            got[len..],
            [POISON, POISON],
            "{layout:?} {segment:?} k={k}: wrote past the list (seed {seed})"
        );
        got.truncate(len);
        lists.push(got);
    }
    assert!(
        lists.windows(2).all(|w| w[0] == w[1]),
        "{layout:?} {segment:?} k={k}: a replay gave another list (seed {seed})"
    );
    lists.swap_remove(0)
}

fn check_topk(gpu: &Gpu, rng: &TestRng, what: &str, scores: &[f32], k: usize) {
    let n = scores.len();
    let t = Tensor::from_f32(gpu, &[n.max(1)], &pad_scores(scores), "scores").unwrap();
    let got = run_select(gpu, &t, 0, Segment::whole(n), k, rng.seed);
    let want: Vec<u32> = topk::reference(scores, k)
        .into_iter()
        .map(|i| i as u32)
        .collect();
    assert_eq!(
        got, want,
        "{what}: n={n} k={k} (seed {}; replay with LLAVA_TEST_SEED={})",
        rng.seed, rng.seed
    );
}

/// A tensor cannot be empty; n = 0 is not tested here but keep the helper total.
fn pad_scores(scores: &[f32]) -> Vec<f32> {
    if scores.is_empty() {
        vec![0.0]
    } else {
        scores.to_vec()
    }
}

fn ks(rng: &mut TestRng, n: usize) -> Vec<usize> {
    let mut ks = vec![
        0,
        1.min(n),
        n,
        n / 2,
        n.saturating_sub(1),
        rng.rng.random_range(0..=n),
    ];
    ks.sort_unstable();
    ks.dedup();
    ks
}

const SIZES: [usize; 7] = [1, 5, 36, 37, 576, 577, 4096];

#[test]
fn topk_matches_a_cpu_sort_on_random_scores() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    for n in SIZES {
        let scores = rng.normal(n, 1.0);
        for k in ks(&mut rng, n) {
            check_topk(&gpu, &rng, "random scores", &scores, k);
        }
    }
}

#[test]
fn topk_breaks_ties_by_the_lower_index() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    // Three distinct values (0.0 and -0.0 are equal): most of the selection is tie-breaking.
    let values = [0.25f32, 0.0, -0.0, 1.0];
    for n in SIZES {
        let scores: Vec<f32> = (0..n).map(|_| values[rng.index(values.len())]).collect();
        for k in ks(&mut rng, n) {
            check_topk(&gpu, &rng, "tied scores", &scores, k);
        }
    }
    // Every score equal: the first k indices.
    let flat = vec![3.5f32; 577];
    check_topk(&gpu, &rng, "all equal", &flat, 100);
}

#[test]
fn topk_treats_nan_as_the_smallest_score() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    let values = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -f32::NAN,
        1.0,
        -1.0,
        f32::MAX,
        f32::MIN,
    ];
    for n in [7, 37, 577] {
        let scores: Vec<f32> = (0..n).map(|_| values[rng.index(values.len())]).collect();
        for k in ks(&mut rng, n) {
            check_topk(&gpu, &rng, "NaN and infinities", &scores, k);
        }
    }
    // NaN is kept only when nothing else is left, and then the lowest-index NaN first.
    let scores = [f32::NAN, f32::NEG_INFINITY, f32::NAN, -1e30];
    check_topk(&gpu, &rng, "NaN last", &scores, 3);
    let t = Tensor::from_f32(&gpu, &[4], &scores, "scores").unwrap();
    assert_eq!(
        run_select(&gpu, &t, 0, Segment::whole(4), 3, rng.seed),
        [0, 1, 3]
    );
}

/// The hand-ranked order of `prune::top_k`'s test (2 > 0 = −0 > −∞ > NaN = −NaN), on the GPU.
#[test]
fn topk_ranks_the_two_zeros_equal_and_nan_last_as_the_cpu_top_k() {
    let gpu = gpu();
    let rng = TestRng::new();
    let scores = [f32::NAN, -0.0, f32::NEG_INFINITY, 2.0, 0.0, -f32::NAN];
    let t = Tensor::from_f32(&gpu, &[6], &scores, "scores").unwrap();
    let want: [&[u32]; 6] = [
        &[3],
        &[1, 3],
        &[1, 3, 4],
        &[1, 2, 3, 4],
        &[0, 1, 2, 3, 4],
        &[0, 1, 2, 3, 4, 5],
    ];
    for (i, want) in want.iter().enumerate() {
        let k = i + 1;
        assert_eq!(
            run_select(&gpu, &t, 0, Segment::whole(6), k, rng.seed),
            *want,
            "k = {k}"
        );
    }
}

#[test]
fn topk_reads_scores_at_an_offset() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    for n in [5, 577, 4096] {
        let before = rng.index(300) + 1;
        let after = rng.index(300) + 1;
        // Outside the range: values that would win if they were read.
        let mut buffer = vec![1e9f32; before];
        let scores = rng.normal(n, 1.0);
        buffer.extend_from_slice(&scores);
        buffer.extend(std::iter::repeat_n(f32::INFINITY, after));
        let t = Tensor::from_f32(&gpu, &[buffer.len()], &buffer, "scores").unwrap();
        for k in ks(&mut rng, n) {
            let got = run_select(&gpu, &t, before, Segment::whole(n), k, rng.seed);
            let want: Vec<u32> = topk::reference(&scores, k)
                .into_iter()
                .map(|i| i as u32)
                .collect();
            assert_eq!(
                got, want,
                "offset {before}, n={n} k={k} (seed {})",
                rng.seed
            );
        }
    }
}

#[test]
fn topk_handles_large_n() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    // The lanes layout's largest segment, then the other layouts' (any length; the
    // multi-workgroup select in 10 and 32 slices).
    for n in [topk::LANES_MAX_SCORES, 5000, 16384] {
        let scores: Vec<f32> = (0..n).map(|_| (rng.index(1000) as f32) * 0.125).collect();
        for k in [0, 1, 999, n / 3, n] {
            check_topk(&gpu, &rng, "large n with ties", &scores, k);
        }
    }
    // Rough timing of the common case (shown with --nocapture).
    let n = 4096;
    let scores = Tensor::from_f32(&gpu, &[n], &rng.normal(n, 1.0), "scores").unwrap();
    let out = Tensor::empty(&gpu, &[n], DType::U32, "keep").unwrap();
    let dispatch = topk::topk(&gpu, &scores, 0, n, 410, &out).unwrap();
    let mut rec = Recorder::new(&gpu);
    rec.dispatch_all(dispatch.clone());
    rec.finish("warm-up").unwrap();
    let reps = 20;
    let start = std::time::Instant::now();
    for _ in 0..reps {
        let mut rec = Recorder::new(&gpu);
        rec.dispatch_all(dispatch.clone());
        rec.finish("timing").unwrap();
    }
    let each = start.elapsed() / reps;
    eprintln!(
        "top-k n={n} k=410 on {}: {each:?} per submit-and-wait",
        gpu.info.name
    );
}

/// The lanes layout's fallback without subgroups (sums and scans through workgroup memory), on
/// random scores with ties, in a segment, against the CPU reference.
#[test]
fn lanes_select_without_subgroups_matches_the_cpu() {
    let gpu = gpu_without_features();
    let mut rng = TestRng::new();
    let n = 77;
    let scores: Vec<f32> = (0..n).map(|_| (rng.index(20) as f32) * 0.5).collect();
    let t = Tensor::from_f32(&gpu, &[n], &scores, "scores").unwrap();
    let segment = Segment {
        total: n + 5,
        start: 3,
        len: n,
    };
    for k in [0, 1, 30, n] {
        let got = run_select_in(&gpu, SelectLayout::Lanes, &t, 0, segment, k, rng.seed);
        let want = topk::reference_sequence(&scores, segment, k);
        assert_eq!(got, want, "k={k} (seed {})", rng.seed);
    }
}

#[test]
fn sequence_index_list_keeps_rows_outside_the_segment() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    for _ in 0..6 {
        let n = rng.index(600) + 1;
        let start = rng.index(50);
        let total = start + n + rng.index(80);
        let segment = Segment {
            total,
            start,
            len: n,
        };
        let values = [0.0f32, 0.5, 1.0, 2.0];
        let scores: Vec<f32> = (0..n).map(|_| values[rng.index(4)]).collect();
        let score_offset = rng.index(20);
        let mut buffer = vec![f32::INFINITY; score_offset];
        buffer.extend_from_slice(&scores);
        let t = Tensor::from_f32(&gpu, &[buffer.len()], &buffer, "scores").unwrap();
        for k in ks(&mut rng, n) {
            let got = run_select(&gpu, &t, score_offset, segment, k, rng.seed);
            let want = topk::reference_sequence(&scores, segment, k);
            assert_eq!(got.len(), total - n + k);
            assert_eq!(got, want, "{segment:?} k={k} (seed {})", rng.seed);
        }
    }
    // An empty segment keeps every other row.
    let t = Tensor::from_f32(&gpu, &[1], &[0.0], "scores").unwrap();
    let empty = Segment {
        total: 9,
        start: 4,
        len: 0,
    };
    assert_eq!(
        run_select(&gpu, &t, 1, empty, 0, rng.seed),
        (0..9).collect::<Vec<u32>>()
    );
    // Stage 1 is the same call: the whole list as the segment gives the plain top-k indices.
    let scores = rng.normal(576, 1.0);
    let t = Tensor::from_f32(&gpu, &[576], &scores, "scores").unwrap();
    let got = run_select(&gpu, &t, 0, Segment::whole(576), 518, rng.seed);
    let want: Vec<u32> = topk::reference(&scores, 518)
        .into_iter()
        .map(|i| i as u32)
        .collect();
    assert_eq!(got, want, "stage 1 (seed {})", rng.seed);
}

fn random_words(rng: &mut TestRng, n: usize) -> Vec<u32> {
    // Any bit pattern, NaN payloads included: the copy must be bitwise.
    (0..n).map(|_| rng.rng.random()).collect()
}

#[test]
fn gather_copies_rows_bit_for_bit() {
    let mut gpu = gpu();
    // Plan the launch grid as if the device allowed only 20 workgroups per dimension, so the
    // larger cases take the 2D-grid path (with overshooting workgroups).
    gpu.limits.max_compute_workgroups_per_dimension = 20;
    let mut rng = TestRng::new();
    // Narrow rows (several per workgroup), the switch-over at 512 words, wide rows.
    for width in [1usize, 3, 37, 511, 512, 600, 4096] {
        for dtype in [DType::F32, DType::U32] {
            let src_rows = if width >= 512 { 40 } else { 700 };
            let rows = rng.index(src_rows) + 1;
            let dst_rows = rows + 3;
            let words = random_words(&mut rng, src_rows * width);
            let src = match dtype {
                DType::F32 => {
                    let floats: Vec<f32> = words.iter().map(|&w| f32::from_bits(w)).collect();
                    Tensor::from_f32(&gpu, &[src_rows, width], &floats, "src").unwrap()
                }
                DType::U32 | DType::F16 => {
                    Tensor::from_u32(&gpu, &[src_rows, width], &words, "src").unwrap()
                }
            };
            // Repeats and any order are allowed; a 1-D index tensor read from an offset.
            let idx_offset = rng.index(5);
            let mut idx: Vec<u32> = (0..idx_offset + rows)
                .map(|_| rng.index(src_rows) as u32)
                .collect();
            idx[idx_offset] = (src_rows - 1) as u32;
            let idx_t = Tensor::from_u32(&gpu, &[idx.len()], &idx, "idx").unwrap();
            let dst = Tensor::empty(&gpu, &[dst_rows, width], dtype, "dst").unwrap();
            dst.poison(&gpu);
            let mut rec = Recorder::new(&gpu);
            rec.dispatch(topk::gather_rows(&gpu, &src, &idx_t, idx_offset, rows, &dst).unwrap());
            rec.finish("gather test").unwrap();
            let got = gpu.read_u32(&dst).unwrap();
            let mut want = topk::gather_reference(&words, width, &idx[idx_offset..]);
            want.resize(dst_rows * width, POISON);
            assert!(
                got == want,
                "gather {dtype:?} width={width} rows={rows}: mismatch at word {:?} (seed {})",
                got.iter().zip(&want).position(|(a, b)| a != b),
                rng.seed
            );
        }
    }
}

#[test]
fn gather_takes_rows_along_the_first_dimension() {
    // A [C, H, D] cache gathers whole [H, D] rows; an index past the source gives a zero row.
    let gpu = gpu();
    let mut rng = TestRng::new();
    let (c, h, d) = (9, 3, 5);
    let words = random_words(&mut rng, c * h * d);
    let src = Tensor::from_u32(&gpu, &[c, h, d], &words, "cache").unwrap();
    let idx = [8u32, 0, 4, 4, 9];
    let idx_t = Tensor::from_u32(&gpu, &[5], &idx, "idx").unwrap();
    let dst = Tensor::empty(&gpu, &[c, h, d], DType::U32, "dst").unwrap();
    dst.poison(&gpu);
    let mut rec = Recorder::new(&gpu);
    rec.dispatch(topk::gather_rows(&gpu, &src, &idx_t, 0, 5, &dst).unwrap());
    rec.finish("gather test").unwrap();
    let mut want = topk::gather_reference(&words, h * d, &idx[..4]);
    want.resize(5 * h * d, 0);
    want.resize(c * h * d, POISON);
    assert_eq!(gpu.read_u32(&dst).unwrap(), want, "seed {}", rng.seed);
}

/// The dispatches of one pruning step, in order: select the rows to keep into `idx`, then gather
/// `segment.kept_rows(k)` rows of every `(src, dst)` pair with them.
fn select_then_gather(
    gpu: &Gpu,
    scores: &Tensor,
    segment: Segment,
    k: usize,
    idx: &Tensor,
    pairs: &[(&Tensor, &Tensor)],
) -> Vec<Dispatch> {
    let mut dispatches = topk::select(gpu, scores, 0, segment, k, idx).unwrap();
    let rows = segment.kept_rows(k);
    for (src, dst) in pairs {
        dispatches.push(topk::gather_rows(gpu, src, idx, 0, rows, dst).unwrap());
    }
    dispatches
}

/// Select with random tied scores, then compact a hidden state, a KV-cache-like buffer with
/// spare capacity, and the position ids; every compacted buffer must equal the CPU gather of
/// the CPU reference list, bit for bit.
fn pipeline_case(gpu: &Gpu, rng: &mut TestRng, segment: Segment, k: usize, d: usize) {
    let Segment { total, len: n, .. } = segment;
    let values = [0.1f32, 0.2, 0.3, 0.4, 0.5];
    let scores: Vec<f32> = (0..n).map(|_| values[rng.index(values.len())]).collect();
    let scores_t = Tensor::from_f32(gpu, &[n], &scores, "scores").unwrap();
    let hidden_words = random_words(rng, total * d);
    let hidden_f: Vec<f32> = hidden_words.iter().map(|&w| f32::from_bits(w)).collect();
    let hidden = Tensor::from_f32(gpu, &[total, d], &hidden_f, "hidden").unwrap();
    let capacity = total + 7;
    let kv_width = 2 * 3;
    let cache_words = random_words(rng, capacity * kv_width);
    let cache = Tensor::from_u32(gpu, &[capacity, kv_width], &cache_words, "cache").unwrap();
    let positions: Vec<u32> = (0..total as u32).collect();
    let pos = Tensor::from_u32(gpu, &[total], &positions, "positions").unwrap();

    let kept = segment.kept_rows(k);
    let idx = Tensor::empty(gpu, &[total], DType::U32, "keep").unwrap();
    let hidden_out = Tensor::empty(gpu, &[kept, d], DType::F32, "hidden'").unwrap();
    let cache_out = Tensor::empty(gpu, &[capacity, kv_width], DType::U32, "cache'").unwrap();
    let pos_out = Tensor::empty(gpu, &[kept], DType::U32, "positions'").unwrap();
    for t in [&idx, &hidden_out, &cache_out, &pos_out] {
        t.poison(gpu);
    }
    let mut rec = Recorder::new(gpu);
    rec.dispatch_all(select_then_gather(
        gpu,
        &scores_t,
        segment,
        k,
        &idx,
        &[
            (&hidden, &hidden_out),
            (&cache, &cache_out),
            (&pos, &pos_out),
        ],
    ));
    rec.finish("pipeline test").unwrap();

    let list = topk::reference_sequence(&scores, segment, k);
    let what = format!("{segment:?} k={k} d={d} (seed {})", rng.seed);
    assert_eq!(
        gpu.read_u32(&idx).unwrap()[..kept],
        list[..],
        "index list, {what}"
    );
    let got = gpu.read_u32(&hidden_out).unwrap();
    assert!(
        got == topk::gather_reference(&hidden_words, d, &list),
        "hidden state, {what}"
    );
    let mut want_cache = topk::gather_reference(&cache_words, kv_width, &list);
    want_cache.resize(capacity * kv_width, POISON);
    assert_eq!(
        gpu.read_u32(&cache_out).unwrap(),
        want_cache,
        "cache, {what}"
    );
    assert_eq!(gpu.read_u32(&pos_out).unwrap(), list, "positions, {what}");
    if k == n {
        assert!(
            got == hidden_words,
            "keeping everything must copy the hidden state exactly, {what}"
        );
    }
}

#[test]
fn select_then_gather_compacts_rows_exactly() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    // Stage 1: 576 patches of width 1024, keep 518; keep all; keep none.
    for k in [518, 576, 0] {
        pipeline_case(&gpu, &mut rng, Segment::whole(576), k, 1024);
    }
    // Stage 2: a prompt with the image at a random position, keep a random budget.
    for _ in 0..3 {
        let n = 518;
        let start = rng.index(40) + 1;
        let total = start + n + rng.index(60) + 1;
        let k = rng.index(n + 1);
        pipeline_case(
            &gpu,
            &mut rng,
            Segment {
                total,
                start,
                len: n,
            },
            k,
            37,
        );
    }
    pipeline_case(
        &gpu,
        &mut rng,
        Segment {
            total: 600,
            start: 35,
            len: 518,
        },
        518,
        64,
    );
}

fn assert_argument(result: llava_wgpu::Result<impl std::fmt::Debug>, name: &str) {
    match result {
        Err(Error::Argument { name: got, .. }) if got == name => {}
        other => panic!("expected an argument error naming {name}, got {other:?}"),
    }
}

fn assert_shape(result: llava_wgpu::Result<impl std::fmt::Debug>, words: &str) {
    match result {
        Err(e @ Error::Shape { .. }) => {
            let text = e.to_string();
            assert!(text.contains(words), "{text}");
        }
        other => panic!("expected a shape error about {words}, got {other:?}"),
    }
}

#[test]
fn bad_arguments_give_clear_errors() {
    let gpu = gpu();
    let scores = Tensor::from_f32(&gpu, &[10], &[0.0; 10], "scores").unwrap();
    let out = Tensor::empty(&gpu, &[10], DType::U32, "keep").unwrap();
    let out_f32 = Tensor::empty(&gpu, &[10], DType::F32, "keep").unwrap();
    let small = Tensor::empty(&gpu, &[3], DType::U32, "keep").unwrap();
    assert_argument(topk::topk(&gpu, &scores, 0, 10, 11, &out), "k");
    assert_argument(
        topk::select(
            &gpu,
            &scores,
            0,
            Segment {
                total: 12,
                start: 5,
                len: 10,
            },
            2,
            &out,
        ),
        "segment",
    );
    assert_shape(
        topk::topk(&gpu, &scores, 4, 8, 2, &out),
        "outside the scores",
    );
    assert_shape(topk::topk(&gpu, &scores, 0, 10, 4, &small), "at least 4");
    assert_shape(topk::topk(&gpu, &scores, 0, 10, 4, &out_f32), "u32");
    assert_shape(topk::topk(&gpu, &out, 0, 10, 4, &out), "f32");
    // Stage 2 list longer than the output.
    assert_shape(
        topk::select(
            &gpu,
            &scores,
            0,
            Segment {
                total: 20,
                start: 3,
                len: 10,
            },
            5,
            &out,
        ),
        "at least 15",
    );

    let src = Tensor::from_f32(&gpu, &[4, 3], &[0.0; 12], "src").unwrap();
    let dst = Tensor::empty(&gpu, &[4, 3], DType::F32, "dst").unwrap();
    let wide = Tensor::empty(&gpu, &[4, 5], DType::F32, "dst").unwrap();
    let ints = Tensor::empty(&gpu, &[4, 3], DType::U32, "dst").unwrap();
    let idx = Tensor::from_u32(&gpu, &[4], &[0, 1, 2, 3], "idx").unwrap();
    assert_shape(
        topk::gather_rows(&gpu, &src, &idx, 0, 4, &wide),
        "row width",
    );
    assert_shape(topk::gather_rows(&gpu, &src, &idx, 0, 4, &ints), "dtype");
    assert_shape(
        topk::gather_rows(&gpu, &src, &idx, 1, 4, &dst),
        "index tensor",
    );
    assert_shape(
        topk::gather_rows(&gpu, &src, &src, 0, 4, &dst),
        "index tensor",
    );
    assert_argument(topk::gather_rows(&gpu, &src, &idx, 0, 5, &dst), "rows");
    assert_argument(topk::gather_rows(&gpu, &src, &idx, 0, 4, &src), "dst");
}
