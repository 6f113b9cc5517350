//! llama-quantize's choice of a type per tensor for its Q4_K_M file type, for a LLaMA decoder
//! (`llama_tensor_get_type_impl` and `tensor_type_fallback` in llama.cpp's src/llama-quant.cpp;
//! docs/gguf.md cites the lines): most matrices Q4_K; the output projection Q6_K; `attn_v` and
//! `ffn_down` Q6_K in the layers `use_more_bits` picks; a row length that is not whole blocks
//! falls back (Q4_K → Q5_0, Q6_K → Q8_0, then f16).

use crate::gpu::WeightFormat;

/// What a decoder matrix is, as far as the choice of its type goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorRole {
    /// `token_embd` (`embed_tokens`).
    TokenEmbedding,
    /// `output` (`lm_head`).
    Output,
    /// `blk.i.attn_v` (`v_proj`) of decoder layer `i`.
    AttentionValue(usize),
    /// `blk.i.ffn_down` (`down_proj`) of decoder layer `i`.
    FeedForwardDown(usize),
    /// Any other matrix of the decoder.
    Other,
}

/// A choice of weight formats over a model's matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mix {
    /// Every matrix in one format (rows that are not whole blocks stay f16).
    Uniform(WeightFormat),
    /// llama-quantize's Q4_K_M.
    Q4KM,
}

impl From<WeightFormat> for Mix {
    fn from(format: WeightFormat) -> Self {
        Mix::Uniform(format)
    }
}

impl Mix {
    /// The name used on the command line: a format's name, or `q4_k_m`.
    pub fn name(self) -> &'static str {
        match self {
            Mix::Uniform(format) => format.name(),
            Mix::Q4KM => "q4_k_m",
        }
    }

    /// The mix called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        if name.eq_ignore_ascii_case("q4_k_m") {
            return Some(Mix::Q4KM);
        }
        WeightFormat::from_name(name).map(Mix::Uniform)
    }

    /// Whether any matrix is stored in blocks.
    pub fn is_quantized(self) -> bool {
        match self {
            Mix::Uniform(format) => format.is_quantized(),
            Mix::Q4KM => true,
        }
    }

    /// The format of a decoder matrix with rows of `cols` values in a model of `layers` decoder
    /// layers, after the fallback for rows that are not whole blocks.
    pub fn format_for(self, role: TensorRole, layers: usize, cols: usize) -> WeightFormat {
        let wanted = match self {
            Mix::Uniform(format) => format,
            Mix::Q4KM => q4_k_m(role, layers, cols),
        };
        fallback(wanted, cols)
    }
}

/// llama-quantize's `use_more_bits`: the first and last eighth of the layers, and every third
/// layer between.
fn use_more_bits(layer: usize, layers: usize) -> bool {
    let (i, n) = (layer as i64, layers as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

fn q4_k_m(role: TensorRole, layers: usize, cols: usize) -> WeightFormat {
    match role {
        // The output's own rule runs before the fallback: rows that are not whole super-blocks
        // make it Q8_0.
        TensorRole::Output if !cols.is_multiple_of(WeightFormat::Q6_K.block_weights()) => {
            WeightFormat::Q8_0
        }
        TensorRole::Output => WeightFormat::Q6_K,
        TensorRole::AttentionValue(i) | TensorRole::FeedForwardDown(i)
            if use_more_bits(i, layers) =>
        {
            WeightFormat::Q6_K
        }
        _ => WeightFormat::Q4_K,
    }
}

/// `tensor_type_fallback`: a format whose blocks do not divide the row, replaced by one whose
/// blocks do, or f16.
fn fallback(format: WeightFormat, cols: usize) -> WeightFormat {
    if cols.is_multiple_of(format.block_weights()) {
        return format;
    }
    let smaller = match format {
        WeightFormat::Q2_K | WeightFormat::Q3_K => WeightFormat::Q4_0,
        WeightFormat::Q4_K => WeightFormat::Q5_0,
        WeightFormat::Q5_K => WeightFormat::Q5_1,
        WeightFormat::Q6_K => WeightFormat::Q8_0,
        other => other,
    };
    if cols.is_multiple_of(smaller.block_weights()) {
        smaller
    } else {
        WeightFormat::F16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 32 layers (LLaMA-7B): the layers llama-quantize gives more bits, by its formula.
    #[test]
    fn more_bits_in_the_first_and_last_eighth_and_every_third_layer() {
        let picked: Vec<usize> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(
            picked,
            [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
    }

    #[test]
    fn q4_k_m_chooses_per_role_and_falls_back_by_row_length() {
        let m = Mix::Q4KM;
        assert_eq!(
            m.format_for(TensorRole::Output, 32, 4096),
            WeightFormat::Q6_K
        );
        assert_eq!(
            m.format_for(TensorRole::Output, 32, 4000),
            WeightFormat::Q8_0
        );
        assert_eq!(
            m.format_for(TensorRole::AttentionValue(0), 32, 4096),
            WeightFormat::Q6_K
        );
        assert_eq!(
            m.format_for(TensorRole::AttentionValue(4), 32, 4096),
            WeightFormat::Q4_K
        );
        assert_eq!(
            m.format_for(TensorRole::FeedForwardDown(6), 32, 11008),
            WeightFormat::Q6_K
        );
        assert_eq!(
            m.format_for(TensorRole::Other, 32, 4096),
            WeightFormat::Q4_K
        );
        assert_eq!(m.format_for(TensorRole::Other, 4, 704), WeightFormat::Q5_0);
        assert_eq!(
            m.format_for(TensorRole::FeedForwardDown(3), 4, 704),
            WeightFormat::Q8_0
        );
        assert_eq!(
            m.format_for(TensorRole::FeedForwardDown(0), 4, 704),
            WeightFormat::Q5_0
        );
        assert_eq!(m.format_for(TensorRole::Other, 4, 150), WeightFormat::F16);
        assert_eq!(
            Mix::Uniform(WeightFormat::Q4_0).format_for(TensorRole::Other, 4, 150),
            WeightFormat::F16
        );
    }
}
