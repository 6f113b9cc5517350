//! Both matmul layouts (tiled and lanes) and gemv against an f64 CPU reference, over every
//! weight format (f16, bf16, f32 and all of ggml's block types the engine runs), odd shapes,
//! bias and accumulation, both reduction paths, both tunings, and the chunked-weight path.
//! Block weights are random blocks (every bit pattern) read by the host dequantizer, itself
//! checked bit for bit against gguf-py's and ggml's in tests/quant.rs; and ggml's own blocks
//! from tests/fixture/ggml_blocks.safetensors against gguf-py's dequantization directly.

mod common;

use common::*;
use llava_wgpu::gpu::kernels::linear::matmul::MatmulLayout;
use llava_wgpu::gpu::kernels::linear::{self, gemv, matmul};
use llava_wgpu::gpu::kernels::ModuleKey;
use llava_wgpu::gpu::{Gpu, Recorder, Tensor, Weight, WeightFormat};
use llava_wgpu::quant;

/// Which kernel computes a case: the gemv (one dispatch per row) or a matmul layout.
#[derive(Clone, Copy, Debug)]
enum Path {
    Gemv,
    Matmul(MatmulLayout),
}

/// Every matmul layout: each is checked on every device, whichever one the device would pick.
const MATMULS: [Path; 2] = [
    Path::Matmul(MatmulLayout::Tiled),
    Path::Matmul(MatmulLayout::Lanes),
];

struct Case {
    m: usize,
    n: usize,
    k: usize,
    format: WeightFormat,
    bias: bool,
    accumulate: bool,
}

/// Error bound per element of a float weight: f32 accumulation error grows with the sum of
/// |x·w| terms.
fn bounds(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut out = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..k)
                .map(|t| (x[i * k + t] as f64 * w[j * k + t] as f64).abs())
                .sum();
            out[i * n + j] = 1e-6 + 4e-6 * s;
        }
    }
    out
}

/// Error bound per element of a block weight, whose kernels compute d·Σq·x + m·Σx per group
/// of 32: the terms are |d·q| and |m|, up to twice the group's largest |w| each, so the
/// accumulation error grows with Σ|x| · max|w| per group (which bounds every formulation of a
/// scale-and-minimum format, ggml's own dot products included).
fn block_bounds(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut out = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..k)
                .step_by(32)
                .map(|g| {
                    let xs: f64 = (g..g + 32).map(|t| (x[i * k + t] as f64).abs()).sum();
                    let ws = (g..g + 32).map(|t| (w[j * k + t] as f64).abs());
                    xs * 3.0 * ws.fold(0f64, f64::max)
                })
                .sum();
            out[i * n + j] = 1e-6 + 4e-6 * s;
        }
    }
    out
}

/// Run one case and check it; returns the shader variants its dispatches ran.
fn run_case(gpu: &Gpu, rng: &mut TestRng, case: &Case, path: Path) -> Vec<ModuleKey> {
    let Case {
        m,
        n,
        k,
        format,
        bias,
        accumulate,
    } = *case;
    let x = rng.uniform(m * k, -1.0, 1.0);
    let w_values = rng.uniform(n * k, -1.0, 1.0);
    let b = rng.uniform(n, -1.0, 1.0);
    let y0 = rng.uniform(m * n, -1.0, 1.0);
    // Block weights: the kernel must compute with exactly what the blocks stand for, as the
    // host dequantizer (checked against gguf-py and ggml in tests/quant.rs) reads them.
    let (mut weight, w_seen) = if format.is_quantized() {
        let blocks = rng.blocks(format, n, k);
        let w = Weight::from_blocks(gpu, "w", n, k, format, &blocks).unwrap();
        (w, quant::dequantize(format, &blocks).unwrap())
    } else {
        let w = Weight::from_f32(gpu, "w", n, k, &w_values, format).unwrap();
        let seen = match format {
            WeightFormat::F16 => linear::round_to_f16(&w_values),
            WeightFormat::BF16 => w_values
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect(),
            _ => w_values.clone(),
        };
        (w, seen)
    };
    if bias {
        weight = weight.with_bias(gpu, &b).unwrap();
    }
    let xt = Tensor::from_f32(gpu, &[m, k], &x, "x").unwrap();
    let yt = Tensor::empty(gpu, &[m, n], llava_wgpu::gpu::DType::F32, "y").unwrap();
    if accumulate {
        yt.write_f32(gpu, &y0).unwrap();
    } else {
        yt.poison(gpu);
    }
    let dispatches = match path {
        Path::Gemv => (0..m)
            .flat_map(|row| gemv::gemv(gpu, &xt, row, &weight, &yt, row, accumulate).unwrap())
            .collect(),
        Path::Matmul(layout) => {
            matmul::matmul_in(gpu, layout, &xt, &weight, &yt, accumulate).unwrap()
        }
    };
    let modules = dispatches.iter().map(|d| d.module.clone()).collect();
    let mut rec = Recorder::new(gpu);
    rec.dispatch_all(dispatches);
    rec.finish("matmul test").unwrap();
    let got = gpu.read_f32(&yt).unwrap();
    let want = linear::reference(
        &x,
        m,
        k,
        &w_seen,
        n,
        bias.then_some(&b[..]),
        accumulate.then_some(&y0[..]),
    );
    let what = format!(
        "{path:?} M={m} N={n} K={k} {format:?} bias={bias} acc={accumulate} chunks={}",
        weight.chunks.len()
    );
    let bound = if format.is_quantized() {
        block_bounds(&x, &w_seen, m, n, k)
    } else {
        bounds(&x, &w_seen, m, n, k)
    };
    assert_within(&what, rng.seed, &got, &want, &bound);
    modules
}

