//! `llava-wgpu quantize`: a copy of a checkpoint whose language-model linear layers and
//! `lm_head` are stored as ggml Q8_0 / Q4_0 blocks, so it loads without requantizing.
//!
//! The file is still safetensors. A quantized tensor keeps its name and is stored as a U8
//! `[rows, blocks per row · block bytes]` array of ggml blocks in row order; the metadata holds
//! the format (`weights::FORMAT_KEY`) and every quantized tensor's logical `[rows, cols]`
//! (`weights::QUANTIZED_KEY`). Every other tensor is copied unchanged, and so are the
//! directory's other files (config, tokenizer, processor, chat template).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, View};

use crate::error::{Error, Result};
use crate::gpu::WeightFormat;
use crate::model::config::LlavaConfig;
use crate::model::weights::{Checkpoint, RawTensor, FORMAT_KEY, QUANTIZED_KEY};
use crate::quant;

/// What `write_checkpoint` wrote.
#[derive(Clone, Debug)]
pub struct QuantizeReport {
    pub file: PathBuf,
    pub format: WeightFormat,
    /// Tensors stored as blocks.
    pub quantized: usize,
    /// Linear weights left as they were because their rows are not whole blocks of 32.
    pub kept: Vec<String>,
    /// Bytes of the quantized tensors before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
}

impl fmt::Display for QuantizeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "wrote {}: {} tensors as {} ({} → {} bytes)",
            self.file.display(),
            self.quantized,
            self.format.name(),
            self.bytes_before,
            self.bytes_after
        )?;
        if !self.kept.is_empty() {
            write!(
                f,
                "; kept unquantized (rows not whole blocks of {}): {}",
                quant::BLOCK,
                self.kept.join(", ")
            )?;
        }
        Ok(())
    }
}

/// A tensor to write: borrowed from the mapped input, or freshly quantized.
struct Out<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Cow<'a, [u8]>,
}

impl View for &Out<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The canonical names of the weights the engine loads in `weight_format`: the decoder's
/// linear layers and `lm_head` (absent when tied to the embeddings, which stay float because
/// their rows are read on the host).
fn quantizable(config: &LlavaConfig) -> Vec<String> {
    let mut names = Vec::new();
    for layer in 0..config.text.num_hidden_layers {
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            names.push(format!("text.layers.{layer}.self_attn.{proj}.weight"));
        }
        for proj in ["gate_proj", "up_proj", "down_proj"] {
            names.push(format!("text.layers.{layer}.mlp.{proj}.weight"));
        }
    }
    names.push("lm_head.weight".into());
    names
}

fn file_error(path: &Path, reason: impl fmt::Display) -> Error {
    Error::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Quantize `model_dir`'s checkpoint into `out_dir` (created if needed).
pub fn write_checkpoint(
    model_dir: &Path,
    out_dir: &Path,
    format: WeightFormat,
) -> Result<QuantizeReport> {
    if !format.is_quantized() {
        return Err(Error::argument(
            "weight_format",
            format!("{} is not a block format (q8_0 or q4_0)", format.name()),
        ));
    }
    let config = LlavaConfig::load(model_dir)?;
    let checkpoint = Checkpoint::open(model_dir)?;
    let file = out_dir.join("model.safetensors");
    if file.exists() || out_dir.join("model.safetensors.index.json").exists() {
        return Err(file_error(
            out_dir,
            "already holds a checkpoint; choose an empty directory",
        ));
    }
    let mut report = QuantizeReport {
        file: file.clone(),
        format,
        quantized: 0,
        kept: Vec::new(),
        bytes_before: 0,
        bytes_after: 0,
    };
    let mut targets = HashMap::new();
    for canonical in quantizable(&config) {
        if checkpoint.contains_canonical(&canonical) {
            let t = checkpoint.get(&canonical)?;
            targets.insert(t.name.clone(), ());
        }
    }
    let mut tensors: BTreeMap<String, Out<'_>> = BTreeMap::new();
    let mut shapes: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for name in checkpoint.stored_names() {
        let t = checkpoint
            .stored(&name)
            .expect("stored_names lists stored tensors");
        let out = match (targets.contains_key(&name), &t.shape[..]) {
            (true, &[_, cols]) if cols.is_multiple_of(quant::BLOCK) => {
                let out = quantize_tensor(&t, format)?;
                report.quantized += 1;
                report.bytes_before += t.bytes.len() as u64;
                report.bytes_after += out.data.len() as u64;
                shapes.insert(name.clone(), t.shape.clone());
                out
            }
            (quantize, _) => {
                if quantize {
                    report.kept.push(name.clone());
                }
                Out {
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    data: Cow::Borrowed(t.bytes),
                }
            }
        };
        tensors.insert(name, out);
    }
    std::fs::create_dir_all(out_dir).map_err(|e| file_error(out_dir, e))?;
    copy_side_files(model_dir, out_dir)?;
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (FORMAT_KEY.to_string(), format.name().to_string()),
        (
            QUANTIZED_KEY.to_string(),
            serde_json::to_string(&shapes).expect("shapes serialise"),
        ),
    ]);
    safetensors::serialize_to_file(tensors.iter(), Some(metadata), &file)
        .map_err(|e| file_error(&file, format!("could not write: {e}")))?;
    Ok(report)
}

fn quantize_tensor<'a>(t: &RawTensor<'_>, format: WeightFormat) -> Result<Out<'a>> {
    let values = t.to_f32()?;
    let blocks = quant::quantize(format, &values)
        .map_err(|e| file_error(t.file, format!("tensor '{}': {e}", t.name)))?;
    let rows = t.shape[0];
    Ok(Out {
        dtype: Dtype::U8,
        shape: vec![rows, blocks.len() / rows],
        data: Cow::Owned(blocks),
    })
}

/// Copy every regular file that is not part of the checkpoint (config, tokenizer, processor,
/// chat template, generation config, README).
fn copy_side_files(model_dir: &Path, out_dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(model_dir).map_err(|e| file_error(model_dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| file_error(model_dir, e))?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let checkpoint_file =
            name.ends_with(".safetensors") || name == "model.safetensors.index.json";
        if path.is_file() && !checkpoint_file {
            std::fs::copy(&path, out_dir.join(&*name)).map_err(|e| file_error(&path, e))?;
        }
    }
    Ok(())
}
