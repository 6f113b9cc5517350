//! quick_gelu, exact gelu and SiLU·mul: launchers for shaders/activation.wgsl and references.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::device::Gpu;
use crate::gpu::kernels::{Dispatch, KernelCall, Shader, WorkgroupSize};
use crate::gpu::tensor::{DType, Tensor};

/// Threads per workgroup, one per element (WG in the shader).
pub const WORKGROUP: WorkgroupSize = WorkgroupSize(256);

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    count: u32,
    width: u32,
    _pad: [u32; 2],
}

/// The element-wise activations a checkpoint's `hidden_act` can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x · sigmoid(1.702 x)` (CLIP's `quick_gelu`).
    QuickGelu,
    /// `0.5 x (1 + erf(x / √2))` (`gelu`, exact).
    Gelu,
}

impl Activation {
    /// Parse a Hugging Face `hidden_act` name.
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Self::QuickGelu),
            "gelu" => Some(Self::Gelu),
            _ => None,
        }
    }

    pub fn reference(self, v: f64) -> f64 {
        match self {
            Self::QuickGelu => v / (1.0 + (-1.702 * v).exp()),
            Self::Gelu => 0.5 * v * (1.0 + erf_f64(v / std::f64::consts::SQRT_2)),
        }
    }
}

/// Apply `act` to every element of `x` in place.
pub fn activate(gpu: &Gpu, act: Activation, x: &Tensor) -> Result<Dispatch> {
    let n = x.numel();
    let entry = match act {
        Activation::QuickGelu => "quick_gelu",
        Activation::Gelu => "gelu_erf",
    };
    let params = Params {
        count: n as u32,
        width: 0,
        _pad: [0; 2],
    };
    KernelCall::new(gpu, Shader::Activation, entry)
        .constants(WORKGROUP.constants())
        .params(&params)
        .read_write(&x.buffer)
        .build(
            entry,
            format!("n={n}"),
            WORKGROUP.groups_for(gpu, n),
            (n * 8) as u64,
            (n * 8) as u64,
        )
}

/// `out[r, j] = silu(gate_up[r, j]) · gate_up[r, width + j]` for `gate_up [rows, 2·width]`.
pub fn silu_mul(gpu: &Gpu, gate_up: &Tensor, out: &Tensor) -> Result<Dispatch> {
    let (rows, cols) = gate_up.rows_cols();
    let (out_rows, width) = out.rows_cols();
    let f32s = gate_up.dtype == DType::F32 && out.dtype == DType::F32;
    if cols != 2 * width || out_rows != rows || !f32s {
        return Err(Error::shape(
            "silu_mul",
            format!(
                "gate|up {:?} must be f32 [rows, 2·width] for f32 out {:?}",
                gate_up.shape, out.shape
            ),
        ));
    }
    let n = rows * width;
    let params = Params {
        count: n as u32,
        width: width as u32,
        _pad: [0; 2],
    };
    KernelCall::new(gpu, Shader::Activation, "silu_mul")
        .constants(WORKGROUP.constants())
        .params(&params)
        .read_write(&gate_up.buffer)
        .read_write(&out.buffer)
        .build(
            "silu_mul",
            format!("rows={rows} width={width}"),
            WORKGROUP.groups_for(gpu, n),
            (n * 6) as u64,
            (n * 12) as u64,
        )
}

pub fn silu_mul_reference(gate_up: &[f32], width: usize) -> Vec<f64> {
    gate_up
        .chunks(2 * width)
        .flat_map(|row| {
            (0..width).map(move |j| {
                let g = row[j] as f64;
                g / (1.0 + (-g).exp()) * row[width + j] as f64
            })
        })
        .collect()
}

/// erf in f64 to ~1e-15 (Maclaurin series near zero, continued fraction for erfc beyond):
/// an independent reference for the shader's polynomial.
pub fn erf_f64(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 2.5 {
        // Maclaurin series: erf(a) = 2/√π Σ (-1)^n a^(2n+1) / (n! (2n+1))
        let mut term = a;
        let mut sum = a;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -a * a / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // Continued fraction erfc(a) = e^(−a²)/√π · 1/(a + (1/2)/(a + 1/(a + (3/2)/(a + …)))),
        // evaluated bottom-up; 60 levels are far more than f64 needs for a ≥ 2.5.
        let mut t = a;
        for n in (1..=60).rev() {
            t = a + (n as f64 / 2.0) / t;
        }
        1.0 - (-a * a).exp() / (std::f64::consts::PI.sqrt() * t)
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}
