//! `LlavaForConditionalGeneration`: the vision tower, the projector and the language model,
//! loaded once and shared by every request.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::error::{Error, Result};
use crate::gpu::kernels::attention::{self, AttentionShape, ScoreOutput};
use crate::gpu::kernels::sample;
use crate::gpu::kernels::topk::{self, Segment};
use crate::gpu::{DType, Gpu, GpuOptions, Recorder, Tensor, WeightFormat};
use crate::model::clip::ClipVision;
use crate::model::config::LlavaConfig;
use crate::model::image_cache::{ImageCache, DEFAULT_IMAGE_CACHE_BYTES};
use crate::model::llama::{KvCache, Llama};
use crate::model::loader::Loader;
use crate::model::projector::Projector;
use crate::model::weights::Checkpoint;
use crate::text::TextTokenizer;
use crate::vision::ImageProcessorConfig;

/// How to load a model.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    pub gpu: GpuOptions,
    /// Matrix weights of the language model (decoder linear layers and `lm_head`) on the GPU:
    /// f16 (default), f32 (exact parity checks), or ggml's Q8_0 / Q4_0 blocks (quantized at
    /// load from float checkpoints, or read as stored from a `quantize`d one).
    pub weight_format: WeightFormat,
    /// Matrix weights of the vision tower and projector; `None`: the same as `weight_format`
    /// when that is f16 or f32, f16 when it is quantized.
    pub vision_weight_format: Option<WeightFormat>,
    /// Show a progress bar on stderr while weights upload.
    pub progress: bool,
    /// Create every weight buffer without uploading data (and compile no pipelines): the
    /// `memory` command measures a model's allocations this way. Such an engine cannot answer
    /// requests.
    pub allocate_only: bool,
    /// Load only the first N decoder layers: real widths at a truncated depth, for benchmarks
    /// of large models on small devices (the answers are not the model's).
    pub text_layers: Option<usize>,
    /// Element type of the KV cache: `DType::F16` (half the bytes) or `DType::F32`. None: f16
    /// where the adapter has SHADER_F16, f32 otherwise.
    pub kv: Option<DType>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            gpu: GpuOptions::default(),
            weight_format: WeightFormat::F16,
            vision_weight_format: None,
            progress: false,
            allocate_only: false,
            text_layers: None,
            kv: None,
        }
    }
}

impl EngineOptions {
    /// The format the vision tower and projector load in (see `vision_weight_format`).
    pub fn vision_format(&self) -> WeightFormat {
        self.vision_weight_format
            .unwrap_or(if self.weight_format.is_quantized() {
                WeightFormat::F16
            } else {
                self.weight_format
            })
    }
}

/// A loaded model, ready to answer requests.
pub struct Engine {
    pub gpu: Gpu,
    pub model_dir: PathBuf,
    pub config: LlavaConfig,
    pub checkpoint: Checkpoint,
    pub tokenizer: TextTokenizer,
    pub image_processor: ImageProcessorConfig,
    pub vision: ClipVision,
    pub projector: Projector,
    /// LLaVA-NeXT's `image_newline` [1, text width], the row closing each grid row of the
    /// packed image features (None for LLaVA-1.5).
    pub image_newline: Option<Tensor>,
    pub llama: Llama,
    /// GPU bytes of all weights (the tracker's count after loading).
    pub weight_bytes: u64,
    /// Element type of every request's KV cache (F32 or F16).
    pub kv_dtype: DType,
    pub load_ms: f64,
    /// Projector outputs of images already seen, shared by every session (not by one-shot
    /// `generate`, whose timings must measure the vision tower).
    pub image_cache: Mutex<ImageCache>,
}

impl Engine {
    pub fn load(model_dir: &Path, options: EngineOptions) -> Result<Self> {
        if !model_dir.is_dir() {
            return Err(Error::File {
                path: model_dir.to_path_buf(),
                reason: "model directory not found".into(),
            });
        }
        let config = LlavaConfig::load(model_dir)?;
        let tokenizer = TextTokenizer::load(
            model_dir,
            config.image_token_index,
            config.text.bos_token_id,
        )?;
        let image_processor = ImageProcessorConfig::load(model_dir, config.vision.image_size)?;
        let checkpoint = Checkpoint::open(model_dir)?;
        Self::from_parts(
            model_dir,
            config,
            tokenizer,
            image_processor,
            checkpoint,
            options,
        )
    }

