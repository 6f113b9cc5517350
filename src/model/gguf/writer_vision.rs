//! The mmproj GGUF of a llava-hf checkpoint, as llama.cpp's legacy LLaVA converter
//! (tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py) writes it: the `clip.*` keys, the
//! projector (`mm.0`, `mm.2`), then the vision tower's layers up to the feature layer, with the
//! converter's names (fc1 is `ffn_down`, fc2 `ffn_up`: clip.cpp and this engine tell them apart
//! by shape).

use std::path::Path;

use super::encode::{tensor_bytes, GgufWriter, Meta};
use crate::error::Result;
use crate::gpu::WeightFormat;
use crate::model::config::LlavaConfig;
use crate::model::weights::Checkpoint;
use crate::vision::ImageProcessorConfig;

/// ggml names of a CLIP layer's tensors and their canonical module names, in CLIPVisionModel's
/// state_dict order.
const LAYER: [(&str, &str); 8] = [
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_out", "self_attn.out_proj"),
    ("ln1", "layer_norm1"),
    ("ffn_down", "mlp.fc1"),
    ("ffn_up", "mlp.fc2"),
    ("ln2", "layer_norm2"),
];

pub(super) fn mmproj_file(
    model_dir: &Path,
    config: &LlavaConfig,
    checkpoint: &Checkpoint,
    format: WeightFormat,
) -> Result<GgufWriter> {
    let mut file = GgufWriter::default();
    vision_metadata(&mut file, model_dir, config, format)?;
    vision_tensors(&mut file, config, checkpoint, format)?;
    Ok(file)
}

fn vision_tensors(
    file: &mut GgufWriter,
    config: &LlavaConfig,
    checkpoint: &Checkpoint,
    format: WeightFormat,
) -> Result<()> {
    // Linear weights in `format` (rows that are not whole blocks: f16), the patch and
    // position embeddings in f16 (llama.cpp never quantizes them), vectors in f32.
    let mut add = |name: &str, canonical: &str, kind: Kind| {
        let shape = checkpoint.tensor(canonical)?.shape;
        let cols = shape.last().copied().unwrap_or(0);
        let format = match kind {
            Kind::Linear if cols.is_multiple_of(format.block_weights()) => format,
            Kind::Linear | Kind::Half => WeightFormat::F16,
            Kind::Vector => WeightFormat::F32,
        };
        let (shape, bytes) = tensor_bytes(checkpoint, canonical, format, false, None)?;
        file.tensor(name, &shape, format, bytes);
        Ok::<(), crate::error::Error>(())
    };
    for (index, linear) in [(0, "linear_1"), (2, "linear_2")] {
        if config.projector_bias {
            add(
                &format!("mm.{index}.bias"),
                &format!("projector.{linear}.bias"),
                Kind::Vector,
            )?;
        }
        // The converter writes the projector's weights in f16 whatever else it does.
        let weight = format!("projector.{linear}.weight");
        add(&format!("mm.{index}.weight"), &weight, Kind::Half)?;
    }
    if config.anyres.is_some() {
        add("model.image_newline", "image_newline", Kind::Vector)?;
    }
    let embeddings = "vision.embeddings";
    add(
        "v.class_embd",
        &format!("{embeddings}.class_embedding"),
        Kind::Vector,
    )?;
    add(
        "v.patch_embd.weight",
        &format!("{embeddings}.patch_embedding.weight"),
        Kind::Half,
    )?;
    add(
        "v.position_embd.weight",
        &format!("{embeddings}.position_embedding.weight"),
        Kind::Half,
    )?;
    add(
        "v.pre_ln.weight",
        "vision.pre_layrnorm.weight",
        Kind::Vector,
    )?;
    add("v.pre_ln.bias", "vision.pre_layrnorm.bias", Kind::Vector)?;
    for i in 0..config.vision_layers_to_run() {
        for (ggml, module) in LAYER {
            for part in ["weight", "bias"] {
                let linear = !ggml.starts_with("ln") && part == "weight";
                let kind = if linear { Kind::Linear } else { Kind::Vector };
                let canonical = format!("vision.encoder.layers.{i}.{module}.{part}");
                add(&format!("v.blk.{i}.{ggml}.{part}"), &canonical, kind)?;
            }
        }
    }
    Ok(())
}

