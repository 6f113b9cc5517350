//! The CLIP vision tower (transformers' `CLIPVisionTransformer`), run up to the layer LLaVA
//! takes its features from. Layers after it are never loaded.

use crate::error::Result;
use crate::gpu::kernels::activation::{self, Activation};
use crate::gpu::kernels::attention::{self, AttentionShape, ScoreOutput};
use crate::gpu::kernels::{matmul, norm};
use crate::gpu::{DType, Dispatch, Gpu, Recorder, Tensor, Weight};
use crate::model::config::VisionConfig;
use crate::model::loader::Loader;

/// `encoder.layers.{i}`: pre-LN self-attention and MLP, each with a residual connection.
pub struct ClipLayer {
    pub layer_norm1: (Tensor, Tensor),
    pub q_proj: Weight,
    pub k_proj: Weight,
    pub v_proj: Weight,
    pub out_proj: Weight,
    pub layer_norm2: (Tensor, Tensor),
    pub fc1: Weight,
    pub fc2: Weight,
}

pub struct ClipVision {
    pub config: VisionConfig,
    /// `embeddings.patch_embedding` (a stride-p convolution) as a matmul over flattened patches.
    pub patch_embedding: Weight,
    /// Class embedding + position embeddings, [1 + patches, d], added to the patch rows.
    pub embedding_base: Tensor,
    pub pre_layrnorm: (Tensor, Tensor),
    pub layers: Vec<ClipLayer>,
    pub activation: Activation,
}

/// Per-request activation buffers for the vision tower.
pub struct ClipBuffers {
    pub patches: Tensor,
    pub embeddings: Tensor,
    pub hidden: Tensor,
    pub normed: Tensor,
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub attn: Tensor,
    pub mlp: Tensor,
}

impl ClipBuffers {
    pub fn bytes(&self) -> u64 {
        [
            &self.patches,
            &self.embeddings,
            &self.hidden,
            &self.normed,
            &self.q,
            &self.k,
            &self.v,
            &self.attn,
            &self.mlp,
        ]
        .iter()
        .map(|t| t.buffer.size())
        .sum()
    }
}

impl ClipVision {
    /// Load the embeddings, `pre_layrnorm` and the first `layers` encoder layers.
    pub fn load(
        loader: &mut Loader,
        config: &VisionConfig,
        layers: usize,
        mut progress: impl FnMut(),
    ) -> Result<Self> {
        let d = config.hidden_size;
        let p = config.patch_size;
        let c = config.num_channels;
        let tokens = config.num_patches() + 1;
        // Conv weight [d, c, p, p] flattened to [d, c·p·p]: the order patches are flattened in.
        let patch_embedding = {
            let name = "vision.embeddings.patch_embedding.weight";
            let values = loader.checkpoint.f32(name, &[d, c, p, p])?;
            let w = Weight::from_f32(loader.gpu, name, d, c * p * p, &values, loader.format)?;
            loader.bytes += w.gpu_bytes();
            w
        };
        let class = loader
            .checkpoint
            .f32("vision.embeddings.class_embedding", &[d])?;
        let mut base = loader
            .checkpoint
            .f32("vision.embeddings.position_embedding.weight", &[tokens, d])?;
        for (b, c) in base[..d].iter_mut().zip(&class) {
            *b += c;
        }
        let embedding_base = loader.upload("vision.embedding_base", &[tokens, d], &base)?;
        let pre_layrnorm = (
            loader.vector("vision.pre_layrnorm.weight", d)?,
            loader.vector("vision.pre_layrnorm.bias", d)?,
        );
        progress();
        let m = config.intermediate_size;
        let mut loaded = Vec::with_capacity(layers);
        for i in 0..layers {
            let prefix = format!("vision.encoder.layers.{i}");
            let ln = |loader: &mut Loader, name: &str| -> Result<(Tensor, Tensor)> {
                Ok((
                    loader.vector(&format!("{prefix}.{name}.weight"), d)?,
                    loader.vector(&format!("{prefix}.{name}.bias"), d)?,
                ))
            };
            loaded.push(ClipLayer {
                layer_norm1: ln(loader, "layer_norm1")?,
                q_proj: loader.linear(&format!("{prefix}.self_attn.q_proj"), d, d, true)?,
                k_proj: loader.linear(&format!("{prefix}.self_attn.k_proj"), d, d, true)?,
                v_proj: loader.linear(&format!("{prefix}.self_attn.v_proj"), d, d, true)?,
                out_proj: loader.linear(&format!("{prefix}.self_attn.out_proj"), d, d, true)?,
                layer_norm2: ln(loader, "layer_norm2")?,
                fc1: loader.linear(&format!("{prefix}.mlp.fc1"), m, d, true)?,
                fc2: loader.linear(&format!("{prefix}.mlp.fc2"), d, m, true)?,
            });
            progress();
        }
        let activation =
            Activation::from_hf(&config.hidden_act).expect("validated by the config parser");
        Ok(Self {
            config: config.clone(),
            patch_embedding,
            embedding_base,
            pre_layrnorm,
            layers: loaded,
            activation,
        })
    }