    /// A LLaVA-shaped model with random weights from a named preset (see `presets.rs`), built
    /// in memory: benchmarks of real model shapes without a download.
    pub fn synthetic(preset: &str, options: EngineOptions) -> Result<Self> {
        let config = crate::model::presets::config(preset)?;
        let tokenizer = TextTokenizer::synthetic(config.text.vocab_size, config.image_token_index)?;
        let image_processor = ImageProcessorConfig::clip_default(config.vision.image_size);
        let checkpoint =
            Checkpoint::synthetic(preset, crate::model::presets::tensor_shapes(&config));
        Self::from_parts(
            Path::new(preset),
            config,
            tokenizer,
            image_processor,
            checkpoint,
            options,
        )
    }

    fn from_parts(
        model_dir: &Path,
        config: LlavaConfig,
        tokenizer: TextTokenizer,
        image_processor: ImageProcessorConfig,
        checkpoint: Checkpoint,
        options: EngineOptions,
    ) -> Result<Self> {
        let start = Instant::now();
        let mut config = config;
        if let Some(layers) = options.text_layers {
            let depth = config.text.num_hidden_layers;
            if layers == 0 || layers > depth {
                return Err(Error::argument(
                    "text_layers",
                    format!("{layers} is not between 1 and the model's {depth} decoder layers"),
                ));
            }
            config.text.num_hidden_layers = layers;
        }
        // The one weight no kernel launcher sees: its rows are gathered on the host.
        checkpoint.check_embedding_width("text.embed_tokens.weight", config.text.hidden_size)?;
        let gpu = Gpu::new(options.gpu.clone())?;
        let kv_dtype = kv_dtype(options.kv, &gpu)?;
        let vision_layers = config.vision_layers_to_run();
        let steps = (vision_layers + 1 + config.text.num_hidden_layers + 2) as u64;
        let bar = upload_progress(options.progress, steps);
        let root = Loader::new(
            &gpu,
            &checkpoint,
            options.weight_format,
            options.allocate_only,
        );
        let vision_root = root.with_format(options.vision_format());
        let vision = ClipVision::load(
            &vision_root.scope("vision"),
            &config.vision,
            vision_layers,
            || bar.inc(1),
        )?;
        let projector = Projector::load(&vision_root.scope("projector"), &config)?;
        let image_newline = match config.anyres {
            Some(_) => {
                let dt = config.text.hidden_size;
                let values = vision_root.f32("image_newline", &[dt])?;
                Some(vision_root.upload("image_newline", &[1, dt], &values)?)
            }
            None => None,
        };
        bar.inc(1);
        let llama = Llama::load(&root, &config.text, || bar.inc(1))?;
        let weight_bytes = gpu.memory_stats().live.weights;
        bar.finish_and_clear();
        gpu.wait("weight upload")?;
        let engine = Self {
            gpu,
            model_dir: model_dir.to_path_buf(),
            config,
            checkpoint,
            tokenizer,
            image_processor,
            vision,
            projector,
            image_newline,
            llama,
            weight_bytes,
            kv_dtype,
            load_ms: 0.0,
            image_cache: Mutex::new(ImageCache::new(DEFAULT_IMAGE_CACHE_BYTES)),
        };
        if !options.allocate_only {
            engine.compile_pipelines()?;
        }
        Ok(Self {
            load_ms: start.elapsed().as_secs_f64() * 1e3,
            ..engine
        })
    }

    /// Build (and throw away) every dispatch a request can record, so all pipelines compile at
    /// load instead of stalling the first request of their kind (`tests/pipelines.rs` checks
    /// that no request compiles one after this).
    fn compile_pipelines(&self) -> Result<()> {
        let mut rec = Recorder::compile_only(&self.gpu);
        self.compile_image_pipelines(&mut rec)?;
        self.compile_text_pipelines(&mut rec)?;
        rec.discard();
        self.gpu.check_errors("pipeline compilation")
    }

