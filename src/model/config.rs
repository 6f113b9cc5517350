//! `config.json` of a llava-hf checkpoint: model_type `llava` (LLaVA-1.5) or `llava_next`
//! (LLaVA-NeXT, anyres: [`AnyresConfig`]), a `llama` or `mistral` text model and a
//! `clip_vision_model` vision tower.
//!
//! Real llava-hf files omit most fields and rely on the transformers class defaults
//! (`llava-1.5-7b-hf` lists neither `hidden_size` nor `num_hidden_layers` for its text model), so
//! every default is applied here explicitly, with the value transformers' `LlamaConfig`,
//! `CLIPVisionConfig` and `LlavaConfig` use. Both spellings of the newer files are accepted
//! (`rope_theta` or `rope_parameters.rope_theta`; `torch_dtype` or `dtype`).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::prune::cost::LayerWidths;
use crate::text::Template;

/// The LLaMA decoder's hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    /// A Mistral decoder (model_type `mistral`); LLaMA otherwise.
    pub mistral: bool,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Vec<u32>,
}

impl TextConfig {
    /// The widths a decoder layer's cost depends on (`prune::cost`): q_proj and o_proj are
    /// d × (heads · head_dim), k_proj and v_proj d × (kv_heads · head_dim).
    pub fn layer_widths(&self) -> LayerWidths {
        LayerWidths {
            hidden: self.hidden_size as u64,
            q: (self.num_attention_heads * self.head_dim) as u64,
            kv: (self.num_key_value_heads * self.head_dim) as u64,
            mlp: self.intermediate_size as u64,
        }
    }
}

/// The CLIP vision tower's hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub layer_norm_eps: f64,
    /// `quick_gelu` (CLIP's default) or `gelu`.
    pub hidden_act: String,
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// The visual tokens LLaVA feeds the language model (N0 in docs/pruning.md): one per patch.
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }
}

/// Which encoder outputs become image features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureSelect {
    /// Drop the CLS token (LLaVA-1.5).
    Default,
    /// Keep CLS and patches.
    Full,
}

/// LLaVA-NeXT's anyres tiling (`LlavaNextConfig`): the image is cut into crops of the vision
/// tower's size at the best-fitting resolution, plus a base view of the whole image.
#[derive(Clone, Debug, PartialEq)]
pub struct AnyresConfig {
    /// `image_grid_pinpoints`: the candidate resolutions as (height, width), multiples of the
    /// vision tower's `image_size`.
    pub grid_pinpoints: Vec<(usize, usize)>,
}

/// transformers' `LlavaNextConfig` default `image_grid_pinpoints` (llava-hf's 336-px list).
pub const DEFAULT_GRID_PINPOINTS: [(usize, usize); 5] =
    [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];

#[derive(Clone, Debug, PartialEq)]
pub struct LlavaConfig {
    pub text: TextConfig,
    pub vision: VisionConfig,
    /// LLaVA-NeXT's tiling (model_type `llava_next`); None for LLaVA-1.5.
    pub anyres: Option<AnyresConfig>,
    pub image_token_index: u32,
    /// Negative values count from the end of `hidden_states` (which has L + 1 entries).
    pub vision_feature_layer: i64,
    pub vision_feature_select_strategy: FeatureSelect,
    /// `gelu` for LLaVA-1.5.
    pub projector_hidden_act: String,
    pub projector_bias: bool,
    /// dtype the checkpoint declares (informational; tensors carry their own dtype).
    pub dtype: Option<String>,
}

impl LlavaConfig {
    /// The prompt format the llava-hf checkpoints of this kind ship as their chat template:
    /// `llava-hf` for LLaVA-1.5, `vicuna-v1` for llava-v1.6-vicuna, `mistral-inst` for
    /// llava-v1.6-mistral.
    pub fn default_template(&self) -> Template {
        match (&self.anyres, self.text.mistral) {
            (None, _) => Template::LlavaHf,
            (Some(_), false) => Template::VicunaV1,
            (Some(_), true) => Template::MistralInst,
        }
    }

