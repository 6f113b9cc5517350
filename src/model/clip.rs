//! The CLIP vision tower (transformers' `CLIPVisionTransformer`), run up to the layer LLaVA
//! takes its features from. Layers after it are never loaded.
//!
//! The structs mirror `modeling_clip.py`: `embeddings`, `pre_layrnorm`, and `encoder.layers[i]`
//! (`CLIPEncoderLayer`) with `layer_norm1`, `self_attn`, `layer_norm2` and `mlp`, each loaded
//! from the checkpoint scope of the same name. `post_layernorm` is never used by LLaVA.

use crate::error::{Error, Result};
use crate::gpu::kernels::activation::{self, Activation};
use crate::gpu::kernels::attention::{self, AttentionShape, ScoreOutput};
use crate::gpu::kernels::linear::matmul;
use crate::gpu::tensor::formats_of;
use crate::gpu::{DType, Gpu, Recorder, Tensor, Weight, WeightFormat};
use crate::model::config::VisionConfig;
use crate::model::loader::Loader;
use crate::model::norm::LayerNorm;

/// `embeddings`: the patch convolution plus the class and position embeddings.
pub struct ClipEmbeddings {
    /// `patch_embedding` (a stride-p convolution) as a matmul over flattened patches.
    pub patch_embedding: Weight,
    /// Class embedding + position embeddings, [1 + patches, d], added to the patch rows.
    pub class_and_position: Tensor,
}

/// `self_attn`: bidirectional multi-head attention with biases.
pub struct ClipAttention {
    pub q_proj: Weight,
    pub k_proj: Weight,
    pub v_proj: Weight,
    pub out_proj: Weight,
    pub heads: usize,
    pub head_dim: usize,
}

/// `mlp`: `fc2(act(fc1(x)))` with CLIP's activation (quick_gelu for LLaVA's towers).
pub struct ClipMlp {
    pub fc1: Weight,
    pub fc2: Weight,
    pub activation: Activation,
}

/// `encoder.layers.{i}`: pre-LN self-attention and MLP, each with a residual connection.
pub struct ClipLayer {
    pub layer_norm1: LayerNorm,
    pub self_attn: ClipAttention,
    pub layer_norm2: LayerNorm,
    pub mlp: ClipMlp,
}

pub struct ClipVision {
    pub config: VisionConfig,
    pub embeddings: ClipEmbeddings,
    pub pre_layrnorm: LayerNorm,
    /// `encoder.layers[0..n]`, n = the layers LLaVA's feature layer needs.
    pub layers: Vec<ClipLayer>,
}

/// Per-request activation buffers for the vision tower. T = 1 + patches (CLS first),
/// d = hidden size, m = intermediate size, c·p·p = values per flattened patch.
pub struct ClipBuffers {
    /// (T, c·p·p): flattened pixel patches; row 0 (CLS) is zero.
    pub patches: Tensor,
    /// (T, d): patch embeddings + class and position embeddings.
    pub embeddings: Tensor,
    /// (T, d): the residual stream; after `forward`, the selected layer's hidden state.
    pub hidden: Tensor,
    /// (T, d): the residual stream after a LayerNorm.
    pub normed: Tensor,
    /// (T, d)
    pub q: Tensor,
    /// (T, d)
    pub k: Tensor,
    /// (T, d)
    pub v: Tensor,
    /// (T, d): attention output before `out_proj`.
    pub attn: Tensor,
    /// (T, m): `fc1` output, activated in place.
    pub mlp: Tensor,
}

impl ClipBuffers {}

impl ClipEmbeddings {
    fn load(loader: &Loader, c: &VisionConfig) -> Result<Self> {
        let (d, p, channels) = (c.hidden_size, c.patch_size, c.num_channels);
        let tokens = c.num_patches() + 1;
        // Conv weight [d, c, p, p] flattened to [d, c·p·p]: the order patches are flattened in.
        let name = loader.key("patch_embedding.weight");
        let values = loader.f32("patch_embedding.weight", &[d, channels, p, p])?;
        let patch_embedding = Weight::from_f32(
            loader.gpu,
            &name,
            d,
            channels * p * p,
            &values,
            loader.float_format("patch_embedding.weight")?,
        )?;
        // The class embedding only ever sits at position 0: fold it into that position's row.
        let class = loader.f32("class_embedding", &[d])?;
        let mut base = loader.f32("position_embedding.weight", &[tokens, d])?;
        for (b, c) in base[..d].iter_mut().zip(&class) {
            *b += c;
        }
        let class_and_position = loader.upload("class_and_position", &[tokens, d], &base)?;
        Ok(Self {
            patch_embedding,
            class_and_position,
        })
    }

