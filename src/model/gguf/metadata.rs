//! What a GGUF pair's metadata says: the [`LlavaConfig`] (`llama.*` keys of the text file,
//! `clip.*` keys of the mmproj), the image processor (`clip.vision.image_mean` / `_std`), and
//! the vocabulary (`tokenizer.ggml.*`). Keys, value types and defaults are the ones llama.cpp's
//! converters write and its loaders read (docs/gguf.md).

use crate::error::Result;
use crate::model::config::{
    AnyresConfig, FeatureSelect, LlavaConfig, TextConfig, VisionConfig, MAX_CROPS_PER_SIDE,
};
use crate::model::gguf::file::GgufFile;
use crate::model::gguf::names::Heads;
use crate::model::gguf::GgufPair;
use crate::text::vocab::{TokenType, Vocab, VocabKind};
use crate::text::Template;
use crate::vision::ImageProcessorConfig;

/// A required u32 key as a positive usize.
fn positive(file: &GgufFile, key: &str) -> Result<usize> {
    match file.require(key, GgufFile::u32)? {
        0 => Err(file.bad_value(key, "is 0")),
        n => Ok(n as usize),
    }
}

/// `llama.attention.head_count` and `head_count_kv` (defaulting to the former).
pub(super) fn text_heads(text: &GgufFile) -> Result<Heads> {
    let q = positive(text, "llama.attention.head_count")?;
    let kv = match text.u32("llama.attention.head_count_kv")? {
        Some(0) => return Err(text.bad_value("llama.attention.head_count_kv", "is 0")),
        Some(n) => n as usize,
        None => q,
    };
    if q % kv != 0 {
        return Err(text.bad_value(
            "llama.attention.head_count_kv",
            format!("{kv} does not divide head_count {q}"),
        ));
    }
    Ok(Heads { q, kv })
}

/// `clip.vision.embedding_length`.
pub(super) fn vision_width(mmproj: &GgufFile) -> Result<usize> {
    positive(mmproj, "clip.vision.embedding_length")
}

impl GgufPair {
    /// The model's configuration; `vocab` is the pair's vocabulary ([`GgufPair::vocab`], read
    /// once by the caller, which also tokenizes with it).
    pub fn config(&self, vocab: &Vocab) -> Result<LlavaConfig> {
        let text = self.text_config(vocab)?;
        let vision = self.vision_config()?;
        let vision_feature_layer = self.feature_layer(&vision)?;
        let anyres = self.anyres(&vision)?;
        self.check_projector(&text)?;
        let image_token_index = match vocab.tokens.iter().position(|t| t == "<image>") {
            Some(id) => id as u32,
            // Converted from the original LLaVA checkpoints: no `<image>` token. The prompt is
            // split at the placeholder instead (`TextTokenizer`); this id is beyond the
            // vocabulary so that it never collides with a real token.
            None => text.vocab_size as u32,
        };
        Ok(LlavaConfig {
            text,
            vision,
            anyres,
            image_token_index,
            vision_feature_layer,
            vision_feature_select_strategy: FeatureSelect::Default,
            projector_hidden_act: "gelu".into(),
            projector_bias: self.contains("projector.linear_1.bias"),
            dtype: None,
        })
    }

    fn text_config(&self, vocab: &Vocab) -> Result<TextConfig> {
        let t = &self.text;
        let heads = text_heads(t)?;
        let hidden_size = positive(t, "llama.embedding_length")?;
        let head_dim = match t.u32("llama.attention.key_length")? {
            Some(n) => n as usize,
            None => hidden_size / heads.q,
        };
        let rotary = t
            .u32("llama.rope.dimension_count")?
            .map_or(head_dim, |n| n as usize);
        if rotary != head_dim || head_dim == 0 || head_dim % 2 != 0 {
            return Err(t.bad_value(
                "llama.rope.dimension_count",
                format!("{rotary} rotated dimensions for heads of {head_dim}: only full, even rotary heads are supported"),
            ));
        }
        if let Some(kind) = t.string("llama.rope.scaling.type")? {
            if kind != "none" {
                return Err(t.bad_value(
                    "llama.rope.scaling.type",
                    format!("'{kind}' RoPE scaling is not supported"),
                ));
            }
        }
        let (bos, eos) = (vocab.bos, vocab.eos);
        let tie_word_embeddings = t.tensor("output.weight").is_none();
        Ok(TextConfig {
            mistral: false,
            hidden_size,
            intermediate_size: positive(t, "llama.feed_forward_length")?,
            num_hidden_layers: positive(t, "llama.block_count")?,
            num_attention_heads: heads.q,
            num_key_value_heads: heads.kv,
            head_dim,
            rms_norm_eps: t.require("llama.attention.layer_norm_rms_epsilon", GgufFile::f32)?
                as f64,
            rope_theta: t.f32("llama.rope.freq_base")?.map_or(10000.0, |v| v as f64),
            max_position_embeddings: positive(t, "llama.context_length")?,
            vocab_size: vocab.tokens.len(),
            tie_word_embeddings,
            bos_token_id: bos,
            eos_token_id: eos.into_iter().collect(),
        })
    }