#[test]
fn matmul_matches_cpu_on_odd_shapes() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    let shapes = [
        (1, 7, 5),
        (37, 70, 33),
        (64, 64, 64),
        (2, 129, 130),
        (577, 96, 67),
        (65, 1, 1),
    ];
    for (i, &(m, n, k)) in shapes.iter().enumerate() {
        for format in FLOATS {
            let case = Case {
                m,
                n,
                k,
                format,
                bias: i % 2 == 0,
                accumulate: i % 3 == 1,
            };
            for path in MATMULS {
                run_case(&gpu, &mut rng, &case, path);
            }
        }
    }
}

/// The lanes layout without subgroups (every lane loads its 8 rows of X itself), and the layout
/// each device picks: lanes only on a CPU adapter with subgroups of at least 8 lanes.
#[test]
fn lanes_matmul_without_subgroups_matches_cpu() {
    let mut rng = TestRng::new();
    let gpu = gpu_without_features();
    assert_eq!(MatmulLayout::for_device(&gpu), MatmulLayout::Tiled);
    let lanes = Path::Matmul(MatmulLayout::Lanes);
    for (i, &(m, n, k)) in [(9, 65, 37), (3, 130, 96), (10, 3, 256)].iter().enumerate() {
        for format in [
            WeightFormat::F16,
            WeightFormat::BF16,
            WeightFormat::F32,
            WeightFormat::Q4_0,
            WeightFormat::Q4_K,
        ] {
            if k % format.block_weights() != 0 {
                continue;
            }
            let case = Case {
                m,
                n,
                k,
                format,
                bias: i == 0,
                accumulate: i == 1,
            };
            run_case(&gpu, &mut rng, &case, lanes);
        }
    }
    let default = self::gpu();
    let eight_lanes = default.caps.subgroup_min_size >= 8;
    // `caps.cpu`: the CPU tuning, which LLAVA_WGPU_DISABLE=cpu-tuning turns off on a CPU adapter.
    let expected = if default.caps.cpu && adapter_offers_subgroups(&default) && eight_lanes {
        MatmulLayout::Lanes
    } else {
        MatmulLayout::Tiled
    };
    assert_eq!(MatmulLayout::for_device(&default), expected);
}