    pub fn tokens(&self) -> usize {
        self.config.num_patches() + 1
    }

    pub fn buffers(&self, gpu: &Gpu) -> Result<ClipBuffers> {
        let t = self.tokens();
        let d = self.config.hidden_size;
        let c = self.config.num_channels * self.config.patch_size * self.config.patch_size;
        let f = |shape: &[usize], label: &str| Tensor::empty(gpu, shape, DType::F32, label);
        Ok(ClipBuffers {
            patches: f(&[t, c], "vision.patches")?,
            embeddings: f(&[t, d], "vision.embeddings")?,
            hidden: f(&[t, d], "vision.hidden")?,
            normed: f(&[t, d], "vision.normed")?,
            q: f(&[t, d], "vision.q")?,
            k: f(&[t, d], "vision.k")?,
            v: f(&[t, d], "vision.v")?,
            attn: f(&[t, d], "vision.attn")?,
            mlp: f(&[t, self.config.intermediate_size], "vision.mlp")?,
        })
    }

    /// Flatten CHW pixels into patch rows [1 + patches, c·p·p] in the convolution's (c, y, x)
    /// order; row 0 (the CLS position) is zero so the matmul leaves it to the class embedding.
    pub fn patchify(&self, pixels: &[f32]) -> Vec<f32> {
        let (s, p, c) = (
            self.config.image_size,
            self.config.patch_size,
            self.config.num_channels,
        );
        let g = s / p;
        let row = c * p * p;
        let mut out = vec![0f32; (g * g + 1) * row];
        for py in 0..g {
            for px in 0..g {
                let dst = &mut out[(1 + py * g + px) * row..(2 + py * g + px) * row];
                for ch in 0..c {
                    for y in 0..p {
                        let src = (ch * s + py * p + y) * s + px * p;
                        dst[(ch * p + y) * p..(ch * p + y + 1) * p]
                            .copy_from_slice(&pixels[src..src + p]);
                    }
                }
            }
        }
        out
    }

    /// Record the tower on `pixels`; afterwards `buffers.hidden` holds the selected hidden state
    /// [1 + patches, d] (CLS first). If `scores` is given, the last layer's attention also emits
    /// per-key attention sums over the requested query rows (for stage-1 pruning).
    pub fn forward(
        &self,
        rec: &mut Recorder,
        buffers: &ClipBuffers,
        pixels: &[f32],
        scores: Option<ScoreOutput>,
    ) -> Result<()> {
        let gpu = rec.gpu();
        buffers.patches.write_f32(gpu, &self.patchify(pixels))?;
        let b = buffers;
        let bytes = b.embeddings.bytes();
        rec.copy(
            &self.embedding_base.buffer,
            0,
            &b.embeddings.buffer,
            0,
            bytes,
        );
        rec.dispatch_all(matmul::matmul(
            gpu,
            &b.patches,
            &self.patch_embedding,
            &b.embeddings,
            true,
        )?);
        rec.dispatch(norm::layer_norm(
            gpu,
            &b.embeddings,
            &self.pre_layrnorm.0,
            &self.pre_layrnorm.1,
            &b.hidden,
            self.config.layer_norm_eps as f32,
        )?);
        let heads = self.config.num_attention_heads;
        let head_dim = self.config.head_dim();
        let t = self.tokens();
        let shape = AttentionShape {
            q_rows: t,
            kv_rows: t,
            heads,
            kv_heads: heads,
            head_dim,
            causal: false,
        };
        let scale = 1.0 / (head_dim as f32).sqrt();
        let eps = self.config.layer_norm_eps as f32;
        let mut scores = scores;
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            let mut d: Vec<Dispatch> = Vec::new();
            d.push(norm::layer_norm(
                gpu,
                &b.hidden,
                &layer.layer_norm1.0,
                &layer.layer_norm1.1,
                &b.normed,
                eps,
            )?);
            d.extend(matmul::matmul(gpu, &b.normed, &layer.q_proj, &b.q, false)?);
            d.extend(matmul::matmul(gpu, &b.normed, &layer.k_proj, &b.k, false)?);
            d.extend(matmul::matmul(gpu, &b.normed, &layer.v_proj, &b.v, false)?);
            let layer_scores = if i == last { scores.take() } else { None };
            d.extend(attention::attention(
                gpu,
                &shape,
                scale,
                &b.q,
                &b.k,
                &b.v,
                &b.attn,
                layer_scores,
            )?);
            // Residual adds are fused into the output projections (accumulate = true).
            d.extend(matmul::matmul(
                gpu,
                &b.attn,
                &layer.out_proj,
                &b.hidden,
                true,
            )?);
            d.push(norm::layer_norm(
                gpu,
                &b.hidden,
                &layer.layer_norm2.0,
                &layer.layer_norm2.1,
                &b.normed,
                eps,
            )?);
            d.extend(matmul::matmul(gpu, &b.normed, &layer.fc1, &b.mlp, false)?);
            d.push(activation::activate(gpu, self.activation, &b.mlp)?);
            d.extend(matmul::matmul(gpu, &b.mlp, &layer.fc2, &b.hidden, true)?);
            rec.dispatch_all(d);
        }
        Ok(())
    }
}
