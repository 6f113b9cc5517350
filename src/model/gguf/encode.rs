//! The GGUF container as this engine writes it (version 3, 32-byte alignment, as gguf-py
//! writes it), the text model's types as llama.cpp's tools choose them, and a checkpoint
//! tensor's bytes in a chosen type: what `writer_text` and `writer_vision` build files from.

use std::io::Write;
use std::path::Path;

use half::f16;

use crate::error::{Error, Result};
use crate::gpu::WeightFormat;
use crate::model::gguf::names::unpermuted_rows;
use crate::model::weights::Checkpoint;
use crate::quant::{self, Mix, TensorRole};

/// A metadata value to write.
#[derive(Clone, Debug, PartialEq)]
pub enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    F32s(Vec<f32>),
    I32s(Vec<i32>),
}

/// A GGUF file being assembled: metadata in order, tensors in order.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Meta)>,
    /// (name, torch-order shape, format, bytes)
    tensors: Vec<(String, Vec<usize>, WeightFormat, Vec<u8>)>,
}

/// ggml's GGUF_DEFAULT_ALIGNMENT, what gguf-py's converters write with.
const ALIGNMENT: usize = 32;

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl GgufWriter {
    pub fn meta(&mut self, key: &str, value: Meta) {
        self.metadata.push((key.to_string(), value));
    }

    /// The alignment of the data section and of every tensor: `general.alignment` if the
    /// metadata has it (a power of two), else 32.
    fn alignment(&self) -> usize {
        self.metadata
            .iter()
            .find_map(|(key, value)| match (key.as_str(), value) {
                ("general.alignment", Meta::U32(a)) if a.is_power_of_two() => Some(*a as usize),
                _ => None,
            })
            .unwrap_or(ALIGNMENT)
    }

    /// A tensor of torch-order `shape` holding `bytes` of `format`.
    pub fn tensor(&mut self, name: &str, shape: &[usize], format: WeightFormat, bytes: Vec<u8>) {
        self.tensors
            .push((name.to_string(), shape.to_vec(), format, bytes));
    }

    /// The file's bytes: header, metadata, tensor infos (dimensions reversed into ggml's
    /// order, offsets each aligned), padding, data. Version 3 (byte-identical to version 2 for
    /// little-endian files but for the number).
    pub fn bytes(&self) -> Vec<u8> {
        let alignment = self.alignment();
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut out, key);
            put_value(&mut out, value);
        }
        let mut offset = 0usize;
        for (name, shape, format, bytes) in &self.tensors {
            put_str(&mut out, name);
            out.extend((shape.len() as u32).to_le_bytes());
            for &d in shape.iter().rev() {
                out.extend((d as u64).to_le_bytes());
            }
            out.extend(format.ggml_type().to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset += bytes.len().next_multiple_of(alignment);
        }
        out.resize(out.len().next_multiple_of(alignment), 0);
        for (_, _, _, bytes) in &self.tensors {
            out.extend(bytes);
            out.resize(out.len().next_multiple_of(alignment), 0);
        }
        out
    }

    /// How many tensors of each format the file holds, in order of appearance.
    pub fn type_counts(&self) -> Vec<(WeightFormat, usize)> {
        let mut counts: Vec<(WeightFormat, usize)> = Vec::new();
        for (_, _, format, _) in &self.tensors {
            match counts.iter_mut().find(|(f, _)| f == format) {
                Some((_, n)) => *n += 1,
                None => counts.push((*format, 1)),
            }
        }
        counts
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let fail = |e: std::io::Error| Error::File {
            path: path.to_path_buf(),
            reason: format!("could not write: {e}"),
        };
        let mut file = std::fs::File::create(path).map_err(fail)?;
        file.write_all(&self.bytes()).map_err(fail)
    }
}

fn put_value(out: &mut Vec<u8>, value: &Meta) {
    let array = |out: &mut Vec<u8>, ty: u32, n: usize| {
        out.extend(9u32.to_le_bytes());
        out.extend(ty.to_le_bytes());
        out.extend((n as u64).to_le_bytes());
    };
    match value {
        Meta::U32(v) => {
            out.extend(4u32.to_le_bytes());
            out.extend(v.to_le_bytes());
        }
        Meta::F32(v) => {
            out.extend(6u32.to_le_bytes());
            out.extend(v.to_le_bytes());
        }
        Meta::Bool(v) => {
            out.extend(7u32.to_le_bytes());
            out.push(*v as u8);
        }
        Meta::Str(s) => {
            out.extend(8u32.to_le_bytes());
            put_str(out, s);
        }
        Meta::Strs(v) => {
            array(out, 8, v.len());
            v.iter().for_each(|s| put_str(out, s));
        }
        Meta::F32s(v) => {
            array(out, 6, v.len());
            v.iter().for_each(|x| out.extend(x.to_le_bytes()));
        }
        Meta::I32s(v) => {
            array(out, 5, v.len());
            v.iter().for_each(|x| out.extend(x.to_le_bytes()));
        }
    }
}