    /// Number of CLIP encoder layers that must run to produce the selected features:
    /// `hidden_states[i]` is the output of layer `i - 1` (`hidden_states[0]` is the embeddings
    /// after `pre_layrnorm`), so feature layer −2 of 24 layers needs layers 0..=22, i.e. 23.
    pub fn vision_layers_to_run(&self) -> usize {
        let states = self.vision.num_hidden_layers as i64 + 1;
        let index = if self.vision_feature_layer < 0 {
            states + self.vision_feature_layer
        } else {
            self.vision_feature_layer
        };
        index as usize
    }

    /// Image tokens per image after feature selection.
    pub fn image_tokens(&self) -> usize {
        match self.vision_feature_select_strategy {
            FeatureSelect::Default => self.vision.num_patches(),
            FeatureSelect::Full => self.vision.num_patches() + 1,
        }
    }

    pub fn load(model_dir: &Path) -> Result<Self> {
        let path = model_dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::File {
            path: path.clone(),
            reason: if e.kind() == std::io::ErrorKind::NotFound {
                "config.json not found: is this a llava-hf model directory?".into()
            } else {
                e.to_string()
            },
        })?;
        Self::parse(&text, &path)
    }

    /// Parse the text of `config.json`; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let root: Value = serde_json::from_str(text).map_err(|e| Error::File {
            path: path.to_path_buf(),
            reason: format!("not valid JSON: {e}"),
        })?;
        let reader = Reader {
            path: path.to_path_buf(),
        };
        reader.llava(&root)
    }
}

/// The most crops along one side of a pinpoint: llava-hf's lists use at most 3, the anyres-max
/// variants 6; more would be a broken file, not a model.
pub const MAX_CROPS_PER_SIDE: usize = 16;

struct Reader {
    path: PathBuf,
}

/// A token id as written: a non-negative integer that fits u32 (never truncated to 32 bits).
fn token_id(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok())
}

impl Reader {
    fn err(&self, field: &str, reason: impl std::fmt::Display) -> Error {
        Error::File {
            path: self.path.clone(),
            reason: format!("field `{field}`: {reason}"),
        }
    }