/// `vision_config.projection_dim` of config.json, or CLIPVisionConfig's default.
fn projection_dim(model_dir: &Path) -> Result<u32> {
    let path = model_dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| crate::error::Error::File {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let dim = json["vision_config"]["projection_dim"]
        .as_u64()
        .unwrap_or(512);
    Ok(u32::try_from(dim).unwrap_or(512))
}

/// How a tensor of the mmproj is stored.
#[derive(Clone, Copy)]
enum Kind {
    /// A linear layer's weight: the mmproj's format.
    Linear,
    /// The patch and position embeddings: f16.
    Half,
    /// Biases, norms, the class embedding: f32.
    Vector,
}

fn vision_metadata(
    file: &mut GgufWriter,
    model_dir: &Path,
    config: &LlavaConfig,
    format: WeightFormat,
) -> Result<()> {
    let v = &config.vision;
    let u32_of = |n: usize| Meta::U32(n as u32);
    let name = model_dir
        .file_name()
        .map_or("llava".into(), |n| n.to_string_lossy().into_owned());
    file.meta("general.architecture", Meta::Str("clip".into()));
    file.meta("clip.has_text_encoder", Meta::Bool(false));
    file.meta("clip.has_vision_encoder", Meta::Bool(true));
    file.meta("clip.has_llava_projector", Meta::Bool(true));
    file.meta(
        "general.file_type",
        Meta::U32(if format == WeightFormat::Q8_0 { 7 } else { 1 }),
    );
    file.meta("general.name", Meta::Str(name));
    file.meta(
        "general.description",
        Meta::Str("image encoder for LLaVA".into()),
    );
    file.meta("clip.projector_type", Meta::Str("mlp".into()));
    file.meta("clip.vision.image_size", u32_of(v.image_size));
    file.meta("clip.vision.patch_size", u32_of(v.patch_size));
    file.meta("clip.vision.embedding_length", u32_of(v.hidden_size));
    file.meta(
        "clip.vision.feed_forward_length",
        u32_of(v.intermediate_size),
    );
    // CLIP's own projection_dim (CLIPVisionConfig's default 512), which the converter copies;
    // neither clip.cpp nor this engine reads it (the projector's width is mm.2's).
    file.meta(
        "clip.vision.projection_dim",
        Meta::U32(projection_dim(model_dir)?),
    );
    file.meta(
        "clip.vision.attention.head_count",
        u32_of(v.num_attention_heads),
    );
    file.meta(
        "clip.vision.attention.layer_norm_epsilon",
        Meta::F32(v.layer_norm_eps as f32),
    );
    // Only the layers the feature layer needs are stored, and every stored layer runs.
    file.meta(
        "clip.vision.block_count",
        u32_of(config.vision_layers_to_run()),
    );
    if let Some(anyres) = &config.anyres {
        // clip.cpp reads each pair as (width, height).
        let flat = anyres
            .grid_pinpoints
            .iter()
            .flat_map(|&(h, w)| [w as i32, h as i32])
            .collect();
        file.meta("clip.vision.image_grid_pinpoints", Meta::I32s(flat));
        file.meta("clip.vision.image_aspect_ratio", Meta::Str("anyres".into()));
        file.meta(
            "clip.vision.mm_patch_merge_type",
            Meta::Str("spatial_unpad".into()),
        );
    }
    let processor = ImageProcessorConfig::load(model_dir, v.image_size)?;
    let three = |x: [f64; 3]| Meta::F32s(x.iter().map(|&v| v as f32).collect());
    file.meta("clip.vision.image_mean", three(processor.image_mean));
    file.meta("clip.vision.image_std", three(processor.image_std));
    file.meta("clip.use_gelu", Meta::Bool(v.hidden_act == "gelu"));
    Ok(())
}
