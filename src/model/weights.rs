//! Checkpoint tensors: `model.safetensors`, or `model.safetensors.index.json` with shards, memory
//! mapped; f32/f16/bf16 converted with `half`; both llava-hf key layouts; or a GGUF pair
//! (`gguf/`), whose names map onto the same canonical names.
//!
//! Tensors are requested by a canonical name (`vision.encoder.layers.0.mlp.fc1.weight`,
//! `projector.linear_1.weight`, `text.layers.0.self_attn.q_proj.weight`, `lm_head.weight`) and
//! resolved against every prefix a llava-hf file may use: hub files have
//! `vision_tower.vision_model.*` and `language_model.model.*`, transformers 5.x writes
//! `model.vision_tower.*` / `model.language_model.*` / `lm_head.*`, and a freshly built model can
//! drop `vision_model.`.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::bf16;
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;

use crate::error::{Error, Result};
use crate::gpu::WeightFormat;
use crate::model::gguf::GgufPair;
use crate::model::stored::StoredTensor;
use crate::quant;

/// Safetensors metadata key holding a quantized checkpoint's weight format ("q4_0"), written by
/// `llava-wgpu quantize`.
pub const FORMAT_KEY: &str = "llava_wgpu.weights";
/// Safetensors metadata key holding, as a JSON object, the `[rows, cols]` shape of every tensor
/// stored as ggml blocks (its safetensors entry is a U8 `[rows, bytes per row]` array).
pub const QUANTIZED_KEY: &str = "llava_wgpu.quantized";

struct Shard {
    path: PathBuf,
    map: Mmap,
    header_len: usize,
    metadata: Metadata,
    /// On-disk tensor name → (block format, logical `[rows, cols]`) for quantized tensors.
    quantized: HashMap<String, (WeightFormat, Vec<usize>)>,
}

/// A tensor's dtype, shape and raw little-endian bytes inside a mapped shard.
pub struct RawTensor<'a> {
    pub name: String,
    pub file: &'a Path,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
    /// Block format and logical `[rows, cols]` shape if the tensor holds ggml blocks.
    pub quantized: Option<(WeightFormat, Vec<usize>)>,
}

/// Every tensor of a checkpoint directory, memory mapped; or a synthetic checkpoint whose
/// tensors are generated on demand (benchmarks of LLaVA-shaped models without a download).
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name → shard index.
    index: HashMap<String, usize>,
    /// Canonical name → shape, for synthetic checkpoints (empty for files).
    synthetic: HashMap<String, Vec<usize>>,
    /// A GGUF text + mmproj pair (no shards then).
    gguf: Option<Box<GgufPair>>,
}

/// Deterministic values for a synthetic tensor: norm weights 1, biases 0, everything else
/// uniform with standard deviation 0.02 (transformers' initialiser range), from a seed per name.
fn synthetic_values(name: &str, shape: &[usize], first_row: usize, rows: usize) -> Vec<f32> {
    let width: usize = shape[1..].iter().product::<usize>().max(1);
    let n = if shape.len() == 1 {
        shape[0]
    } else {
        rows * width
    };
    let is_vector = shape.len() == 1;
    if is_vector && name.ends_with(".bias") {
        return vec![0.0; n];
    }
    if is_vector && name.ends_with(".weight") {
        return vec![1.0; n];
    }
    // splitmix64 per row, so any row can be generated alone (embedding lookups).
    let name_hash = name.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    let scale = 0.02 * 3f32.sqrt();
    let mut out = Vec::with_capacity(n);
    let row_count = if is_vector { 1 } else { rows };
    let row_width = if is_vector { n } else { width };
    for r in 0..row_count {
        let mut state = name_hash ^ ((first_row + r) as u64).wrapping_mul(0x9E3779B97F4A7C15);
        for _ in 0..row_width {
            state = state.wrapping_add(0x9E3779B97F4A7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            z ^= z >> 31;
            let unit = (z >> 40) as f32 / (1u64 << 24) as f32;
            out.push((unit * 2.0 - 1.0) * scale);
        }
    }
    out
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = File::open(path).map_err(|e| file_error(path, e))?;
    // SAFETY: the mapping is read-only; a file truncated by another process while mapped is the
    // same hazard every mmap-based model loader (transformers included) accepts.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| file_error(path, e))?;
    let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
        file_error(
            path,
            format!("not a valid safetensors file (truncated, or its header disagrees with its size): {e}"),
        )
    })?;
    let quantized = quantized_tensors(path, &metadata)?;
    Ok(Shard {
        path: path.to_path_buf(),
        map,
        header_len,
        metadata,
        quantized,
    })
}

