//! `LlavaForConditionalGeneration`: the vision tower, the projector and the language model,
//! loaded once and shared by every request.

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::error::{Error, Result};
use crate::gpu::{Gpu, GpuOptions, WeightFormat};
use crate::model::clip::ClipVision;
use crate::model::config::LlavaConfig;
use crate::model::llama::Llama;
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

    /// Build (and throw away) every dispatch a request records, so all pipelines compile at load
    /// instead of stalling the first request.
    fn compile_pipelines(&self) -> Result<()> {
        let gpu = &self.gpu;
        let mut rec = crate::gpu::Recorder::new(gpu);
        let vision = self.vision.buffers(gpu)?;
        let pixels = vec![0f32; 3 * self.config.vision.image_size * self.config.vision.image_size];
        self.vision.forward(&mut rec, &vision, &pixels, None)?;
        let dt = self.config.text.hidden_size;
        let features = crate::gpu::Tensor::empty(
            gpu,
            &[2, self.config.vision.hidden_size],
            crate::gpu::DType::F32,
            "warmup",
        )?;
        let scratch = Projector::scratch(gpu, 2, dt)?;
        let out = Projector::scratch(gpu, 2, dt)?;
        self.projector
            .forward(&mut rec, &features, &scratch, &out)?;
        let buffers = self.llama.buffers(gpu, 2)?;
        let layers = self.config.text.num_hidden_layers;
        let token = crate::gpu::Tensor::empty(gpu, &[1], crate::gpu::DType::U32, "warmup")?;
        // Both shapes: prefill (matmul) and decode (gemv).
        for t in [2, 1] {
            let mut cache = crate::model::llama::KvCache::new(gpu, &self.config.text, 2)?;
            self.llama
                .forward_layers(&mut rec, &buffers, t, &mut cache, 0..layers, None)?;
        }
        self.llama.logits(&mut rec, &buffers, 0)?;
        rec.dispatch(crate::gpu::kernels::sample::argmax(
            gpu,
            &buffers.logits,
            0,
            &token,
            0,
        )?);
        rec.discard();
        gpu.check_errors("pipeline compilation")
    }

    /// Token embeddings for `ids`, read from the mapped checkpoint.
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.checkpoint
            .embedding_rows("text.embed_tokens.weight", ids)
    }
}
