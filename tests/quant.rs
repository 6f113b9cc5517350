//! The host quantizer against ggml's reference as implemented by `gguf.quants` (an independent
//! implementation): bytes recorded by scripts/quant_fixture.py must match exactly, and the
//! dequantized values too.

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

#[test]
fn quantizer_rejects_partial_blocks_and_float_formats() {
    let err = quant::quantize(WeightFormat::Q8_0, &[0.0; 33])
        .unwrap_err()
        .to_string();
    assert!(err.contains("33"), "{err}");
    let err = quant::quantize(WeightFormat::F16, &[0.0; 32])
        .unwrap_err()
        .to_string();
    assert!(err.contains("F16"), "{err}");
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
}