/// The quantized tensors a shard's metadata lists (see [`FORMAT_KEY`], [`QUANTIZED_KEY`]).
fn quantized_tensors(
    path: &Path,
    metadata: &Metadata,
) -> Result<HashMap<String, (WeightFormat, Vec<usize>)>> {
    let Some(meta) = metadata.metadata() else {
        return Ok(HashMap::new());
    };
    let Some(shapes) = meta.get(QUANTIZED_KEY) else {
        return Ok(HashMap::new());
    };
    let name = meta.get(FORMAT_KEY).map(String::as_str).unwrap_or("");
    let format = WeightFormat::from_name(name)
        .filter(|f| f.is_quantized())
        .ok_or_else(|| {
            file_error(
                path,
                format!("metadata '{FORMAT_KEY}' is '{name}', expected q8_0 or q4_0"),
            )
        })?;
    let shapes: HashMap<String, Vec<usize>> = serde_json::from_str(shapes).map_err(|e| {
        file_error(
            path,
            format!("metadata '{QUANTIZED_KEY}' is not an object of [rows, cols] shapes: {e}"),
        )
    })?;
    Ok(shapes
        .into_iter()
        .map(|(tensor, shape)| (tensor, (format, shape)))
        .collect())
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| file_error(&index_path, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| file_error(&index_path, format!("not valid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| file_error(&index_path, "no `weight_map` object"))?;
            let mut shard_of_file: HashMap<String, usize> = HashMap::new();
            let mut files: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
            files.sort_unstable();
            files.dedup();
            for name in files {
                if name.contains('/') || name.contains('\\') || name.contains("..") {
                    return Err(file_error(
                        &index_path,
                        format!("shard name '{name}' is not a plain file name"),
                    ));
                }
                shard_of_file.insert(name.to_string(), shards.len());
                shards.push(open_shard(&dir.join(name))?);
            }
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    file_error(
                        &index_path,
                        format!("entry for '{tensor}' is not a file name"),
                    )
                })?;
                let shard = shard_of_file[file];
                if shards[shard].metadata.info(tensor).is_none() {
                    return Err(file_error(
                        &shards[shard].path,
                        format!("the index says tensor '{tensor}' is here, but it is not"),
                    ));
                }
                index.insert(tensor.clone(), shard);
            }
        } else if single.exists() {
            let shard = open_shard(&single)?;
            for name in shard.metadata.tensors().keys() {
                index.insert(name.clone(), 0);
            }
            shards.push(shard);
        } else {
            return Err(file_error(
                dir,
                "neither model.safetensors nor model.safetensors.index.json is here",
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            index,
            synthetic: HashMap::new(),
            gguf: None,
        })
    }

    /// The tensors of a GGUF pair, named `label` in messages.
    pub fn from_gguf(label: &Path, pair: GgufPair) -> Self {
        Self {
            dir: label.to_path_buf(),
            shards: Vec::new(),
            index: HashMap::new(),
            synthetic: HashMap::new(),
            gguf: Some(Box::new(pair)),
        }
    }

    /// The block format a `quantize`d checkpoint stores its matrices in (its metadata's
    /// [`FORMAT_KEY`]), if it is one.
    pub fn stored_block_format(&self) -> Option<WeightFormat> {
        self.shards
            .iter()
            .flat_map(|s| s.quantized.values())
            .map(|(format, _)| *format)
            .next()
    }

    /// The GGUF pair this checkpoint reads, if it is one.
    pub fn gguf(&self) -> Option<&GgufPair> {
        self.gguf.as_deref()
    }

    /// A checkpoint whose tensors (canonical names → shapes) are generated on demand.
    pub fn synthetic(label: &str, shapes: HashMap<String, Vec<usize>>) -> Self {
        Self {
            dir: PathBuf::from(label),
            shards: Vec::new(),
            index: HashMap::new(),
            synthetic: shapes,
            gguf: None,
        }
    }

    fn synthetic_shape(&self, canonical: &str, shape: &[usize]) -> Option<Result<()>> {
        let known = self.synthetic.get(canonical)?;
        Some(if known == shape {
            Ok(())
        } else {
            Err(file_error(
                &self.dir,
                format!("synthetic tensor '{canonical}' has shape {known:?}, expected {shape:?}"),
            ))
        })
    }

    /// Rows `ids` of the embedding matrix `canonical` [rows, width], as f32.
    pub fn embedding_rows(&self, canonical: &str, ids: &[u32]) -> Result<Vec<f32>> {
        if let Some(shape) = self.synthetic.get(canonical) {
            let mut out = Vec::with_capacity(ids.len() * shape[1]);
            for &id in ids {
                if id as usize >= shape[0] {
                    return Err(file_error(
                        &self.dir,
                        format!("token id {id} is outside '{canonical}'"),
                    ));
                }
                out.extend(synthetic_values(canonical, shape, id as usize, 1));
            }
            return Ok(out);
        }
        self.tensor(canonical)?.rows_f32(ids)
    }

    /// Check that the embedding matrix `canonical` is `[rows, width]`. Its rows are read on the
    /// host ([`Self::embedding_rows`]), where no kernel launcher checks a shape, so a wrong width
    /// would otherwise surface as misaligned rows or a slice out of bounds mid-request.
    pub fn check_embedding_width(&self, canonical: &str, width: usize) -> Result<()> {
        let (shape, file, name) = match self.synthetic.get(canonical) {
            Some(shape) => (shape.clone(), self.dir.clone(), canonical.to_string()),
            None => {
                let t = self.tensor(canonical)?;
                (t.shape.clone(), t.file.to_path_buf(), t.name.clone())
            }
        };
        match shape[..] {
            [_, w] if w == width => Ok(()),
            _ => Err(file_error(
                &file,
                format!(
                    "tensor '{name}' has shape {shape:?}: expected rows of hidden_size = {width} \
                     values, found {}",
                    shape.last().map_or("none".into(), |w| w.to_string())
                ),
            )),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a tensor is stored under exactly `name` (a synthetic one under its canonical
    /// name; a GGUF pair's under its canonical name too).
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
            || self.synthetic.contains_key(name)
            || self.gguf.as_ref().is_some_and(|g| g.contains(name))
    }

    /// The on-disk names a canonical name may have.
    pub fn aliases(canonical: &str) -> Vec<String> {
        let with =
            |prefixes: &[&str], rest: &str| prefixes.iter().map(|p| format!("{p}{rest}")).collect();
        if let Some(rest) = canonical.strip_prefix("vision.") {
            with(
                &[
                    "vision_tower.vision_model.",
                    "vision_tower.",
                    "model.vision_tower.vision_model.",
                    "model.vision_tower.",
                ],
                rest,
            )
        } else if let Some(rest) = canonical.strip_prefix("projector.") {
            with(
                &["multi_modal_projector.", "model.multi_modal_projector."],
                rest,
            )
        } else if let Some(rest) = canonical.strip_prefix("text.") {
            with(
                &[
                    "language_model.model.",
                    "model.language_model.",
                    "language_model.",
                ],
                rest,
            )
        } else if canonical == "image_newline" {
            with(&["", "model."], "image_newline")
        } else if canonical == "lm_head.weight" {
            with(&["language_model.lm_head.", "lm_head."], "weight")
        } else {
            vec![canonical.to_string()]
        }
    }

    /// Whether a tensor exists under any alias of the canonical name `canonical`.
    pub fn contains_canonical(&self, canonical: &str) -> bool {
        if let Some(gguf) = &self.gguf {
            return gguf.contains(canonical);
        }
        Self::aliases(canonical)
            .iter()
            .any(|n| self.index.contains_key(n))
    }

    /// Every tensor name stored in the checkpoint's files, sorted (empty for synthetic ones).
    pub fn stored_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.index.keys().cloned().collect();
        names.sort_unstable();
        names
    }

    /// The tensor stored under exactly `name` in the files.
    pub fn stored(&self, name: &str) -> Option<RawTensor<'_>> {
        let shard = &self.shards[*self.index.get(name)?];
        let info = shard.metadata.info(name)?;
        let start = shard.header_len + 8 + info.data_offsets.0;
        let end = shard.header_len + 8 + info.data_offsets.1;
        Some(RawTensor {
            name: name.to_string(),
            file: &shard.path,
            dtype: info.dtype,
            shape: info.shape.clone(),
            bytes: &shard.map[start..end],
            quantized: shard.quantized.get(name).cloned(),
        })
    }

    /// Find a tensor by canonical name under any of its aliases.
    pub fn get(&self, canonical: &str) -> Result<RawTensor<'_>> {
        let names = Self::aliases(canonical);
        if let Some(t) = names.iter().find_map(|name| self.stored(name)) {
            return Ok(t);
        }
        Err(file_error(
            &self.dir,
            format!(
                "tensor '{}' is missing (looked for {})",
                names[0],
                names.join(", ")
            ),
        ))
    }

    /// Check that a tensor exists with the expected shape, reading no values (the `memory`
    /// command allocates weights without uploading them).
    pub fn check(&self, canonical: &str, shape: &[usize]) -> Result<()> {
        if let Some(check) = self.synthetic_shape(canonical, shape) {
            return check;
        }
        self.tensor(canonical)?.check_shape(shape)
    }

    /// The tensor `canonical` as stored, in torch's dimension order: any source, any format
    /// (a synthetic tensor is generated as f32).
    pub fn tensor(&self, canonical: &str) -> Result<StoredTensor<'_>> {
        if let Some(shape) = self.synthetic.get(canonical) {
            let values = synthetic_values(canonical, shape, 0, shape[0]);
            return Ok(StoredTensor {
                name: canonical.to_string(),
                file: &self.dir,
                shape: shape.clone(),
                format: WeightFormat::F32,
                bytes: bytemuck::cast_slice(&values).to_vec().into(),
            });
        }
        if let Some(gguf) = &self.gguf {
            return gguf.tensor(canonical);
        }
        self.get(canonical)?.stored()
    }

    /// A tensor as f32 values, checked against the expected shape.
    pub fn f32(&self, canonical: &str, shape: &[usize]) -> Result<Vec<f32>> {
        if let Some(check) = self.synthetic_shape(canonical, shape) {
            check?;
            return Ok(synthetic_values(canonical, shape, 0, shape[0]));
        }
        let t = self.tensor(canonical)?;
        t.check_shape(shape)?;
        t.to_f32()
    }
}