/// The devices the gemv runs on in these tests, each with whether its dispatches must take the
/// subgroup path: the default device exactly when the adapter offers usable subgroups, a device
/// with the features disabled never; each with the adapter's own tuning and a GPU's (on a CPU
/// adapter, 16 rows per workgroup against 4).
fn gemv_devices() -> Vec<(Gpu, bool)> {
    let default = gpu();
    let subgroups = adapter_offers_subgroups(&default);
    let tuned_for_gpus = gpu_tuned_for_gpus(true);
    // Both tunings really run: a CPU adapter's default (unless LLAVA_WGPU_DISABLE=cpu-tuning
    // turned the CPU tuning off) differs from the GPU one.
    let rows = |gpu: &Gpu| gemv::GemvShape::for_device(&gpu.caps).rows;
    if default.caps.cpu {
        assert_ne!(rows(&default), rows(&tuned_for_gpus));
        assert_eq!(
            MatmulLayout::for_device(&tuned_for_gpus),
            MatmulLayout::Tiled
        );
    }
    vec![
        (default, subgroups),
        (gpu_without_features(), false),
        (tuned_for_gpus, subgroups),
        (gpu_tuned_for_gpus(false), false),
    ]
}

#[test]
fn gemv_matches_cpu_with_and_without_subgroups() {
    let mut rng = TestRng::new();
    for (gpu, subgroups) in gemv_devices() {
        let shapes = [
            (1, 7, 5),
            (1, 130, 67),
            (3, 33, 1024),
            (1, 1000, 129),
            (1, 5, 4099),
        ];
        for (i, &(m, n, k)) in shapes.iter().enumerate() {
            for format in FLOATS {
                let case = Case {
                    m,
                    n,
                    k,
                    format,
                    bias: i % 2 == 1,
                    accumulate: i % 2 == 0,
                };
                let modules = run_case(&gpu, &mut rng, &case, Path::Gemv);
                assert_ran_path("gemv", &modules, subgroups);
            }
        }
    }
}

#[test]
fn chunked_weights_give_the_same_result() {
    // 1 KiB bindings: a [300, 37] f16 weight (48 words per row... 96 bytes) splits into chunks of
    // 10 rows; f32 rows of 160 bytes into chunks of 6.
    let gpu = gpu_with_binding_limit(1024);
    let mut rng = TestRng::new();
    for format in FLOATS {
        for (m, path) in chunked_cases() {
            let case = Case {
                m,
                n: 300,
                k: 37,
                format,
                bias: true,
                accumulate: m == 5,
            };
            run_case(&gpu, &mut rng, &case, path);
        }
    }
}

/// Chunked cases: a few rows and more than a tile of rows through each matmul layout, and one
/// row through the gemv.
fn chunked_cases() -> Vec<(usize, Path)> {
    let mut cases = vec![(1, Path::Gemv)];
    for path in MATMULS {
        cases.extend([(5, path), (70, path)]);
    }
    cases
}

const FLOATS: [WeightFormat; 3] = [WeightFormat::F16, WeightFormat::BF16, WeightFormat::F32];

/// Every block format the engine runs.
fn block_formats() -> impl Iterator<Item = WeightFormat> {
    WeightFormat::ALL.into_iter().filter(|f| f.is_quantized())
}

/// K a multiple of 32 but not of 128 (odd block counts: 1, 3, 5, 35 blocks; 1, 3, 5 K-quant
/// super-blocks), odd N, M = 1, 37 and 577 (a CLIP-L/336 sequence).
#[test]
fn quantized_matmul_matches_cpu_on_odd_shapes() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    let shapes = [
        (1, 7, 32),
        (37, 70, 96),
        (577, 65, 160),
        (64, 129, 1120),
        (3, 1, 32),
        (37, 33, 256),
        (577, 9, 768),
        (2, 131, 1280),
    ];
    for path in MATMULS {
        run_quantized(&gpu, &mut rng, &shapes, |i| (i % 2 == 0, i % 3 == 1), path);
    }
}

/// Every block format at each of `shapes` (m, n, k) whose K is whole blocks of it, with bias
/// and accumulation as `flags(i)` says for shape i.
fn run_quantized(
    gpu: &Gpu,
    rng: &mut TestRng,
    shapes: &[(usize, usize, usize)],
    flags: impl Fn(usize) -> (bool, bool),
    path: Path,
) {
    for (i, &(m, n, k)) in shapes.iter().enumerate() {
        let (bias, accumulate) = flags(i);
        for format in block_formats().filter(|f| k % f.block_weights() == 0) {
            let case = Case {
                m,
                n,
                k,
                format,
                bias,
                accumulate,
            };
            run_case(gpu, rng, &case, path);
        }
    }
}

