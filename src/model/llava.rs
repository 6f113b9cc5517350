//! `LlavaForConditionalGeneration`: the vision tower, the projector and the language model,
//! loaded once and shared by every request.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::error::{Error, Result};
use crate::gpu::kernels::attention::{self, AttentionShape, ScoreOutput};
use crate::gpu::kernels::topk::{self, Segment, SelectLayout};
use crate::gpu::kernels::{linear, sample};
use crate::gpu::{DType, Gpu, GpuOptions, Recorder, Tensor, WeightFormat};
use crate::model::clip::ClipVision;
use crate::model::config::LlavaConfig;
use crate::model::gguf::{self, GgufPair};
use crate::model::image_cache::{ImageCache, DEFAULT_IMAGE_CACHE_BYTES};
use crate::model::llama::{DecodeState, KvCache, Llama};
use crate::model::loader::{Formats, Loader};
use crate::model::projector::Projector;
use crate::model::weights::Checkpoint;
use crate::quant::Mix;
use crate::text::{Template, TextTokenizer};
use crate::vision::ImageProcessorConfig;

/// How to load a model.
#[derive(Clone, Debug, Default)]
pub struct EngineOptions {
    pub gpu: GpuOptions,
    /// The mmproj GGUF (vision tower and projector) of a GGUF text model given as the model.
    pub mmproj: Option<PathBuf>,
    /// Matrix weights of the language model (decoder linear layers and `lm_head`) on the GPU:
    /// one format (f32 for exact parity checks; ggml's block formats quantized at load from
    /// float checkpoints, or read as stored from a `quantize`d one) or llama-quantize's Q4_K_M
    /// mix. None: as stored for GGUF files and `quantize`d checkpoints, f16 otherwise. A GGUF
    /// file always runs as stored: asking for a format is an error.
    pub weight_format: Option<Mix>,
    /// Matrix weights of the vision tower and projector, one format (a mix is refused);
    /// `None`: the same as `weight_format` when that is a float format, f16 when it is
    /// quantized (as stored for GGUF).
    pub vision_weight_format: Option<Mix>,
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
    /// Keep `embed_tokens` on the host only (262 MB less GPU memory for a 7B f16 checkpoint):
    /// each decode step then waits for the host to read its token and upload the row, instead
    /// of gathering the row on the GPU from the id the GPU holds.
    pub host_embeddings: bool,
}

impl EngineOptions {
    /// The language model's matrices' formats for a checkpoint of safetensors: as asked, or
    /// the checkpoint's stored block format (a `quantize`d one), or f16.
    pub fn text_mix(&self, checkpoint: &Checkpoint) -> Mix {
        self.weight_format
            .or_else(|| checkpoint.stored_block_format().map(Mix::Uniform))
            .unwrap_or(Mix::Uniform(WeightFormat::F16))
    }

    /// The format the vision tower and projector load in (see `vision_weight_format`).
    pub fn vision_format(&self, text: Mix) -> Result<WeightFormat> {
        match self.vision_weight_format {
            Some(Mix::Uniform(format)) => Ok(format),
            Some(mix) => Err(Error::argument(
                "vision_weight_format",
                format!(
                    "{} chooses types per decoder tensor; the vision tower takes one format",
                    mix.name()
                ),
            )),
            None => Ok(match text {
                Mix::Uniform(format) if !format.is_quantized() => format,
                _ => WeightFormat::F16,
            }),
        }
    }
}

