//! The LLaMA decoder (transformers' `LlamaModel` + `lm_head`) with a KV cache.
//!
//! One code path serves prefill (T prompt rows) and decode (T = 1; the linear layers then run
//! as gemv). Keys and values are computed for the new rows, rotated, and appended to each
//! layer's cache; attention then reads the whole cache. A prompt's token embeddings are gathered
//! on the host from the memory-mapped checkpoint; decode steps gather theirs on the GPU from
//! `embed_tokens`, held there as the checkpoint stores it (the same values the host reads),
//! because a replayed decode step ([`Llama::decode_plan`]) feeds the GPU's own argmax back
//! without the host.
//!
//! The structs mirror `modeling_llama.py`: `Llama.layers[i]` is `LlamaDecoderLayer` with
//! `input_layernorm`, `self_attn` (`LlamaAttention`), `post_attention_layernorm` and `mlp`
//! (`LlamaMLP`), each loaded from the checkpoint scope of the same name.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::gpu::kernels::attention::{self, AttentionShape, ScoreOutput};
use crate::gpu::kernels::attention_decode::{self, DecodeHeads};
use crate::gpu::kernels::linear::gemv;
use crate::gpu::kernels::linear::LinearInput;
use crate::gpu::kernels::rope::{self, RopeTable};
use crate::gpu::kernels::{activation, decode_step, embedding, kv_store, linear, sample, Dispatch};
use crate::gpu::tensor::formats_of;
use crate::gpu::{DType, Gpu, MemoryKind, Recorder, Tensor, Weight, WeightFormat};
use crate::model::config::TextConfig;
use crate::model::loader::{Formats, Loader};
use crate::model::norm::RmsNorm;

/// `self_attn`: grouped-query attention with rotary positions.
pub struct LlamaAttention {
    pub q_proj: Weight,
    pub k_proj: Weight,
    pub v_proj: Weight,
    pub o_proj: Weight,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// `mlp`: `down_proj(silu(gate_proj(x)) * up_proj(x))`.
pub struct LlamaMlp {
    /// `gate_proj` and `up_proj` stacked into one [2m, d] weight: one matmul for both.
    pub gate_up_proj: Weight,
    pub down_proj: Weight,
}

/// `layers.{i}`: pre-norm attention and MLP, each with a residual connection.
pub struct LlamaLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: LlamaAttention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: LlamaMlp,
}

pub struct Llama {
    pub config: TextConfig,
    /// `embed_tokens` [V, d] on the GPU as stored, read by decode steps (prompts are embedded on
    /// the host); `None` when the engine keeps it on the host only (`--host-embeddings`), and
    /// the host writes each decode step's row.
    pub embed_tokens: Option<Weight>,
    pub layers: Vec<LlamaLayer>,
    pub norm: RmsNorm,
    pub lm_head: Weight,
    /// cos/sin of every position up to the context length, shared by all layers.
    pub rope: RopeTable,
}

/// One layer's cached keys and values, f32 or f16 (halves packed two per word).
pub struct LayerKv {
    /// (capacity, kv_heads · head_dim), rows [0, len) filled, already rotated.
    pub k: Tensor,
    /// (capacity, kv_heads · head_dim), rows [0, len) filled, same element type as `k`.
    pub v: Tensor,
    /// Rows filled (layers after a stage-2 drop hold fewer than those before it).
    pub len: usize,
}

/// Keys and values of every decoder layer. Each layer is allocated for the rows it will hold:
/// after a stage-2 drop, layers K.. hold only the kept rows, so pruning frees their bytes.
pub struct KvCache {
    /// One entry per decoder layer.
    pub layers: Vec<LayerKv>,
}

impl KvCache {
    /// A cache whose layer `i` holds up to `capacities[i]` rows of `dtype` (F32 or F16).
    pub fn new(gpu: &Gpu, config: &TextConfig, capacities: &[usize], dtype: DType) -> Result<Self> {
        if dtype == DType::U32 {
            return Err(Error::argument(
                "kv",
                "the KV cache holds f32 or f16 values",
            ));
        }
        if capacities.len() != config.num_hidden_layers {
            return Err(Error::shape(
                "kv cache",
                format!(
                    "{} layer capacities for {} decoder layers",
                    capacities.len(),
                    config.num_hidden_layers
                ),
            ));
        }
        let width = config.num_key_value_heads * config.head_dim;
        let layers = capacities
            .iter()
            .enumerate()
            .map(|(i, &capacity)| LayerKv::new(gpu, i, capacity, width, dtype))
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    /// A cache with the same capacity in every layer.
    pub fn uniform(gpu: &Gpu, config: &TextConfig, capacity: usize, dtype: DType) -> Result<Self> {
        Self::new(
            gpu,
            config,
            &vec![capacity; config.num_hidden_layers],
            dtype,
        )
    }

    /// Bytes of the cache's buffers (every layer's K and V, as allocated).
    pub fn allocated_bytes(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| l.k.buffer.size() + l.v.buffer.size())
            .sum()
    }

