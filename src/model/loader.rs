//! Uploading checkpoint tensors to the GPU in the engine's formats, one module scope at a time.
//!
//! A [`Loader`] stands at a key prefix of the checkpoint's canonical names (see `weights.rs`):
//! `loader.scope("text").scope("layers").scope(3)` reads `text.layers.3.*`. Each model struct
//! loads its own fields from the scope its parent hands it, so a key in an error message leads
//! straight to the struct that asked for it, as in candle's `VarBuilder::pp`.

use std::fmt::Display;

use crate::error::Result;
use crate::gpu::tensor::QUANT_BLOCK;
use crate::gpu::{Gpu, MemoryKind, Tensor, Weight, WeightFormat};
use crate::model::weights::Checkpoint;

/// Reads tensors under one key prefix and uploads them (counted as weights by the device's
/// allocation tracker).
#[derive(Clone)]
pub struct Loader<'a> {
    pub gpu: &'a Gpu,
    pub checkpoint: &'a Checkpoint,
    /// Format of matrix weights (norm weights, biases and embeddings stay f32).
    pub format: WeightFormat,
    /// Create the matrix weights' buffers without reading or uploading their values (shapes
    /// are still checked): `llava-wgpu memory` measures a model this way.
    pub allocate_only: bool,
    prefix: String,
}

impl<'a> Loader<'a> {
    pub fn new(
        gpu: &'a Gpu,
        checkpoint: &'a Checkpoint,
        format: WeightFormat,
        allocate_only: bool,
    ) -> Self {
        Self {
            gpu,
            checkpoint,
            format,
            allocate_only,
            prefix: String::new(),
        }
    }

    /// The loader for the sub-module `name` (a field name or a layer index).
    pub fn scope(&self, name: impl Display) -> Self {
        Self {
            prefix: self.key(name),
            ..self.clone()
        }
    }

    /// The full canonical key of `name` in this scope.
    pub fn key(&self, name: impl Display) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The linear layer `name`: `name.weight` [n, k] and, if `bias`, `name.bias` [n].
    pub fn linear(&self, name: &str, n: usize, k: usize, bias: bool) -> Result<Weight> {
        self.linear_stack(&[name], n, k, bias)
    }

    /// Several linear layers with the same input stacked into one [Σn, k] weight (e.g. LLaMA's
    /// gate and up projections), so one matmul computes them all.
    pub fn linear_stack(
        &self,
        names: &[&str],
        n_each: usize,
        k: usize,
        bias: bool,
    ) -> Result<Weight> {
        let keys: Vec<String> = names.iter().map(|name| self.key(name)).collect();
        let label = keys.join("+");
        let n = n_each * keys.len();
        let format = self.format_for(&label, k);
        let mut weight = if self.allocate_only {
            for key in &keys {
                self.checkpoint
                    .check(&format!("{key}.weight"), &[n_each, k])?;
            }
            Weight::allocate(self.gpu, &label, n, k, format)?
        } else {
            self.upload_matrix(&keys, &label, n_each, k, format)?
        };
        if bias {
            let mut values = Vec::with_capacity(n);
            for key in &keys {
                values.extend(self.checkpoint.f32(&format!("{key}.bias"), &[n_each])?);
            }
            weight = weight.with_bias(self.gpu, &values)?;
        }
        Ok(weight)
    }

    /// This scope with matrix weights in `format` (the vision tower and projector may differ
    /// from the language model).
    pub fn with_format(&self, format: WeightFormat) -> Self {
        Self {
            format,
            ..self.clone()
        }
    }

    /// The format of float-only weights (a convolution's patch embedding): this scope's format,
    /// or f16 where that is a block format.
    pub fn float_format(&self) -> WeightFormat {
        if self.format.is_quantized() {
            WeightFormat::F16
        } else {
            self.format
        }
    }

    /// The format a `[_, k]` weight is stored in: this scope's, except that rows which are not
    /// whole blocks of 32 stay f16 (as llama.cpp's quantizer leaves such tensors unquantized),
    /// which the load reports on stderr.
    fn format_for(&self, label: &str, k: usize) -> WeightFormat {
        if self.format.is_quantized() && !k.is_multiple_of(QUANT_BLOCK) {
            eprintln!(
                "{label}: rows of {k} values are not whole blocks of {QUANT_BLOCK}; kept in f16 \
                 instead of {:?}",
                self.format
            );
            return WeightFormat::F16;
        }
        self.format
    }

    /// The weights `keys` stacked into one [n_each · keys, k] matrix, uploaded in `format`
    /// (quantized formats from the checkpoint's blocks, or quantized now).
    fn upload_matrix(
        &self,
        keys: &[String],
        label: &str,
        n_each: usize,
        k: usize,
        format: WeightFormat,
    ) -> Result<Weight> {
        let n = n_each * keys.len();
        Ok(match format {
            WeightFormat::Q8_0 | WeightFormat::Q4_0 => {
                let mut blocks = Vec::new();
                for key in keys {
                    let name = format!("{key}.weight");
                    blocks.extend_from_slice(&self.checkpoint.blocks(
                        &name,
                        &[n_each, k],
                        format,
                    )?);
                }
                Weight::from_blocks(self.gpu, label, n, k, format, &blocks)?
            }
            WeightFormat::F16 => {
                let mut values = Vec::with_capacity(n * k);
                for key in keys {
                    values.extend(
                        self.checkpoint
                            .f16(&format!("{key}.weight"), &[n_each, k])?,
                    );
                }
                Weight::from_f16(self.gpu, label, n, k, &values)?
            }
            WeightFormat::F32 => {
                let mut values = Vec::with_capacity(n * k);
                for key in keys {
                    values.extend(
                        self.checkpoint
                            .f32(&format!("{key}.weight"), &[n_each, k])?,
                    );
                }
                Weight::from_f32(self.gpu, label, n, k, &values, WeightFormat::F32)?
            }
        })
    }

    /// The tensor `name` as f32 values on the host, checked against `shape`.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.checkpoint.f32(&self.key(name), shape)
    }

    /// The vector `name` (a norm weight or a bias) as an f32 tensor.
    pub fn vector(&self, name: &str, len: usize) -> Result<Tensor> {
        let values = self.f32(name, &[len])?;
        self.upload(name, &[len], &values)
    }

    /// Upload host values as the f32 tensor `name` of this scope.
    pub fn upload(&self, name: &str, shape: &[usize], values: &[f32]) -> Result<Tensor> {
        let t = Tensor::from_f32_as(
            self.gpu,
            shape,
            values,
            &self.key(name),
            MemoryKind::Weights,
        )?;
        Ok(t)
    }
}
