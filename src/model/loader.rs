//! Uploading checkpoint tensors to the GPU in the engine's formats.

use crate::error::Result;
use crate::gpu::{Gpu, Tensor, Weight, WeightFormat};
use crate::model::weights::Checkpoint;

/// Reads tensors from a checkpoint and uploads them, tallying the GPU bytes they take.
pub struct Loader<'a> {
    pub gpu: &'a Gpu,
    pub checkpoint: &'a Checkpoint,
    /// Format of matrix weights (norm weights, biases and embeddings stay f32).
    pub format: WeightFormat,
    pub bytes: u64,
}

impl<'a> Loader<'a> {
    pub fn new(gpu: &'a Gpu, checkpoint: &'a Checkpoint, format: WeightFormat) -> Self {
        Self {
            gpu,
            checkpoint,
            format,
            bytes: 0,
        }
    }

    /// A linear layer `{name}.weight` [n, k] and, if `bias`, `{name}.bias` [n].
    pub fn linear(&mut self, name: &str, n: usize, k: usize, bias: bool) -> Result<Weight> {
        self.linear_stack(&[name], n, k, bias)
    }

    /// Several linear layers with the same input stacked into one [Σn, k] weight (e.g. LLaMA's
    /// gate and up projections), so one matmul computes them all.
    pub fn linear_stack(
        &mut self,
        names: &[&str],
        n_each: usize,
        k: usize,
        bias: bool,
    ) -> Result<Weight> {
        let label = names.join("+");
        let n = n_each * names.len();
        let mut weight = match self.format {
            WeightFormat::F16 => {
                let mut values = Vec::with_capacity(n * k);
                for name in names {
                    values.extend(
                        self.checkpoint
                            .f16(&format!("{name}.weight"), &[n_each, k])?,
                    );
                }
                Weight::from_f16(self.gpu, &label, n, k, &values)?
            }
            WeightFormat::F32 => {
                let mut values = Vec::with_capacity(n * k);
                for name in names {
                    values.extend(
                        self.checkpoint
                            .f32(&format!("{name}.weight"), &[n_each, k])?,
                    );
                }
                Weight::from_f32(self.gpu, &label, n, k, &values, WeightFormat::F32)?
            }
        };
        if bias {
            let mut values = Vec::with_capacity(n);
            for name in names {
                values.extend(self.checkpoint.f32(&format!("{name}.bias"), &[n_each])?);
            }
            weight = weight.with_bias(self.gpu, &values)?;
        }
        self.bytes += weight.gpu_bytes();
        Ok(weight)
    }

    /// A vector (norm weight or bias) as an f32 tensor.
    pub fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        let values = self.checkpoint.f32(name, &[len])?;
        self.upload(name, &[len], &values)
    }

    pub fn upload(&mut self, label: &str, shape: &[usize], values: &[f32]) -> Result<Tensor> {
        let t = Tensor::from_f32(self.gpu, shape, values, label)?;
        self.bytes += t.buffer.size();
        Ok(t)
    }
}
