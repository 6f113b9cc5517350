//! Argmax over one logits row against the CPU reference: random rows, many ties, NaN, all-NaN
//! and infinite rows, both reduction paths (subgroups and shared memory), and bad arguments.

mod common;

use common::*;
use llava_wgpu::gpu::kernels::sample;
use llava_wgpu::gpu::{DType, Gpu, Recorder, Tensor};
use llava_wgpu::Error;

const POISON: u32 = 0x7fc0_0000;

/// Argmax of row `row` of `logits [rows, v]` on the GPU, written to element 1 of a poisoned
/// 3-element output whose other elements must stay untouched.
fn run(gpu: &Gpu, logits: &[f32], rows: usize, v: usize, row: usize) -> u32 {
    let t = Tensor::from_f32(gpu, &[rows, v], logits, "logits").unwrap();
    let out = Tensor::empty(gpu, &[3], DType::U32, "ids").unwrap();
    out.poison(gpu);
    let dispatch = sample::argmax(gpu, &t, row, &out, 1).unwrap();
    assert_ran_path(
        "argmax",
        std::slice::from_ref(&dispatch.module),
        gpu.caps.subgroups,
    );
    let mut rec = Recorder::new(gpu);
    rec.dispatch(dispatch);
    rec.finish("argmax test").unwrap();
    let got = gpu.read_u32(&out).unwrap();
    assert_eq!(
        (got[0], got[2]),
        (POISON, POISON),
        "argmax wrote outside out[1]"
    );
    got[1]
}

fn check(gpu: &Gpu, rng: &TestRng, what: &str, logits: &[f32], rows: usize, v: usize, row: usize) {
    let got = run(gpu, logits, rows, v, row);
    let want = sample::argmax_reference(&logits[row * v..(row + 1) * v])
        .map_or(sample::NO_INDEX, |i| i as u32);
    assert_eq!(
        got, want,
        "{what}: V={v} row {row} of {rows}, subgroups={} (seed {}; replay with LLAVA_TEST_SEED={})",
        gpu.caps.subgroups, rng.seed, rng.seed
    );
}

/// The subgroup path (where the adapter offers it) and the shared-memory path; `run` checks
/// each dispatch took its device's path.
fn devices() -> [Gpu; 2] {
    let devices = [gpu(), gpu_without_features()];
    let paths = [devices[0].caps.subgroups, devices[1].caps.subgroups];
    assert_eq!(paths, [adapter_offers_subgroups(&devices[0]), false]);
    devices
}

#[test]
fn argmax_matches_cpu_on_random_rows() {
    let mut rng = TestRng::new();
    for gpu in devices() {
        for v in [1, 7, 1000, 32064] {
            let rows = 3;
            let logits = rng.normal(rows * v, 4.0);
            let row = rng.index(rows);
            check(&gpu, &rng, "random", &logits, rows, v, row);
        }
    }
}

#[test]
fn argmax_breaks_ties_by_the_lower_index() {
    let mut rng = TestRng::new();
    for gpu in devices() {
        for v in [1, 7, 1000, 32064] {
            // Four distinct values: the maximum occurs many times.
            let values = [-1.0f32, 0.0, 0.5, 2.0];
            let logits: Vec<f32> = (0..2 * v).map(|_| values[rng.index(4)]).collect();
            check(&gpu, &rng, "ties", &logits, 2, v, 1);
            // The maximum only near the end, twice, in different threads' strides.
            let mut row = vec![0.0f32; v];
            if v > 2 {
                row[v - 1] = 9.0;
                row[v - 2] = 9.0;
            }
            check(&gpu, &rng, "late ties", &row, 1, v, 0);
        }
        // -0 and +0 are equal: the first wins.
        check(
            &gpu,
            &rng,
            "signed zeros",
            &[-1.0, -0.0, 0.0, -0.0],
            1,
            4,
            0,
        );
    }
}

#[test]
fn argmax_ignores_nan() {
    let mut rng = TestRng::new();
    for gpu in devices() {
        for v in [1, 7, 1000, 32064] {
            let mut logits = rng.normal(v, 1.0);
            // NaN first, at a random place, and where the true maximum would otherwise be.
            logits[0] = f32::NAN;
            let r = rng.index(v);
            logits[r] = -f32::NAN;
            if v > 2 {
                let best = sample::argmax_reference(&logits).unwrap();
                logits[(best + 1) % v] = f32::NAN;
            }
            check(&gpu, &rng, "NaN present", &logits, 1, v, 0);
        }
        assert_eq!(
            run(&gpu, &[f32::NAN; 9], 1, 9, 0),
            sample::NO_INDEX,
            "all NaN"
        );
        assert_eq!(run(&gpu, &[f32::NEG_INFINITY; 9], 1, 9, 0), 0, "all -inf");
        check(
            &gpu,
            &rng,
            "inf",
            &[f32::NAN, 1.0, f32::INFINITY, f32::NAN, f32::INFINITY],
            1,
            5,
            0,
        );
    }
}

#[test]
fn argmax_handles_a_full_vocabulary() {
    let mut rng = TestRng::new();
    let v = 256_000;
    let logits = rng.normal(v, 3.0);
    for gpu in devices() {
        check(&gpu, &rng, "V=256000", &logits, 1, v, 0);
    }
}

#[test]
fn argmax_rejects_bad_arguments() {
    let gpu = gpu();
    let logits = Tensor::from_f32(&gpu, &[2, 5], &[0.0; 10], "logits").unwrap();
    let ids = Tensor::empty(&gpu, &[4], DType::U32, "ids").unwrap();
    let floats = Tensor::empty(&gpu, &[4], DType::F32, "ids").unwrap();
    match sample::argmax(&gpu, &logits, 2, &ids, 0) {
        Err(Error::Argument { name, .. }) => assert_eq!(name, "row"),
        other => panic!("expected an error naming row, got {other:?}"),
    }
    for (t, at) in [(&ids, 4), (&floats, 0)] {
        match sample::argmax(&gpu, &logits, 0, t, at) {
            Err(e @ Error::Shape { .. }) => assert!(e.to_string().contains("u32"), "{e}"),
            other => panic!("expected a shape error, got {other:?}"),
        }
    }
    assert!(matches!(
        sample::argmax(&gpu, &ids, 0, &ids, 0),
        Err(Error::Shape { .. })
    ));
}
