//! `Checkpoint::open` on a model directory whose `model.safetensors` header lies (lengths,
//! offsets, dtypes, shapes), whose file is truncated or padded, or whose
//! `model.safetensors.index.json` points at the wrong files; then every read of every tensor.
//! `Ok` or an error naming a file in the directory; allocations stay within twice the file size.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use llava_wgpu::gpu::WeightFormat;
use llava_wgpu::model::Checkpoint;
use proptest::prelude::*;
use serde_json::{json, Value};

use crate::support::{cases, largest_allocation, model_dir, number, regex, Scratch};

/// The tensors of the small checkpoint every case starts from: name, dtype, shape.
const TENSORS: &[(&str, &str, &[usize])] = &[
    ("language_model.model.embed_tokens.weight", "F32", &[7, 5]),
    ("language_model.model.norm.weight", "F16", &[5]),
    ("multi_modal_projector.linear_1.bias", "BF16", &[3]),
    ("lm_head.weight", "F16", &[7, 5]),
    (
        "vision_tower.vision_model.post_layernorm.weight",
        "F32",
        &[1, 1, 2],
    ),
];

fn bytes_per(dtype: &str) -> usize {
    if dtype == "F32" {
        4
    } else {
        2
    }
}

/// The header of the base checkpoint (tensors packed in order) and its data length.
fn base_header() -> (Value, usize) {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0;
    for (name, dtype, shape) in TENSORS {
        let len = shape.iter().product::<usize>() * bytes_per(dtype);
        header.insert(
            name.to_string(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    (Value::Object(header), offset)
}

/// A safetensors file: the 8-byte header length, the header, the data (a ramp of bytes).
fn file_bytes(header: &Value, header_len: Option<u64>, data_len: usize) -> Vec<u8> {
    let text = header.to_string();
    let n = header_len.unwrap_or(text.len() as u64);
    let mut bytes = n.to_le_bytes().to_vec();
    bytes.extend_from_slice(text.as_bytes());
    bytes.extend((0..data_len).map(|i| (i * 37 % 251) as u8));
    bytes
}

/// One lie in the header or the file.
#[derive(Clone, Debug)]
enum Lie {
    Dtype(usize, Value),
    Shape(usize, Vec<Value>),
    Offsets(usize, Value, Value),
    Remove(usize, &'static str),
    HeaderLen(u64),
    HeaderLenDelta(i64),
    Truncate(usize),
    Append(usize),
}

fn lie() -> impl Strategy<Value = Lie> {
    let t = 0..TENSORS.len();
    let dtype = prop::sample::select(vec![
        "F32", "F16", "BF16", "F64", "I8", "U8", "I64", "BOOL", "F8_E4M3", "F4", "F6_E2M3", "E8M0",
        "C64", "f32", "",
    ])
    .prop_map(Value::from);
    prop_oneof![
        (t.clone(), prop_oneof![dtype, number()]).prop_map(|(i, d)| Lie::Dtype(i, d)),
        (t.clone(), prop::collection::vec(number(), 0..4)).prop_map(|(i, s)| Lie::Shape(i, s)),
        (t.clone(), number(), number()).prop_map(|(i, a, b)| Lie::Offsets(i, a, b)),
        (
            t,
            prop::sample::select(vec!["dtype", "shape", "data_offsets"])
        )
            .prop_map(|(i, f)| Lie::Remove(i, f)),
        any::<u64>().prop_map(Lie::HeaderLen),
        (-16i64..16).prop_map(Lie::HeaderLenDelta),
        (0usize..600).prop_map(Lie::Truncate),
        (1usize..64).prop_map(Lie::Append),
    ]
}

/// The bytes of the base checkpoint after `lies`.
fn lying_file(lies: &[Lie]) -> Vec<u8> {
    let (mut header, data_len) = base_header();
    let mut header_len = None;
    let entry = |h: &mut Value, i: usize| h[TENSORS[i].0].as_object_mut().unwrap().clone();
    for l in lies {
        let (i, mut e) = match l {
            Lie::Dtype(i, _) | Lie::Shape(i, _) | Lie::Offsets(i, ..) | Lie::Remove(i, _) => {
                (*i, entry(&mut header, *i))
            }
            _ => (0, Default::default()),
        };
        match l {
            Lie::Dtype(_, d) => drop(e.insert("dtype".into(), d.clone())),
            Lie::Shape(_, s) => drop(e.insert("shape".into(), Value::from(s.clone()))),
            Lie::Offsets(_, a, b) => drop(e.insert("data_offsets".into(), json!([a, b]))),
            Lie::Remove(_, f) => drop(e.remove(*f)),
            Lie::HeaderLen(n) => header_len = Some(*n),
            Lie::HeaderLenDelta(d) => {
                header_len = Some((header.to_string().len() as i64 + d).max(0) as u64)
            }
            Lie::Truncate(_) | Lie::Append(_) => {}
        }
        if !e.is_empty() {
            header[TENSORS[i].0] = Value::Object(e);
        }
    }
    let mut bytes = file_bytes(&header, header_len, data_len);
    for l in lies {
        match l {
            Lie::Truncate(cut) => bytes.truncate(bytes.len().saturating_sub(*cut)),
            Lie::Append(n) => bytes.extend(std::iter::repeat_n(0xAB, *n)),
            _ => {}
        }
    }
    bytes
}

/// Open `dir` and read every tensor every way the engine does; errors must name a file there.
fn open_and_read(dir: &Path) -> Result<(), TestCaseError> {
    let checkpoint = match Checkpoint::open(dir) {
        Ok(c) => c,
        Err(e) => return names_a_file_in(dir, &e),
    };
    for (name, _, _) in TENSORS {
        if !checkpoint.contains(name) {
            continue;
        }
        let t = checkpoint.get(name).map_err(fail)?;
        let shape = t.shape.clone();
        let rows = checkpoint
            .tensor(name)
            .and_then(|t| t.rows_f32(&[0, 3, 6, 7, u32::MAX]));
        let reads = [
            t.to_f32().map(drop),
            rows.map(drop),
            checkpoint.f32(name, &shape).map(drop),
            checkpoint.matrix(name, &shape, WeightFormat::F16).map(drop),
            checkpoint.f32(name, &[5, 7]).map(drop),
        ];
        for r in reads {
            if let Err(e) = r {
                names_a_file_in(dir, &e)?;
            }
        }
    }
    Ok(())
}

fn fail(e: llava_wgpu::Error) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

fn names_a_file_in(dir: &Path, e: &llava_wgpu::Error) -> Result<(), TestCaseError> {
    let text = e.to_string();
    prop_assert!(
        text.starts_with(&dir.display().to_string()),
        "error names no file of the checkpoint: {text}"
    );
    Ok(())
}

/// Shard names an index may point at.
fn shard_name() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => prop::sample::select(vec!["a.safetensors", "b.safetensors"]).prop_map(Value::from),
        1 => prop::sample::select(vec![
            "missing.safetensors", "../a.safetensors", "sub/a.safetensors", "a\\b", "", ".",
            "..", "model.safetensors.index.json", "bad.safetensors",
        ])
        .prop_map(Value::from),
        1 => number(),
    ]
}

fn tensor_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(TENSORS.iter().map(|t| t.0).collect::<Vec<_>>())
            .prop_map(str::to_string),
        1 => regex(".{0,12}"),
    ]
}

