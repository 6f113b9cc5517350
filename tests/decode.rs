//! The kernels of a replayed decode step, each against an independent CPU reference: the
//! embedding row gathered by a GPU-held id (every weight format, against the host's ggml
//! dequantization), the KV append at the step counter's row, the decode attention over a
//! cache whose length only the GPU knows (against attention.rs's f64 reference), and the step
//! counter itself. Outputs are poisoned before every launch. `decode_replay.rs` checks the loop
//! they make end to end.

mod common;

use common::*;
use llava_wgpu::gpu::kernels::attention::{self, AttentionShape};
use llava_wgpu::gpu::kernels::attention_decode::{self, DecodeHeads};
use llava_wgpu::gpu::kernels::{decode_step, embedding, kv_store, Dispatch};
use llava_wgpu::gpu::{DType, Gpu, Recorder, Tensor, Weight, WeightFormat};
use llava_wgpu::quant;

fn run(gpu: &Gpu, dispatches: impl IntoIterator<Item = Dispatch>) {
    let mut rec = Recorder::new(gpu);
    rec.dispatch_all(dispatches);
    rec.finish("decode kernel test").unwrap();
}

fn pack_halves(values: &[f32]) -> Vec<u32> {
    kv_store::reference(values)
}

fn round_to_half(values: &[f32]) -> Vec<f32> {
    values
        .iter()
        .map(|&x| half::f16::from_f32(x).to_f32())
        .collect()
}

/// A random `[rows, k]` table in `format` and the values the GPU should see: floats rounded
/// to the format, blocks dequantized by the host's ggml reference (`quant::dequantize`).
fn table(
    gpu: &Gpu,
    rng: &mut TestRng,
    format: WeightFormat,
    rows: usize,
    k: usize,
) -> (Weight, Vec<f32>) {
    if format.is_quantized() {
        let blocks = rng.blocks(format, rows, k);
        let values = quant::dequantize(format, &blocks).unwrap();
        let w = Weight::from_stored(gpu, "embed", rows, k, format, &blocks).unwrap();
        return (w, values);
    }
    let raw = rng.uniform(rows * k, -3.0, 3.0);
    let values: Vec<f32> = match format {
        WeightFormat::F16 => round_to_half(&raw),
        WeightFormat::BF16 => raw
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect(),
        _ => raw.clone(),
    };
    (
        Weight::from_f32(gpu, "embed", rows, k, &raw, format).unwrap(),
        values,
    )
}

/// Every format the engine runs, with an odd row count, a float width that is not a whole
/// padded row (70), and ids in the first, a middle and the last row; an id past the table
/// leaves the poisoned output as it was.
#[test]
fn embedding_rows_match_the_dequantized_table_in_every_format() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    let rows = 37;
    for format in WeightFormat::ALL {
        let k = if format.is_quantized() { 512 } else { 70 };
        let (w, values) = table(&gpu, &mut rng, format, rows, k);
        let ids = Tensor::from_u32(&gpu, &[2], &[0, 0], "ids").unwrap();
        let out = Tensor::empty(&gpu, &[1, k], DType::F32, "out").unwrap();
        for id in [0u32, rng.index(rows) as u32, rows as u32 - 1, rows as u32] {
            ids.write_u32(&gpu, &[7, id]).unwrap();
            out.poison(&gpu);
            run(&gpu, embedding::embed_row(&gpu, &w, &ids, 1, &out).unwrap());
            let got = gpu.read_f32(&out).unwrap();
            let what = format!("{format:?} row {id} (seed {})", rng.seed);
            match embedding::reference(&values, k, id) {
                Some(want) => {
                    let want: Vec<f64> = want.iter().map(|&x| x as f64).collect();
                    assert_close(&what, rng.seed, &got, &want, 1e-7, 1e-6);
                }
                None => assert!(got.iter().all(|x| x.is_nan()), "{what}: wrote {got:?}"),
            }
        }
    }
}

/// A table split over several bindings: the row comes from the chunk that holds it.
#[test]
fn embedding_rows_come_from_the_chunk_holding_them() {
    let gpu = gpu_with_binding_limit(4096);
    let mut rng = TestRng::new();
    let (rows, k) = (53, 96);
    let (w, values) = table(&gpu, &mut rng, WeightFormat::F32, rows, k);
    assert!(w.chunks.len() > 2, "the limit must split the table");
    let ids = Tensor::from_u32(&gpu, &[1], &[0], "ids").unwrap();
    let out = Tensor::empty(&gpu, &[1, k], DType::F32, "out").unwrap();
    for id in [0, 11, 12, 30, 52] {
        ids.write_u32(&gpu, &[id]).unwrap();
        out.poison(&gpu);
        run(&gpu, embedding::embed_row(&gpu, &w, &ids, 0, &out).unwrap());
        let want = embedding::reference(&values, k, id).unwrap();
        assert_eq!(
            gpu.read_f32(&out).unwrap(),
            want,
            "row {id}, seed {}",
            rng.seed
        );
    }
}

