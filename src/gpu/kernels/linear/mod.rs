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
use crate::gpu::tensor::{DType, Tensor, Weight, WeightChunk, WeightFormat};

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

/// The shader's X_MODE values.
pub(crate) const X_PLAIN: u32 = 0;
pub(crate) const X_RMS_NORM: u32 = 1;
pub(crate) const X_SILU_GATE: u32 = 2;

/// What a linear kernel's input rows are, computed as they are loaded: the norms and the MLP
/// activation fused into the projection that reads them (gemv.wgsl for a decode step, the tiled
/// matmul.wgsl for a prefill on a GPU).
#[derive(Clone, Copy, Debug)]
pub enum LinearInput<'a> {
    /// The row of x as it is.
    Plain,
    /// `RMSNorm(x)·γ` of the row (LLaMA's `LlamaRMSNorm`, `gamma` [K] f32).
    RmsNorm { gamma: &'a Tensor, eps: f32 },
    /// `silu(gate)·up` of a row of 2K values, gate first (LLaMA's MLP between `gate_up_proj`
    /// and `down_proj`).
    SiluGate,
}

impl LinearInput<'_> {
    /// Every X_MODE, for tests that compile them all.
    pub const MODES: [u32; 3] = [X_PLAIN, X_RMS_NORM, X_SILU_GATE];

    /// The shader's X_MODE.
    pub fn mode(&self) -> u32 {
        match self {
            LinearInput::Plain => X_PLAIN,
            LinearInput::RmsNorm { .. } => X_RMS_NORM,
            LinearInput::SiluGate => X_SILU_GATE,
        }
    }

    /// The buffer bound as γ (`stand_in` where the mode reads none) and the norm's epsilon.
    pub(crate) fn gamma_binding<'b>(
        &'b self,
        stand_in: &'b wgpu::Buffer,
    ) -> (&'b wgpu::Buffer, f32) {
        match self {
            LinearInput::RmsNorm { gamma, eps } => (&gamma.buffer, *eps),
            _ => (stand_in, 0.0),
        }
    }

    /// Whether a norm's γ is K f32 values (always, for the other modes).
    pub(crate) fn gamma_fits(&self, k: usize) -> bool {
        match self {
            LinearInput::RmsNorm { gamma, .. } => gamma.dtype == DType::F32 && gamma.numel() == k,
            _ => true,
        }
    }

    /// Values per row of x for a product with K columns.
    pub(crate) fn row_len(&self, k: usize) -> usize {
        match self {
            LinearInput::SiluGate => 2 * k,
            _ => k,
        }
    }
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

/// [`linear`] of the rows `input` computes from the rows of `x`: the gemv for a single row, the
/// matmul otherwise, which must be a layout that fuses inputs here ([`fuses_inputs`]).
pub fn linear_with(
    gpu: &Gpu,
    x: &Tensor,
    input: LinearInput,
    w: &Weight,
    y: &Tensor,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    if x.rows_cols().0 == 1 {
        gemv::gemv_with(gpu, x, 0, input, w, y, 0, accumulate)
    } else {
        let layout = matmul::MatmulLayout::for_device(gpu);
        matmul::matmul_with(gpu, layout, x, input, w, y, accumulate)
    }
}

/// Whether [`linear_with`] takes fused inputs on this device at every row count: where the
/// matmul runs in the tiled layout (GPUs; CPU adapters without subgroups), not the lanes one.
pub fn fuses_inputs(gpu: &Gpu) -> bool {
    matmul::MatmulLayout::for_device(gpu).fuses_inputs()
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