    /// Count `rows` more filled rows in every layer: the rows a replayed decode loop appended
    /// on the GPU ([`Llama::decode_plan`]), which the host did not record as it went.
    pub fn count_appended(&mut self, rows: usize) {
        for layer in &mut self.layers {
            layer.len += rows;
        }
    }

    /// Decode steps every layer still has room for.
    pub fn free_rows(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.capacity() - l.len)
            .min()
            .unwrap_or(0)
    }

    /// Give layer `layer` room for exactly `capacity` rows, keeping its filled rows: new
    /// buffers, a GPU copy of rows [0, len), and the old buffers released (a follow-up turn of a
    /// conversation needs more rows than its first request planned for; an adaptive stage 2
    /// needs fewer than its cap). A capacity below the rows held is refused.
    pub fn grow_layer(&mut self, gpu: &Gpu, layer: usize, capacity: usize) -> Result<()> {
        let Some(kv) = self.layers.get_mut(layer) else {
            return Err(Error::argument(
                "layer",
                format!(
                    "the cache has {} layers, not {}",
                    self.layers.len(),
                    layer + 1
                ),
            ));
        };
        if capacity < kv.len {
            return Err(Error::argument(
                "capacity",
                format!(
                    "layer {layer} holds {} rows; a capacity of {capacity} would drop some",
                    kv.len
                ),
            ));
        }
        let bigger = LayerKv::new(gpu, layer, capacity, kv.width(), kv.k.dtype)?;
        let filled = kv.len as u64 * kv.row_bytes();
        let mut rec = Recorder::new(gpu);
        rec.copy(&kv.k.buffer, 0, &bigger.k.buffer, 0, filled);
        rec.copy(&kv.v.buffer, 0, &bigger.v.buffer, 0, filled);
        rec.finish("kv cache growth")?;
        *kv = LayerKv {
            len: kv.len,
            ..bigger
        };
        Ok(())
    }
}

impl LayerKv {
    fn new(gpu: &Gpu, layer: usize, capacity: usize, width: usize, dtype: DType) -> Result<Self> {
        let buffer = |name: &str| {
            let label = format!("kv.{name}.{layer}");
            Tensor::empty_as(gpu, &[capacity, width], dtype, &label, MemoryKind::Kv)
        };
        Ok(Self {
            k: buffer("k")?,
            v: buffer("v")?,
            len: 0,
        })
    }

    /// Rows the layer has room for.
    pub fn capacity(&self) -> usize {
        self.k.shape[0]
    }

    /// Elements per row: kv_heads · head_dim.
    pub fn width(&self) -> usize {
        self.k.shape[1]
    }

    fn row_bytes(&self) -> u64 {
        (self.width() * self.k.dtype.bytes()) as u64
    }

    /// Queue writing the f32 rows of `k` and `v` after the filled ones (a copy into an f32
    /// cache, a conversion into an f16 one); returns the first new row.
    fn append(&mut self, rec: &mut Recorder, k: &Tensor, v: &Tensor) -> Result<usize> {
        let rows = k.rows_cols().0;
        let capacity = self.capacity();
        let start = self.len;
        if start + rows > capacity {
            return Err(Error::argument(
                "max_new_tokens",
                format!(
                    "the KV cache holds {capacity} tokens; {} more do not fit",
                    start + rows - capacity
                ),
            ));
        }
        if self.k.dtype == DType::F16 {
            let gpu = rec.gpu();
            let stores = [
                kv_store::store_f16(gpu, k, &self.k, start)?,
                kv_store::store_f16(gpu, v, &self.v, start)?,
            ];
            rec.dispatch_all(stores);
        } else {
            let row_bytes = self.row_bytes();
            let (offset, size) = (start as u64 * row_bytes, rows as u64 * row_bytes);
            rec.copy(&k.buffer, 0, &self.k.buffer, offset, size);
            rec.copy(&v.buffer, 0, &self.v.buffer, offset, size);
        }
        self.len = start + rows;
        Ok(start)
    }
}