impl Checkpoint {
    /// The matrix `canonical` of shape `[rows, cols]` as the bytes of `format` (float elements,
    /// or ggml blocks): the stored bytes when they are in `format` already (a GGUF or quantized
    /// checkpoint's blocks are never requantized), float values converted or quantized
    /// otherwise. Blocks stored in another format than `format` are an error naming both.
    pub fn matrix(
        &self,
        canonical: &str,
        shape: &[usize],
        format: WeightFormat,
    ) -> Result<std::borrow::Cow<'_, [u8]>> {
        let t = self.tensor(canonical)?;
        t.check_shape(shape)?;
        if t.format == format {
            return Ok(t.bytes);
        }
        if t.format.is_quantized() {
            return Err(file_error(
                t.file,
                format!(
                    "tensor '{}' is stored as {} blocks; load the checkpoint with \
                     weight_format = {} (or a GGUF file as it is stored)",
                    t.name,
                    t.format.name(),
                    t.format.name()
                ),
            ));
        }
        let values = t.to_f32()?;
        let bytes = match format {
            WeightFormat::F32 => bytemuck::cast_slice(&values).to_vec(),
            WeightFormat::F16 => bytemuck::cast_slice(&t.to_f16()?).to_vec(),
            WeightFormat::BF16 => values
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
            block => quant::quantize(block, &values)
                .map_err(|e| file_error(t.file, format!("tensor '{}': {e}", t.name)))?,
        };
        Ok(bytes.into())
    }

    /// The format `canonical` is stored in, read without its values (synthetic tensors are
    /// f32).
    pub fn stored_format(&self, canonical: &str) -> Result<WeightFormat> {
        if self.synthetic.contains_key(canonical) {
            // A synthetic checkpoint stands for llava-hf's files, which store f16.
            return Ok(WeightFormat::F16);
        }
        Ok(self.tensor(canonical)?.format)
    }
}

