//! The GGUF reader on files whose header, metadata and tensor infos lie (versions, counts,
//! lengths, value types, nested arrays, dimensions, ggml types, offsets), cut short or with bits
//! flipped; then every metadata read the engine makes (configuration, vocabulary) and every
//! tensor's bytes. `Ok` or an error naming the file; allocations stay within a small multiple
//! of the file's size.

use std::path::Path;
use std::sync::OnceLock;

use llava_wgpu::model::gguf::file::GgufFile;
use llava_wgpu::model::gguf::{metadata, GgufPair};
use proptest::prelude::*;

use crate::support::{cases, largest_allocation, regex, Scratch};

/// Keys the engine reads, so that generated metadata often has them.
const KEYS: &[&str] = &[
    "general.architecture",
    "general.alignment",
    "llama.block_count",
    "llama.embedding_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "tokenizer.ggml.model",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "clip.vision.image_grid_pinpoints",
    "clip.vision.feature_layer",
];

fn put_string(out: &mut Vec<u8>, s: &[u8], claimed: Option<u64>) {
    out.extend(claimed.unwrap_or(s.len() as u64).to_le_bytes());
    out.extend(s);
}

/// A metadata value: its type number and payload bytes, possibly lying about a length.
#[derive(Clone, Debug)]
enum Value {
    /// A scalar of type `ty` (any number, known or not) with `bytes` after it.
    Scalar {
        ty: u32,
        bytes: Vec<u8>,
    },
    Str {
        text: Vec<u8>,
        claimed: Option<u64>,
    },
    /// An array of `ty` elements, each written by `items`, with a count that may lie.
    Array {
        ty: u32,
        items: Vec<Value>,
        claimed: Option<u64>,
    },
}

impl Value {
    fn write(&self, out: &mut Vec<u8>, with_type: bool) {
        match self {
            Value::Scalar { ty, bytes } => {
                if with_type {
                    out.extend(ty.to_le_bytes());
                }
                out.extend(bytes);
            }
            Value::Str { text, claimed } => {
                if with_type {
                    out.extend(8u32.to_le_bytes());
                }
                put_string(out, text, *claimed);
            }
            Value::Array { ty, items, claimed } => {
                if with_type {
                    out.extend(9u32.to_le_bytes());
                }
                out.extend(ty.to_le_bytes());
                out.extend(claimed.unwrap_or(items.len() as u64).to_le_bytes());
                for item in items {
                    item.write(out, false);
                }
            }
        }
    }
}

fn claimed_len() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![
        30 => Just(None),
        1 => (0u64..64).prop_map(Some),
        1 => any::<u64>().prop_map(Some),
        1 => Just(Some(u64::MAX)),
    ]
}

/// Bytes of a scalar of GGUF type `ty` (none for strings, arrays and unknown types).
fn scalar_size(ty: u32) -> usize {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        _ => 0,
    }
}

/// A scalar of any type number, its payload mostly the right length for it.
fn scalar() -> impl Strategy<Value = Value> {
    let ty = prop_oneof![8 => 0u32..13, 1 => 0u32..100];
    (ty, prop::collection::vec(any::<u8>(), 0..9), 0u8..5).prop_map(|(ty, mut bytes, lie)| {
        if lie != 0 {
            bytes.resize(scalar_size(ty), 0);
        }
        Value::Scalar { ty, bytes }
    })
}

fn string() -> impl Strategy<Value = Value> {
    (regex(".{0,10}"), claimed_len()).prop_map(|(t, claimed)| Value::Str {
        text: t.into_bytes(),
        claimed,
    })
}

/// An array whose elements mostly have its element type, with a count that may lie.
fn array(inner: BoxedStrategy<Value>) -> impl Strategy<Value = Value> {
    let element = prop_oneof![8 => 0u32..13, 1 => 0u32..100];
    (
        element,
        prop::collection::vec((inner, any::<u8>()), 0..6),
        claimed_len(),
    )
        .prop_map(|(ty, items, claimed)| {
            let items = items
                .into_iter()
                .map(|(item, mix)| match (ty, mix % 8) {
                    (_, 0) => item,
                    (8, _) => Value::Str {
                        text: vec![b'a' + mix % 26; (mix % 5) as usize],
                        claimed: None,
                    },
                    _ => Value::Scalar {
                        ty,
                        bytes: vec![mix; scalar_size(ty)],
                    },
                })
                .collect();
            Value::Array { ty, items, claimed }
        })
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![scalar(), string()];
    leaf.prop_recursive(3, 32, 6, |inner| array(inner.boxed()))
}

