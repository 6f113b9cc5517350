//! Fused attention against an f64 CPU reference: bidirectional (CLIP) and causal (LLaMA) masks,
//! grouped-query heads, KV caches with garbage past the valid rows, head dims up to 128, and the
//! score accumulation used by visual-token pruning over full, tail and single-row ranges.
//!
//! Inputs: Q and K ~ U(-2, 2), V ~ U(-1, 1), scale 1/sqrt(D), so logits have a standard
//! deviation of 4/3 and reach about ±5 (softmax rows are neither flat nor one-hot).
//! Tolerances (f32 everywhere on the GPU, f64 on the CPU), about 10× the errors observed on
//! lavapipe (≤ 4e-7 on outputs, ≤ 0.3% of the score bound below):
//! - output: |err| ≤ 5e-6 + 5e-5·|want|. Each output is a convex combination of V values in
//!   [-1, 1]; the logits carry ~1e-7..1e-6 absolute f32 error (D-term dot products of O(1)
//!   terms), so probabilities carry ~1e-6 relative error and outputs ~1e-6 absolute at worst,
//!   plus exp2 and the online rescaling (a few ulp each, more on GPUs with approximate exp2).
//! - scores: |err| ≤ 2e-7·n + 2e-5·|want| where n = (query rows in range)·H is the number of
//!   probabilities summed into each key; each carries ~1e-6 relative error and the f32 sums of
//!   values ≤ 1 add ~n·eps absolute.
//!
//! Every case runs in both layouts (`LAYOUTS`): the tiled kernel GPUs run and the lanes kernel
//! CPU adapters run, on the same device.

mod common;

/// Output tolerance (see the module docs).
const OUT_ABS: f64 = 5e-6;
const OUT_REL: f64 = 5e-5;
/// Score tolerance: absolute per summed probability, and relative.
const SCORE_ABS_PER_TERM: f64 = 2e-7;
const SCORE_REL: f64 = 2e-5;

use common::*;
use llava_wgpu::gpu::kernels::attention::{self, AttentionLayout, AttentionShape, ScoreOutput};
use llava_wgpu::gpu::{DType, Gpu, Recorder, Tensor};

fn shape(
    q_rows: usize,
    kv_rows: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
) -> AttentionShape {
    AttentionShape {
        q_rows,
        kv_rows,
        heads,
        kv_heads,
        head_dim,
        causal,
    }
}

/// The two attention shaders, both run by every check on the same device.
const LAYOUTS: [AttentionLayout; 2] = [AttentionLayout::Tiled, AttentionLayout::Lanes];

struct Inputs {
    q: Vec<f32>,
    /// `capacity` rows; rows ≥ Tk are NaN.
    k: Vec<f32>,
    v: Vec<f32>,
    capacity: usize,
}

fn inputs(rng: &mut TestRng, s: &AttentionShape, capacity: usize) -> Inputs {
    let kv_width = s.kv_heads * s.head_dim;
    let q = rng.uniform(s.q_rows * s.heads * s.head_dim, -2.0, 2.0);
    let mut k = rng.uniform(s.kv_rows * kv_width, -2.0, 2.0);
    let mut v = rng.uniform(s.kv_rows * kv_width, -1.0, 1.0);
    k.resize(capacity * kv_width, f32::NAN);
    v.resize(capacity * kv_width, f32::NAN);
    Inputs { q, k, v, capacity }
}

struct GpuResult {
    out: Vec<f32>,
    scores: Vec<f32>,
}

fn run_gpu(
    gpu: &Gpu,
    layout: AttentionLayout,
    s: &AttentionShape,
    scale: f32,
    x: &Inputs,
    range: Option<(usize, usize)>,
) -> GpuResult {
    let kv_width = s.kv_heads * s.head_dim;
    let q = Tensor::from_f32(gpu, &[s.q_rows, s.heads * s.head_dim], &x.q, "q").unwrap();
    let k = Tensor::from_f32(gpu, &[x.capacity, kv_width], &x.k, "k").unwrap();
    let v = Tensor::from_f32(gpu, &[x.capacity, kv_width], &x.v, "v").unwrap();
    let out = Tensor::empty(gpu, &[s.q_rows, s.heads * s.head_dim], DType::F32, "out").unwrap();
    out.poison(gpu);
    let (partials, scores) = attention::score_buffers(gpu, s).unwrap();
    partials.poison(gpu);
    scores.poison(gpu);
    let score_output = range.map(|(q_start, q_end)| ScoreOutput {
        q_start,
        q_end,
        partials: &partials,
        scores: &scores,
    });
    let mut rec = Recorder::new(gpu);
    rec.dispatch_all(
        attention::attention_in(gpu, layout, s, scale, [&q, &k, &v, &out], score_output).unwrap(),
    );
    rec.finish("attention test").unwrap();
    GpuResult {
        out: gpu.read_f32(&out).unwrap(),
        scores: if range.is_some() {
            gpu.read_f32(&scores).unwrap()
        } else {
            Vec::new()
        },
    }
}

