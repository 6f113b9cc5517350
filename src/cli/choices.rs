//! The library's enums as clap values. Each mirror carries the `--help` text of its values and
//! converts into the library type; the tests check that both sides spell every value alike.

use llava_wgpu::gpu::device::BackendChoice;
use llava_wgpu::gpu::{DType, WeightFormat};
use llava_wgpu::model::gguf::writer::TextTypes;
use llava_wgpu::prune::{Method, Positions, Stage1Score};
use llava_wgpu::quant::Mix;
use llava_wgpu::text::Template;

/// `--prune`: [`Method`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MethodArg {
    /// Every visual token reaches the language model.
    None,
    /// Stage 1 in the vision encoder, stage 2 at decoder layer K.
    Star,
    /// Drop at decoder layer K by the last prompt row's attention (no stage 1).
    Fastv,
    /// Before the projector by the CLS attention row.
    Fastervlm,
    /// Before the projector: important tokens by CLS attention plus diverse ones by similarity.
    Vispruner,
    /// Before the projector, uniformly at random with a seed.
    Random,
    /// At decoder layer K (default 2): pivots by key norm, then the tokens least similar to
    /// them.
    Dart,
    /// Before the first decoder layer: max-min diversity of the projected image features.
    Divprune,
}

impl From<MethodArg> for Method {
    fn from(arg: MethodArg) -> Self {
        match arg {
            MethodArg::None => Method::None,
            MethodArg::Star => Method::Star,
            MethodArg::Fastv => Method::Fastv,
            MethodArg::Fastervlm => Method::Fastervlm,
            MethodArg::Vispruner => Method::Vispruner,
            MethodArg::Random => Method::Random,
            MethodArg::Dart => Method::Dart,
            MethodArg::Divprune => Method::Divprune,
        }
    }
}

/// `--positions`: [`Positions`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PositionsArg {
    /// Kept image tokens keep their patch's RoPE position; the text after continues unpruned.
    Original,
    /// Kept image tokens are renumbered one after another.
    Contiguous,
}

impl From<PositionsArg> for Positions {
    fn from(arg: PositionsArg) -> Self {
        match arg {
            PositionsArg::Original => Positions::Original,
            PositionsArg::Contiguous => Positions::Contiguous,
        }
    }
}

/// `--stage1-score`: [`Stage1Score`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage1ScoreArg {
    /// Attention each patch receives, averaged over heads and all queries.
    Attention,
    /// The CLS query row only (FasterVLM).
    Cls,
}

impl From<Stage1ScoreArg> for Stage1Score {
    fn from(arg: Stage1ScoreArg) -> Self {
        match arg {
            Stage1ScoreArg::Attention => Stage1Score::Attention,
            Stage1ScoreArg::Cls => Stage1Score::Cls,
        }
    }
}

/// `--template`: [`Template`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TemplateArg {
    /// `USER: <image>\n{prompt} ASSISTANT:` (the llava-hf model cards and chat template).
    LlavaHf,
    /// The original LLaVA-1.5 `vicuna_v1` format: the system sentence, then the llava-hf turn
    /// (also llava-v1.6-vicuna's prompt).
    VicunaV1,
    /// `[INST] <image>\n{prompt} [/INST]` (llava-v1.6-mistral).
    MistralInst,
    /// The prompt exactly as given (it must contain `<image>` itself).
    Raw,
}

impl From<TemplateArg> for Template {
    fn from(arg: TemplateArg) -> Self {
        match arg {
            TemplateArg::LlavaHf => Template::LlavaHf,
            TemplateArg::VicunaV1 => Template::VicunaV1,
            TemplateArg::MistralInst => Template::MistralInst,
            TemplateArg::Raw => Template::Raw,
        }
    }
}

/// `--backend`: [`BackendChoice`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    Vulkan,
    Metal,
    Dx12,
    Gl,
}

impl From<BackendArg> for BackendChoice {
    fn from(arg: BackendArg) -> Self {
        match arg {
            BackendArg::Vulkan => BackendChoice::Vulkan,
            BackendArg::Metal => BackendChoice::Metal,
            BackendArg::Dx12 => BackendChoice::Dx12,
            BackendArg::Gl => BackendChoice::Gl,
        }
    }
}