    /// `embeddings = patches · Wᵀ + class_and_position`.
    fn forward(&self, rec: &mut Recorder, b: &ClipBuffers) -> Result<()> {
        let gpu = rec.gpu();
        let (base, out) = (&self.class_and_position.buffer, &b.embeddings.buffer);
        rec.copy(base, 0, out, 0, b.embeddings.bytes());
        rec.dispatch_all(matmul::matmul(
            gpu,
            &b.patches,
            &self.patch_embedding,
            &b.embeddings,
            true,
        )?);
        Ok(())
    }
}

impl ClipAttention {
    fn load(loader: &Loader, c: &VisionConfig) -> Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            q_proj: loader.linear("q_proj", d, d, true)?,
            k_proj: loader.linear("k_proj", d, d, true)?,
            v_proj: loader.linear("v_proj", d, d, true)?,
            out_proj: loader.linear("out_proj", d, d, true)?,
            heads: c.num_attention_heads,
            head_dim: c.head_dim(),
        })
    }

    /// `hidden += out_proj(attention(normed))` (the residual add is fused into `out_proj`).
    /// `scores`, if given, receives per-key attention sums for pruning.
    fn forward(
        &self,
        rec: &mut Recorder,
        b: &ClipBuffers,
        scores: Option<ScoreOutput>,
    ) -> Result<()> {
        let gpu = rec.gpu();
        let tokens = b.hidden.shape[0];
        let shape = AttentionShape {
            q_rows: tokens,
            kv_rows: tokens,
            heads: self.heads,
            kv_heads: self.heads,
            head_dim: self.head_dim,
            causal: false,
        };
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        let mut d = matmul::matmul(gpu, &b.normed, &self.q_proj, &b.q, false)?;
        d.extend(matmul::matmul(gpu, &b.normed, &self.k_proj, &b.k, false)?);
        d.extend(matmul::matmul(gpu, &b.normed, &self.v_proj, &b.v, false)?);
        d.extend(attention::attention(
            gpu, &shape, scale, &b.q, &b.k, &b.v, &b.attn, scores,
        )?);
        d.extend(matmul::matmul(
            gpu,
            &b.attn,
            &self.out_proj,
            &b.hidden,
            true,
        )?);
        rec.dispatch_all(d);
        Ok(())
    }
}

impl ClipMlp {
    fn load(loader: &Loader, c: &VisionConfig) -> Result<Self> {
        let (d, m) = (c.hidden_size, c.intermediate_size);
        Ok(Self {
            fc1: loader.linear("fc1", m, d, true)?,
            fc2: loader.linear("fc2", d, m, true)?,
            activation: Activation::from_hf(&c.hidden_act).expect("validated by the config parser"),
        })
    }

    /// `hidden += fc2(act(fc1(normed)))` (the residual add is fused into `fc2`).
    fn forward(&self, rec: &mut Recorder, b: &ClipBuffers) -> Result<()> {
        let gpu = rec.gpu();
        let mut d = matmul::matmul(gpu, &b.normed, &self.fc1, &b.mlp, false)?;
        d.push(activation::activate(gpu, self.activation, &b.mlp)?);
        d.extend(matmul::matmul(gpu, &b.mlp, &self.fc2, &b.hidden, true)?);
        rec.dispatch_all(d);
        Ok(())
    }
}

impl ClipLayer {
    fn load(loader: &Loader, c: &VisionConfig) -> Result<Self> {
        let (d, eps) = (c.hidden_size, c.layer_norm_eps);
        Ok(Self {
            layer_norm1: LayerNorm::load(&loader.scope("layer_norm1"), d, eps)?,
            self_attn: ClipAttention::load(&loader.scope("self_attn"), c)?,
            layer_norm2: LayerNorm::load(&loader.scope("layer_norm2"), d, eps)?,
            mlp: ClipMlp::load(&loader.scope("mlp"), c)?,
        })
    }