/// The step row of an f32 and an f16 cache gets the values; every other row keeps its marker.
#[test]
fn kv_rows_land_at_the_step_counters_row() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    let (capacity, width, first_row) = (11usize, 34usize, 3usize);
    let values = rng.uniform(width, -100.0, 100.0);
    let src = Tensor::from_f32(&gpu, &[1, width], &values, "src").unwrap();
    for (dtype, row_words, want) in [
        (
            DType::F32,
            width,
            values.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        ),
        (DType::F16, width / 2, pack_halves(&values)),
    ] {
        for step in [0u32, 4, 7] {
            let cache = Tensor::empty(&gpu, &[capacity, width], dtype, "cache").unwrap();
            let words = capacity * row_words;
            cache.write_u32(&gpu, &vec![0xDEAD_BEEF; words]).unwrap();
            let counter = Tensor::from_u32(&gpu, &[1], &[step], "step").unwrap();
            run(
                &gpu,
                [kv_store::store_at_step(&gpu, &src, &cache, first_row, &counter).unwrap()],
            );
            let got = gpu.read_words(&cache.buffer, 0, words).unwrap();
            let row = first_row + step as usize;
            let at = row * row_words..(row + 1) * row_words;
            assert_eq!(&got[at.clone()], &want[..], "{dtype:?} step {step}");
            assert!(got[..at.start]
                .iter()
                .chain(&got[at.end..])
                .all(|&w| w == 0xDEAD_BEEF));
        }
    }
}

/// One decode query row against `kv_base + step + 1` cache rows, grouped heads, head sizes of
/// 4, 64, 68 and 128, tiles of 64 keys crossed, f32 and f16 caches; rows past the valid ones
/// are NaN, so reading one would show.
#[test]
fn decode_attention_matches_the_reference() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    // (heads, kv heads, head dim, kv_base, step)
    let cases = [
        (4, 2, 64, 0, 0),
        (8, 8, 128, 70, 5),
        (6, 2, 68, 130, 3),
        (3, 1, 4, 1, 63),
        (32, 32, 128, 199, 1),
    ];
    for (heads, kv_heads, head_dim, kv_base, step) in cases {
        let kv_rows = kv_base + step + 1;
        let capacity = kv_rows + 9;
        let s = AttentionShape {
            q_rows: 1,
            kv_rows,
            heads,
            kv_heads,
            head_dim,
            causal: true,
        };
        let width = kv_heads * head_dim;
        let q = rng.uniform(heads * head_dim, -2.0, 2.0);
        let mut k = rng.uniform(kv_rows * width, -2.0, 2.0);
        let mut v = rng.uniform(kv_rows * width, -1.0, 1.0);
        k.resize(capacity * width, f32::NAN);
        v.resize(capacity * width, f32::NAN);
        let scale = attention::default_scale(head_dim);
        let q_t = Tensor::from_f32(&gpu, &[1, heads * head_dim], &q, "q").unwrap();
        let counter = Tensor::from_u32(&gpu, &[1], &[step as u32], "step").unwrap();
        let out = Tensor::empty(&gpu, &[1, heads * head_dim], DType::F32, "out").unwrap();
        for dtype in [DType::F32, DType::F16] {
            let cache = |values: &[f32], label| match dtype {
                DType::F16 => {
                    let t = Tensor::empty(&gpu, &[capacity, width], DType::F16, label).unwrap();
                    t.write_u32(&gpu, &pack_halves(values)).unwrap();
                    t
                }
                _ => Tensor::from_f32(&gpu, &[capacity, width], values, label).unwrap(),
            };
            let (k_t, v_t) = (cache(&k, "k"), cache(&v, "v"));
            let (k_ref, v_ref) = match dtype {
                DType::F16 => (round_to_half(&k), round_to_half(&v)),
                _ => (k.clone(), v.clone()),
            };
            let (want, _) = attention::reference(&s, scale, &q, &k_ref, &v_ref, None);
            out.poison(&gpu);
            let heads_of = DecodeHeads {
                heads,
                kv_heads,
                head_dim,
            };
            let d = attention_decode::attention_decode(
                &gpu,
                heads_of,
                scale,
                kv_base,
                &counter,
                [&q_t, &k_t, &v_t, &out],
            );
            run(&gpu, [d.unwrap()]);
            let got = gpu.read_f32(&out).unwrap();
            let what = format!("{dtype:?} {s:?} base {kv_base} step {step}");
            assert_close(&what, rng.seed, &got, &want, 5e-6, 5e-5);
        }
    }
}

/// Shapes the kernel cannot run are refused: heads not a multiple of the kv heads, a head size
/// not a multiple of 4, a base past the cache.
#[test]
fn decode_attention_refuses_bad_shapes() {
    let gpu = gpu();
    let t = |rows: usize, cols: usize| Tensor::empty(&gpu, &[rows, cols], DType::F32, "t").unwrap();
    let counter = Tensor::from_u32(&gpu, &[1], &[0], "step").unwrap();
    let (q, k, v, o) = (t(1, 24), t(5, 12), t(5, 12), t(1, 24));
    let call = |heads, kv_heads, head_dim, base| {
        let h = DecodeHeads {
            heads,
            kv_heads,
            head_dim,
        };
        attention_decode::attention_decode(&gpu, h, 0.5, base, &counter, [&q, &k, &v, &o])
    };
    assert!(call(6, 3, 4, 0).is_ok());
    assert!(call(5, 3, 4, 0).is_err());
    assert!(call(4, 2, 6, 0).is_err());
    assert!(call(6, 3, 4, 5).is_err());
}

/// Each advance moves the counter by one and sets the next position after the first.
#[test]
fn the_step_counter_advances_the_position() {
    let gpu = gpu();
    let step = Tensor::from_u32(&gpu, &[1], &[0], "step").unwrap();
    let positions = Tensor::from_u32(&gpu, &[4], &[100, 9, 9, 9], "positions").unwrap();
    let advance = decode_step::advance(&gpu, &step, &positions, 100).unwrap();
    for n in 1..=3u32 {
        run(&gpu, [advance.clone()]);
        assert_eq!(gpu.read_u32(&step).unwrap(), vec![n]);
        assert_eq!(gpu.read_u32(&positions).unwrap(), vec![100 + n, 9, 9, 9]);
    }
}
