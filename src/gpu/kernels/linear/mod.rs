//! Linear layers, `Y = X·Wᵀ (+ bias) (+ Y)`, and their two kernels: `gemv` for a single row
//! (decode) and the tiled `matmul` for many (prefill, the vision tower).
//!
//! This module holds what both launchers share (the flag bits their shaders read, the shape
//! check, the f64 CPU reference) and [`linear`], which picks the kernel by shape. The two
//! launchers are leaves: they use only these shared items, never each other.

pub mod gemv;
pub mod matmul;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result};
use crate::gpu::device::Gpu;
use crate::gpu::kernels::{Constants, Dispatch};
use crate::gpu::tensor::{Tensor, Weight, WeightChunk, WeightFormat};

/// Bit of `Params::flags` that adds the bias (FLAG_BIAS in the shaders).
pub(crate) const FLAG_BIAS: u32 = 1;
/// Bit of `Params::flags` that adds the product to what Y holds (FLAG_ACCUMULATE in the shaders).
pub(crate) const FLAG_ACCUMULATE: u32 = 2;

/// The flag bits as the shader constants gemv.wgsl and matmul.wgsl are given.
pub(crate) fn flag_constants() -> Constants {
    Constants::new(&[
        ("FLAG_BIAS", FLAG_BIAS),
        ("FLAG_ACCUMULATE", FLAG_ACCUMULATE),
    ])
}

/// The `flags` word for a product with `w` (bias if it has one) and `accumulate`.
pub(crate) fn flags_for(w: &Weight, accumulate: bool) -> u32 {
    let mut flags = if accumulate { FLAG_ACCUMULATE } else { 0 };
    if w.bias.is_some() {
        flags |= FLAG_BIAS;
    }
    flags
}

/// The `FORMAT` constant the linear shaders are compiled for: the ggml type number of the
/// chunk's format (blocks.wgsl names formats by these numbers).
pub(crate) fn format_constant(format: WeightFormat) -> Constants {
    Constants::new(&[("FORMAT", format.ggml_type())])
}

/// How a shader finds a chunk of `w` with K = `k`: `(w_stride, scales)` as the shaders'
/// `Params` name them. Float formats: 32-bit words per stored row, no scales region. Block
/// formats: blocks per row, and the word where the scale fields follow the bodies.
pub(crate) fn chunk_layout(chunk: &WeightChunk, k: usize) -> (u32, u32) {
    match (chunk.format.row_words(k), chunk.format.blocks()) {
        (Some(words), _) => (words as u32, 0),
        (None, Some(layout)) => {
            let blocks = k / layout.weights;
            (
                blocks as u32,
                (chunk.rows * blocks * layout.body_bytes() / 4) as u32,
            )
        }
        (None, None) => unreachable!("every format is either float or blocks"),
    }
}

/// The profiler's name of a linear kernel for one format: `{kernel}_{format}{suffix}`, e.g.
/// `gemv_q4_k_subgroup`. Interned, and looked up without building the string: dispatches are
/// built every decode step, and there are at most a few dozen such names.
pub(crate) fn kernel_name(
    kernel: &'static str,
    format: WeightFormat,
    suffix: &'static str,
) -> &'static str {
    type Names = HashMap<(&'static str, WeightFormat, &'static str), &'static str>;
    static NAMES: OnceLock<Mutex<Names>> = OnceLock::new();
    let mut names = NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    names.entry((kernel, format, suffix)).or_insert_with(|| {
        Box::leak(format!("{kernel}_{}{suffix}", format.name()).into_boxed_str())
    })
}

/// Check `x [M, K]`, `w [N, K]`, `y [M, N]` and return (M, N, K).
pub(crate) fn check_linear(
    op: &str,
    x: &Tensor,
    w: &Weight,
    y: &Tensor,
) -> Result<(usize, usize, usize)> {
    let (m, k) = x.rows_cols();
    let (ym, yn) = y.rows_cols();
    if k != w.k || ym != m || yn != w.n {
        return Err(Error::shape(
            op,
            format!(
                "X {:?} · {}ᵀ [{}, {}] does not give Y {:?}",
                x.shape, w.name, w.n, w.k, y.shape
            ),
        ));
    }
    Ok((m, w.n, k))
}

/// `Y = X·Wᵀ` choosing the kernel by shape: gemv for a single row, matmul otherwise.
pub fn linear(
    gpu: &Gpu,
    x: &Tensor,
    w: &Weight,
    y: &Tensor,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    let (m, _, _) = check_linear("linear", x, w, y)?;
    if m == 1 {
        gemv::gemv(gpu, x, 0, w, y, 0, accumulate)
    } else {
        matmul::matmul(gpu, x, w, y, accumulate)
    }
}

/// The Gram matrix `Y = X·Xᵀ` of an f32 `x [n, k]` (its rows as both operands: the linear
/// kernels read `x` as an f32 weight), into `y [n, n]`. `k` must be a whole f32 weight row
/// (a multiple of [`WeightFormat::row_alignment`]); pad the rows with zeros otherwise.
pub fn gram(gpu: &Gpu, x: &Tensor, y: &Tensor) -> Result<Vec<Dispatch>> {
    let (n, k) = x.rows_cols();
    if WeightFormat::F32.row_words(k) != Some(k) {
        return Err(Error::shape(
            "gram",
            format!("rows of {k} f32 values are not whole weight rows: pad them"),
        ));
    }
    let weight = Weight {
        name: "gram".into(),
        n,
        k,
        chunks: vec![WeightChunk {
            buffer: x.buffer.clone(),
            first_row: 0,
            rows: n,
            format: WeightFormat::F32,
        }],
        bias: None,
    };
    linear(gpu, x, &weight, y, false)
}

/// CPU reference in f64: `y[m][n] = Σ_k x[m][k]·w[n][k] + bias[n] + y_in[m][n]`.
/// `w` must hold the values the GPU sees (round through f16 first for f16 weights).
pub fn reference(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    y_in: Option<&[f32]>,
) -> Vec<f64> {
    let mut y = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for t in 0..k {
                s += x[i * k + t] as f64 * w[j * k + t] as f64;
            }
            if let Some(b) = bias {
                s += b[j] as f64;
            }
            if let Some(y0) = y_in {
                s += y0[i * n + j] as f64;
            }
            y[i * n + j] = s;
        }
    }
    y
}

/// The values an f16 weight holds on the GPU.
pub fn round_to_f16(values: &[f32]) -> Vec<f32> {
    values
        .iter()
        .map(|&v| half::f16::from_f32(v).to_f32())
        .collect()
}