/// A tensor info: name, dimensions (ggml order), ggml type, and an offset: None for the one a
/// writer would give it, else a lie.
#[derive(Clone, Debug)]
struct Info {
    name: String,
    dims: Vec<u64>,
    ty: u32,
    offset: Option<u64>,
}

impl Info {
    /// Bytes the tensor's data takes (0 when its type or shape is no real tensor's).
    fn size(&self) -> u64 {
        let Some(f) = llava_wgpu::gpu::WeightFormat::from_ggml_type(self.ty) else {
            return 0;
        };
        let per = f.block_bytes().or(f.element_bytes()).unwrap() as u64;
        let count = self.dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        count.map_or(0, |n| {
            (n / f.block_weights() as u64)
                .saturating_mul(per)
                .min(1 << 20)
        })
    }
}

fn info() -> impl Strategy<Value = Info> {
    let real_type = prop::sample::select(vec![0u32, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 30]);
    let ty = prop_oneof![6 => real_type, 1 => 0u32..45];
    let dim = prop_oneof![6 => 1u64..5, 1 => any::<u64>(), 1 => Just(0u64)];
    let rank = prop_oneof![8 => 1usize..5, 1 => Just(0usize), 1 => 5usize..7];
    let offset = prop_oneof![6 => Just(None), 1 => any::<u64>().prop_map(Some), 1 => (0u64..200).prop_map(Some)];
    (
        regex("[a-z.]{0,10}"),
        ty,
        rank,
        prop::collection::vec(dim, 6),
        offset,
    )
        .prop_map(|(name, ty, rank, dims, offset)| {
            // Rows of whole blocks of the type, mostly.
            let block = llava_wgpu::gpu::WeightFormat::from_ggml_type(ty)
                .map_or(1, |f| f.block_weights() as u64);
            let mut dims: Vec<u64> = dims[..rank].to_vec();
            if let Some(first) = dims.first_mut() {
                if *first < 5 {
                    *first *= block;
                }
            }
            Info {
                name,
                dims,
                ty,
                offset,
            }
        })
}

/// A whole file from its parts: header fields may lie, the data is a ramp of bytes.
#[derive(Clone, Debug)]
struct File {
    version: u32,
    kv: Vec<(String, Value)>,
    infos: Vec<Info>,
    claimed_kv: Option<u64>,
    claimed_tensors: Option<u64>,
    /// Bytes more (or fewer) data than the tensors take.
    data_delta: i64,
    cut: Option<usize>,
}

impl File {
    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        let n_tensors = self.claimed_tensors.unwrap_or(self.infos.len() as u64);
        out.extend(n_tensors.to_le_bytes());
        out.extend(
            self.claimed_kv
                .unwrap_or(self.kv.len() as u64)
                .to_le_bytes(),
        );
        for (key, value) in &self.kv {
            put_string(&mut out, key.as_bytes(), None);
            value.write(&mut out, true);
        }
        let mut next = 0u64;
        for info in &self.infos {
            put_string(&mut out, info.name.as_bytes(), None);
            out.extend((info.dims.len() as u32).to_le_bytes());
            info.dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend(info.ty.to_le_bytes());
            out.extend(info.offset.unwrap_or(next).to_le_bytes());
            next += info.size().next_multiple_of(32);
        }
        out.resize(out.len().next_multiple_of(32), 0);
        let data = (next as i64 + self.data_delta).max(0) as usize;
        out.extend((0..data).map(|i| (i * 37 % 251) as u8));
        if let Some(cut) = self.cut {
            out.truncate(cut);
        }
        out
    }
}

fn file() -> impl Strategy<Value = File> {
    let key = prop_oneof![3 => prop::sample::select(KEYS).prop_map(str::to_string), 1 => regex(".{0,12}")];
    let version =
        prop_oneof![12 => Just(3u32), 4 => Just(2u32), 1 => Just(1u32), 1 => any::<u32>()];
    (
        version,
        prop::collection::vec((key, value()), 0..8),
        prop::collection::vec(info(), 0..5),
        claimed_len(),
        claimed_len(),
        prop_oneof![4 => Just(0i64), 1 => -64i64..64],
        prop::option::weighted(0.2, 0usize..2048),
    )
        .prop_map(
            |(version, kv, infos, claimed_kv, claimed_tensors, data_delta, cut)| File {
                version,
                kv,
                infos,
                claimed_kv,
                claimed_tensors,
                data_delta,
                cut,
            },
        )
}

