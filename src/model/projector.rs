//! `multi_modal_projector`: linear → GELU (exact) → linear, from vision width to text width.

use crate::error::Result;
use crate::gpu::kernels::activation::{self, Activation};
use crate::gpu::kernels::linear;
use crate::gpu::{DType, Gpu, Recorder, Tensor, Weight};
use crate::model::config::LlavaConfig;
use crate::model::loader::Loader;

pub struct Projector {
    pub linear_1: Weight,
    pub linear_2: Weight,
}

impl Projector {
    /// Load from `loader` scoped at the projector (`projector.*` canonical keys).
    pub fn load(loader: &Loader, config: &LlavaConfig) -> Result<Self> {
        let (dv, dt) = (config.vision.hidden_size, config.text.hidden_size);
        let bias = config.projector_bias;
        Ok(Self {
            linear_1: loader.linear("linear_1", dt, dv, bias)?,
            linear_2: loader.linear("linear_2", dt, dt, bias)?,
        })
    }

    /// `features [n, dv]` → `out [n, dt]`, using `scratch [n, dt]`.
    pub fn forward(
        &self,
        rec: &mut Recorder,
        features: &Tensor,
        scratch: &Tensor,
        out: &Tensor,
    ) -> Result<()> {
        let gpu = rec.gpu();
        rec.dispatch_all(linear::linear(
            gpu,
            features,
            &self.linear_1,
            scratch,
            false,
        )?);
        rec.dispatch(activation::activate(gpu, Activation::Gelu, scratch)?);
        rec.dispatch_all(linear::linear(gpu, scratch, &self.linear_2, out, false)?);
        Ok(())
    }

    pub fn scratch(gpu: &Gpu, rows: usize, width: usize) -> Result<Tensor> {
        Tensor::empty(gpu, &[rows, width], DType::F32, "projector.scratch")
    }
}