/// Run one case on the GPU in both layouts and compare each with the CPU reference. `capacity`
/// > Tk puts NaN rows past the valid part of the cache.
fn check(
    gpu: &Gpu,
    rng: &mut TestRng,
    s: AttentionShape,
    capacity: usize,
    range: Option<(usize, usize)>,
) {
    let scale = attention::default_scale(s.head_dim);
    let x = inputs(rng, &s, capacity);
    let (want_out, want_scores) = attention::reference(&s, scale, &x.q, &x.k, &x.v, range);
    for layout in LAYOUTS {
        let got = run_gpu(gpu, layout, &s, scale, &x, range);
        let what = format!("{layout:?} {s:?} capacity={capacity} scores={range:?}");
        assert_close(
            &format!("output {what}"),
            rng.seed,
            &got.out,
            &want_out,
            OUT_ABS,
            OUT_REL,
        );
        if let Some((start, end)) = range {
            check_scores(
                &what,
                rng.seed,
                &got.scores,
                &want_scores,
                (end - start) * s.heads,
            );
        }
    }
}

/// Scores against the reference; every one of the `terms` summed rows sums to one.
fn check_scores(what: &str, seed: u64, got: &[f32], want: &[f64], terms: usize) {
    let n = terms as f64;
    assert_close(
        &format!("scores {what}"),
        seed,
        got,
        want,
        SCORE_ABS_PER_TERM * n,
        SCORE_REL,
    );
    let total: f64 = got.iter().map(|&x| x as f64).sum();
    assert!(
        (total - n).abs() < 1e-4 * n,
        "{what}: scores sum to {total}, expected {n} (seed {seed})"
    );
}

#[test]
fn bidirectional_matches_cpu() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    check(&gpu, &mut rng, shape(37, 37, 4, 4, 16, false), 37, None);
    // CLIP-L/14-336 sequence length and head dim.
    check(&gpu, &mut rng, shape(577, 577, 4, 4, 64, false), 577, None);
    // Fewer rows than a block, one head.
    check(&gpu, &mut rng, shape(3, 3, 1, 1, 8, false), 3, None);
}

#[test]
fn causal_prefill_with_grouped_query_heads() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    for t in [1, 5, 37] {
        check(&gpu, &mut rng, shape(t, t, 4, 2, 16, true), t, None);
    }
    // A group of 3 heads straddles the 16-row blocks; a group of 32 spans two blocks per token.
    check(&gpu, &mut rng, shape(19, 19, 6, 2, 16, true), 19, None);
    check(&gpu, &mut rng, shape(3, 3, 32, 1, 16, true), 3, None);
}

#[test]
fn causal_with_kv_cache_and_decode() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    // Chunked prefill: 3 new rows at positions 37..40.
    check(&gpu, &mut rng, shape(3, 40, 4, 2, 16, true), 48, None);
    // Decode: first token, and a long cache (several key tiles, partial last tile).
    check(&gpu, &mut rng, shape(1, 1, 4, 2, 16, true), 9, None);
    check(&gpu, &mut rng, shape(1, 200, 4, 2, 16, true), 256, None);
    // Decode without grouping (LLaVA-7B is multi-head) and with a group of 32 heads.
    check(&gpu, &mut rng, shape(1, 70, 4, 4, 16, true), 70, None);
    check(&gpu, &mut rng, shape(1, 45, 32, 1, 16, true), 64, None);
}

#[test]
fn head_dim_128_and_odd_head_dims() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    check(&gpu, &mut rng, shape(20, 45, 4, 2, 128, true), 50, None);
    check(&gpu, &mut rng, shape(33, 33, 2, 2, 128, false), 33, None);
    check(&gpu, &mut rng, shape(1, 77, 4, 1, 128, true), 80, None);
    check(&gpu, &mut rng, shape(29, 29, 6, 2, 24, true), 29, None);
    check(&gpu, &mut rng, shape(21, 21, 3, 3, 40, false), 21, None);
    // Not a multiple of 4: the last vec4 of every row is partial.
    check(&gpu, &mut rng, shape(4, 39, 2, 1, 17, true), 40, None);
    check(&gpu, &mut rng, shape(18, 18, 2, 2, 1, false), 18, None);
}

