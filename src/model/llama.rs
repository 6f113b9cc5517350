//! The LLaMA decoder (transformers' `LlamaModel` + `lm_head`) with a KV cache.
//!
//! One code path serves prefill (T prompt rows) and decode (T = 1; the linear layers then run
//! as gemv). Keys and values are computed for the new rows, rotated, and appended to each
//! layer's cache; attention then reads the whole cache. Token embeddings are gathered on the
//! host from the memory-mapped checkpoint, so `embed_tokens` (262 MB for 7B) never occupies
//! GPU memory.

use crate::error::{Error, Result};
use crate::gpu::kernels::attention::{self, AttentionShape, ScoreOutput};
use crate::gpu::kernels::rope::{self, RopeTable};
use crate::gpu::kernels::{activation, linear, norm};
use crate::gpu::{DType, Dispatch, Gpu, Recorder, Tensor, Weight};
use crate::model::config::TextConfig;
use crate::model::loader::Loader;

pub struct LlamaLayer {
    pub input_layernorm: Tensor,
    pub q_proj: Weight,
    pub k_proj: Weight,
    pub v_proj: Weight,
    pub o_proj: Weight,
    pub post_attention_layernorm: Tensor,
    /// `gate_proj` and `up_proj` stacked into one [2m, d] weight: one matmul for both.
    pub gate_up_proj: Weight,
    pub down_proj: Weight,
}

pub struct Llama {
    pub config: TextConfig,
    pub layers: Vec<LlamaLayer>,
    pub norm: Tensor,
    pub lm_head: Weight,
    pub rope: RopeTable,
}

/// Keys and values of every layer, [capacity, kv_heads · head_dim] each, f32.
pub struct KvCache {
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub capacity: usize,
    /// Rows filled per layer (layers after a stage-2 drop hold fewer).
    pub len: Vec<usize>,
}

impl KvCache {
    pub fn new(gpu: &Gpu, config: &TextConfig, capacity: usize) -> Result<Self> {
        let width = config.num_key_value_heads * config.head_dim;
        let layers = config.num_hidden_layers;
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for i in 0..layers {
            k.push(Tensor::empty(
                gpu,
                &[capacity, width],
                DType::F32,
                &format!("kv.k.{i}"),
            )?);
            v.push(Tensor::empty(
                gpu,
                &[capacity, width],
                DType::F32,
                &format!("kv.v.{i}"),
            )?);
        }
        Ok(Self {
            k,
            v,
            capacity,
            len: vec![0; layers],
        })
    }

    /// GPU bytes the filled part of the cache occupies (what pruning shrinks).
    pub fn used_bytes(&self) -> u64 {
        self.len
            .iter()
            .zip(&self.k)
            .map(|(&rows, k)| 2 * rows as u64 * k.shape[1] as u64 * 4)
            .sum()
    }

    pub fn allocated_bytes(&self) -> u64 {
        self.k.iter().chain(&self.v).map(|t| t.buffer.size()).sum()
    }
}

/// Per-request activation buffers, sized for `rows` tokens at once.
pub struct LlamaBuffers {
    pub rows: usize,
    pub hidden: Tensor,
    pub normed: Tensor,
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub attn: Tensor,
    pub gate_up: Tensor,
    pub act: Tensor,
    pub positions: Tensor,
    pub last: Tensor,
    pub last_normed: Tensor,
    pub logits: Tensor,
}

impl LlamaBuffers {
    pub fn bytes(&self) -> u64 {
        [
            &self.hidden,
            &self.normed,
            &self.q,
            &self.k,
            &self.v,
            &self.attn,
            &self.gate_up,
            &self.act,
            &self.positions,
            &self.last,
            &self.last_normed,
            &self.logits,
        ]
        .iter()
        .map(|t| t.buffer.size())
        .sum()
    }
}