/// Per-request activation buffers, allocated for `rows` tokens; a forward pass over T ≤ rows
/// tokens uses the first T rows ([`LlamaBuffers::first_rows`]). d = hidden size, m =
/// intermediate size, h / kvh = query / key-value heads, hd = head dim, V = vocabulary.
pub struct LlamaBuffers {
    pub rows: usize,
    /// (rows, d): the residual stream.
    pub hidden: Tensor,
    /// (rows, d): the residual stream after a norm, input of attention and MLP where the
    /// matmul does not fuse the norm (and DART's scoring rows).
    pub normed: Tensor,
    /// (rows, h · hd)
    pub q: Tensor,
    /// (rows, kvh · hd): this pass's new keys, copied into the cache after RoPE.
    pub k: Tensor,
    /// (rows, kvh · hd)
    pub v: Tensor,
    /// (rows, h · hd): attention output before `o_proj`.
    pub attn: Tensor,
    /// (rows, 2m): gate and up projections side by side.
    pub gate_up: Tensor,
    /// (rows, m): silu(gate) · up; none where `down_proj`'s matmul computes it as it loads
    /// (`linear::fuses_inputs`).
    pub act: Option<Tensor>,
    /// (rows,) u32: the position id of each row (RoPE).
    pub positions: Tensor,
    /// (1, d): the row whose next token is predicted.
    pub last: Tensor,
    /// (1, d): `last` after the final norm.
    pub last_normed: Tensor,
    /// (1, V)
    pub logits: Tensor,
}

impl LlamaBuffers {
    /// Views of the first `t` rows of every per-token buffer (the same GPU memory).
    pub fn first_rows(&self, t: usize) -> Result<Self> {
        let rows = |x: &Tensor| x.view(&[t, x.shape[1]]);
        Ok(Self {
            rows: t,
            hidden: rows(&self.hidden)?,
            normed: rows(&self.normed)?,
            q: rows(&self.q)?,
            k: rows(&self.k)?,
            v: rows(&self.v)?,
            attn: rows(&self.attn)?,
            gate_up: rows(&self.gate_up)?,
            act: self.act.as_ref().map(rows).transpose()?,
            positions: self.positions.view(&[t])?,
            last: self.last.clone(),
            last_normed: self.last_normed.clone(),
            logits: self.logits.clone(),
        })
    }
}

impl LlamaAttention {
    fn load(loader: &Loader, c: &TextConfig) -> Result<Self> {
        let d = c.hidden_size;
        let qd = c.num_attention_heads * c.head_dim;
        let kvd = c.num_key_value_heads * c.head_dim;
        Ok(Self {
            q_proj: loader.linear("q_proj", qd, d, false)?,
            k_proj: loader.linear("k_proj", kvd, d, false)?,
            v_proj: loader.linear("v_proj", kvd, d, false)?,
            o_proj: loader.linear("o_proj", d, qd, false)?,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        })
    }