#[test]
fn quantized_gemv_matches_cpu_with_and_without_subgroups() {
    let mut rng = TestRng::new();
    for (gpu, _) in gemv_devices() {
        let shapes = [
            (1, 7, 32),
            (1, 131, 96),
            (2, 33, 1120),
            (1, 1001, 160),
            (1, 5, 4128),
            (1, 9, 256),
            (2, 65, 768),
            (1, 1001, 1280),
        ];
        run_quantized(
            &gpu,
            &mut rng,
            &shapes,
            |i| (i % 2 == 1, i % 2 == 0),
            Path::Gemv,
        );
    }
}

/// Chunks of a quantized weight each carry their own scales region.
#[test]
fn quantized_chunked_weights_give_the_same_result() {
    // 2 KiB bindings: a [300, 256] Q8_0 row is 272 bytes → 7 rows a chunk; Q4_K 144 → 14.
    let gpu = gpu_with_binding_limit(2048);
    let mut rng = TestRng::new();
    for format in block_formats() {
        for (m, path) in chunked_cases() {
            let case = Case {
                m,
                n: 300,
                k: 256,
                format,
                bias: true,
                accumulate: m == 5,
            };
            run_case(&gpu, &mut rng, &case, path);
        }
    }
}

/// The GPU layout keeps ggml's block bytes recoverable, and the buffer is exactly
/// `storage_bytes` long.
#[test]
fn quantized_upload_keeps_the_blocks() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    let (n, k) = (13, 256);
    for format in block_formats() {
        let blocks = rng.blocks(format, n, k);
        let w = Weight::from_blocks(&gpu, "w", n, k, format, &blocks).unwrap();
        assert_eq!(w.chunks.len(), 1);
        assert_eq!(w.chunks[0].buffer.size(), format.storage_bytes(n, k));
        let buffer = &w.chunks[0].buffer;
        let words = gpu
            .read_words(buffer, 0, buffer.size() as usize / 4)
            .unwrap();
        let bytes: &[u8] = bytemuck::cast_slice(&words);
        let back = quant::to_ggml_blocks(format, n * k / format.block_weights(), bytes).unwrap();
        assert_eq!(back, blocks, "{format:?}");
    }
}

#[test]
fn quantized_upload_rejects_wrong_block_counts() {
    let gpu = gpu();
    let blocks = vec![0u8; 3 * 34];
    let err = Weight::from_blocks(&gpu, "layers.0.q_proj", 2, 64, WeightFormat::Q8_0, &blocks)
        .unwrap_err()
        .to_string();
    assert!(err.contains("layers.0.q_proj"), "{err}");
    let err = Weight::from_blocks(&gpu, "odd", 2, 40, WeightFormat::Q4_0, &[0; 36])
        .unwrap_err()
        .to_string();
    assert!(err.contains("odd") && err.contains("40"), "{err}");
}

#[test]
fn linear_rejects_mismatched_shapes() {
    let gpu = gpu();
    let w = Weight::from_f32(&gpu, "proj", 4, 3, &[0.0; 12], WeightFormat::F16).unwrap();
    let x = Tensor::from_f32(&gpu, &[2, 5], &[0.0; 10], "x").unwrap();
    let y = Tensor::empty(&gpu, &[2, 4], llava_wgpu::gpu::DType::F32, "y").unwrap();
    let err = linear::linear(&gpu, &x, &w, &y, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("proj"), "{err}");
}

/// ggml's own blocks (scripts/ggml_reference.sh: 25 rows of 512 quantized by ggml's C code)
/// through gemv and both matmul layouts, in both tunings, against gguf-py's dequantization of
/// the same blocks in f64: the kernels read every format byte-exactly as ggml and gguf-py do.
#[test]
fn kernels_read_ggmls_blocks_as_gguf_py_dequantizes_them() {
    let data = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixture/ggml_blocks.safetensors"
    ))
    .unwrap();
    let st = safetensors::SafeTensors::deserialize(&data).unwrap();
    let mut rng = TestRng::new();
    for gpu in [gpu(), gpu_tuned_for_gpus(true)] {
        read_ggmls_blocks(&st, &gpu, &mut rng);
    }
}