impl Llama {
    pub fn load(
        loader: &mut Loader,
        config: &TextConfig,
        mut progress: impl FnMut(),
    ) -> Result<Self> {
        let d = config.hidden_size;
        let m = config.intermediate_size;
        let qd = config.num_attention_heads * config.head_dim;
        let kvd = config.num_key_value_heads * config.head_dim;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("text.layers.{i}");
            layers.push(LlamaLayer {
                input_layernorm: loader.vector(&format!("{p}.input_layernorm.weight"), d)?,
                q_proj: loader.linear(&format!("{p}.self_attn.q_proj"), qd, d, false)?,
                k_proj: loader.linear(&format!("{p}.self_attn.k_proj"), kvd, d, false)?,
                v_proj: loader.linear(&format!("{p}.self_attn.v_proj"), kvd, d, false)?,
                o_proj: loader.linear(&format!("{p}.self_attn.o_proj"), d, qd, false)?,
                post_attention_layernorm: loader
                    .vector(&format!("{p}.post_attention_layernorm.weight"), d)?,
                gate_up_proj: loader.linear_stack(
                    &[&format!("{p}.mlp.gate_proj"), &format!("{p}.mlp.up_proj")],
                    m,
                    d,
                    false,
                )?,
                down_proj: loader.linear(&format!("{p}.mlp.down_proj"), d, m, false)?,
            });
            progress();
        }
        let norm = loader.vector("text.norm.weight", d)?;
        let head_name = if config.tie_word_embeddings
            && !loader.checkpoint.contains("language_model.lm_head.weight")
            && !loader.checkpoint.contains("lm_head.weight")
        {
            "text.embed_tokens"
        } else {
            "lm_head"
        };
        let lm_head = loader.linear(head_name, config.vocab_size, d, false)?;
        progress();
        let rope = RopeTable::new(
            loader.gpu,
            config.rope_theta,
            config.head_dim,
            config.max_position_embeddings,
        )?;
        loader.bytes += rope.table.buffer.size();
        Ok(Self {
            config: config.clone(),
            layers,
            norm,
            lm_head,
            rope,
        })
    }

    pub fn buffers(&self, gpu: &Gpu, rows: usize) -> Result<LlamaBuffers> {
        let c = &self.config;
        let qd = c.num_attention_heads * c.head_dim;
        let kvd = c.num_key_value_heads * c.head_dim;
        let f = |shape: &[usize], label: &str| Tensor::empty(gpu, shape, DType::F32, label);
        Ok(LlamaBuffers {
            rows,
            hidden: f(&[rows, c.hidden_size], "text.hidden")?,
            normed: f(&[rows, c.hidden_size], "text.normed")?,
            q: f(&[rows, qd], "text.q")?,
            k: f(&[rows, kvd], "text.k")?,
            v: f(&[rows, kvd], "text.v")?,
            attn: f(&[rows, qd], "text.attn")?,
            gate_up: f(&[rows, 2 * c.intermediate_size], "text.gate_up")?,
            act: f(&[rows, c.intermediate_size], "text.act")?,
            positions: Tensor::empty(gpu, &[rows], DType::U32, "text.positions")?,
            last: f(&[1, c.hidden_size], "text.last")?,
            last_normed: f(&[1, c.hidden_size], "text.last_normed")?,
            logits: f(&[1, c.vocab_size], "text.logits")?,
        })
    }

    /// Run layers `layers` on the first `t` rows of `b.hidden` (positions already written to
    /// `b.positions`), appending their keys and values to the cache. `scores` asks the last of
    /// these layers' attention to emit per-key attention sums.
    pub fn forward_layers(
        &self,
        rec: &mut Recorder,
        b: &LlamaBuffers,
        t: usize,
        cache: &mut KvCache,
        layers: std::ops::Range<usize>,
        scores: Option<ScoreOutput>,
    ) -> Result<()> {
        let gpu = rec.gpu();
        let c = &self.config;
        let (h, kvh, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let rows = |x: &Tensor| x.view(&[t, x.shape[1]]);
        let (hidden, normed, q, k, v, attn, gate_up, act) = (
            rows(&b.hidden)?,
            rows(&b.normed)?,
            rows(&b.q)?,
            rows(&b.k)?,
            rows(&b.v)?,
            rows(&b.attn)?,
            rows(&b.gate_up)?,
            rows(&b.act)?,
        );
        let positions = b.positions.view(&[t])?;
        let eps = c.rms_norm_eps as f32;
        let scale = 1.0 / (hd as f32).sqrt();
        let width = (kvh * hd) as u64 * 4;
        let mut scores = scores;
        let last = layers.end.saturating_sub(1);
        for i in layers {
            let layer = &self.layers[i];
            let start = cache.len[i];
            if start + t > cache.capacity {
                return Err(Error::argument(
                    "--max-new-tokens",
                    format!(
                        "the KV cache holds {} tokens; {} more do not fit",
                        cache.capacity,
                        start + t - cache.capacity
                    ),
                ));
            }
            let mut d: Vec<Dispatch> = Vec::new();
            d.push(norm::rms_norm(
                gpu,
                &hidden,
                &layer.input_layernorm,
                &normed,
                eps,
            )?);
            d.extend(linear::linear(gpu, &normed, &layer.q_proj, &q, false)?);
            d.extend(linear::linear(gpu, &normed, &layer.k_proj, &k, false)?);
            d.extend(linear::linear(gpu, &normed, &layer.v_proj, &v, false)?);
            d.push(rope::rope(gpu, &q, h, &positions, &self.rope)?);
            d.push(rope::rope(gpu, &k, kvh, &positions, &self.rope)?);
            rec.dispatch_all(d);
            rec.copy(
                &k.buffer,
                0,
                &cache.k[i].buffer,
                start as u64 * width,
                t as u64 * width,
            );
            rec.copy(
                &v.buffer,
                0,
                &cache.v[i].buffer,
                start as u64 * width,
                t as u64 * width,
            );
            cache.len[i] = start + t;
            let shape = AttentionShape {
                q_rows: t,
                kv_rows: start + t,
                heads: h,
                kv_heads: kvh,
                head_dim: hd,
                causal: true,
            };
            let layer_scores = if i == last { scores.take() } else { None };
            let mut d = attention::attention(
                gpu,
                &shape,
                scale,
                &q,
                &cache.k[i],
                &cache.v[i],
                &attn,
                layer_scores,
            )?;
            // Residual adds are fused into o_proj and down_proj (accumulate = true).
            d.extend(linear::linear(gpu, &attn, &layer.o_proj, &hidden, true)?);
            d.push(norm::rms_norm(
                gpu,
                &hidden,
                &layer.post_attention_layernorm,
                &normed,
                eps,
            )?);
            d.extend(linear::linear(
                gpu,
                &normed,
                &layer.gate_up_proj,
                &gate_up,
                false,
            )?);
            d.push(activation::silu_mul(gpu, &gate_up, &act)?);
            d.extend(linear::linear(gpu, &act, &layer.down_proj, &hidden, true)?);
            rec.dispatch_all(d);
        }
        Ok(())
    }

    /// Final norm and lm_head on row `row` of the hidden state: logits land in `b.logits`.
    pub fn logits(&self, rec: &mut Recorder, b: &LlamaBuffers, row: usize) -> Result<()> {
        let gpu = rec.gpu();
        let width = self.config.hidden_size as u64 * 4;
        rec.copy(
            &b.hidden.buffer,
            row as u64 * width,
            &b.last.buffer,
            0,
            width,
        );
        rec.dispatch(norm::rms_norm(
            gpu,
            &b.last,
            &self.norm,
            &b.last_normed,
            self.config.rms_norm_eps as f32,
        )?);
        rec.dispatch_all(linear::linear(
            gpu,
            &b.last_normed,
            &self.lm_head,
            &b.logits,
            false,
        )?);
        Ok(())
    }
}