    /// The vision tower with and without stage-1 scores, stage 1's select and gather (CLS and
    /// all-query scoring share one pipeline), the projector.
    fn compile_image_pipelines(&self, rec: &mut Recorder) -> Result<()> {
        let gpu = &self.gpu;
        let vision = self.vision.buffers(gpu)?;
        let pixels = vec![0f32; 3 * self.config.vision.image_size * self.config.vision.image_size];
        self.vision.forward(rec, &vision, &pixels, None)?;
        let tokens = self.vision.tokens();
        let shape = self.vision.attention_shape();
        let (partials, scores) = attention::score_buffers(gpu, &shape)?;
        let out = ScoreOutput {
            q_start: 0,
            q_end: tokens,
            partials: &partials,
            scores: &scores,
        };
        self.vision.forward(rec, &vision, &pixels, Some(out))?;
        let dt = self.config.text.hidden_size;
        let features = Tensor::empty(
            gpu,
            &[2, self.config.vision.hidden_size],
            DType::F32,
            "warmup",
        )?;
        let segment = Segment {
            total: tokens,
            start: 1,
            len: tokens - 1,
        };
        let rows = Tensor::empty(gpu, &[segment.kept_rows(1)], DType::U32, "warmup")?;
        rec.dispatch(topk::select(gpu, &scores, 1, segment, 1, &rows)?);
        rec.dispatch(topk::gather_rows(
            gpu,
            &vision.hidden,
            &rows,
            1,
            1,
            &features,
        )?);
        let scratch = Projector::scratch(gpu, 2, dt)?;
        let out = Projector::scratch(gpu, 2, dt)?;
        self.projector.forward(rec, &features, &scratch, &out)
    }

    /// The decoder at prefill (matmul) and decode (gemv) shapes, the scored attention of stage 2
    /// and FastV with its select and the gathers of hidden rows (f32) and positions (u32), the
    /// logits and the GPU argmax (host sampling reads the logits and adds no dispatch).
    fn compile_text_pipelines(&self, rec: &mut Recorder) -> Result<()> {
        let gpu = &self.gpu;
        let text = &self.config.text;
        let buffers = self.llama.buffers(gpu, 2)?;
        let layers = text.num_hidden_layers;
        for t in [2, 1] {
            let mut cache = KvCache::uniform(gpu, text, 2, self.kv_dtype)?;
            self.llama
                .forward_layers(rec, &buffers, t, &mut cache, 0..layers, None)?;
        }
        let shape = AttentionShape {
            q_rows: 2,
            kv_rows: 2,
            heads: text.num_attention_heads,
            kv_heads: text.num_key_value_heads,
            head_dim: text.head_dim,
            causal: true,
        };
        let (partials, scores) = attention::score_buffers(gpu, &shape)?;
        let out = ScoreOutput {
            q_start: 1,
            q_end: 2,
            partials: &partials,
            scores: &scores,
        };
        let mut cache = KvCache::uniform(gpu, text, 2, self.kv_dtype)?;
        self.llama
            .forward_layers(rec, &buffers, 2, &mut cache, 0..1, Some(out))?;
        let segment = Segment::whole(2);
        let rows = Tensor::empty(gpu, &[1], DType::U32, "warmup")?;
        let hidden = Tensor::empty(gpu, &[1, text.hidden_size], DType::F32, "warmup")?;
        let positions = Tensor::empty(gpu, &[1], DType::U32, "warmup")?;
        rec.dispatch(topk::select(gpu, &scores, 0, segment, 1, &rows)?);
        rec.dispatch(topk::gather_rows(
            gpu,
            &buffers.hidden,
            &rows,
            0,
            1,
            &hidden,
        )?);
        rec.dispatch(topk::gather_rows(
            gpu,
            &buffers.positions,
            &rows,
            0,
            1,
            &positions,
        )?);
        self.llama.logits(rec, &buffers, 0)?;
        let token = Tensor::empty(gpu, &[1], DType::U32, "warmup")?;
        rec.dispatch(sample::argmax(gpu, &buffers.logits, 0, &token, 0)?);
        Ok(())
    }

    /// Token embeddings for `ids`, read from the mapped checkpoint.
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.checkpoint
            .embedding_rows("text.embed_tokens.weight", ids)
    }
}

/// The KV cache's element type: as asked, else f16 where the adapter has SHADER_F16.
fn kv_dtype(asked: Option<DType>, gpu: &Gpu) -> Result<DType> {
    match asked {
        Some(DType::U32) => Err(Error::argument(
            "kv",
            "the KV cache holds f16 or f32 values",
        )),
        Some(dtype) => Ok(dtype),
        None if gpu.caps.shader_f16 => Ok(DType::F16),
        None => Ok(DType::F32),
    }
}

/// A progress bar over the layers being uploaded (hidden unless `shown`).
fn upload_progress(shown: bool, steps: u64) -> ProgressBar {
    if !shown {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(steps);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} layers {elapsed}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_message("uploading weights");
    bar
}
