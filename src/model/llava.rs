//! `LlavaForConditionalGeneration`: the vision tower, the projector and the language model,
//! loaded once and shared by every request.

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::error::{Error, Result};
use crate::gpu::kernels::attention::{self, AttentionShape, ScoreOutput};
use crate::gpu::kernels::sample;
use crate::gpu::kernels::topk::{self, Segment};
use crate::gpu::{DType, Gpu, GpuOptions, Recorder, Tensor, WeightFormat};
use crate::model::clip::ClipVision;
use crate::model::config::LlavaConfig;
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
    /// Matrix weights on the GPU: f16 (default) or f32 (exact parity checks).
    pub weight_format: WeightFormat,
    /// Show a progress bar on stderr while weights upload.
    pub progress: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            gpu: GpuOptions::default(),
            weight_format: WeightFormat::F16,
            progress: false,
        }
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
    /// GPU bytes of all weights.
    pub weight_bytes: u64,
    pub load_ms: f64,
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
        // The one weight no kernel launcher sees: its rows are gathered on the host.
        checkpoint.check_embedding_width("text.embed_tokens.weight", config.text.hidden_size)?;
        let gpu = Gpu::new(options.gpu.clone())?;

        let vision_layers = config.vision_layers_to_run();
        let steps = (vision_layers + 1 + config.text.num_hidden_layers + 2) as u64;
        let bar = if options.progress {
            let bar = ProgressBar::new(steps);
            bar.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} layers {elapsed}")
                    .expect("static template")
                    .progress_chars("=> "),
            );
            bar.set_message("uploading weights");
            bar
        } else {
            ProgressBar::hidden()
        };
        let root = Loader::new(&gpu, &checkpoint, options.weight_format);
        let vision =
            ClipVision::load(&root.scope("vision"), &config.vision, vision_layers, || {
                bar.inc(1)
            })?;
        let projector = Projector::load(&root.scope("projector"), &config)?;
        let image_newline = match config.anyres {
            Some(_) => {
                let dt = config.text.hidden_size;
                let values = root.f32("image_newline", &[dt])?;
                Some(root.upload("image_newline", &[1, dt], &values)?)
            }
            None => None,
        };
        bar.inc(1);
        let llama = Llama::load(&root, &config.text, || bar.inc(1))?;
        let weight_bytes = root.uploaded_bytes();
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
            load_ms: 0.0,
        };
        engine.compile_pipelines()?;
        Ok(Self {
            load_ms: start.elapsed().as_secs_f64() * 1e3,
            ..engine
        })
    }

    /// Build (and throw away) every dispatch a request can record, so all pipelines compile at
    /// load instead of stalling the first request of their kind (`tests/pipelines.rs` checks
    /// that no request compiles one after this).
    fn compile_pipelines(&self) -> Result<()> {
        let mut rec = Recorder::new(&self.gpu);
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
            let mut cache = KvCache::new(gpu, text, 2)?;
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
        let mut cache = KvCache::new(gpu, text, 2)?;
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
