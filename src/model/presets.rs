//! LLaVA-shaped models with random weights, built in memory from a named preset, for
//! benchmarks without a checkpoint (`llava-wgpu bench --preset NAME`).

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::model::config::LlavaConfig;

/// The presets and their config.json text (parsed by the same code as a real checkpoint's).
pub const PRESETS: [(&str, &str); 4] = [
    // LLaVA-1.5-7B exactly as llava-hf publishes it (the text model relies on LlamaConfig defaults).
    (
        "llava-1.5-7b",
        r#"{"model_type": "llava", "image_token_index": 32000, "projector_hidden_act": "gelu",
            "text_config": {"model_type": "llama", "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "vocab_size": 32064},
            "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                              "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14},
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default"}"#,
    ),
    (
        "llava-1.5-13b",
        r#"{"model_type": "llava", "image_token_index": 32000, "projector_hidden_act": "gelu",
            "text_config": {"model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
                            "num_hidden_layers": 40, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "vocab_size": 32064},
            "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                              "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14},
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default"}"#,
    ),
    // LLaVA-1.5's token geometry (336 px, patch 14: 576 visual tokens; 32 064-word vocabulary)
    // with narrow layers, so an unpruned prefill takes seconds on a software Vulkan driver.
    (
        "small",
        r#"{"model_type": "llava", "image_token_index": 32000, "projector_hidden_act": "gelu",
            "text_config": {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1408, "num_attention_heads": 8,
                            "num_key_value_heads": 8, "num_hidden_layers": 16, "max_position_embeddings": 4096,
                            "rms_norm_eps": 1e-05, "vocab_size": 32064},
            "vision_config": {"model_type": "clip_vision_model", "hidden_size": 256, "image_size": 336, "intermediate_size": 1024,
                              "num_attention_heads": 4, "num_hidden_layers": 6, "patch_size": 14},
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default"}"#,
    ),
    // LLaVA-NeXT's token geometry (336-px views, llava-hf's pinpoints: a square image gives the
    // base view plus 2 x 2 crops, 2,880 visual tokens and 48 newlines) with "small"'s narrow layers.
    (
        "next-small",
        r#"{"model_type": "llava_next", "image_token_index": 32000, "projector_hidden_act": "gelu",
            "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
            "text_config": {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1408, "num_attention_heads": 8,
                            "num_key_value_heads": 8, "num_hidden_layers": 16, "max_position_embeddings": 4096,
                            "rms_norm_eps": 1e-05, "vocab_size": 32064},
            "vision_config": {"model_type": "clip_vision_model", "hidden_size": 256, "image_size": 336, "intermediate_size": 1024,
                              "num_attention_heads": 4, "num_hidden_layers": 6, "patch_size": 14},
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default"}"#,
    ),
];

pub fn config(name: &str) -> Result<LlavaConfig> {
    let text = PRESETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
            Error::argument(
                "preset",
                format!("'{name}' is not one of {}", names.join(", ")),
            )
        })?;
    LlavaConfig::parse(text, Path::new(name))
}

/// Canonical tensor names and shapes of every tensor the engine loads for `config`.
pub fn tensor_shapes(config: &LlavaConfig) -> HashMap<String, Vec<usize>> {
    let v = &config.vision;
    let t = &config.text;
    let (dv, mv, p, c) = (
        v.hidden_size,
        v.intermediate_size,
        v.patch_size,
        v.num_channels,
    );
    let (dt, mt) = (t.hidden_size, t.intermediate_size);
    let qd = t.num_attention_heads * t.head_dim;
    let kvd = t.num_key_value_heads * t.head_dim;
    let mut s: HashMap<String, Vec<usize>> = HashMap::new();
    let mut add = |name: String, shape: Vec<usize>| {
        s.insert(name, shape);
    };
    add(
        "vision.embeddings.patch_embedding.weight".into(),
        vec![dv, c, p, p],
    );
    add("vision.embeddings.class_embedding".into(), vec![dv]);
    add(
        "vision.embeddings.position_embedding.weight".into(),
        vec![v.num_patches() + 1, dv],
    );
    for part in ["weight", "bias"] {
        add(format!("vision.pre_layrnorm.{part}"), vec![dv]);
    }
    for i in 0..config.vision_layers_to_run() {
        let l = format!("vision.encoder.layers.{i}");
        for norm in ["layer_norm1", "layer_norm2"] {
            add(format!("{l}.{norm}.weight"), vec![dv]);
            add(format!("{l}.{norm}.bias"), vec![dv]);
        }
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            add(format!("{l}.self_attn.{proj}.weight"), vec![dv, dv]);
            add(format!("{l}.self_attn.{proj}.bias"), vec![dv]);
        }
        add(format!("{l}.mlp.fc1.weight"), vec![mv, dv]);
        add(format!("{l}.mlp.fc1.bias"), vec![mv]);
        add(format!("{l}.mlp.fc2.weight"), vec![dv, mv]);
        add(format!("{l}.mlp.fc2.bias"), vec![dv]);
    }
    add("projector.linear_1.weight".into(), vec![dt, dv]);
    add("projector.linear_1.bias".into(), vec![dt]);
    add("projector.linear_2.weight".into(), vec![dt, dt]);
    add("projector.linear_2.bias".into(), vec![dt]);
    add("text.embed_tokens.weight".into(), vec![t.vocab_size, dt]);
    for i in 0..t.num_hidden_layers {
        let l = format!("text.layers.{i}");
        add(format!("{l}.input_layernorm.weight"), vec![dt]);
        add(format!("{l}.post_attention_layernorm.weight"), vec![dt]);
        add(format!("{l}.self_attn.q_proj.weight"), vec![qd, dt]);
        add(format!("{l}.self_attn.k_proj.weight"), vec![kvd, dt]);
        add(format!("{l}.self_attn.v_proj.weight"), vec![kvd, dt]);
        add(format!("{l}.self_attn.o_proj.weight"), vec![dt, qd]);
        add(format!("{l}.mlp.gate_proj.weight"), vec![mt, dt]);
        add(format!("{l}.mlp.up_proj.weight"), vec![mt, dt]);
        add(format!("{l}.mlp.down_proj.weight"), vec![dt, mt]);
    }
    add("text.norm.weight".into(), vec![dt]);
    add("lm_head.weight".into(), vec![t.vocab_size, dt]);
    if config.anyres.is_some() {
        add("image_newline".into(), vec![dt]);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vision::anyres::AnyresLayout;

    #[test]
    fn next_small_has_next_geometry() {
        let c = config("next-small").unwrap();
        let anyres = c.anyres.as_ref().expect("a llava_next preset");
        // The bench's square image at the largest square pinpoint: base view + 2 x 2 crops.
        let layout = AnyresLayout::new((672, 672), &anyres.grid_pinpoints, 336, 14);
        assert_eq!(layout.views(), 5);
        assert_eq!((layout.visual_tokens(), layout.newlines()), (2880, 48));
        assert_eq!(tensor_shapes(&c)["image_newline"], vec![512]);
    }
}