    fn usize_or(&self, obj: &Value, prefix: &str, key: &str, default: usize) -> Result<usize> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| {
                    self.err(
                        &format!("{prefix}{key}"),
                        format!("expected a positive integer, found {v}"),
                    )
                }),
        }
    }

    fn f64_or(&self, obj: &Value, prefix: &str, key: &str, default: f64) -> Result<f64> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| {
                    self.err(
                        &format!("{prefix}{key}"),
                        format!("expected a positive number, found {v}"),
                    )
                }),
        }
    }

    fn str_or(&self, obj: &Value, prefix: &str, key: &str, default: &str) -> Result<String> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(self.err(
                &format!("{prefix}{key}"),
                format!("expected a string, found {v}"),
            )),
        }
    }

    fn ids(&self, obj: &Value, prefix: &str, key: &str) -> Result<Vec<u32>> {
        let bad = |v: &Value| {
            self.err(
                &format!("{prefix}{key}"),
                format!("expected a token id below 2^32 or a list of them, found {v}"),
            )
        };
        match obj.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| token_id(v).ok_or_else(|| bad(v)))
                .collect(),
            Some(v) => token_id(v).map(|n| vec![n]).ok_or_else(|| bad(v)),
        }
    }

    fn expect_model_type(&self, obj: &Value, field: &str, wanted: &[&str]) -> Result<()> {
        match obj.get("model_type").and_then(Value::as_str) {
            Some(t) if wanted.contains(&t) => Ok(()),
            // Older vision configs sometimes omit it; the tensors will tell if it is not CLIP.
            None if field != "model_type" => Ok(()),
            other => Err(self.err(
                field,
                format!(
                    "unsupported architecture {}: this engine runs {}",
                    other.map_or("(missing)".to_string(), |t| format!("'{t}'")),
                    wanted.join(" / ")
                ),
            )),
        }
    }

    fn llava(&self, root: &Value) -> Result<LlavaConfig> {
        self.expect_model_type(root, "model_type", &["llava", "llava_next"])?;
        let empty = Value::Object(Default::default());
        let text_obj = root.get("text_config").unwrap_or(&empty);
        let vision_obj = root.get("vision_config").unwrap_or(&empty);
        self.expect_model_type(text_obj, "text_config.model_type", &["llama", "mistral"])?;
        self.expect_model_type(
            vision_obj,
            "vision_config.model_type",
            &["clip_vision_model"],
        )?;

        let text = self.text(text_obj, root)?;
        let vision = self.vision(vision_obj)?;
        let vision_feature_layer = self.vision_feature_layer(root, &vision)?;
        let vision_feature_select_strategy = self.feature_select(root)?;
        let anyres = match root.get("model_type").and_then(Value::as_str) {
            Some("llava_next") => {
                Some(self.anyres(root, &vision, vision_feature_select_strategy)?)
            }
            _ => None,
        };
        let projector_hidden_act = self.str_or(root, "", "projector_hidden_act", "gelu")?;
        if projector_hidden_act != "gelu" {
            return Err(self.err(
                "projector_hidden_act",
                format!("'{projector_hidden_act}' is not supported (LLaVA-1.5 uses gelu)"),
            ));
        }
        let image_token_index = self.image_token_index(root, &text)?;
        let projector_bias = root
            .get("multimodal_projector_bias")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let dtype = root
            .get("dtype")
            .or_else(|| root.get("torch_dtype"))
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(LlavaConfig {
            text,
            vision,
            anyres,
            image_token_index,
            vision_feature_layer,
            vision_feature_select_strategy,
            projector_hidden_act,
            projector_bias,
            dtype,
        })
    }

    /// One index into the `L + 1` hidden states (negative from the end; 0, the embeddings, is no
    /// feature layer, and neither is its negative spelling −(L + 1)). Lists of layers
    /// (LLaVA-NeXT style) are refused.
    fn vision_feature_layer(&self, root: &Value, vision: &VisionConfig) -> Result<i64> {
        let layer = match root.get("vision_feature_layer") {
            None | Some(Value::Null) => -2,
            Some(v) => v.as_i64().ok_or_else(|| {
                self.err(
                    "vision_feature_layer",
                    format!("only a single layer index is supported, found {v}"),
                )
            })?,
        };
        let states = vision.num_hidden_layers as i64 + 1;
        if layer >= states || layer <= -states || layer == 0 {
            return Err(self.err(
                "vision_feature_layer",
                format!(
                    "{layer} is outside the {} hidden states of the vision tower",
                    states
                ),
            ));
        }
        Ok(layer)
    }

    /// `image_grid_pinpoints` (transformers' default list if absent): (height, width) pairs,
    /// each side a positive multiple of the vision tower's image size. The "full" strategy is
    /// refused: transformers' packing of the crop grid assumes patch rows only.
    fn anyres(
        &self,
        root: &Value,
        vision: &VisionConfig,
        select: FeatureSelect,
    ) -> Result<AnyresConfig> {
        if select == FeatureSelect::Full {
            return Err(self.err(
                "vision_feature_select_strategy",
                "'full' cannot be used with llava_next: its crop grid holds patch tokens only (use 'default')",
            ));
        }
        let field = "image_grid_pinpoints";
        let grid_pinpoints = match root.get(field) {
            None | Some(Value::Null) => DEFAULT_GRID_PINPOINTS.to_vec(),
            Some(Value::Array(items)) if !items.is_empty() => items
                .iter()
                .map(|item| self.pinpoint(item, vision.image_size))
                .collect::<Result<_>>()?,
            Some(v) => {
                return Err(self.err(
                    field,
                    format!("expected a list of [height, width], found {v}"),
                ))
            }
        };
        Ok(AnyresConfig { grid_pinpoints })
    }

    fn pinpoint(&self, item: &Value, image_size: usize) -> Result<(usize, usize)> {
        let side = |v: &Value| {
            v.as_u64()
                .map(|n| n as usize)
                .filter(|&n| n > 0 && n % image_size == 0 && n / image_size <= MAX_CROPS_PER_SIDE)
        };
        match item.as_array().map(Vec::as_slice) {
            Some([h, w]) => side(h).zip(side(w)).ok_or(()),
            _ => Err(()),
        }
        .map_err(|()| {
            self.err(
                "image_grid_pinpoints",
                format!(
                    "{item} is not [height, width] with each side a multiple of the vision \
                     tower's image_size {image_size} (at most {MAX_CROPS_PER_SIDE} crops per side)"
                ),
            )
        })
    }

    fn feature_select(&self, root: &Value) -> Result<FeatureSelect> {
        match self
            .str_or(root, "", "vision_feature_select_strategy", "default")?
            .as_str()
        {
            "default" => Ok(FeatureSelect::Default),
            "full" => Ok(FeatureSelect::Full),
            other => Err(self.err(
                "vision_feature_select_strategy",
                format!("'{other}' is not default or full"),
            )),
        }
    }

    /// `image_token_index`, or its other spelling `image_token_id`; LLaVA-1.5's 32000 if absent.
    fn image_token_index(&self, root: &Value, text: &TextConfig) -> Result<u32> {
        let index = match root
            .get("image_token_index")
            .or_else(|| root.get("image_token_id"))
        {
            None | Some(Value::Null) => 32000,
            Some(v) => token_id(v).ok_or_else(|| {
                self.err(
                    "image_token_index",
                    format!("expected a token id below 2^32, found {v}"),
                )
            })?,
        };
        if index as usize >= text.vocab_size {
            return Err(self.err(
                "image_token_index",
                format!("{index} is outside the vocabulary of {}", text.vocab_size),
            ));
        }
        Ok(index)
    }

    /// RoPE's base: `rope_parameters.rope_theta` (transformers 5) or `rope_theta`; RoPE
    /// scaling is refused by name.
    fn rope_theta(&self, t: &Value) -> Result<f64> {
        let p = "text_config.";
        match t.get("rope_parameters").and_then(|r| r.get("rope_theta")) {
            Some(_) => {
                let rp = &t["rope_parameters"];
                let kind =
                    self.str_or(rp, "text_config.rope_parameters.", "rope_type", "default")?;
                if kind != "default" {
                    return Err(self.err(
                        "text_config.rope_parameters.rope_type",
                        format!("'{kind}' RoPE scaling is not supported"),
                    ));
                }
                self.f64_or(rp, "text_config.rope_parameters.", "rope_theta", 10000.0)
            }
            None => {
                if let Some(scaling) = t.get("rope_scaling").filter(|v| !v.is_null()) {
                    return Err(self.err(
                        "text_config.rope_scaling",
                        format!("RoPE scaling {scaling} is not supported"),
                    ));
                }
                self.f64_or(t, p, "rope_theta", 10000.0)
            }
        }
    }

    fn text(&self, t: &Value, root: &Value) -> Result<TextConfig> {
        let p = "text_config.";
        let mistral = t.get("model_type").and_then(Value::as_str) == Some("mistral");
        // LlamaConfig or MistralConfig defaults (the 7B shapes).
        let hidden_size = self.usize_or(t, p, "hidden_size", 4096)?;
        let num_attention_heads = self.usize_or(t, p, "num_attention_heads", 32)?;
        let kv_default = if mistral { 8 } else { num_attention_heads };
        let num_key_value_heads = self.usize_or(t, p, "num_key_value_heads", kv_default)?;
        // `"head_dim": null` means the default, hidden_size / num_attention_heads, like no key.
        let head_dim_given = !matches!(t.get("head_dim"), None | Some(Value::Null));
        if hidden_size % num_attention_heads != 0 && !head_dim_given {
            return Err(self.err(
                "text_config.hidden_size",
                format!(
                    "{hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"
                ),
            ));
        }
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(self.err(
                "text_config.num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
            ));
        }
        let head_dim = self.usize_or(t, p, "head_dim", hidden_size / num_attention_heads)?;
        let hidden_act = self.str_or(t, p, "hidden_act", "silu")?;
        if hidden_act != "silu" {
            return Err(self.err(
                "text_config.hidden_act",
                format!("'{hidden_act}' is not supported (LLaMA uses silu)"),
            ));
        }
        let rope_theta = self.rope_theta(t)?;
        // The vocabulary size sits in text_config in newer files and at the top level in older.
        let vocab_default = root
            .get("vocab_size")
            .and_then(Value::as_u64)
            .map_or(32000, |n| n as usize);
        let eos = self.ids(t, p, "eos_token_id")?;
        let (intermediate_default, context_default) = if mistral {
            (14336, 4096 * 32)
        } else {
            (11008, 2048)
        };
        let mut max_position_embeddings =
            self.usize_or(t, p, "max_position_embeddings", context_default)?;
        if mistral {
            // `"sliding_window": null` is full attention. A window (MistralConfig's default is
            // 4096) caps the context: within it, sliding-window attention is full causal
            // attention, so the engine never needs the sliding mask.
            if !matches!(t.get("sliding_window"), Some(Value::Null)) {
                let window = self.usize_or(t, p, "sliding_window", 4096)?;
                max_position_embeddings = max_position_embeddings.min(window);
            }
        }
        Ok(TextConfig {
            mistral,
            hidden_size,
            intermediate_size: self.usize_or(t, p, "intermediate_size", intermediate_default)?,
            num_hidden_layers: self.usize_or(t, p, "num_hidden_layers", 32)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: self.f64_or(t, p, "rms_norm_eps", 1e-6)?,
            rope_theta,
            max_position_embeddings,
            vocab_size: self.usize_or(t, p, "vocab_size", vocab_default)?,
            tie_word_embeddings: t
                .get("tie_word_embeddings")
                .or_else(|| root.get("tie_word_embeddings"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            bos_token_id: self.ids(t, p, "bos_token_id")?.first().copied().or(Some(1)),
            eos_token_id: if eos.is_empty() { vec![2] } else { eos },
        })
    }

    fn vision(&self, v: &Value) -> Result<VisionConfig> {
        let p = "vision_config.";
        // CLIPVisionConfig defaults (ViT-B/32).
        let hidden_size = self.usize_or(v, p, "hidden_size", 768)?;
        let num_attention_heads = self.usize_or(v, p, "num_attention_heads", 12)?;
        if hidden_size % num_attention_heads != 0 {
            return Err(self.err(
                "vision_config.hidden_size",
                format!(
                    "{hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"
                ),
            ));
        }
        let image_size = self.usize_or(v, p, "image_size", 224)?;
        let patch_size = self.usize_or(v, p, "patch_size", 32)?;
        if image_size % patch_size != 0 {
            return Err(self.err(
                "vision_config.image_size",
                format!("{image_size} is not a multiple of patch_size {patch_size}"),
            ));
        }
        // One visual token per patch (and CLS) must be countable in the u32s the GPU indexes with.
        let grid = image_size / patch_size;
        if grid
            .checked_mul(grid)
            .is_none_or(|patches| patches >= u32::MAX as usize)
        {
            return Err(self.err(
                "vision_config.image_size",
                format!(
                    "{image_size} gives {grid}x{grid} patches of {patch_size}, too many to index"
                ),
            ));
        }
        let num_channels = self.usize_or(v, p, "num_channels", 3)?;
        if num_channels != 3 {
            return Err(self.err(
                "vision_config.num_channels",
                format!("{num_channels} is not supported: the image processor produces RGB (3)"),
            ));
        }
        let hidden_act = self.str_or(v, p, "hidden_act", "quick_gelu")?;
        if hidden_act != "quick_gelu" && hidden_act != "gelu" {
            return Err(self.err(
                "vision_config.hidden_act",
                format!("'{hidden_act}' is not supported"),
            ));
        }
        Ok(VisionConfig {
            hidden_size,
            intermediate_size: self.usize_or(v, p, "intermediate_size", 3072)?,
            num_hidden_layers: self.usize_or(v, p, "num_hidden_layers", 12)?,
            num_attention_heads,
            image_size,
            patch_size,
            num_channels,
            layer_norm_eps: self.f64_or(v, p, "layer_norm_eps", 1e-5)?,
            hidden_act,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The config.json of llava-hf/llava-1.5-7b-hf as published (it omits most fields).
    const LLAVA_7B: &str = r#"{
      "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100,
      "image_token_index": 32000, "model_type": "llava", "pad_token_id": 32001,
      "projector_hidden_act": "gelu",
      "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
        "torch_dtype": "float16", "vocab_size": 32064},
      "tie_word_embeddings": false, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
      "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
        "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
        "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
      "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064
    }"#;

    #[test]
    fn llava_7b_config_gets_the_class_defaults() {
        let c = LlavaConfig::parse(LLAVA_7B, Path::new("config.json")).unwrap();
        assert_eq!(c.text.hidden_size, 4096);
        assert_eq!(c.text.intermediate_size, 11008);
        assert_eq!(c.text.num_hidden_layers, 32);
        assert_eq!(c.text.num_key_value_heads, 32);
        assert_eq!(c.text.head_dim, 128);
        assert_eq!(c.text.rms_norm_eps, 1e-5);
        assert_eq!(c.text.rope_theta, 10000.0);
        assert_eq!(c.text.vocab_size, 32064);
        assert_eq!(c.vision.num_patches(), 576);
        assert_eq!(c.vision.hidden_act, "quick_gelu");
        assert_eq!(c.vision_layers_to_run(), 23);
        assert_eq!(c.image_tokens(), 576);
        assert_eq!(c.image_token_index, 32000);
    }

    #[test]
    fn unsupported_architectures_name_the_field() {
        let bad = LLAVA_7B.replace(r#""model_type": "llama""#, r#""model_type": "gemma""#);
        let e = LlavaConfig::parse(&bad, Path::new("config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("text_config.model_type") && e.contains("gemma"),
            "{e}"
        );
        let bad = LLAVA_7B.replace(
            r#""model_type": "llava""#,
            r#""model_type": "llava_onevision""#,
        );
        let e = LlavaConfig::parse(&bad, Path::new("config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`model_type`") && e.contains("llava_onevision"),
            "{e}"
        );
        let bad = LLAVA_7B.replace(
            r#""vision_feature_layer": -2"#,
            r#""vision_feature_layer": [-2, -5]"#,
        );
        let e = LlavaConfig::parse(&bad, Path::new("config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("vision_feature_layer"), "{e}");
        let e = LlavaConfig::parse("{", Path::new("x/config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("x/config.json"), "{e}");
    }

    #[test]
    fn token_ids_beyond_u32_are_refused_not_truncated() {
        // 2^32 + 5 once became id 5, inside the vocabulary (found by tests/fuzz).
        let bad = LLAVA_7B.replace(
            r#""image_token_index": 32000"#,
            r#""image_token_index": 4294967301"#,
        );
        let e = LlavaConfig::parse(&bad, Path::new("config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("image_token_index") && e.contains("4294967301"),
            "{e}"
        );
        let bad = LLAVA_7B.replace(
            r#""rms_norm_eps": 1e-05,"#,
            r#""rms_norm_eps": 1e-05, "eos_token_id": [2, 4294967298],"#,
        );
        let e = LlavaConfig::parse(&bad, Path::new("config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("text_config.eos_token_id"), "{e}");
    }

    #[test]
    fn the_embeddings_are_no_feature_layer_from_either_end() {
        // −25 of 24 layers is hidden_states[0]: it ran no layer at all (found by tests/fuzz).
        for layer in ["0", "-25", "25"] {
            let bad = LLAVA_7B.replace(
                r#""vision_feature_layer": -2"#,
                &format!(r#""vision_feature_layer": {layer}"#),
            );
            let e = LlavaConfig::parse(&bad, Path::new("config.json"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("vision_feature_layer"), "{e}");
        }
        let first = LLAVA_7B.replace(
            r#""vision_feature_layer": -2"#,
            r#""vision_feature_layer": -24"#,
        );
        let c = LlavaConfig::parse(&first, Path::new("config.json")).unwrap();
        assert_eq!(c.vision_layers_to_run(), 1);
    }

    #[test]
    fn images_with_more_patches_than_u32_indexes_are_refused() {
        // 2^32 / 1 gives 2^64 patches, which wrapped to 0 in image_tokens() (found by tests/fuzz).
        for (image, patch) in [("4294967296", "1"), ("710471553673788466", "14")] {
            let bad = LLAVA_7B
                .replace(r#""image_size": 336"#, &format!(r#""image_size": {image}"#))
                .replace(r#""patch_size": 14"#, &format!(r#""patch_size": {patch}"#));
            let e = LlavaConfig::parse(&bad, Path::new("config.json"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("vision_config.image_size"), "{e}");
        }
    }

    #[test]
    fn a_null_head_dim_still_needs_divisible_heads() {
        // head_dim null skipped the check and gave head_dim 4096 / 5000 = 0 (found by
        // tests/fuzz after 602,339 cases).
        let bad = LLAVA_7B.replace(
            r#""rms_norm_eps": 1e-05,"#,
            r#""rms_norm_eps": 1e-05, "head_dim": null, "num_attention_heads": 5000,"#,
        );
        let e = LlavaConfig::parse(&bad, Path::new("config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("text_config.hidden_size"), "{e}");
    }

    #[test]
    fn transformers_5_spellings_are_read() {
        let newer = LLAVA_7B.replace(
            r#""rms_norm_eps": 1e-05,"#,
            r#""rms_norm_eps": 1e-05, "rope_parameters": {"rope_theta": 5000.0, "rope_type": "default"},"#,
        );
        let c = LlavaConfig::parse(&newer, Path::new("config.json")).unwrap();
        assert_eq!(c.text.rope_theta, 5000.0);
    }

    /// llava-hf/llava-v1.6-mistral-7b-hf's config.json as published (the text model relies on
    /// MistralConfig's defaults for its width and depth).
    const NEXT_MISTRAL_7B: &str = r#"{
      "architectures": ["LlavaNextForConditionalGeneration"], "ignore_index": -100,
      "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
      "image_token_index": 32000, "model_type": "llava_next", "projector_hidden_act": "gelu",
      "text_config": {"_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2",
        "architectures": ["MistralForCausalLM"], "intermediate_size": 14336,
        "max_position_embeddings": 32768, "model_type": "mistral", "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": null,
        "torch_dtype": "bfloat16", "vocab_size": 32064},
      "torch_dtype": "float16", "use_image_newline_parameter": true,
      "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
        "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
        "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
      "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064
    }"#;

    #[test]
    fn llava_next_mistral_gets_mistral_defaults_and_pinpoints() {
        let c = LlavaConfig::parse(NEXT_MISTRAL_7B, Path::new("config.json")).unwrap();
        assert_eq!(c.text.hidden_size, 4096);
        assert_eq!(c.text.num_hidden_layers, 32);
        assert_eq!(c.text.num_key_value_heads, 8);
        assert_eq!(c.text.intermediate_size, 14336);
        assert_eq!(c.text.rope_theta, 1e6);
        // sliding_window null: the whole 32k context.
        assert_eq!(c.text.max_position_embeddings, 32768);
        let anyres = c.anyres.expect("llava_next has anyres");
        assert_eq!(anyres.grid_pinpoints, DEFAULT_GRID_PINPOINTS.to_vec());
        // A window smaller than the context caps it; an absent one is MistralConfig's 4096.
        let windowed =
            NEXT_MISTRAL_7B.replace(r#""sliding_window": null"#, r#""sliding_window": 8192"#);
        let c = LlavaConfig::parse(&windowed, Path::new("config.json")).unwrap();
        assert_eq!(c.text.max_position_embeddings, 8192);
        let absent = NEXT_MISTRAL_7B.replace(r#""sliding_window": null,"#, "");
        let c = LlavaConfig::parse(&absent, Path::new("config.json")).unwrap();
        assert_eq!(c.text.max_position_embeddings, 4096);
        // LLaVA-1.5 has no tiling.
        assert!(LlavaConfig::parse(LLAVA_7B, Path::new("config.json"))
            .unwrap()
            .anyres
            .is_none());
    }

    #[test]
    fn bad_pinpoints_and_full_strategy_name_the_field() {
        let pinpoints = r#""image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]"#;
        for bad in [
            r#""image_grid_pinpoints": [[336, 670]]"#,
            r#""image_grid_pinpoints": [[336]]"#,
            r#""image_grid_pinpoints": []"#,
            r#""image_grid_pinpoints": [[0, 336]]"#,
            r#""image_grid_pinpoints": "anyres""#,
        ] {
            let text = NEXT_MISTRAL_7B.replace(pinpoints, bad);
            let e = LlavaConfig::parse(&text, Path::new("config.json"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("image_grid_pinpoints"), "{bad}: {e}");
        }
        let full = NEXT_MISTRAL_7B.replace(
            r#""vision_feature_select_strategy": "default""#,
            r#""vision_feature_select_strategy": "full""#,
        );
        let e = LlavaConfig::parse(&full, Path::new("config.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("vision_feature_select_strategy"), "{e}");
    }
}