/// A loaded model, ready to answer requests.
pub struct Engine {
    pub gpu: Gpu,
    pub model_dir: PathBuf,
    pub config: LlavaConfig,
    /// The prompt format the model was trained with: the checkpoint kind's (llava-hf
    /// checkpoints, `LlavaConfig::default_template`) or the one a GGUF file's chat template
    /// names.
    pub template: Template,
    /// Whether images are padded to a square unless a request says otherwise: GGUF LLaVA-1.5
    /// pairs are, as the original LLaVA and llama.cpp evaluate them; llava-hf checkpoints are
    /// centre-cropped, as their processor does; LLaVA-NeXT never pads.
    pub pads_by_default: bool,
    /// What the language model's and the vision tower's weights are stored in, for labels:
    /// `q4_k_m`, `f16`, or `as stored (q4_k, q6_k)` for a GGUF file.
    pub weight_labels: [String; 2],
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
    /// Load a llava-hf model directory, or a GGUF pair: a text GGUF (with
    /// `options.mmproj`) or a directory holding a text and an mmproj GGUF.
    pub fn load(model_dir: &Path, options: EngineOptions) -> Result<Self> {
        if options.mmproj.is_some() || gguf::is_gguf_model(model_dir) {
            return Self::load_gguf(model_dir, options);
        }
        if !model_dir.is_dir() {
            let reason = if model_dir.exists() {
                "not a model directory (llava-hf layout) nor a GGUF file"
            } else {
                "model directory not found"
            };
            return Err(Error::File {
                path: model_dir.to_path_buf(),
                reason: reason.into(),
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
        let parts = Parts {
            template: config.default_template(),
            pads_by_default: false,
            config,
            tokenizer,
            image_processor,
            checkpoint,
        };
        Self::from_parts(model_dir, parts, options)
    }

    /// A GGUF pair: configuration, tokenizer and image settings from the files' metadata,
    /// every weight in the type it is stored in.
    fn load_gguf(model: &Path, options: EngineOptions) -> Result<Self> {
        if let Some(mix) = options.weight_format {
            return Err(Error::argument(
                "weight_format",
                format!(
                    "{} was asked for, but a GGUF model runs in the types its files store \
                     (nothing is requantized): leave the weight format out",
                    mix.name()
                ),
            ));
        }
        if let Some(mix) = options.vision_weight_format {
            return Err(Error::argument(
                "vision_weight_format",
                format!(
                    "{} was asked for, but the mmproj file's types are used as stored",
                    mix.name()
                ),
            ));
        }
        let pair = GgufPair::open(model, options.mmproj.as_deref())?;
        let vocab = pair.vocab()?;
        let config = pair.config(&vocab)?;
        let tokenizer = TextTokenizer::from_vocab(vocab, config.image_token_index)?;
        let parts = Parts {
            image_processor: pair.image_processor(config.vision.image_size)?,
            template: pair.template()?,
            pads_by_default: config.anyres.is_none(),
            config,
            tokenizer,
            checkpoint: Checkpoint::from_gguf(model, pair),
        };
        Self::from_parts(model, parts, options)
    }

    /// A LLaVA-shaped model with random weights from a named preset (see `presets.rs`), built
    /// in memory: benchmarks of real model shapes without a download.
    pub fn synthetic(preset: &str, options: EngineOptions) -> Result<Self> {
        let config = crate::model::presets::config(preset)?;
        let tokenizer = TextTokenizer::synthetic(config.text.vocab_size, config.image_token_index)?;
        let image_processor = ImageProcessorConfig::clip_default(config.vision.image_size);
        let checkpoint =
            Checkpoint::synthetic(preset, crate::model::presets::tensor_shapes(&config));
        let parts = Parts {
            template: config.default_template(),
            pads_by_default: false,
            config,
            tokenizer,
            image_processor,
            checkpoint,
        };
        Self::from_parts(Path::new(preset), parts, options)
    }

    /// How the language model's and the vision tower's matrices are stored on the GPU.
    fn formats(
        checkpoint: &Checkpoint,
        options: &EngineOptions,
        layers: usize,
    ) -> Result<[Formats; 2]> {
        if checkpoint.gguf().is_some() {
            return Ok([Formats::AsStored, Formats::AsStored]);
        }
        if let (Some(asked), Some(stored)) =
            (options.weight_format, checkpoint.stored_block_format())
        {
            // A quantized checkpoint says what it holds; its blocks are never requantized.
            if asked != Mix::Uniform(stored) {
                return Err(Error::argument(
                    "weight_format",
                    format!(
                        "{} was asked for, but {} stores its language model's matrices as {} blocks \
                         (written by `llava-wgpu quantize`; nothing is requantized): leave \
                         weight_format out, or give weight_format = {}",
                        asked.name(),
                        checkpoint.dir().display(),
                        stored.name(),
                        stored.name()
                    ),
                ));
            }
        }
        let mix = options.text_mix(checkpoint);
        let vision = Mix::Uniform(options.vision_format(mix)?);
        Ok([
            Formats::Mix { mix, layers },
            Formats::Mix {
                mix: vision,
                layers,
            },
        ])
    }

    fn from_parts(model_dir: &Path, parts: Parts, options: EngineOptions) -> Result<Self> {
        let start = Instant::now();
        let Parts {
            mut config,
            tokenizer,
            image_processor,
            checkpoint,
            template,
            pads_by_default,
        } = parts;
        let [text_formats, vision_formats] =
            Self::formats(&checkpoint, &options, config.text.num_hidden_layers)?;
        truncate_depth(&mut config, options.text_layers)?;
        // The one weight no kernel launcher sees: its rows are gathered on the host.
        checkpoint.check_embedding_width("text.embed_tokens.weight", config.text.hidden_size)?;
        let gpu = Gpu::new(options.gpu.clone())?;
        let kv_dtype = kv_dtype(options.kv, &gpu)?;
        let vision_layers = config.vision_layers_to_run();
        let steps = (vision_layers + 1 + config.text.num_hidden_layers + 2) as u64;
        let bar = upload_progress(options.progress, steps);
        let root = Loader::new(&gpu, &checkpoint, text_formats, options.allocate_only);
        let vision_root = root.with_formats(vision_formats);
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
        let on_gpu = !options.host_embeddings;
        let llama = Llama::load(&root, &config.text, on_gpu, || bar.inc(1))?;
        let weight_bytes = gpu.memory_stats().live.weights;
        bar.finish_and_clear();
        gpu.wait("weight upload")?;
        let weight_labels = [
            weight_label(text_formats, &llama.formats()),
            weight_label(vision_formats, &vision.formats()),
        ];
        let engine = Self {
            gpu,
            model_dir: model_dir.to_path_buf(),
            config,
            template,
            pads_by_default,
            weight_labels,
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
            engine.gpu.save_pipeline_cache();
        }
        Ok(Self {
            load_ms: start.elapsed().as_secs_f64() * 1e3,
            ..engine
        })
    }

    /// Build (and throw away) every dispatch a request can record, so all pipelines compile at
    /// load instead of stalling the first request of their kind (`tests/pipelines.rs` checks
    /// that no request compiles one after this). The image and the text pipelines compile on
    /// two threads: a driver that runs shaders on the CPU spends most of a small model's load
    /// here, compiling each pipeline with LLVM on the calling thread (about 17 ms each on
    /// lavapipe), and a pipeline both halves use at worst compiles twice.
    fn compile_pipelines(&self) -> Result<()> {
        std::thread::scope(|scope| {
            let image = scope.spawn(|| {
                let mut rec = Recorder::compile_only(&self.gpu);
                self.compile_image_pipelines(&mut rec)?;
                rec.discard();
                Ok::<_, Error>(())
            });
            let mut rec = Recorder::compile_only(&self.gpu);
            self.compile_text_pipelines(&mut rec)?;
            rec.discard();
            image
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })?;
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
        rec.dispatch_all(topk::select(gpu, &scores, 1, segment, 1, &rows)?);
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
        self.projector.forward(rec, &features, &scratch, &out)?;
        self.compile_gram_pipelines(rec)
    }

    /// The Gram matrices VisPruner and DivPrune compare rows by (f32 rows as an f32 weight):
    /// the matmul for many rows and the gemv for one.
    fn compile_gram_pipelines(&self, rec: &mut Recorder) -> Result<()> {
        let gpu = &self.gpu;
        for n in [2, 1] {
            let rows = Tensor::empty(gpu, &[n, 4], DType::F32, "warmup")?;
            let gram = Tensor::empty(gpu, &[n, n], DType::F32, "warmup")?;
            rec.dispatch_all(linear::gram(gpu, &rows, &gram)?);
        }
        Ok(())
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
            let mut cache = KvCache::uniform(gpu, text, 3, self.kv_dtype)?;
            self.llama
                .forward_layers(rec, &buffers, t, &mut cache, 0..layers, None)?;
            if t == 2 {
                // A replayed decode step after a two-row prompt (greedy: with the argmax).
                let token = Tensor::empty(gpu, &[1], DType::U32, "warmup")?;
                let state = DecodeState::new(gpu, token, &buffers.positions, 2)?;
                let plan = self
                    .llama
                    .decode_plan(gpu, &buffers, &cache, &state, true)?;
                rec.dispatch_all(plan);
            }
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
        rec.dispatch_all(topk::select(gpu, &scores, 0, segment, 1, &rows)?);
        // Where a stage-2 segment as long as the context would take another select layout
        // (the multi-workgroup one on GPUs), its pipelines compile now too.
        let longest = SelectLayout::for_device(gpu, text.max_position_embeddings);
        if longest != SelectLayout::for_device(gpu, segment.len) {
            let select = topk::select_in(gpu, longest, &scores, 0, segment, 1, &rows)?;
            rec.dispatch_all(select);
        }
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

/// What a model is made of before its weights are on the GPU.
struct Parts {
    config: LlavaConfig,
    tokenizer: TextTokenizer,
    image_processor: ImageProcessorConfig,
    checkpoint: Checkpoint,
    template: Template,
    pads_by_default: bool,
}

/// Keep only the first `layers` decoder layers (`EngineOptions::text_layers`).
fn truncate_depth(config: &mut LlavaConfig, layers: Option<usize>) -> Result<()> {
    let Some(layers) = layers else {
        return Ok(());
    };
    let depth = config.text.num_hidden_layers;
    if layers == 0 || layers > depth {
        return Err(Error::argument(
            "text_layers",
            format!("{layers} is not between 1 and the model's {depth} decoder layers"),
        ));
    }
    config.text.num_hidden_layers = layers;
    Ok(())
}

/// A label for how matrices were stored: the mix asked for (`q4_k_m`, `f16`), or the formats
/// a GGUF file holds them in (`gguf q4_k+q6_k`).
fn weight_label(formats: Formats, held: &[WeightFormat]) -> String {
    match formats {
        Formats::Mix { mix, .. } => mix.name().to_string(),
        Formats::AsStored => {
            let names: Vec<&str> = held.iter().map(|f| f.name()).collect();
            format!("gguf {}", names.join("+"))
        }
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