/// A 4,096-key cache (LLaVA-1.5's whole context) with head dim 128 and scores: lavapipe stops
/// an invocation after 65,535 loop iterations in all, which a long key loop must stay under.
#[test]
fn a_full_context_of_keys() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    check(
        &gpu,
        &mut rng,
        shape(9, 4096, 2, 1, 128, true),
        4096,
        Some((0, 9)),
    );
}

#[test]
fn nan_cache_rows_past_the_valid_keys_do_not_leak() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    // Capacity far above Tk, in both masks, with and without scores.
    check(&gpu, &mut rng, shape(37, 37, 2, 2, 16, false), 300, None);
    check(
        &gpu,
        &mut rng,
        shape(5, 37, 4, 2, 16, true),
        300,
        Some((0, 5)),
    );
    check(
        &gpu,
        &mut rng,
        shape(37, 37, 4, 2, 16, false),
        100,
        Some((30, 37)),
    );
}

#[test]
fn scores_bidirectional_full_tail_and_last_row() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    let s = shape(37, 37, 4, 4, 16, false);
    // STAR stage 1: every query row (CLS and patches).
    check(&gpu, &mut rng, s, 37, Some((0, 37)));
    // A tail range and the single last row.
    check(&gpu, &mut rng, s, 37, Some((30, 37)));
    check(&gpu, &mut rng, s, 37, Some((36, 37)));
    // FasterVLM's CLS row.
    check(&gpu, &mut rng, s, 37, Some((0, 1)));
    // CLIP-sized stage 1 with a middle range.
    check(
        &gpu,
        &mut rng,
        shape(577, 577, 2, 2, 64, false),
        577,
        Some((0, 577)),
    );
    check(
        &gpu,
        &mut rng,
        shape(100, 100, 2, 2, 64, false),
        100,
        Some((40, 61)),
    );
}

#[test]
fn scores_causal_gqa_full_tail_and_last_row() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    let s = shape(37, 37, 4, 2, 16, true);
    check(&gpu, &mut rng, s, 37, Some((0, 37)));
    // STAR stage 2: the text rows after the image.
    check(&gpu, &mut rng, s, 37, Some((25, 37)));
    // FastV: the last prompt row.
    check(&gpu, &mut rng, s, 37, Some((36, 37)));
    // Group of 3 (blocks straddle tokens), and a chunk on top of a cache.
    check(
        &gpu,
        &mut rng,
        shape(40, 40, 6, 2, 24, true),
        45,
        Some((33, 40)),
    );
    check(
        &gpu,
        &mut rng,
        shape(5, 60, 4, 2, 16, true),
        64,
        Some((4, 5)),
    );
}

#[test]
fn scored_and_plain_passes_give_identical_outputs() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    for s in [
        shape(37, 37, 4, 2, 16, true),
        shape(50, 50, 2, 2, 64, false),
    ] {
        let scale = attention::default_scale(s.head_dim);
        let x = inputs(&mut rng, &s, s.kv_rows);
        for layout in LAYOUTS {
            let plain = run_gpu(&gpu, layout, &s, scale, &x, None);
            let scored = run_gpu(&gpu, layout, &s, scale, &x, Some((10, 30)));
            let same = plain
                .out
                .iter()
                .zip(&scored.out)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{layout:?} {s:?}: outputs differ between the plain and the scored pass (seed {})",
                rng.seed
            );
        }
    }
}

#[test]
fn a_non_default_scale_is_applied() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    let s = shape(20, 20, 2, 1, 32, true);
    let x = inputs(&mut rng, &s, 20);
    for (scale, layout) in [0.05f32, 0.4]
        .into_iter()
        .flat_map(|s| LAYOUTS.map(|l| (s, l)))
    {
        let got = run_gpu(&gpu, layout, &s, scale, &x, Some((0, 20)));
        let (want, want_scores) = attention::reference(&s, scale, &x.q, &x.k, &x.v, Some((0, 20)));
        assert_close(
            &format!("{layout:?} output scale={scale}"),
            rng.seed,
            &got.out,
            &want,
            OUT_ABS,
            OUT_REL,
        );
        assert_close(
            &format!("{layout:?} scores scale={scale}"),
            rng.seed,
            &got.scores,
            &want_scores,
            SCORE_ABS_PER_TERM * 40.0, // 20 rows × 2 heads
            SCORE_REL,
        );
    }
}

