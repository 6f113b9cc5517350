//! The two normalisations the model uses, as modules that load their own parameters:
//! CLIP's `nn.LayerNorm` (weight and bias) and LLaMA's `LlamaRMSNorm` (weight only).

use crate::error::Result;
use crate::gpu::kernels::linear::LinearInput;
use crate::gpu::kernels::norm;
use crate::gpu::{Recorder, Tensor};
use crate::model::loader::Loader;

/// `nn.LayerNorm(width, eps)`: `weight` and `bias`, [width] each.
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f32,
}

impl LayerNorm {
    pub fn load(loader: &Loader, width: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: loader.vector("weight", width)?,
            bias: loader.vector("bias", width)?,
            eps: eps as f32,
        })
    }

    /// `out = LayerNorm(x)` row by row; `x` and `out` are [rows, width].
    pub fn forward(&self, rec: &mut Recorder, x: &Tensor, out: &Tensor) -> Result<()> {
        let gpu = rec.gpu();
        rec.dispatch(norm::layer_norm(
            gpu,
            x,
            &self.weight,
            &self.bias,
            out,
            self.eps,
        )?);
        Ok(())
    }
}

/// `LlamaRMSNorm(width, eps)`: `weight` [width].
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f32,
}

impl RmsNorm {
    pub fn load(loader: &Loader, width: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: loader.vector("weight", width)?,
            eps: eps as f32,
        })
    }

    /// `out = RMSNorm(x)` row by row; `x` and `out` are [rows, width].
    pub fn forward(&self, rec: &mut Recorder, x: &Tensor, out: &Tensor) -> Result<()> {
        let gpu = rec.gpu();
        rec.dispatch(norm::rms_norm(gpu, x, &self.weight, out, self.eps)?);
        Ok(())
    }

    /// The norm as the input of the gemv that reads its output (a decode step fuses it there).
    pub fn input(&self) -> LinearInput<'_> {
        LinearInput::RmsNorm {
            gamma: &self.weight,
            eps: self.eps,
        }
    }
}
