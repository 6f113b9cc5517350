//! The host quantizers and dequantizers against ggml's: bytes recorded from `gguf.quants` by
//! scripts/quant_fixture.py (Q8_0, Q4_0) and from ggml's own C code by
//! scripts/ggml_reference.sh (every block type; with gguf-py's and ggml's dequantization of
//! the same blocks) must match exactly.

use llava_wgpu::gpu::WeightFormat;
use llava_wgpu::quant;
use safetensors::SafeTensors;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixture/quant_blocks.safetensors"
);

fn tensor(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<u8>) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e:?}"));
    (t.shape().to_vec(), t.data().to_vec())
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(bytes)
}

fn formats() -> [(WeightFormat, &'static str); 2] {
    [(WeightFormat::Q8_0, "q8_0"), (WeightFormat::Q4_0, "q4_0")]
}

#[test]
fn quantization_matches_gguf_byte_for_byte() {
    let data = std::fs::read(FIXTURE).unwrap();
    let st = SafeTensors::deserialize(&data).unwrap();
    let (shape, input) = tensor(&st, "input");
    let input = f32s(&input);
    let k = shape[1];
    for (format, name) in formats() {
        let (_, want) = tensor(&st, name);
        let row_bytes = want.len() / shape[0];
        for (r, row) in input.chunks_exact(k).enumerate() {
            let got = quant::quantize(format, row).unwrap();
            let expected = &want[r * row_bytes..(r + 1) * row_bytes];
            if got != expected {
                let block = format.block_bytes().unwrap();
                let at = got.iter().zip(expected).position(|(a, b)| a != b).unwrap();
                panic!(
                    "{name} row {r}: block {} byte {} differs: got {:?}, gguf {:?}\nrow {:?}",
                    at / block,
                    at % block,
                    &got[at / block * block..][..block],
                    &expected[at / block * block..][..block],
                    &row[at / block * 32..][..32]
                );
            }
        }
        // All rows at once give the same bytes as row by row.
        assert_eq!(quant::quantize(format, &input).unwrap(), want, "{name}");
    }
}

#[test]
fn dequantization_matches_gguf() {
    let data = std::fs::read(FIXTURE).unwrap();
    let st = SafeTensors::deserialize(&data).unwrap();
    for (format, name) in formats() {
        let (_, blocks) = tensor(&st, name);
        let (_, want) = tensor(&st, &format!("{name}_deq"));
        let want = f32s(&want);
        let got = quant::dequantize(format, &blocks).unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // Bit-equal, NaN included (the fixture's f16-overflow block has inf · 0).
            assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                "{name} element {i}: {g} vs gguf {w}"
            );
        }
    }
}

const GGML_FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixture/ggml_blocks.safetensors"
);

fn assert_bit_equal(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
            "{what} element {i}: {g} vs {w}"
        );
    }
}

/// Every block format: the engine's dequantization of ggml's blocks equals ggml's own
/// (`to_float`) and gguf-py's bit for bit.
#[test]
fn every_block_format_dequantizes_as_ggml_and_gguf_py_do() {
    let data = std::fs::read(GGML_FIXTURE).unwrap();
    let st = SafeTensors::deserialize(&data).unwrap();
    for format in WeightFormat::ALL.into_iter().filter(|f| f.is_quantized()) {
        let name = format.name();
        let (_, blocks) = tensor(&st, name);
        let got = quant::dequantize(format, &blocks).unwrap();
        for source in ["ggml", "gguf"] {
            let (_, want) = tensor(&st, &format!("{name}_{source}"));
            assert_bit_equal(&format!("{name} vs {source}"), &got, &f32s(&want));
        }
    }
}

/// Every format with a quantizer writes the bytes ggml's C reference quantizers write
/// (llama-quantize without an importance matrix), row by row and all rows at once.
#[test]
fn quantizers_match_ggmls_c_code_byte_for_byte() {
    let data = std::fs::read(GGML_FIXTURE).unwrap();
    let st = SafeTensors::deserialize(&data).unwrap();
    let (shape, input) = tensor(&st, "input");
    let input = f32s(&input);
    let k = shape[1];
    for format in quant::QUANTIZERS {
        let name = format.name();
        let (_, want) = tensor(&st, name);
        let block = format.block_bytes().unwrap();
        let row_bytes = want.len() / shape[0];
        for (r, row) in input.chunks_exact(k).enumerate() {
            let got = quant::quantize(format, row).unwrap();
            let expected = &want[r * row_bytes..(r + 1) * row_bytes];
            if let Some(at) = got.iter().zip(expected).position(|(a, b)| a != b) {
                panic!(
                    "{name} row {r}: block {} byte {} differs: got {:?}, ggml {:?}",
                    at / block,
                    at % block,
                    &got[at / block * block..][..block],
                    &expected[at / block * block..][..block],
                );
            }
        }
        assert_eq!(quant::quantize(format, &input).unwrap(), want, "{name}");
    }
}

#[test]
fn quantizer_rejects_partial_blocks_and_float_formats() {
    let err = quant::quantize(WeightFormat::Q8_0, &[0.0; 33])
        .unwrap_err()
        .to_string();
    assert!(err.contains("33"), "{err}");
    let err = quant::quantize(WeightFormat::F16, &[0.0; 32])
        .unwrap_err()
        .to_string();
    assert!(err.contains("f16"), "{err}");
    let err = quant::quantize(WeightFormat::Q4_K, &[0.0; 128])
        .unwrap_err()
        .to_string();
    assert!(err.contains("128") && err.contains("256"), "{err}");
    let err = quant::quantize(WeightFormat::Q2_K, &[0.0; 256])
        .unwrap_err()
        .to_string();
    assert!(err.contains("q2_k"), "{err}");
    let err = quant::dequantize(WeightFormat::Q4_0, &[0; 19])
        .unwrap_err()
        .to_string();
    assert!(err.contains("19"), "{err}");
}

/// The sizes the memory accounting relies on: ggml's block sizes, and the GPU layout's exact
/// buffer size (quants, then scales padded to 16 bytes).
#[test]
fn storage_sizes_are_exact() {
    assert_eq!(WeightFormat::Q8_0.block_bytes(), Some(34));
    assert_eq!(WeightFormat::Q4_0.block_bytes(), Some(18));
    // 4096×4096: 524288 blocks.
    assert_eq!(WeightFormat::Q8_0.storage_bytes(4096, 4096), 524288 * 34);
    assert_eq!(WeightFormat::Q4_0.storage_bytes(4096, 4096), 524288 * 18);
    // 3 rows of 96: 9 blocks, 18 scale bytes padded to 32.
    assert_eq!(WeightFormat::Q4_0.storage_bytes(3, 96), 9 * 16 + 32);
    assert_eq!(WeightFormat::F16.storage_bytes(3, 37), 3 * 40 * 2);
    assert_eq!(WeightFormat::F32.storage_bytes(3, 37), 3 * 40 * 4);
    // K-quants: bodies whole, the moved f16 fields padded (Q6_K: 208 + 2, Q4_K keeps 144).
    assert_eq!(WeightFormat::Q4_K.storage_bytes(2, 512), 4 * 144);
    assert_eq!(WeightFormat::Q6_K.storage_bytes(2, 512), 4 * 208 + 16);
    assert_eq!(WeightFormat::Q2_K.storage_bytes(1, 256), 80 + 16);
    // 7B's 4096×11008 Q4_K: exactly ggml's bytes.
    assert_eq!(
        WeightFormat::Q4_K.storage_bytes(4096, 11008),
        4096 * 43 * 144
    );
}