fn read_ggmls_blocks(st: &safetensors::SafeTensors, gpu: &Gpu, rng: &mut TestRng) {
    let (n, k) = (25, 512);
    for format in WeightFormat::ALL {
        let name = format.name();
        let Ok(stored) = st.tensor(name) else {
            assert_eq!(format, WeightFormat::F32, "{name} missing from the fixture");
            continue;
        };
        let want: Vec<f32> =
            bytemuck::pod_collect_to_vec(st.tensor(&format!("{name}_gguf")).unwrap().data());
        let w = Weight::from_stored(gpu, "w", n, k, format, stored.data()).unwrap();
        for (m, path) in [(1, Path::Gemv), (9, MATMULS[0]), (9, MATMULS[1])] {
            let x = rng.uniform(m * k, -1.0, 1.0);
            let xt = Tensor::from_f32(gpu, &[m, k], &x, "x").unwrap();
            let yt = Tensor::empty(gpu, &[m, n], llava_wgpu::gpu::DType::F32, "y").unwrap();
            yt.poison(gpu);
            let dispatches = match path {
                Path::Gemv => gemv::gemv(gpu, &xt, 0, &w, &yt, 0, false).unwrap(),
                Path::Matmul(layout) => {
                    matmul::matmul_in(gpu, layout, &xt, &w, &yt, false).unwrap()
                }
            };
            let mut rec = Recorder::new(gpu);
            rec.dispatch_all(dispatches);
            rec.finish("ggml blocks").unwrap();
            let got = gpu.read_f32(&yt).unwrap();
            let reference = linear::reference(&x, m, k, &want, n, None, None);
            let what = format!(
                "{path:?} {name} (ggml's blocks), cpu tuning {}",
                gpu.caps.cpu
            );
            let bound = if format.is_quantized() {
                block_bounds(&x, &want, m, n, k)
            } else {
                bounds(&x, &want, m, n, k)
            };
            assert_within(&what, rng.seed, &got, &reference, &bound);
        }
    }
}

/// `linear::gram` (VisPruner's and DivPrune's similarities): `X·Xᵀ` of random rows, odd row
/// counts, against the f64 reference with X as both operands; the output is poisoned first. A
/// width that is not a whole f32 weight row is refused.
#[test]
fn gram_matches_cpu() {
    let gpu = gpu();
    let mut rng = TestRng::new();
    for (n, k) in [(1, 8), (37, 12), (196, 64), (5, 260)] {
        let x = rng.normal(n * k, 1.0);
        let rows = Tensor::from_f32(&gpu, &[n, k], &x, "x").unwrap();
        let gram = Tensor::empty(&gpu, &[n, n], llava_wgpu::gpu::DType::F32, "gram").unwrap();
        gram.poison(&gpu);
        let mut rec = Recorder::new(&gpu);
        rec.dispatch_all(linear::gram(&gpu, &rows, &gram).unwrap());
        rec.finish("gram").unwrap();
        let got = gpu.read_f32(&gram).unwrap();
        let want = linear::reference(&x, n, k, &x, n, None, None);
        assert_within("gram", rng.seed, &got, &want, &bounds(&x, &x, n, n, k));
    }
    let odd = Tensor::from_f32(&gpu, &[2, 3], &[0.0; 6], "x").unwrap();
    let out = Tensor::from_f32(&gpu, &[2, 2], &[0.0; 4], "gram").unwrap();
    let e = linear::gram(&gpu, &odd, &out).unwrap_err().to_string();
    assert!(e.contains("pad"), "{e}");
}

/// A random weight in `format` and the values the kernels see (floats rounded to the format,
/// blocks dequantized by the host's ggml reference).
fn random_weight(
    gpu: &Gpu,
    rng: &mut TestRng,
    format: WeightFormat,
    n: usize,
    k: usize,
) -> (Weight, Vec<f32>) {
    if format.is_quantized() {
        let blocks = rng.blocks(format, n, k);
        let w = Weight::from_stored(gpu, "w", n, k, format, &blocks).unwrap();
        return (w, quant::dequantize(format, &blocks).unwrap());
    }
    let values = rng.uniform(n * k, -1.0, 1.0);
    let w = Weight::from_f32(gpu, "w", n, k, &values, format).unwrap();
    let seen = match format {
        WeightFormat::F16 => linear::round_to_f16(&values),
        _ => values,
    };
    (w, seen)
}