    fn vision_config(&self) -> Result<VisionConfig> {
        let v = &self.mmproj;
        let hidden_size = vision_width(v)?;
        let num_attention_heads = positive(v, "clip.vision.attention.head_count")?;
        let image_size = positive(v, "clip.vision.image_size")?;
        let patch_size = positive(v, "clip.vision.patch_size")?;
        if hidden_size % num_attention_heads != 0 {
            return Err(v.bad_value(
                "clip.vision.attention.head_count",
                format!("{num_attention_heads} heads do not divide the width {hidden_size}"),
            ));
        }
        if image_size % patch_size != 0 || (image_size / patch_size).pow(2) >= u32::MAX as usize {
            return Err(v.bad_value(
                "clip.vision.image_size",
                format!("{image_size} is not a usable multiple of patch_size {patch_size}"),
            ));
        }
        if v.bool("clip.use_silu")? == Some(true) {
            return Err(v.bad_value("clip.use_silu", "SiLU vision towers are not supported"));
        }
        // clip.cpp: use_gelu selects GELU, otherwise quick GELU (CLIP's own activation).
        let gelu = v.bool("clip.use_gelu")?.unwrap_or(false);
        Ok(VisionConfig {
            hidden_size,
            intermediate_size: positive(v, "clip.vision.feed_forward_length")?,
            num_hidden_layers: positive(v, "clip.vision.block_count")?,
            num_attention_heads,
            image_size,
            patch_size,
            num_channels: 3,
            layer_norm_eps: v.require("clip.vision.attention.layer_norm_epsilon", GgufFile::f32)?
                as f64,
            hidden_act: if gelu { "gelu" } else { "quick_gelu" }.into(),
        })
    }

    /// The hidden state the image features come from. `clip.vision.feature_layer` lists
    /// indices into the hidden states of the converted tower (0 = the embeddings); without it
    /// the output of the last stored layer is used: the legacy converter stores exactly the
    /// layers LLaVA needs (23 of CLIP-L's 24 for feature layer −2), and every one of them runs
    /// (llama.cpp runs one fewer: docs/gguf.md).
    fn feature_layer(&self, vision: &VisionConfig) -> Result<i64> {
        let key = "clip.vision.feature_layer";
        let stored = vision.num_hidden_layers as i64;
        match self.mmproj.ints(key)? {
            None => Ok(stored),
            Some([layer]) if (1..=stored).contains(layer) => Ok(*layer),
            Some([layer]) => Err(self.mmproj.bad_value(
                key,
                format!("{layer} is not one of the {stored} stored layers' outputs"),
            )),
            Some(layers) => Err(self.mmproj.bad_value(
                key,
                format!("features from several layers {layers:?} are not supported"),
            )),
        }
    }

    /// LLaVA-NeXT's tiling, from `clip.vision.image_grid_pinpoints` (pairs read as width,
    /// height, as clip.cpp reads them), with `spatial_unpad` merging and `image_newline`.
    fn anyres(&self, vision: &VisionConfig) -> Result<Option<AnyresConfig>> {
        let v = &self.mmproj;
        let key = "clip.vision.image_grid_pinpoints";
        let Some(flat) = v.ints(key)? else {
            return Ok(None);
        };
        if flat.is_empty() || flat.len() % 2 != 0 {
            return Err(v.bad_value(key, "expected a non-empty list of width, height pairs"));
        }
        let side = |n: i64| {
            usize::try_from(n).ok().filter(|&n| {
                n > 0 && n % vision.image_size == 0 && n / vision.image_size <= MAX_CROPS_PER_SIDE
            })
        };
        let mut grid_pinpoints = Vec::new();
        for pair in flat.chunks_exact(2) {
            let (Some(w), Some(h)) = (side(pair[0]), side(pair[1])) else {
                return Err(v.bad_value(
                    key,
                    format!(
                        "{pair:?} is not a pair of positive multiples of the image size {}",
                        vision.image_size
                    ),
                ));
            };
            grid_pinpoints.push((h, w));
        }
        let merge = v
            .string("clip.vision.mm_patch_merge_type")?
            .unwrap_or("flat");
        if merge != "spatial_unpad" {
            return Err(v.bad_value(
                "clip.vision.mm_patch_merge_type",
                format!(
                    "'{merge}' with grid pinpoints: only LLaVA-NeXT's spatial_unpad is supported"
                ),
            ));
        }
        if !self.contains("image_newline") {
            return Err(v.tensor_error(
                "model.image_newline",
                "is missing: LLaVA-NeXT's spatial_unpad merging needs it",
            ));
        }
        Ok(Some(AnyresConfig { grid_pinpoints }))
    }

