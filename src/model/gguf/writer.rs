//! A llava-hf checkpoint written as the GGUF pair llama.cpp's tools make (`llava-wgpu quantize
//! --format gguf`): the text model as convert_hf_to_gguf.py writes it (and, for q4_0 and
//! q4_k_m, as llama-quantize then quantizes it: from the f16 values, with its choice of type per
//! tensor), the vision tower and projector as the legacy LLaVA mmproj converter writes them.
//! docs/gguf.md lists the keys; tests/gguf_writer.rs compares the result with files made by
//! llama.cpp's own tools.

use std::path::{Path, PathBuf};

pub use super::encode::{GgufWriter, Meta, TextTypes};
use crate::error::{Error, Result};
use crate::gpu::WeightFormat;
use crate::model::config::LlavaConfig;
use crate::model::weights::Checkpoint;

/// What [`write_pair`] wrote.
#[derive(Clone, Debug)]
pub struct PairReport {
    pub text: PathBuf,
    pub mmproj: PathBuf,
    /// Tensors of the text file per type, e.g. `q4_k: 23`.
    pub text_types: Vec<(WeightFormat, usize)>,
}

impl std::fmt::Display for PairReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let types: Vec<String> = self
            .text_types
            .iter()
            .map(|(t, n)| format!("{n} {}", t.name()))
            .collect();
        write!(
            f,
            "wrote {} ({}) and {}",
            self.text.display(),
            types.join(", "),
            self.mmproj.display()
        )
    }
}

/// Write `model_dir` (a llava-hf checkpoint) as a GGUF pair into `out_dir`:
/// `ggml-model-{text}.gguf` and `mmproj-model-{vision}.gguf`. `vision` is f16 or q8_0.
pub fn write_pair(
    model_dir: &Path,
    out_dir: &Path,
    text: TextTypes,
    vision: WeightFormat,
) -> Result<PairReport> {
    if !matches!(vision, WeightFormat::F16 | WeightFormat::Q8_0) {
        return Err(Error::argument(
            "vision_weight_format",
            format!("an mmproj is written in f16 or q8_0, not {}", vision.name()),
        ));
    }
    let config = LlavaConfig::load(model_dir)?;
    let checkpoint = Checkpoint::open(model_dir)?;
    std::fs::create_dir_all(out_dir).map_err(|e| Error::File {
        path: out_dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let text_path = out_dir.join(format!("ggml-model-{}.gguf", text.name()));
    let mmproj_path = out_dir.join(format!("mmproj-model-{}.gguf", vision.name()));
    let text_file = super::writer_text::text_file(model_dir, &config, &checkpoint, text)?;
    let text_types = text_file.type_counts();
    text_file.write(&text_path)?;
    super::writer_vision::mmproj_file(model_dir, &config, &checkpoint, vision)?
        .write(&mmproj_path)?;
    Ok(PairReport {
        text: text_path,
        mmproj: mmproj_path,
        text_types,
    })
}