/// The fused input in f64 from a row of x: `RMSNorm(row)·γ` given `norm` (γ, eps), else
/// `silu(gate)·up` of a row of 2K values.
fn fused_input(row: &[f32], k: usize, norm: Option<(&[f32], f32)>) -> Vec<f64> {
    match norm {
        Some((gamma, eps)) => {
            let mean = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / k as f64;
            let inv = 1.0 / (mean + eps as f64).sqrt();
            (0..k)
                .map(|i| row[i] as f64 * inv * gamma[i] as f64)
                .collect()
        }
        None => (0..k)
            .map(|i| {
                let (g, u) = (row[i] as f64, row[k + i] as f64);
                g / (1.0 + (-g).exp()) * u
            })
            .collect(),
    }
}

/// The decode step's fused gemv inputs against f64: `RMSNorm(x)·γ` (the norm's sum of squares
/// reduced inside the gemv) and `silu(gate)·up` of a [2K] row, on every gemv device, for float
/// and block weights, from the second row of x (an offset that is not a multiple of 4 for the
/// odd K), accumulating into poisoned or given outputs. Bound: the plain gemv's, on the fused
/// input, plus 4e-6 of the value for the f32 rms scale and exp.
#[test]
fn fused_gemv_inputs_match_cpu() {
    use llava_wgpu::gpu::kernels::linear::LinearInput;
    let mut rng = TestRng::new();
    let cases = [
        (WeightFormat::F32, 37, 70),
        (WeightFormat::F16, 130, 67),
        (WeightFormat::Q4_0, 33, 96),
        (WeightFormat::Q6_K, 9, 512),
    ];
    for (gpu, _) in gemv_devices() {
        for (format, n, k) in cases {
            let (weight, w_seen) = random_weight(&gpu, &mut rng, format, n, k);
            let gamma = rng.uniform(k, -2.0, 2.0);
            let gamma_t = Tensor::from_f32(&gpu, &[k], &gamma, "gamma").unwrap();
            let eps = 1e-5f32;
            for silu in [false, true] {
                let width = if silu { 2 * k } else { k };
                let x = rng.normal(2 * width, 3.0);
                let norm = (!silu).then_some((&gamma[..], eps));
                let input = fused_input(&x[width..], k, norm);
                let input32: Vec<f32> = input.iter().map(|&v| v as f32).collect();
                let y0 = rng.uniform(n, -1.0, 1.0);
                let xt = Tensor::from_f32(&gpu, &[2, width], &x, "x").unwrap();
                let yt = Tensor::empty(&gpu, &[1, n], llava_wgpu::gpu::DType::F32, "y").unwrap();
                let mode = match silu {
                    true => LinearInput::SiluGate,
                    false => LinearInput::RmsNorm {
                        gamma: &gamma_t,
                        eps,
                    },
                };
                // SiLU accumulates (as into the residual stream), the norm overwrites poison.
                match silu {
                    true => yt.write_f32(&gpu, &y0).unwrap(),
                    false => yt.poison(&gpu),
                }
                let d = gemv::gemv_with(&gpu, &xt, 1, mode, &weight, &yt, 0, silu).unwrap();
                let mut rec = Recorder::new(&gpu);
                rec.dispatch_all(d);
                rec.finish("fused gemv test").unwrap();
                let got = gpu.read_f32(&yt).unwrap();
                let want: Vec<f64> = (0..n)
                    .map(|j| {
                        let dot: f64 = (0..k).map(|t| input[t] * w_seen[j * k + t] as f64).sum();
                        dot + if silu { y0[j] as f64 } else { 0.0 }
                    })
                    .collect();
                let plain = if format.is_quantized() {
                    block_bounds(&input32, &w_seen, 1, n, k)
                } else {
                    bounds(&input32, &w_seen, 1, n, k)
                };
                let bound: Vec<f64> = plain
                    .iter()
                    .zip(&want)
                    .map(|(b, w)| b + 4e-6 * w.abs())
                    .collect();
                let what = format!("{mode:?} {format:?} N={n} K={k} on {}", gpu.info.name);
                assert_within(&what, rng.seed, &got, &want, &bound);
            }
        }
    }
}