    /// The projector is LLaVA's two-layer MLP, and its output width is the text model's.
    fn check_projector(&self, text: &TextConfig) -> Result<()> {
        let v = &self.mmproj;
        let kind = match v.string("clip.projector_type")? {
            Some(kind) => kind,
            None => v.string("clip.vision.projector_type")?.unwrap_or("mlp"),
        };
        if kind != "mlp" {
            return Err(v.bad_value(
                "clip.projector_type",
                format!("'{kind}' is not supported (LLaVA's projector is 'mlp')"),
            ));
        }
        if v.tensor("mm.3.weight").is_some() {
            return Err(v.tensor_error(
                "mm.3.weight",
                "is present: the MLP_NORM projector (Yi-VL) is not supported",
            ));
        }
        let out = v
            .tensor("mm.2.weight")
            .ok_or_else(|| v.tensor_error("mm.2.weight", "is missing"))?;
        let width = out.dims.get(1).copied().unwrap_or(0);
        if width != text.hidden_size {
            return Err(v.tensor_error(
                "mm.2.weight",
                format!(
                    "projects to width {width}, but the text model {} is {} wide: the two files \
                     are not a pair",
                    self.text.path.display(),
                    text.hidden_size
                ),
            ));
        }
        Ok(())
    }

    /// CLIP's image processor with the mmproj's mean and std.
    pub fn image_processor(&self, image_size: usize) -> Result<ImageProcessorConfig> {
        let mut c = ImageProcessorConfig::clip_default(image_size);
        for (key, value) in [
            ("clip.vision.image_mean", &mut c.image_mean),
            ("clip.vision.image_std", &mut c.image_std),
        ] {
            if let Some(found) = self.mmproj.floats(key)? {
                let [a, b, c] = found[..] else {
                    return Err(self.mmproj.bad_value(key, "expected three numbers"));
                };
                *value = [a, b, c];
            }
        }
        if c.image_std.iter().any(|&s| s <= 0.0 || !s.is_finite()) {
            return Err(self
                .mmproj
                .bad_value("clip.vision.image_std", "must be positive"));
        }
        Ok(c)
    }

    /// The prompt format: recognised from `tokenizer.chat_template`, else LLaVA-1.5's.
    pub fn template(&self) -> Result<Template> {
        Ok(match self.text.string("tokenizer.chat_template")? {
            Some(jinja) => Template::recognise(jinja),
            None => Template::LlavaHf,
        })
    }

    /// The vocabulary of the text file's `tokenizer.ggml.*`.
    pub fn vocab(&self) -> Result<Vocab> {
        vocab(&self.text)
    }
}

/// The vocabulary of a GGUF file's `tokenizer.ggml.*` keys, with llama.cpp's defaults for
/// absent ones (special ids 1, 2, 0 and a space prefix for SentencePiece).
pub fn vocab(t: &GgufFile) -> Result<Vocab> {
    let model = t.require("tokenizer.ggml.model", GgufFile::string)?;
    let tokens = t
        .require("tokenizer.ggml.tokens", GgufFile::strings)?
        .to_vec();
    let n = tokens.len();
    let kind = match model {
        "llama" => VocabKind::Spm,
        "gpt2" => VocabKind::Bpe {
            pre: t
                .string("tokenizer.ggml.pre")?
                .unwrap_or("default")
                .to_string(),
            merges: t
                .require("tokenizer.ggml.merges", GgufFile::strings)?
                .to_vec(),
        },
        other => {
            return Err(t.bad_value(
                "tokenizer.ggml.model",
                format!("'{other}' is not supported (llama SentencePiece or gpt2 BPE)"),
            ))
        }
    };
    let scores = match t.floats("tokenizer.ggml.scores")? {
        Some(s) if s.len() == n => s.iter().map(|&v| v as f32).collect(),
        Some(s) => {
            return Err(t.bad_value(
                "tokenizer.ggml.scores",
                format!("{} scores for {n} tokens", s.len()),
            ))
        }
        None => vec![0.0; n],
    };
    let types = match t.ints("tokenizer.ggml.token_type")? {
        Some(ty) if ty.len() == n => ty
            .iter()
            .map(|&v| TokenType::from_gguf(v))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| t.bad_value("tokenizer.ggml.token_type", "holds an unknown type"))?,
        Some(ty) => {
            return Err(t.bad_value(
                "tokenizer.ggml.token_type",
                format!("{} types for {n} tokens", ty.len()),
            ))
        }
        None => vec![TokenType::Normal; n],
    };
    let spm = matches!(kind, VocabKind::Spm);
    let id = |key: &str, default: Option<u32>| -> Result<Option<u32>> {
        Ok(match t.u32(key)? {
            Some(id) if (id as usize) < n => Some(id),
            // llama.cpp keeps its default for an id outside the vocabulary.
            Some(_) | None => default.filter(|&d| (d as usize) < n),
        })
    };
    Ok(Vocab {
        source: t.path.clone(),
        bos: id(
            "tokenizer.ggml.bos_token_id",
            Some(if spm { 1 } else { 11 }),
        )?,
        eos: id(
            "tokenizer.ggml.eos_token_id",
            Some(if spm { 2 } else { 11 }),
        )?,
        unk: id("tokenizer.ggml.unknown_token_id", spm.then_some(0))?,
        add_bos: t.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(spm),
        add_eos: t.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
        add_space_prefix: t.bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(spm),
        kind,
        tokens,
        scores,
        types,
    })
}