    /// Q, K and V of the rows of `x.normed`, rotated to their positions; or, given `norm` (a
    /// decode step's one row, or a prefill where the matmul fuses inputs), of `x.hidden`
    /// normalised inside each projection.
    fn project(
        &self,
        gpu: &Gpu,
        x: &LlamaBuffers,
        rope_table: &RopeTable,
        norm: Option<&RmsNorm>,
    ) -> Result<Vec<Dispatch>> {
        let mut d = Vec::new();
        for (w, out) in [
            (&self.q_proj, &x.q),
            (&self.k_proj, &x.k),
            (&self.v_proj, &x.v),
        ] {
            d.extend(match norm {
                Some(norm) => linear::linear_with(gpu, &x.hidden, norm.input(), w, out, false)?,
                None => linear::linear(gpu, &x.normed, w, out, false)?,
            });
        }
        d.push(rope::rope(gpu, &x.q, self.heads, &x.positions, rope_table)?);
        d.push(rope::rope(
            gpu,
            &x.k,
            self.kv_heads,
            &x.positions,
            rope_table,
        )?);
        Ok(d)
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// `hidden += o_proj(attention(normed))`, appending this pass's keys and values to `kv`
    /// (the residual add is fused into `o_proj`); with `norm`, `normed` is never written and
    /// the projections normalise `hidden` themselves. `scores`, if given, receives per-key
    /// attention sums for pruning.
    fn forward(
        &self,
        rec: &mut Recorder,
        x: &LlamaBuffers,
        kv: &mut LayerKv,
        (rope_table, norm): (&RopeTable, Option<&RmsNorm>),
        scores: Option<ScoreOutput>,
    ) -> Result<()> {
        let gpu = rec.gpu();
        rec.dispatch_all(self.project(gpu, x, rope_table, norm)?);
        let start = kv.append(rec, &x.k, &x.v)?;
        let shape = AttentionShape {
            q_rows: x.rows,
            kv_rows: start + x.rows,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            causal: true,
        };
        rec.dispatch_all(attention::attention(
            gpu,
            &shape,
            self.scale(),
            &x.q,
            &kv.k,
            &kv.v,
            &x.attn,
            scores,
        )?);
        rec.dispatch_all(linear::linear(gpu, &x.attn, &self.o_proj, &x.hidden, true)?);
        Ok(())
    }

    /// [`Self::forward`] for one replayed decode step (`x` one row), `norm` fused into the
    /// projections: the new key and value go to cache row `kv.len + step[0]`, and attention
    /// reads the rows up to it.
    fn decode_step(
        &self,
        gpu: &Gpu,
        x: &LlamaBuffers,
        kv: &LayerKv,
        (norm, rope_table): (&RmsNorm, &RopeTable),
        step: &Tensor,
    ) -> Result<Vec<Dispatch>> {
        let mut d = self.project(gpu, x, rope_table, Some(norm))?;
        d.push(kv_store::store_at_step(gpu, &x.k, &kv.k, kv.len, step)?);
        d.push(kv_store::store_at_step(gpu, &x.v, &kv.v, kv.len, step)?);
        let heads = DecodeHeads {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        };
        d.push(attention_decode::attention_decode(
            gpu,
            heads,
            self.scale(),
            kv.len,
            step,
            [&x.q, &kv.k, &kv.v, &x.attn],
        )?);
        d.extend(linear::linear(gpu, &x.attn, &self.o_proj, &x.hidden, true)?);
        Ok(d)
    }
}

impl LlamaMlp {
    fn load(loader: &Loader, c: &TextConfig) -> Result<Self> {
        let (d, m) = (c.hidden_size, c.intermediate_size);
        Ok(Self {
            gate_up_proj: loader.linear_stack(&["gate_proj", "up_proj"], m, d, false)?,
            down_proj: loader.linear("down_proj", d, m, false)?,
        })
    }

    /// `hidden += down_proj(silu(gate_proj(normed)) · up_proj(normed))` (the residual add is
    /// fused into `down_proj`).
    fn dispatches(&self, gpu: &Gpu, x: &LlamaBuffers) -> Result<Vec<Dispatch>> {
        let act = x.act.as_ref().ok_or_else(|| {
            Error::shape(
                "mlp",
                "buffers made for fused inputs have no activation buffer",
            )
        })?;
        let mut d = linear::linear(gpu, &x.normed, &self.gate_up_proj, &x.gate_up, false)?;
        d.push(activation::silu_mul(gpu, &x.gate_up, act)?);
        d.extend(linear::linear(gpu, act, &self.down_proj, &x.hidden, true)?);
        Ok(d)
    }

    /// [`Self::dispatches`] reading `x.hidden` through `norm`: the norm fused into
    /// `gate_up_proj`, `silu(gate)·up` into `down_proj`'s load (a decode step's one row, or a
    /// prefill where the matmul fuses inputs).
    fn fused(&self, gpu: &Gpu, x: &LlamaBuffers, norm: &RmsNorm) -> Result<Vec<Dispatch>> {
        let (hidden, gate_up) = (&x.hidden, &x.gate_up);
        let (w_gate_up, w_down) = (&self.gate_up_proj, &self.down_proj);
        let mut d = linear::linear_with(gpu, hidden, norm.input(), w_gate_up, gate_up, false)?;
        let silu = LinearInput::SiluGate;
        d.extend(linear::linear_with(
            gpu, gate_up, silu, w_down, hidden, true,
        )?);
        Ok(d)
    }
}

impl LlamaLayer {
    fn load(loader: &Loader, c: &TextConfig) -> Result<Self> {
        let (d, eps) = (c.hidden_size, c.rms_norm_eps);
        Ok(Self {
            input_layernorm: RmsNorm::load(&loader.scope("input_layernorm"), d, eps)?,
            self_attn: LlamaAttention::load(&loader.scope("self_attn"), c)?,
            post_attention_layernorm: RmsNorm::load(
                &loader.scope("post_attention_layernorm"),
                d,
                eps,
            )?,
            mlp: LlamaMlp::load(&loader.scope("mlp"), c)?,
        })
    }