/// A norm weight of the wrong length, or a SiLU row that is not 2K wide, is refused.
#[test]
fn fused_gemv_inputs_refuse_mismatched_shapes() {
    use llava_wgpu::gpu::kernels::linear::LinearInput;
    let gpu = gpu();
    let w = Weight::from_f32(&gpu, "w", 4, 8, &[0.5; 32], WeightFormat::F32).unwrap();
    let x = Tensor::from_f32(&gpu, &[1, 8], &[1.0; 8], "x").unwrap();
    let y = Tensor::empty(&gpu, &[1, 4], llava_wgpu::gpu::DType::F32, "y").unwrap();
    let short = Tensor::from_f32(&gpu, &[7], &[1.0; 7], "gamma").unwrap();
    let norm = LinearInput::RmsNorm {
        gamma: &short,
        eps: 1e-5,
    };
    assert!(gemv::gemv_with(&gpu, &x, 0, norm, &w, &y, 0, false).is_err());
    assert!(gemv::gemv_with(&gpu, &x, 0, LinearInput::SiluGate, &w, &y, 0, false).is_err());
    let gamma = Tensor::from_f32(&gpu, &[8], &[1.0; 8], "gamma").unwrap();
    let norm = LinearInput::RmsNorm {
        gamma: &gamma,
        eps: 1e-5,
    };
    assert!(gemv::gemv_with(&gpu, &x, 0, norm, &w, &y, 0, false).is_ok());
}