fn names_the_file(path: &Path, e: &llava_wgpu::Error) -> Result<(), TestCaseError> {
    let text = e.to_string();
    prop_assert!(
        text.starts_with(&path.display().to_string()),
        "error names no file: {text}"
    );
    Ok(())
}

/// Files that opened (a run with few of them would test little: see `some_files_open`).
static OPENED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Open `path` and read it every way the engine does.
fn open_and_read(path: &Path) -> Result<(), TestCaseError> {
    let file = match GgufFile::open(path) {
        Ok(f) => f,
        Err(e) => return names_the_file(path, &e),
    };
    OPENED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut sum = 0u64;
    for info in &file.tensors {
        sum += file.bytes(info).iter().map(|&b| b as u64).sum::<u64>();
    }
    std::hint::black_box(sum);
    if let Err(e) = metadata::vocab(&file) {
        names_the_file(path, &e)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(3000))]

    #[test]
    fn lying_gguf_files_are_refused_by_name(f in file()) {
        let scratch = Scratch::new("gguf");
        let bytes = f.bytes();
        let path = scratch.write("model.gguf", &bytes);
        let (result, largest) = largest_allocation(|| open_and_read(&path));
        result?;
        // Parsed metadata is at most a few times the bytes that declare it.
        let bound = 32 * bytes.len() + (1 << 16);
        prop_assert!(largest <= bound, "allocated {largest} bytes for a {}-byte file", bytes.len());
    }
}

/// The generator makes files that open, not only refusals: of 400 cases, some open.
#[test]
fn some_generated_files_open() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let before = OPENED.load(std::sync::atomic::Ordering::Relaxed);
    for _ in 0..400 {
        let f = file().new_tree(&mut runner).unwrap().current();
        let scratch = Scratch::new("gguf-open");
        let path = scratch.write("model.gguf", f.bytes());
        open_and_read(&path).unwrap();
    }
    let opened = OPENED.load(std::sync::atomic::Ordering::Relaxed) - before;
    eprintln!("{opened} of 400 generated GGUF files opened");
    assert!(opened >= 20, "only {opened} of 400 generated files opened");
}

/// The tiny fixture's F16 pair, read once.
fn real_pair() -> &'static (Vec<u8>, Vec<u8>) {
    static BYTES: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    BYTES.get_or_init(|| {
        let dir = crate::support::model_dir().join("gguf/f16");
        (
            std::fs::read(dir.join("ggml-model-f16.gguf")).unwrap(),
            std::fs::read(dir.join("mmproj-model-f16.gguf")).unwrap(),
        )
    })
}

proptest! {
    #![proptest_config(cases(300))]

    /// The real pair with one file cut short or a bit of its first 16 KiB (header, metadata,
    /// tensor infos) flipped: the pair opens, or is refused naming one of its files; what
    /// opens configures, tokenizes and reads its tensors, or names a file.
    #[test]
    fn the_real_pair_damaged_is_refused_by_name(
        which in 0usize..2, keep in 0usize..1_100_000, flip in 0usize..16384, bit in 0u8..8,
    ) {
        let scratch = Scratch::new("gguf-real");
        let (text, mmproj) = real_pair();
        let mut damaged = [text.clone(), mmproj.clone()];
        let victim = &mut damaged[which];
        victim.truncate(keep.min(victim.len()));
        if let Some(b) = victim.get_mut(flip) {
            *b ^= 1 << bit;
        }
        let t = scratch.write("ggml-model-f16.gguf", &damaged[0]);
        let m = scratch.write("mmproj-model-f16.gguf", &damaged[1]);
        let dir = scratch.path();
        let result = (|| -> llava_wgpu::Result<()> {
            let pair = GgufPair::open(&t, Some(&m))?;
            pair.config(&pair.vocab()?)?;
            for name in ["text.layers.0.self_attn.q_proj.weight", "vision.encoder.layers.0.mlp.fc1.weight", "lm_head.weight"] {
                pair.tensor(name)?.to_f32()?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            let text = e.to_string();
            prop_assert!(text.starts_with(&dir.display().to_string()), "error names no file: {text}");
        }
    }
}
