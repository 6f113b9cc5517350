//! Uploading checkpoint tensors to the GPU in the engine's formats, one module scope at a time.
//!
//! A [`Loader`] stands at a key prefix of the checkpoint's canonical names (see `weights.rs`):
//! `loader.scope("text").scope("layers").scope(3)` reads `text.layers.3.*`. Each model struct
//! loads its own fields from the scope its parent hands it, so a key in an error message leads
//! straight to the struct that asked for it, as in candle's `VarBuilder::pp`.

use std::fmt::Display;

use crate::error::Result;
use crate::gpu::{Gpu, MemoryKind, Tensor, Weight, WeightFormat};
use crate::model::weights::Checkpoint;
use crate::quant::{Mix, TensorRole};

/// How the loader chooses each matrix's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Formats {
    /// As `mix` chooses for a decoder of `layers` layers (the depth its per-layer rules read).
    Mix { mix: Mix, layers: usize },
    /// Each matrix in the format its file stores it in: a GGUF pair runs as stored.
    AsStored,
}

/// Reads tensors under one key prefix and uploads them (counted as weights by the device's
/// allocation tracker).
#[derive(Clone)]
pub struct Loader<'a> {
    pub gpu: &'a Gpu,
    pub checkpoint: &'a Checkpoint,
    /// Formats of matrix weights (norm weights, biases and embeddings stay f32).
    pub formats: Formats,
    /// Create the matrix weights' buffers without reading or uploading their values (shapes
    /// are still checked): `llava-wgpu memory` measures a model this way.
    pub allocate_only: bool,
    prefix: String,
}

/// What a decoder matrix is, from its canonical key, for a [`Mix`]'s per-tensor rules.
fn role(key: &str) -> TensorRole {
    let layer = |rest: &str| rest.split('.').next().and_then(|i| i.parse().ok());
    if key == "lm_head" || key == "text.embed_tokens" {
        return TensorRole::Output;
    }
    if let Some(rest) = key.strip_prefix("text.layers.") {
        match (layer(rest), rest.split_once('.').map(|(_, f)| f)) {
            (Some(i), Some("self_attn.v_proj")) => return TensorRole::AttentionValue(i),
            (Some(i), Some("mlp.down_proj")) => return TensorRole::FeedForwardDown(i),
            _ => {}
        }
    }
    TensorRole::Other
}

impl<'a> Loader<'a> {
    pub fn new(
        gpu: &'a Gpu,
        checkpoint: &'a Checkpoint,
        formats: Formats,
        allocate_only: bool,
    ) -> Self {
        Self {
            gpu,
            checkpoint,
            formats,
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
    /// gate and up projections), so one matmul computes them all. Parts stored in different
    /// formats (a GGUF file may do that) become chunks of one weight, each in its own format.
    pub fn linear_stack(
        &self,
        names: &[&str],
        n_each: usize,
        k: usize,
        bias: bool,
    ) -> Result<Weight> {
        let keys: Vec<String> = names.iter().map(|name| self.key(name)).collect();
        let label = keys.join("+");
        let formats = keys
            .iter()
            .map(|key| self.format_for(key, k))
            .collect::<Result<Vec<_>>>()?;
        let mut weight = if formats.iter().all(|&f| f == formats[0]) {
            self.upload_matrix(&keys, &label, n_each, k, formats[0])?
        } else {
            let parts = keys
                .iter()
                .zip(&formats)
                .map(|(key, &format)| {
                    self.upload_matrix(std::slice::from_ref(key), key, n_each, k, format)
                })
                .collect::<Result<Vec<_>>>()?;
            Weight::stack(&label, parts)?
        };
        if bias {
            let mut values = Vec::with_capacity(n_each * keys.len());
            for key in &keys {
                values.extend(self.checkpoint.f32(&format!("{key}.bias"), &[n_each])?);
            }
            weight = weight.with_bias(self.gpu, &values)?;
        }
        Ok(weight)
    }

    /// This scope with matrix weights chosen by `formats` (the vision tower and projector may
    /// differ from the language model).
    pub fn with_formats(&self, formats: Formats) -> Self {
        Self {
            formats,
            ..self.clone()
        }
    }

    /// The format of the float-only weight `name` (a convolution's patch embedding): as stored
    /// when that is a float format and the loader keeps stored formats; otherwise a uniform
    /// float format, or f16.
    pub fn float_format(&self, name: &str) -> Result<WeightFormat> {
        let format = match self.formats {
            Formats::AsStored => self.checkpoint.stored_format(&self.key(name))?,
            Formats::Mix {
                mix: Mix::Uniform(format),
                ..
            } => format,
            Formats::Mix { .. } => WeightFormat::F16,
        };
        Ok(if format.is_quantized() {
            WeightFormat::F16
        } else {
            format
        })
    }

    /// The format the `[_, k]` weight `key` is stored in on the GPU.
    fn format_for(&self, key: &str, k: usize) -> Result<WeightFormat> {
        let Formats::Mix { mix, layers } = self.formats else {
            return self.checkpoint.stored_format(&format!("{key}.weight"));
        };
        let format = mix.format_for(role(key), layers, k);
        if let Mix::Uniform(wanted) = mix {
            if format != wanted {
                // As llama.cpp's quantizer leaves such tensors, and says so.
                eprintln!(
                    "{key}: rows of {k} values are not whole blocks of {}; kept in {} \
                     instead of {}",
                    wanted.block_weights(),
                    format.name(),
                    wanted.name()
                );
            }
        }
        Ok(format)
    }

    /// The weights `keys` stacked into one [n_each · keys, k] matrix in `format` (stored bytes
    /// as they are, float values converted or quantized now).
    fn upload_matrix(
        &self,
        keys: &[String],
        label: &str,
        n_each: usize,
        k: usize,
        format: WeightFormat,
    ) -> Result<Weight> {
        let n = n_each * keys.len();
        if self.allocate_only {
            for key in keys {
                self.checkpoint
                    .check(&format!("{key}.weight"), &[n_each, k])?;
            }
            return Weight::allocate(self.gpu, label, n, k, format);
        }
        let mut bytes = Vec::new();
        for key in keys {
            let part = self
                .checkpoint
                .matrix(&format!("{key}.weight"), &[n_each, k], format)?;
            if keys.len() == 1 {
                return Weight::from_stored(self.gpu, label, n, k, format, &part);
            }
            bytes.extend_from_slice(&part);
        }
        Weight::from_stored(self.gpu, label, n, k, format, &bytes)
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