    /// `x = x + attn(norm1(x)); x = x + mlp(norm2(x))`.
    fn forward(
        &self,
        rec: &mut Recorder,
        b: &ClipBuffers,
        scores: Option<ScoreOutput>,
    ) -> Result<()> {
        self.layer_norm1.forward(rec, &b.hidden, &b.normed)?;
        self.self_attn.forward(rec, b, scores)?;
        self.layer_norm2.forward(rec, &b.hidden, &b.normed)?;
        self.mlp.forward(rec, b)
    }
}

impl ClipVision {
    /// The formats its matrices are stored in, each once.
    pub fn formats(&self) -> Vec<WeightFormat> {
        let layers = self.layers.iter().flat_map(|l| {
            let (a, m) = (&l.self_attn, &l.mlp);
            [&a.q_proj, &a.k_proj, &a.v_proj, &a.out_proj, &m.fc1, &m.fc2]
        });
        formats_of(std::iter::once(&self.embeddings.patch_embedding).chain(layers))
    }

    /// Load the embeddings, `pre_layrnorm` and the first `layers` encoder layers from `loader`
    /// scoped at the vision tower (`vision.*` canonical keys).
    pub fn load(
        loader: &Loader,
        config: &VisionConfig,
        layers: usize,
        mut progress: impl FnMut(),
    ) -> Result<Self> {
        let embeddings = ClipEmbeddings::load(&loader.scope("embeddings"), config)?;
        let pre_layrnorm = LayerNorm::load(
            &loader.scope("pre_layrnorm"),
            config.hidden_size,
            config.layer_norm_eps,
        )?;
        progress();
        let layers_scope = loader.scope("encoder").scope("layers");
        let mut loaded = Vec::with_capacity(layers);
        for i in 0..layers {
            loaded.push(ClipLayer::load(&layers_scope.scope(i), config)?);
            progress();
        }
        Ok(Self {
            config: config.clone(),
            embeddings,
            pre_layrnorm,
            layers: loaded,
        })
    }

    pub fn tokens(&self) -> usize {
        self.config.num_patches() + 1
    }

    /// The shape of every encoder layer's self-attention: all T = 1 + patches tokens attend to
    /// all of them.
    pub fn attention_shape(&self) -> AttentionShape {
        let (tokens, heads) = (self.tokens(), self.config.num_attention_heads);
        AttentionShape {
            q_rows: tokens,
            kv_rows: tokens,
            heads,
            kv_heads: heads,
            head_dim: self.config.head_dim(),
            causal: false,
        }
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

    /// Flatten CHW pixels `[c, s, s]` into patch rows [1 + patches, c·p·p] in the convolution's
    /// (c, y, x) order; row 0 (the CLS position) is zero so the matmul leaves it to the class
    /// embedding.
    pub fn patchify(&self, pixels: &[f32]) -> Result<Vec<f32>> {
        let (s, p, c) = (
            self.config.image_size,
            self.config.patch_size,
            self.config.num_channels,
        );
        if pixels.len() != c * s * s {
            return Err(Error::shape(
                "patchify",
                format!(
                    "pixels hold {} values, the vision tower takes [{c}, {s}, {s}]",
                    pixels.len()
                ),
            ));
        }
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
        Ok(out)
    }

    /// Record the tower on `pixels`; afterwards `buffers.hidden` holds the selected hidden state
    /// [1 + patches, d] (CLS first). If `scores` is given, the last layer's attention also emits
    /// per-key attention sums over the requested query rows (for stage-1 pruning).
    pub fn forward(
        &self,
        rec: &mut Recorder,
        buffers: &ClipBuffers,
        pixels: &[f32],
        mut scores: Option<ScoreOutput>,
    ) -> Result<()> {
        buffers
            .patches
            .write_f32(rec.gpu(), &self.patchify(pixels)?)?;
        self.embeddings.forward(rec, buffers)?;
        self.pre_layrnorm
            .forward(rec, &buffers.embeddings, &buffers.hidden)?;
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_scores = if i == last { scores.take() } else { None };
            layer.forward(rec, buffers, layer_scores)?;
        }
        Ok(())
    }
}
