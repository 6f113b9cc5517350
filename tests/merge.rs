//! The group-mean kernel behind `--merge` (shaders/merge_rows.wgsl) against its f64 reference:
//! random groups of random sizes (empty ones, repeated rows, a row past the source), widths from
//! one vec4 to rows wider than a workgroup's stride, the 2D launch grid, and its argument errors.
//! Whole merged selections are checked in tests/merged_selections.rs.

mod common;

use common::*;
use llava_wgpu::gpu::kernels::merge;
use llava_wgpu::gpu::{DType, Recorder, Tensor};
use rand::Rng;

/// A poisoned f32 element (never written) reads back as NaN, which no mean equals.
fn assert_close(got: &[f32], want: &[f32], what: &str) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tolerance = 1e-6 * (1.0 + w.abs());
        assert!(
            (g - w).abs() <= tolerance,
            "{what}: element {i}: got {g}, want {w}"
        );
    }
}

#[test]
fn group_means_match_the_f64_reference() {
    let mut gpu = gpu();
    // Few workgroups per dimension, so the larger cases take the 2D grid (with spare groups).
    gpu.limits.max_compute_workgroups_per_dimension = 7;
    let mut rng = TestRng::new();
    for width in [4usize, 12, 196, 260, 1028] {
        let src_rows = rng.index(60) + 2;
        let groups_n = rng.index(30) + 1;
        let mut groups: Vec<Vec<usize>> = (0..groups_n)
            .map(|_| {
                let len = rng.index(6);
                (0..len).map(|_| rng.index(src_rows)).collect()
            })
            .collect();
        // A row past the source counts as zeros; an empty group writes zeros.
        groups[0].push(src_rows + 3);
        if groups_n > 1 {
            groups[1].clear();
        }
        let src_values = rng.normal(src_rows * width, 2.0);
        let src = Tensor::from_f32(&gpu, &[src_rows, width], &src_values, "src").unwrap();
        let words = merge::group_list(&groups).unwrap();
        let list = Tensor::from_u32(&gpu, &[words.len()], &words, "groups").unwrap();
        let spare = 2;
        let dst = Tensor::empty(&gpu, &[groups_n + spare, width], DType::F32, "dst").unwrap();
        dst.poison(&gpu);
        let mut rec = Recorder::new(&gpu);
        rec.dispatch(merge::merge_rows(&gpu, &src, &list, groups_n, &dst).unwrap());
        rec.finish("merge test").unwrap();
        let got = gpu.read_f32(&dst).unwrap();
        let want = merge::merge_reference(&src_values, width, &groups);
        let what = format!("width {width}, {groups_n} groups (seed {})", rng.seed);
        assert_close(&got[..want.len()], &want, &what);
        assert!(
            got[want.len()..].iter().all(|v| v.is_nan()),
            "{what}: wrote past the groups"
        );
    }
}

#[test]
fn a_group_of_one_row_copies_it() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    let (rows, width) = (9, 8);
    let values: Vec<f32> = (0..rows * width)
        .map(|_| rng.rng.random_range(-5.0f32..5.0))
        .collect();
    let src = Tensor::from_f32(&gpu, &[rows, width], &values, "src").unwrap();
    let groups = vec![vec![4], vec![0], vec![8]];
    let words = merge::group_list(&groups).unwrap();
    assert_eq!(words, vec![0, 1, 2, 3, 4, 0, 8]);
    let list = Tensor::from_u32(&gpu, &[words.len()], &words, "groups").unwrap();
    let dst = Tensor::empty(&gpu, &[3, width], DType::F32, "dst").unwrap();
    dst.poison(&gpu);
    let mut rec = Recorder::new(&gpu);
    rec.dispatch(merge::merge_rows(&gpu, &src, &list, 3, &dst).unwrap());
    rec.finish("merge test").unwrap();
    let want: Vec<f32> = [4, 0, 8]
        .iter()
        .flat_map(|&r| values[r * width..(r + 1) * width].to_vec())
        .collect();
    assert_eq!(gpu.read_f32(&dst).unwrap(), want, "seed {}", rng.seed);
}

#[test]
fn bad_arguments_are_refused_with_the_kernel_named() {
    let gpu = gpu();
    let words = merge::group_list(&[vec![0, 1]]).unwrap();
    let list = Tensor::from_u32(&gpu, &[words.len()], &words, "groups").unwrap();
    let odd = Tensor::from_f32(&gpu, &[2, 6], &[0.0; 12], "odd").unwrap();
    let dst = Tensor::empty(&gpu, &[1, 6], DType::F32, "dst").unwrap();
    let err = merge::merge_rows(&gpu, &odd, &list, 1, &dst).unwrap_err();
    assert!(err.to_string().contains("merge_rows"), "{err}");
    let src = Tensor::from_f32(&gpu, &[2, 8], &[0.0; 16], "src").unwrap();
    let small = Tensor::empty(&gpu, &[1, 4], DType::F32, "small").unwrap();
    assert!(merge::merge_rows(&gpu, &src, &list, 1, &small).is_err());
    // Two groups need three offsets; this list has them only for one.
    let short = Tensor::from_u32(&gpu, &[2], &[0, 0], "short").unwrap();
    let wide = Tensor::empty(&gpu, &[2, 8], DType::F32, "wide").unwrap();
    assert!(merge::merge_rows(&gpu, &src, &short, 2, &wide).is_err());
}