/// Two valid shards holding alternate tensors, one corrupt one, and an index.
fn sharded_dir(scratch: &Scratch, index: &str) {
    let (header, _) = base_header();
    for (file, parity) in [("a.safetensors", 0), ("b.safetensors", 1)] {
        let mut part = serde_json::Map::new();
        let mut offset = 0;
        for (i, (name, dtype, shape)) in TENSORS.iter().enumerate() {
            if i % 2 == parity {
                let len = shape.iter().product::<usize>() * bytes_per(dtype);
                let mut e = header[*name].clone();
                e["data_offsets"] = json!([offset, offset + len]);
                part.insert(name.to_string(), e);
                offset += len;
            }
        }
        scratch.write(file, file_bytes(&Value::Object(part), None, offset));
    }
    scratch.write("bad.safetensors", [1, 2, 3]);
    scratch.write("model.safetensors.index.json", index);
}

proptest! {
    #![proptest_config(cases(3000))]

    #[test]
    fn lying_safetensors_headers_are_refused_by_name(lies in prop::collection::vec(lie(), 0..4)) {
        let scratch = Scratch::new("st");
        let bytes = lying_file(&lies);
        scratch.write("model.safetensors", &bytes);
        let (result, largest) = largest_allocation(|| open_and_read(scratch.path()));
        result?;
        let bound = 2 * bytes.len() + (1 << 20);
        prop_assert!(largest <= bound, "allocated {largest} bytes for a {}-byte file", bytes.len());
    }

    #[test]
    fn a_huge_claimed_tensor_is_refused_without_allocating(
        dims in prop::collection::vec(1_000usize..10_000_000, 2..4),
        dtype in prop::sample::select(vec!["F32", "F16", "BF16"]),
    ) {
        let scratch = Scratch::new("huge");
        let elements: u128 = dims.iter().map(|&d| d as u128).product();
        let end = elements * bytes_per(dtype) as u128;
        let end = Value::from(u64::try_from(end).unwrap_or(u64::MAX));
        let header = json!({"huge": {"dtype": dtype, "shape": dims, "data_offsets": [0, end]}});
        scratch.write("model.safetensors", file_bytes(&header, None, 4096));
        let start = Instant::now();
        let (result, largest) = largest_allocation(|| Checkpoint::open(scratch.path()));
        prop_assert!(result.is_err(), "a {elements}-element tensor in 4 KiB was accepted");
        prop_assert!(largest < 1 << 20, "allocated {largest} bytes");
        prop_assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn mutated_indexes_are_read_or_refused_by_name(
        map in prop::collection::btree_map(tensor_name(), shard_name(), 0..8),
        wrap in 0..4u8,
    ) {
        let scratch = Scratch::new("index");
        let weight_map = Value::Object(map.into_iter().collect());
        let index = match wrap {
            0 => json!({"metadata": {"total_size": 1}, "weight_map": weight_map}),
            1 => json!({"weight_map": [weight_map]}),
            2 => weight_map,
            _ => Value::from(weight_map.to_string()),
        };
        let text = index.to_string();
        sharded_dir(&scratch, if wrap == 3 { &text[1..] } else { &text });
        open_and_read(scratch.path())?;
    }
}

#[test]
fn the_base_checkpoint_opens() {
    let scratch = Scratch::new("base");
    scratch.write("model.safetensors", lying_file(&[]));
    let c = Checkpoint::open(scratch.path()).unwrap();
    assert!(TENSORS.iter().all(|t| c.contains(t.0)));
}

/// The fixture's real model.safetensors (1.8 MB), read once.
fn real_file() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| std::fs::read(model_dir().join("model.safetensors")).unwrap())
}

proptest! {
    #![proptest_config(cases(300))]

    /// The real file cut short, or with one bit of its header (or its first bytes) flipped.
    #[test]
    fn the_real_checkpoint_damaged_is_refused_by_name(
        keep in 0usize..2_000_000, flip in 0usize..8192, bit in 0u8..8,
    ) {
        let scratch = Scratch::new("real");
        let mut bytes = real_file()[..keep.min(real_file().len())].to_vec();
        if let Some(b) = bytes.get_mut(flip) {
            *b ^= 1 << bit;
        }
        scratch.write("model.safetensors", &bytes);
        let dir = scratch.path();
        let (result, largest) = largest_allocation(|| -> Result<(), TestCaseError> {
            let c = match Checkpoint::open(dir) {
                Ok(c) => c,
                Err(e) => return names_a_file_in(dir, &e),
            };
            for name in ["text.embed_tokens.weight", "lm_head.weight", "vision.post_layernorm.weight"] {
                if let Err(e) = c.get(name).and_then(|t| t.to_f32()) {
                    names_a_file_in(dir, &e)?;
                }
            }
            Ok(())
        });
        result?;
        prop_assert!(largest <= 2 * real_file().len(), "allocated {largest} bytes");
    }
}