/// The text model's types, as the tool that makes such files chooses them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextTypes {
    /// `convert_hf_to_gguf.py --outtype f16`.
    F16,
    /// `convert_hf_to_gguf.py --outtype q8_0` (rows that are not whole blocks: F16).
    Q8_0,
    /// `llama-quantize … Q4_0` of the f16 file: Q4_0, the output Q6_K.
    Q4_0,
    /// `llama-quantize … Q4_K_M` of the f16 file ([`Mix::Q4KM`]).
    Q4KM,
}

impl TextTypes {
    pub fn name(self) -> &'static str {
        match self {
            TextTypes::F16 => "f16",
            TextTypes::Q8_0 => "q8_0",
            TextTypes::Q4_0 => "q4_0",
            TextTypes::Q4KM => "q4_k_m",
        }
    }

    /// llama.cpp's `general.file_type` (`llama_ftype`).
    pub(super) fn file_type(self) -> u32 {
        match self {
            TextTypes::F16 => 1,
            TextTypes::Q8_0 => 7,
            TextTypes::Q4_0 => 2,
            TextTypes::Q4KM => 15,
        }
    }

    /// Whether llama-quantize makes it, from the converter's f16 values.
    pub(super) fn quantizes_f16_values(self) -> bool {
        matches!(self, TextTypes::Q4_0 | TextTypes::Q4KM)
    }

    /// The type of a matrix with rows of `cols` values.
    pub(super) fn format(self, role: TensorRole, layers: usize, cols: usize) -> WeightFormat {
        let fits = |f: WeightFormat| cols.is_multiple_of(f.block_weights());
        match self {
            TextTypes::F16 => WeightFormat::F16,
            TextTypes::Q8_0 if fits(WeightFormat::Q8_0) => WeightFormat::Q8_0,
            TextTypes::Q8_0 => WeightFormat::F16,
            TextTypes::Q4_0 if role == TensorRole::Output => {
                Mix::Q4KM.format_for(TensorRole::Output, layers, cols)
            }
            TextTypes::Q4_0 => Mix::Uniform(WeightFormat::Q4_0).format_for(role, layers, cols),
            TextTypes::Q4KM => Mix::Q4KM.format_for(role, layers, cols),
        }
    }
}

/// `canonical` as the bytes of `format`: 1-D tensors and floats converted, blocks quantized
/// (from the f16-rounded values when `from_f16`, as llama-quantize reads the converter's f16
/// file), rows permuted as the converter's `permute` does over `heads` heads.
pub(super) fn tensor_bytes(
    checkpoint: &Checkpoint,
    canonical: &str,
    format: WeightFormat,
    from_f16: bool,
    permute_heads: Option<usize>,
) -> Result<(Vec<usize>, Vec<u8>)> {
    let stored = checkpoint.tensor(canonical)?;
    let shape = stored.shape.clone();
    let mut values = stored.to_f32()?;
    if let Some(heads) = permute_heads {
        values = permute(&values, &shape, heads).ok_or_else(|| {
            Error::shape(
                canonical,
                format!("{shape:?} does not split into {heads} heads"),
            )
        })?;
    }
    if from_f16 && format.is_quantized() {
        values = values.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
    }
    let bytes = match format {
        WeightFormat::F32 => bytemuck::cast_slice(&values).to_vec(),
        WeightFormat::F16 => values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        WeightFormat::BF16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        block => {
            quant::quantize(block, &values).map_err(|e| Error::shape(canonical, e.to_string()))?
        }
    };
    Ok((shape, bytes))
}

/// The converter's `permute`: HF row `h·hd + a·hd/2 + j` goes to row `h·hd + 2j + a`.
fn permute(values: &[f32], shape: &[usize], heads: usize) -> Option<Vec<f32>> {
    let rows = shape[0];
    let width = values.len() / rows.max(1);
    let read_from = unpermuted_rows(rows, heads)?;
    let mut out = vec![0f32; values.len()];
    for (hf, &stored) in read_from.iter().enumerate() {
        out[stored * width..(stored + 1) * width]
            .copy_from_slice(&values[hf * width..(hf + 1) * width]);
    }
    Some(out)
}