    /// `x = x + attn(norm(x)); x = x + mlp(norm(x))` on the rows of `x`.
    fn forward(
        &self,
        rec: &mut Recorder,
        x: &LlamaBuffers,
        kv: &mut LayerKv,
        rope_table: &RopeTable,
        scores: Option<ScoreOutput>,
    ) -> Result<()> {
        if linear::fuses_inputs(rec.gpu()) {
            // The tiled matmul (GPUs) computes both norms and the activation as it loads X.
            let norm = Some(&self.input_layernorm);
            self.self_attn
                .forward(rec, x, kv, (rope_table, norm), scores)?;
            let mlp = self
                .mlp
                .fused(rec.gpu(), x, &self.post_attention_layernorm)?;
            rec.dispatch_all(mlp);
            return Ok(());
        }
        self.input_layernorm.forward(rec, &x.hidden, &x.normed)?;
        self.self_attn
            .forward(rec, x, kv, (rope_table, None), scores)?;
        self.post_attention_layernorm
            .forward(rec, &x.hidden, &x.normed)?;
        rec.dispatch_all(self.mlp.dispatches(rec.gpu(), x)?);
        Ok(())
    }

    /// [`Self::forward`] as one replayed decode step's dispatches (see
    /// [`LlamaAttention::decode_step`]): both norms fused into the projections after them, and
    /// `silu(gate)·up` into `down_proj`'s load.
    fn decode_step(
        &self,
        gpu: &Gpu,
        x: &LlamaBuffers,
        kv: &LayerKv,
        rope_table: &RopeTable,
        step: &Tensor,
    ) -> Result<Vec<Dispatch>> {
        let norm = (&self.input_layernorm, rope_table);
        let mut d = self.self_attn.decode_step(gpu, x, kv, norm, step)?;
        d.extend(self.mlp.fused(gpu, x, &self.post_attention_layernorm)?);
        Ok(d)
    }
}

impl Llama {
    /// The formats its matrices are stored in, each once.
    pub fn formats(&self) -> Vec<WeightFormat> {
        let layers = self.layers.iter().flat_map(|l| {
            let (a, m) = (&l.self_attn, &l.mlp);
            [
                &a.q_proj,
                &a.k_proj,
                &a.v_proj,
                &a.o_proj,
                &m.gate_up_proj,
                &m.down_proj,
            ]
        });
        formats_of(layers.chain([&self.lm_head]).chain(&self.embed_tokens))
    }

    /// Load `LlamaForCausalLM` from the checkpoint's root scope: the decoder from `text.*`
    /// (`LlamaModel`) and the head from `lm_head`; `embed_tokens` too with
    /// `embeddings_on_gpu`.
    pub fn load(
        root: &Loader,
        config: &TextConfig,
        embeddings_on_gpu: bool,
        mut progress: impl FnMut(),
    ) -> Result<Self> {
        let loader = root.scope("text");
        let layers_scope = loader.scope("layers");
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            layers.push(LlamaLayer::load(&layers_scope.scope(i), config)?);
            progress();
        }
        let norm = RmsNorm::load(
            &loader.scope("norm"),
            config.hidden_size,
            config.rms_norm_eps,
        )?;
        let (vocab, d) = (config.vocab_size, config.hidden_size);
        // As stored, so that a decode step's row is the row the host gathers for a prompt.
        let embed_tokens = match embeddings_on_gpu {
            true => Some(loader.with_formats(Formats::AsStored).linear(
                "embed_tokens",
                vocab,
                d,
                false,
            )?),
            false => None,
        };
        let lm_head = match Self::ties_lm_head(root, config) {
            false => root.linear("lm_head", vocab, d, false)?,
            true => {
                let head = root.linear("text.embed_tokens", vocab, d, false)?;
                let formats = |w: &Weight| w.chunks.iter().map(|c| c.format).collect::<Vec<_>>();
                match &embed_tokens {
                    Some(table) if formats(table) == formats(&head) => table.clone(),
                    _ => head,
                }
            }
        };
        progress();
        let rope = RopeTable::new(
            loader.gpu,
            config.rope_theta,
            config.head_dim,
            config.max_position_embeddings,
        )?;
        Ok(Self {
            config: config.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
        })
    }