/// The lanes layout's fallback without subgroups (every lane loads all 8 rows), and the layout
/// each device picks: lanes only on a CPU adapter with subgroups.
#[test]
fn lanes_layout_without_subgroups_and_the_device_choice() {
    let plain = gpu_without_features();
    assert_eq!(AttentionLayout::for_device(&plain), AttentionLayout::Tiled);
    let mut rng = TestRng::new();
    check(
        &plain,
        &mut rng,
        shape(19, 19, 6, 2, 16, true),
        24,
        Some((5, 19)),
    );
    check(
        &plain,
        &mut rng,
        shape(21, 21, 3, 3, 17, false),
        21,
        Some((0, 21)),
    );
    let tuned = gpu_tuned_for_gpus(true);
    assert_eq!(AttentionLayout::for_device(&tuned), AttentionLayout::Tiled);
    let default = gpu();
    let lanes = default.caps.cpu && adapter_offers_subgroups(&default);
    assert_eq!(
        AttentionLayout::for_device(&default) == AttentionLayout::Lanes,
        lanes
    );
}

#[test]
fn bad_shapes_are_clear_errors() {
    let gpu = gpu();
    let t = |rows: usize, cols: usize| Tensor::empty(&gpu, &[rows, cols], DType::F32, "t").unwrap();
    let (q, k, v, out) = (t(4, 32), t(8, 16), t(8, 16), t(4, 32));
    let good = shape(4, 8, 2, 1, 16, true);
    let run =
        |s: &AttentionShape, q: &Tensor, k: &Tensor, out: &Tensor, scores: Option<ScoreOutput>| {
            attention::attention(&gpu, s, 0.25, q, k, &v, out, scores)
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
    assert!(attention::attention(&gpu, &good, 0.25, &q, &k, &v, &out, None).is_ok());

    // head_dim over 128.
    let (q2, k2, o2) = (t(4, 258), t(8, 129), t(4, 258));
    let err = run(&shape(4, 8, 2, 1, 129, true), &q2, &k2, &o2, None);
    assert!(err.contains("head_dim 129"), "{err}");
    // Heads that do not group.
    let err = run(&shape(4, 8, 3, 2, 16, true), &q, &k, &out, None);
    assert!(err.contains("grouped"), "{err}");
    // Q with the wrong width, O with the wrong row count.
    let err = run(&good, &t(4, 16), &k, &out, None);
    assert!(err.contains("Q has shape [4, 16]"), "{err}");
    let err = run(&good, &q, &k, &t(5, 32), None);
    assert!(err.contains("O has shape [5, 32]"), "{err}");
    // Fewer cache rows than valid keys.
    let err = run(&shape(4, 9, 2, 1, 16, true), &q, &k, &out, None);
    assert!(err.contains("K has shape [8, 16]"), "{err}");
    // Causal with more queries than keys.
    let err = run(&shape(4, 3, 2, 1, 16, true), &q, &k, &out, None);
    assert!(err.contains("causal"), "{err}");
    // Integer tensors.
    let ids = Tensor::empty(&gpu, &[4, 32], DType::U32, "ids").unwrap();
    let err = run(&good, &ids, &k, &out, None);
    assert!(err.contains("Q has shape"), "{err}");

    // Score ranges and scratch sizes.
    let (partials, scores) = attention::score_buffers(&gpu, &good).unwrap();
    let so = |q_start, q_end, partials| ScoreOutput {
        q_start,
        q_end,
        partials,
        scores: &scores,
    };
    let err = run(&good, &q, &k, &out, Some(so(2, 2, &partials)));
    assert!(err.contains("query range 2..2"), "{err}");
    let err = run(&good, &q, &k, &out, Some(so(0, 5, &partials)));
    assert!(err.contains("query range 0..5"), "{err}");
    let small = Tensor::empty(&gpu, &[3], DType::F32, "small").unwrap();
    let err = run(&good, &q, &k, &out, Some(so(0, 4, &small)));
    assert!(err.contains("partials"), "{err}");
    let err = run(
        &good,
        &q,
        &k,
        &out,
        Some(ScoreOutput {
            q_start: 0,
            q_end: 4,
            partials: &partials,
            scores: &small,
        }),
    );
    assert!(err.contains("scores"), "{err}");
}

/// `values` rounded to IEEE halves (nearest even) and packed two per word, low half first:
/// the f16 KV cache's layout, built here with the `half` crate, not with the engine.
fn pack_halves(values: &[f32]) -> Vec<u32> {
    values
        .chunks(2)
        .map(|p| {
            let lo = half::f16::from_f32(p[0]).to_bits() as u32;
            let hi = half::f16::from_f32(p[1]).to_bits() as u32;
            lo | hi << 16
        })
        .collect()
}

fn round_to_half(values: &[f32]) -> Vec<f32> {
    values
        .iter()
        .map(|&x| half::f16::from_f32(x).to_f32())
        .collect()
}

/// Attention reading an f16 K/V cache against the f64 reference fed the same f16-rounded keys
/// and values (so only the kernel's own arithmetic is compared), with NaN halves in the cache
/// rows past the valid keys.
fn check_f16_kv(gpu: &Gpu, rng: &mut TestRng, s: AttentionShape, capacity: usize) {
    let scale = attention::default_scale(s.head_dim);
    let x = inputs(rng, &s, capacity);
    let kv_width = s.kv_heads * s.head_dim;
    let q = Tensor::from_f32(gpu, &[s.q_rows, s.heads * s.head_dim], &x.q, "q").unwrap();
    let half_tensor = |values: &[f32], label| {
        let t = Tensor::empty(gpu, &[capacity, kv_width], DType::F16, label).unwrap();
        t.write_u32(gpu, &pack_halves(values)).unwrap();
        t
    };
    let (k, v) = (half_tensor(&x.k, "k"), half_tensor(&x.v, "v"));
    let out = Tensor::empty(gpu, &[s.q_rows, s.heads * s.head_dim], DType::F32, "out").unwrap();
    let (k16, v16) = (round_to_half(&x.k), round_to_half(&x.v));
    let (want, _) = attention::reference(&s, scale, &x.q, &k16, &v16, None);
    for layout in LAYOUTS {
        out.poison(gpu);
        let mut rec = Recorder::new(gpu);
        let d = attention::attention_in(gpu, layout, &s, scale, [&q, &k, &v, &out], None);
        rec.dispatch_all(d.unwrap());
        rec.finish("attention f16 kv test").unwrap();
        let got = gpu.read_f32(&out).unwrap();
        assert_close(
            &format!("{layout:?} f16 K/V output {s:?} capacity={capacity}"),
            rng.seed,
            &got,
            &want,
            OUT_ABS,
            OUT_REL,
        );
    }
}

#[test]
fn f16_kv_cache_matches_cpu_on_the_rounded_values() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    check_f16_kv(&gpu, &mut rng, shape(37, 37, 4, 2, 16, true), 40);
    check_f16_kv(&gpu, &mut rng, shape(1, 200, 4, 2, 16, true), 256);
    check_f16_kv(&gpu, &mut rng, shape(1, 77, 4, 1, 128, true), 80);
    check_f16_kv(&gpu, &mut rng, shape(3, 40, 6, 2, 24, true), 48);
    // Odd head dim with an even row width: halves straddle heads and words.
    check_f16_kv(&gpu, &mut rng, shape(5, 21, 2, 2, 17, false), 22);
}