/// `--weights` and `--vision-weights`: a [`Mix`] of the formats the engine can convert or
/// quantize float weights to (the vision tower takes a single format, not the mix).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightsArg {
    F16,
    F32,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q5_0")]
    Q5_0,
    #[value(name = "q4_k")]
    Q4K,
    #[value(name = "q5_k")]
    Q5K,
    #[value(name = "q6_k")]
    Q6K,
    /// llama-quantize's Q4_K_M: Q4_K, with Q6_K for the output and for attn_v and ffn_down
    /// in half the layers.
    #[value(name = "q4_k_m")]
    Q4KM,
}

impl From<WeightsArg> for Mix {
    fn from(arg: WeightsArg) -> Self {
        Mix::Uniform(match arg {
            WeightsArg::F16 => WeightFormat::F16,
            WeightsArg::F32 => WeightFormat::F32,
            WeightsArg::Bf16 => WeightFormat::BF16,
            WeightsArg::Q8_0 => WeightFormat::Q8_0,
            WeightsArg::Q4_0 => WeightFormat::Q4_0,
            WeightsArg::Q5_0 => WeightFormat::Q5_0,
            WeightsArg::Q4K => WeightFormat::Q4_K,
            WeightsArg::Q5K => WeightFormat::Q5_K,
            WeightsArg::Q6K => WeightFormat::Q6_K,
            WeightsArg::Q4KM => return Mix::Q4KM,
        })
    }
}

/// `quantize --weights`: the types a checkpoint can be written in ([`TextTypes`]; a safetensors
/// checkpoint takes the block formats q8_0 and q4_0 only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantizedArg {
    /// GGUF only: f16 matrices (convert_hf_to_gguf.py --outtype f16).
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    /// GGUF only: llama-quantize's Q4_K_M.
    #[value(name = "q4_k_m")]
    Q4KM,
}

impl From<QuantizedArg> for TextTypes {
    fn from(arg: QuantizedArg) -> Self {
        match arg {
            QuantizedArg::F16 => TextTypes::F16,
            QuantizedArg::Q8_0 => TextTypes::Q8_0,
            QuantizedArg::Q4_0 => TextTypes::Q4_0,
            QuantizedArg::Q4KM => TextTypes::Q4KM,
        }
    }
}

/// `quantize --format`: what file to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FileFormatArg {
    /// A llava-hf directory with the language model's matrices as ggml blocks in safetensors.
    Safetensors,
    /// A llama.cpp GGUF pair: a text model and an mmproj.
    Gguf,
}

/// `--kv`: the KV cache's element type ([`DType`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KvArg {
    /// IEEE halves, two per word: half the bytes (default where the adapter has SHADER_F16).
    F16,
    /// Full precision (default otherwise).
    F32,
}

impl From<KvArg> for DType {
    fn from(arg: KvArg) -> Self {
        match arg {
            KvArg::F16 => DType::F16,
            KvArg::F32 => DType::F32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    /// The name clap accepts for `arg` must parse to the library value it converts into.
    fn same_names<A, T>()
    where
        A: ValueEnum + Copy + Into<T>,
        T: std::str::FromStr + PartialEq + std::fmt::Debug,
        T::Err: std::fmt::Debug,
    {
        for arg in A::value_variants() {
            let name = arg.to_possible_value().unwrap().get_name().to_string();
            assert_eq!(name.parse::<T>().unwrap(), (*arg).into(), "{name}");
        }
    }

    #[test]
    fn every_cli_value_names_its_library_value() {
        same_names::<MethodArg, Method>();
        same_names::<Stage1ScoreArg, Stage1Score>();
        same_names::<PositionsArg, Positions>();
        same_names::<TemplateArg, Template>();
        same_names::<BackendArg, BackendChoice>();
        for arg in QuantizedArg::value_variants() {
            let name = arg.to_possible_value().unwrap().get_name().to_string();
            assert_eq!(TextTypes::from(*arg).name(), name);
        }
        for arg in WeightsArg::value_variants() {
            let name = arg.to_possible_value().unwrap().get_name().to_string();
            assert_eq!(Mix::from_name(&name), Some((*arg).into()), "{name}");
        }
        // Every format a quantizer writes, the floats, and the Q4_K_M mix.
        assert_eq!(
            WeightsArg::value_variants().len(),
            llava_wgpu::quant::QUANTIZERS.len() + 3 + 1
        );
        assert_eq!(MethodArg::value_variants().len(), Method::ALL.len());
        assert_eq!(
            Stage1ScoreArg::value_variants().len(),
            Stage1Score::ALL.len()
        );
        assert_eq!(TemplateArg::value_variants().len(), Template::ALL.len());
    }
}