    /// Whether `lm_head` is `embed_tokens`: the checkpoint ties them and stores only the latter.
    fn ties_lm_head(root: &Loader, config: &TextConfig) -> bool {
        let checkpoint = root.checkpoint;
        config.tie_word_embeddings
            && !checkpoint.contains("language_model.lm_head.weight")
            && !checkpoint.contains("lm_head.weight")
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
            act: match linear::fuses_inputs(gpu) {
                true => None,
                false => Some(f(&[rows, c.intermediate_size], "text.act")?),
            },
            positions: Tensor::empty(gpu, &[rows], DType::U32, "text.positions")?,
            last: f(&[1, c.hidden_size], "text.last")?,
            last_normed: f(&[1, c.hidden_size], "text.last_normed")?,
            logits: f(&[1, c.vocab_size], "text.logits")?,
        })
    }

    /// Run decoder layers `layers` on the first `t` rows of `b.hidden` (positions already
    /// written to `b.positions`), appending their keys and values to the cache. `scores` asks
    /// the last of these layers' attention to emit per-key attention sums (pruning).
    pub fn forward_layers(
        &self,
        rec: &mut Recorder,
        b: &LlamaBuffers,
        t: usize,
        cache: &mut KvCache,
        layers: Range<usize>,
        mut scores: Option<ScoreOutput>,
    ) -> Result<()> {
        let x = b.first_rows(t)?;
        let last = layers.end.saturating_sub(1);
        for i in layers {
            let layer_scores = if i == last { scores.take() } else { None };
            self.layers[i].forward(rec, &x, &mut cache.layers[i], &self.rope, layer_scores)?;
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
        self.norm.forward(rec, &b.last, &b.last_normed)?;
        rec.dispatch_all(linear::linear(
            gpu,
            &b.last_normed,
            &self.lm_head,
            &b.logits,
            false,
        )?);
        Ok(())
    }

    /// One decode step as dispatches, built once per request and replayed for every token
    /// with no host work but the submit: the embedding row of `state.token` (gathered on the
    /// GPU; without `embed_tokens` there, the host writes the row into `b.hidden` first), every layer on it at position `first_position + step` with its key and value
    /// appended at each layer's `len + step`, the final norm and `lm_head` into `b.logits`,
    /// with `argmax` the greedy next id into `state.token`, and the step counter advanced.
    /// The caller keeps `step` below `cache.free_rows()` and counts the rows the steps
    /// appended afterwards ([`KvCache::count_appended`]).
    pub fn decode_plan(
        &self,
        gpu: &Gpu,
        b: &LlamaBuffers,
        cache: &KvCache,
        state: &DecodeState,
        argmax: bool,
    ) -> Result<Vec<Dispatch>> {
        let x = b.first_rows(1)?;
        let mut d = match &self.embed_tokens {
            Some(table) => embedding::embed_row(gpu, table, &state.token, 0, &x.hidden)?,
            None => Vec::new(),
        };
        for (layer, kv) in self.layers.iter().zip(&cache.layers) {
            d.extend(layer.decode_step(gpu, &x, kv, &self.rope, &state.step)?);
        }
        let norm = self.norm.input();
        d.extend(gemv::gemv_with(
            gpu,
            &x.hidden,
            0,
            norm,
            &self.lm_head,
            &b.logits,
            0,
            false,
        )?);
        if argmax {
            d.push(sample::argmax(gpu, &b.logits, 0, &state.token, 0)?);
        }
        d.push(decode_step::advance(
            gpu,
            &state.step,
            &x.positions,
            state.first_position,
        )?);
        Ok(d)
    }
}

/// What a replayed decode step reads and advances on the GPU.
pub struct DecodeState {
    /// (1,) u32: steps run so far in this decode loop.
    pub step: Tensor,
    /// (1,) u32: the token the next step feeds; the GPU's argmax writes it, or the host writes
    /// a token it sampled.
    pub token: Tensor,
    /// The position of the loop's first token.
    pub first_position: usize,
}

impl DecodeState {
    /// A loop whose first step feeds the id already in `token` at `first_position`, written into
    /// `positions[0]` (the decode steps' RoPE positions).
    pub fn new(
        gpu: &Gpu,
        token: Tensor,
        positions: &Tensor,
        first_position: usize,
    ) -> Result<Self> {
        let step = Tensor::from_u32(gpu, &[1], &[0], "decode.step")?;
        let position = u32::try_from(first_position).map_err(|_| {
            Error::argument(
                "position",
                format!("{first_position} is not a 32-bit position"),
            )
        })?;
        positions.write_u32(gpu, &[position])?;
        Ok(Self {
            step,
            token,
            first_position,
        })
    }
}