impl<'a> RawTensor<'a> {
    /// The tensor as [`StoredTensor`]: f32, f16 and bf16 as they are; ggml blocks (a
    /// `quantize`d checkpoint's U8 tensors) with their logical shape, checked against their
    /// byte count.
    pub fn stored(self) -> Result<StoredTensor<'a>> {
        let (format, shape) = match (&self.quantized, self.dtype) {
            (Some((format, logical)), _) => (*format, logical.clone()),
            (None, Dtype::F32) => (WeightFormat::F32, self.shape.clone()),
            (None, Dtype::F16) => (WeightFormat::F16, self.shape.clone()),
            (None, Dtype::BF16) => (WeightFormat::BF16, self.shape.clone()),
            (None, other) => {
                return Err(file_error(
                    self.file,
                    format!(
                        "tensor '{}' has dtype {other:?}; only F32, F16 and BF16 are supported",
                        self.name
                    ),
                ))
            }
        };
        if let Some(block_bytes) = format.block_bytes() {
            let block = format.block_weights();
            let count = shape.iter().product::<usize>() / block;
            let cols = shape.last().copied().unwrap_or(0);
            if !cols.is_multiple_of(block)
                || self.dtype != Dtype::U8
                || self.bytes.len() != count * block_bytes
            {
                return Err(file_error(
                    self.file,
                    format!(
                        "tensor '{}' ({} bytes of {:?}) does not hold the {count} {} blocks of \
                         {block_bytes} bytes its shape {shape:?} needs",
                        self.name,
                        self.bytes.len(),
                        self.dtype,
                        format.name()
                    ),
                ));
            }
        }
        Ok(StoredTensor {
            name: self.name,
            file: self.file,
            shape,
            format,
            bytes: self.bytes.into(),
        })
    }

    /// The tensor's values as f32 (float dtypes only).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        if let Some((format, _)) = &self.quantized {
            return Err(file_error(
                self.file,
                format!(
                    "tensor '{}' is stored as {} blocks",
                    self.name,
                    format.name()
                ),
            ));
        }
        let stored = RawTensor {
            name: self.name.clone(),
            file: self.file,
            dtype: self.dtype,
            shape: self.shape.clone(),
            bytes: self.bytes,
            quantized: None,
        };
        stored.stored()?.to_f32()
    }
}
