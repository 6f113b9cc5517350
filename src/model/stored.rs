//! A checkpoint tensor as a file stores it, whatever the file: its shape in torch's order
//! (outermost first), its format (a float type, or ggml blocks), and its bytes, borrowed from
//! the memory-mapped file or, after a fix-up such as GGUF's Q/K row order, owned.

use std::borrow::Cow;
use std::path::Path;

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::gpu::WeightFormat;
use crate::quant;

pub struct StoredTensor<'a> {
    /// The name the file gives it.
    pub name: String,
    pub file: &'a Path,
    /// Torch's order: a linear weight is `[out, in]`, rows of `in` values.
    pub shape: Vec<usize>,
    pub format: WeightFormat,
    pub bytes: Cow<'a, [u8]>,
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// `bytes` of `format` as f32 values: floats converted exactly, blocks dequantized as ggml does.
pub fn values_f32(format: WeightFormat, bytes: &[u8]) -> Result<Vec<f32>> {
    Ok(match format {
        WeightFormat::F32 => bytemuck::pod_collect_to_vec(bytes),
        WeightFormat::F16 => bytemuck::pod_collect_to_vec::<u8, f16>(bytes)
            .iter()
            .map(|h| h.to_f32())
            .collect(),
        WeightFormat::BF16 => bytemuck::pod_collect_to_vec::<u8, bf16>(bytes)
            .iter()
            .map(|h| h.to_f32())
            .collect(),
        block => quant::dequantize(block, bytes)?,
    })
}

impl<'a> StoredTensor<'a> {
    pub fn check_shape(&self, shape: &[usize]) -> Result<()> {
        if self.shape != shape {
            return Err(file_error(
                self.file,
                format!(
                    "tensor '{}' has shape {:?}, expected {:?}",
                    self.name, self.shape, shape
                ),
            ));
        }
        Ok(())
    }

    /// Bytes of one row (the last dimension), in the stored format.
    pub fn row_bytes(&self) -> usize {
        self.format
            .row_bytes(self.shape.last().copied().unwrap_or(1))
    }

    /// Rows in the outermost-but-last dimensions.
    pub fn rows(&self) -> usize {
        self.shape[..self.shape.len().saturating_sub(1)]
            .iter()
            .product()
    }

    /// The whole tensor as f32.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        values_f32(self.format, &self.bytes)
            .map_err(|e| file_error(self.file, format!("tensor '{}': {e}", self.name)))
    }

    /// The whole tensor as IEEE halves (values outside f16's range are an error rather than a
    /// silent infinity).
    pub fn to_f16(&self) -> Result<Vec<f16>> {
        if self.format == WeightFormat::F16 {
            return Ok(bytemuck::pod_collect_to_vec(&self.bytes));
        }
        let values = self.to_f32()?;
        let mut out = Vec::with_capacity(values.len());
        for v in values {
            let h = f16::from_f32(v);
            if h.is_infinite() && v.is_finite() {
                return Err(file_error(
                    self.file,
                    format!(
                        "tensor '{}' holds {v}, outside the f16 range; load with f32 weights",
                        self.name
                    ),
                ));
            }
            out.push(h);
        }
        Ok(out)
    }

    /// Rows `ids` of a 2-D tensor as f32, converted one row at a time (an embedding lookup
    /// straight from the mapped file, in any stored format).
    pub fn rows_f32(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let [rows, width] = self.shape[..] else {
            return Err(file_error(
                self.file,
                format!("tensor '{}' is not a matrix", self.name),
            ));
        };
        let row_bytes = self.row_bytes();
        let mut out = Vec::with_capacity(ids.len() * width);
        for &id in ids {
            let id = id as usize;
            if id >= rows {
                return Err(file_error(
                    self.file,
                    format!("token id {id} is outside '{}' ({rows} rows)", self.name),
                ));
            }
            let row = &self.bytes[id * row_bytes..(id + 1) * row_bytes];
            out.extend(values_f32(self.format, row)?);
        }
        Ok(out)
    }

    /// The tensor with its rows (outermost dimension) in another order: row `i` of the result
    /// is stored row `order[i]`. Exact for every format, since ggml blocks never span rows.
    pub fn reorder_rows(self, order: &[usize]) -> Result<Self> {
        let row_bytes = self.row_bytes();
        let rows = self.rows();
        if order.len() != rows || order.iter().any(|&r| r >= rows) {
            return Err(file_error(
                self.file,
                format!(
                    "tensor '{}' of shape {:?} cannot be reordered over {} rows",
                    self.name,
                    self.shape,
                    order.len()
                ),
            ));
        }
        let mut bytes = Vec::with_capacity(self.bytes.len());
        for &r in order {
            bytes.extend_from_slice(&self.bytes[r * row_bytes..(r + 1) * row_bytes]);
        }
        Ok(Self {
            bytes: Cow::Owned(bytes),
            ..self
        })
    }
}