/// The tiled matmul's fused inputs (a prefill's norms and MLP activation on a GPU) against f64:
/// `RMSNorm(x)·γ` of every row (γ folded into the staged weights, Σx² from the staged X) and
/// `silu(gate)·up` of [M, 2K] rows, each overwriting poisoned outputs and accumulating into given
/// ones (the residual add, after the 1/rms scale), with and without subgroups and with weights
/// split into row chunks; float and block weights, one with a bias, row counts that leave partial
/// 64-row tiles. Bound: the plain matmul's, on the fused input, plus 4e-6 of the value.
#[test]
fn fused_matmul_inputs_match_cpu() {
    let mut rng = TestRng::new();
    let chunked = Gpu::new(llava_wgpu::gpu::GpuOptions {
        disable_cpu_tuning: true,
        max_binding_bytes: Some(2048),
        ..Default::default()
    })
    .unwrap();
    for gpu in [gpu_tuned_for_gpus(true), gpu_tuned_for_gpus(false), chunked] {
        let cases = [
            (WeightFormat::F32, 70, 37, 70, false),
            (WeightFormat::F16, 5, 130, 67, true),
            (WeightFormat::Q4_0, 67, 33, 96, false),
            (WeightFormat::Q6_K, 3, 9, 512, false),
        ];
        for (format, m, n, k, with_bias) in cases {
            let (weight, w_seen) = random_weight(&gpu, &mut rng, format, n, k);
            let bias = rng.uniform(n, -1.0, 1.0);
            let weight = match with_bias {
                true => weight.with_bias(&gpu, &bias).unwrap(),
                false => weight,
            };
            let bias = with_bias.then_some(&bias[..]);
            for silu in [false, true] {
                for accumulate in [false, true] {
                    let case = FusedCase {
                        m,
                        n,
                        k,
                        silu,
                        accumulate,
                        bias,
                    };
                    check_fused_matmul(&gpu, &mut rng, &weight, &w_seen, case);
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
struct FusedCase<'a> {
    m: usize,
    n: usize,
    k: usize,
    silu: bool,
    accumulate: bool,
    bias: Option<&'a [f32]>,
}

/// One fused tiled matmul on random x (and γ) against the f64 product of the fused input.
fn check_fused_matmul(gpu: &Gpu, rng: &mut TestRng, weight: &Weight, w_seen: &[f32], c: FusedCase) {
    use llava_wgpu::gpu::kernels::linear::LinearInput;
    let FusedCase { m, n, k, silu, .. } = c;
    let gamma = rng.uniform(k, -2.0, 2.0);
    let gamma_t = Tensor::from_f32(gpu, &[k], &gamma, "gamma").unwrap();
    let eps = 1e-5f32;
    let width = if silu { 2 * k } else { k };
    let x = rng.normal(m * width, 3.0);
    let norm = (!silu).then_some((&gamma[..], eps));
    let input: Vec<f64> = x
        .chunks(width)
        .flat_map(|row| fused_input(row, k, norm))
        .collect();
    let input32: Vec<f32> = input.iter().map(|&v| v as f32).collect();
    let y0 = rng.uniform(m * n, -1.0, 1.0);
    let xt = Tensor::from_f32(gpu, &[m, width], &x, "x").unwrap();
    let yt = Tensor::empty(gpu, &[m, n], llava_wgpu::gpu::DType::F32, "y").unwrap();
    let mode = match silu {
        true => LinearInput::SiluGate,
        false => LinearInput::RmsNorm {
            gamma: &gamma_t,
            eps,
        },
    };
    match c.accumulate {
        true => yt.write_f32(gpu, &y0).unwrap(),
        false => yt.poison(gpu),
    }
    let tiled = MatmulLayout::Tiled;
    let d = matmul::matmul_with(gpu, tiled, &xt, mode, weight, &yt, c.accumulate).unwrap();
    let mut rec = Recorder::new(gpu);
    rec.dispatch_all(d);
    rec.finish("fused matmul test").unwrap();
    let got = gpu.read_f32(&yt).unwrap();
    let want: Vec<f64> = (0..m * n)
        .map(|at| {
            let (i, j) = (at / n, at % n);
            let dot: f64 = (0..k)
                .map(|t| input[i * k + t] * w_seen[j * k + t] as f64)
                .sum();
            let bias = c.bias.map_or(0.0, |b| b[j] as f64);
            dot + bias + if c.accumulate { y0[at] as f64 } else { 0.0 }
        })
        .collect();
    let plain = match weight.formats()[0].is_quantized() {
        true => block_bounds(&input32, w_seen, m, n, k),
        false => bounds(&input32, w_seen, m, n, k),
    };
    let bound: Vec<f64> = plain
        .iter()
        .zip(&want)
        .map(|(b, w)| b + 4e-6 * w.abs())
        .collect();
    let what = format!(
        "{mode:?} accumulate={} bias={} {:?} M={m} N={n} K={k} in {} chunks on {}",
        c.accumulate,
        c.bias.is_some(),
        weight.formats(),
        weight.chunks.len(),
        gpu.info.name
    );
    assert_within(&what, rng.seed, &got, &want, &bound);
}

/// The fused matmul refuses a γ of the wrong length, a SiLU input that is not 2K wide, and the
/// lanes layout (which reads X as stored); the plain product still runs in both layouts.
#[test]
fn fused_matmul_inputs_refuse_mismatched_shapes_and_the_lanes_layout() {
    use llava_wgpu::gpu::kernels::linear::LinearInput;
    let gpu = gpu();
    let w = Weight::from_f32(&gpu, "w", 4, 8, &[0.5; 32], WeightFormat::F32).unwrap();
    let x = Tensor::from_f32(&gpu, &[3, 8], &[1.0; 24], "x").unwrap();
    let y = Tensor::empty(&gpu, &[3, 4], llava_wgpu::gpu::DType::F32, "y").unwrap();
    let short = Tensor::from_f32(&gpu, &[7], &[1.0; 7], "gamma").unwrap();
    let gamma = Tensor::from_f32(&gpu, &[8], &[1.0; 8], "gamma").unwrap();
    let norm = |gamma| LinearInput::RmsNorm { gamma, eps: 1e-5 };
    let tiled = MatmulLayout::Tiled;
    assert!(matmul::matmul_with(&gpu, tiled, &x, norm(&short), &w, &y, false).is_err());
    let silu = LinearInput::SiluGate;
    assert!(matmul::matmul_with(&gpu, tiled, &x, silu, &w, &y, false).is_err());
    assert!(matmul::matmul_with(&gpu, tiled, &x, norm(&gamma), &w, &y, false).is_ok());
    if gpu.caps.prefers_lanes(8) {
        let lanes = MatmulLayout::Lanes;
        let refused = matmul::matmul_with(&gpu, lanes, &x, norm(&gamma), &w, &y, false);
        assert!(
            matches!(refused, Err(llava_wgpu::Error::Argument { .. })),
            "{refused:?}"
        );
        let plain = LinearInput::Plain;
        assert!(matmul::matmul_with(&gpu, lanes, &x, plain, &w, &y, false).is_ok());
    }
}