/// The KV append kernel writes exactly the halves the `half` crate rounds to, at the row asked
/// for, and leaves every other row as it was.
#[test]
fn kv_store_writes_rounded_halves_at_the_row() {
    use llava_wgpu::gpu::kernels::kv_store;
    let gpu = gpu();
    let mut rng = TestRng::new();
    let (capacity, width, rows, first) = (13usize, 34usize, 5usize, 6usize);
    // Up to 60000: large halves, inside f16's range (WGSL leaves overflow indeterminate).
    let values = rng.uniform(rows * width, -60000.0, 60000.0);
    let src = Tensor::from_f32(&gpu, &[rows, width], &values, "src").unwrap();
    let cache = Tensor::empty(&gpu, &[capacity, width], DType::F16, "cache").unwrap();
    let marker = vec![0xDEAD_BEEFu32; capacity * width / 2];
    cache.write_u32(&gpu, &marker).unwrap();
    let mut rec = Recorder::new(&gpu);
    rec.dispatch(kv_store::store_f16(&gpu, &src, &cache, first).unwrap());
    rec.finish("kv store test").unwrap();
    let got = gpu
        .read_words(&cache.buffer, 0, capacity * width / 2)
        .unwrap();
    let words_per_row = width / 2;
    let written = first * words_per_row..(first + rows) * words_per_row;
    assert_eq!(
        &got[written.clone()],
        &pack_halves(&values)[..],
        "seed {}",
        rng.seed
    );
    assert!(got[..written.start].iter().all(|&w| w == 0xDEAD_BEEF));
    assert!(got[written.end..].iter().all(|&w| w == 0xDEAD_BEEF));
    // Rows past the cache, or an odd width, are refused.
    assert!(kv_store::store_f16(&gpu, &src, &cache, capacity - 2).is_err());
}
