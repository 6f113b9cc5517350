//! The GGUF container (versions 2 and 3), memory mapped: header, typed metadata, tensor infos.
//!
//! Layout (ggml's gguf.h, docs/gguf.md): `"GGUF"`, u32 version, u64 tensor count, u64 metadata
//! count; each metadata pair is a string key, a u32 value type and the value (arrays: u32 element
//! type, u64 count, elements); each tensor info is a string name, u32 dimension count, u64 per
//! dimension in ggml's order (`ne[0]`, the contiguous one, first), u32 ggml type and a u64 offset
//! into the data section, which starts at the next multiple of `general.alignment` (default 32)
//! after the infos. Strings are a u64 length and UTF-8 bytes.
//!
//! Everything a file claims is checked against the file before it is believed: counts and
//! lengths against the bytes left (so a lying header costs no memory), tensor types against the
//! types the engine runs (others are named in the error), each tensor's bytes against the end of
//! the file, offsets against the alignment and against each other (no overlaps).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::gpu::WeightFormat;

const MAGIC: &[u8; 4] = b"GGUF";
/// ggml's GGUF_DEFAULT_ALIGNMENT.
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// Arrays inside arrays are allowed to this depth (ggml's reader allows none; gguf-py writes
/// some), which bounds the reader's recursion.
const MAX_ARRAY_DEPTH: usize = 2;

/// A metadata value, typed as the file declares it.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array, stored compactly by element type.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    /// Integers of any width (their declared type kept in `ty`), as i64.
    Int {
        ty: u32,
        values: Vec<i64>,
    },
    Float(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Nested(Vec<Array>),
}

impl Value {
    /// GGUF's name of the value's type (`u32`, `string`, `array`…), for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }

    /// The value as a non-negative integer, whatever its integer type.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }
}

/// Where one tensor's bytes are, and what they hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in ggml's order: `dims[0]` is the contiguous one (a torch `[n_out, n_in]`
    /// weight is `[n_in, n_out]` here).
    pub dims: Vec<usize>,
    pub format: WeightFormat,
    /// Byte range in the file.
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    /// The shape in torch's order (outermost first): `dims` reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

/// A GGUF file, memory mapped, with its metadata and tensor infos read and checked.
pub struct GgufFile {
    pub path: PathBuf,
    map: Mmap,
    pub version: u32,
    pub alignment: u64,
    pub metadata: HashMap<String, Value>,
    /// Metadata keys in file order.
    pub keys: Vec<String>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| file_error(path, e))?;
        // SAFETY: the mapping is read-only; a file truncated by another process while mapped is
        // the same hazard every mmap-based model loader (llama.cpp's included) accepts.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| file_error(path, e))?;
        let parsed = parse(&map).map_err(|reason| file_error(path, reason))?;
        let index = parsed
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            map,
            version: parsed.version,
            alignment: parsed.alignment,
            metadata: parsed.metadata,
            keys: parsed.keys,
            tensors: parsed.tensors,
            index,
        })
    }

    /// Whether the file starts with GGUF's magic (read without mapping the whole file).
    pub fn is_gguf(path: &Path) -> bool {
        use std::io::Read;
        let mut magic = [0u8; 4];
        File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
            && &magic == MAGIC
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a tensor (checked to lie inside the file when the file was opened).
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.map[info.start..info.end]
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

struct Parsed {
    version: u32,
    alignment: u64,
    metadata: HashMap<String, Value>,
    keys: Vec<String>,
    tensors: Vec<TensorInfo>,
}

/// A cursor over the file's bytes that never reads past them.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> std::result::Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(format!(
                "truncated: {what} at byte {} needs {n} bytes, the file has {} left",
                self.at,
                self.bytes.len() - self.at
            ));
        };
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn array<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items each at least `min_item` bytes long: refused if the rest of the file
    /// could not hold them, before anything is allocated for them.
    fn count(&mut self, what: &str, min_item: usize) -> std::result::Result<usize, String> {
        let n = self.u64(what)?;
        let most = (self.left() / min_item.max(1)) as u64;
        if n > most {
            return Err(format!(
                "{what} is {n}, but the {} bytes left hold at most {most}: the file is \
                 truncated, or its header is wrong",
                self.left()
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let len = self.count(&format!("length of {what}"), 1)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }
}

fn parse(bytes: &[u8]) -> std::result::Result<Parsed, String> {
    let mut r = Reader { bytes, at: 0 };
    let magic = r.take(4, "the magic number").map_err(|_| {
        format!(
            "not a GGUF file: {} bytes, too short for the header",
            bytes.len()
        )
    })?;
    if magic != MAGIC {
        return Err(format!(
            "not a GGUF file: it starts with {magic:02x?}, not \"GGUF\""
        ));
    }
    let version = r.u32("the version")?;
    match version {
        2 | 3 => {}
        1 => return Err(
            "GGUF version 1 is not supported (llama.cpp dropped it too); convert the model again"
                .into(),
        ),
        v if v & 0xffff == 0 => {
            return Err(format!(
                "version {v:#x}: a big-endian GGUF file, which this engine does not read"
            ))
        }
        v => {
            return Err(format!(
                "unsupported GGUF version {v} (versions 2 and 3 are read)"
            ))
        }
    }
    // A tensor info takes at least 8 + 4 + 8 + 4 + 8 bytes; a metadata pair at least 8 + 4 + 1.
    let n_tensors = r.count("the tensor count", 32)?;
    let n_kv = r.count("the metadata count", 13)?;
    let mut metadata = HashMap::with_capacity(n_kv);
    let mut keys = Vec::with_capacity(n_kv);
    for i in 0..n_kv {
        let key = r.string(&format!("metadata key {i}"))?;
        let ty = r.u32(&format!("the type of '{key}'"))?;
        let value = read_value(&mut r, ty, &key, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(format!("metadata key '{key}' appears twice"));
        }
        keys.push(key);
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if a.is_power_of_two() => *a as u64,
        Some(v) => {
            return Err(format!(
                "metadata 'general.alignment' must be a u32 power of two, found {v:?}"
            ))
        }
    };
    let infos = read_tensor_infos(&mut r, n_tensors)?;
    let data_start = (r.at as u64).next_multiple_of(alignment);
    let tensors = place_tensors(infos, data_start, alignment, bytes.len())?;
    Ok(Parsed {
        version,
        alignment,
        metadata,
        keys,
        tensors,
    })
}

/// GGUF's value type numbers (gguf.h `gguf_type`).
fn read_value(
    r: &mut Reader,
    ty: u32,
    key: &str,
    depth: usize,
) -> std::result::Result<Value, String> {
    let what = format!("the value of '{key}'");
    Ok(match ty {
        0 => Value::U8(r.array::<1>(&what)?[0]),
        1 => Value::I8(r.array::<1>(&what)?[0] as i8),
        2 => Value::U16(u16::from_le_bytes(r.array(&what)?)),
        3 => Value::I16(i16::from_le_bytes(r.array(&what)?)),
        4 => Value::U32(r.u32(&what)?),
        5 => Value::I32(i32::from_le_bytes(r.array(&what)?)),
        6 => Value::F32(f32::from_le_bytes(r.array(&what)?)),
        7 => Value::Bool(r.array::<1>(&what)?[0] != 0),
        8 => Value::String(r.string(&what)?),
        9 => Value::Array(read_array(r, key, depth)?),
        10 => Value::U64(r.u64(&what)?),
        11 => Value::I64(i64::from_le_bytes(r.array(&what)?)),
        12 => Value::F64(f64::from_le_bytes(r.array(&what)?)),
        other => return Err(format!("metadata '{key}' has unknown value type {other}")),
    })
}

/// Bytes of one element of a scalar value type (0 for strings and arrays, which vary).
fn scalar_size(ty: u32) -> Option<usize> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

fn read_array(r: &mut Reader, key: &str, depth: usize) -> std::result::Result<Array, String> {
    if depth >= MAX_ARRAY_DEPTH {
        return Err(format!("metadata '{key}' nests arrays too deeply"));
    }
    let ty = r.u32(&format!("the element type of '{key}'"))?;
    // Strings take at least their 8-byte length, nested arrays their 12-byte header.
    let min_item = match ty {
        8 => 8,
        9 => 12,
        ty => scalar_size(ty)
            .ok_or_else(|| format!("metadata '{key}' is an array of unknown type {ty}"))?,
    };
    let n = r.count(&format!("the length of '{key}'"), min_item)?;
    let what = format!("an element of '{key}'");
    Ok(match ty {
        8 => Array::String((0..n).map(|_| r.string(&what)).collect::<Result<_, _>>()?),
        9 => Array::Nested(
            (0..n)
                .map(|_| read_array(r, key, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        6 | 12 => Array::Float(
            (0..n)
                .map(|_| match read_value(r, ty, key, depth)? {
                    Value::F32(v) => Ok(v as f64),
                    Value::F64(v) => Ok(v),
                    _ => unreachable!("float types"),
                })
                .collect::<Result<_, String>>()?,
        ),
        7 => Array::Bool(r.take(n, &what)?.iter().map(|&b| b != 0).collect()),
        _ => Array::Int {
            ty,
            values: (0..n)
                .map(|_| int_value(read_value(r, ty, key, depth)?))
                .collect::<Result<_, String>>()?,
        },
    })
}

fn int_value(v: Value) -> std::result::Result<i64, String> {
    Ok(match v {
        Value::U8(v) => v as i64,
        Value::I8(v) => v as i64,
        Value::U16(v) => v as i64,
        Value::I16(v) => v as i64,
        Value::U32(v) => v as i64,
        Value::I32(v) => v as i64,
        Value::I64(v) => v,
        Value::U64(v) => i64::try_from(v).map_err(|_| format!("{v} does not fit an i64"))?,
        other => unreachable!("not an integer: {other:?}"),
    })
}

/// A tensor info as written: name, dims (ggml order), type number, offset into the data.
struct RawInfo {
    name: String,
    dims: Vec<u64>,
    ty: u32,
    offset: u64,
}

fn read_tensor_infos(r: &mut Reader, n: usize) -> std::result::Result<Vec<RawInfo>, String> {
    let mut infos = Vec::with_capacity(n);
    for i in 0..n {
        let name = r.string(&format!("the name of tensor {i}"))?;
        let n_dims = r.u32(&format!("the dimension count of '{name}'"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!(
                "tensor '{name}' has {n_dims} dimensions (1 to {MAX_DIMS} are allowed)"
            ));
        }
        let dims = (0..n_dims)
            .map(|_| r.u64(&format!("the dimensions of '{name}'")))
            .collect::<Result<Vec<_>, _>>()?;
        let ty = r.u32(&format!("the type of '{name}'"))?;
        let offset = r.u64(&format!("the offset of '{name}'"))?;
        infos.push(RawInfo {
            name,
            dims,
            ty,
            offset,
        });
    }
    Ok(infos)
}

/// Check each tensor's type, size, alignment and place in the file, and that no two overlap
/// or share a name.
fn place_tensors(
    infos: Vec<RawInfo>,
    data_start: u64,
    alignment: u64,
    file_len: usize,
) -> std::result::Result<Vec<TensorInfo>, String> {
    let mut tensors = Vec::with_capacity(infos.len());
    let mut seen = std::collections::HashSet::new();
    for info in infos {
        let name = &info.name;
        if !seen.insert(name.clone()) {
            return Err(format!("tensor '{name}' appears twice"));
        }
        let format = WeightFormat::from_ggml_type(info.ty).ok_or_else(|| {
            format!(
                "tensor '{name}' has type {}, which this engine does not run (it runs {})",
                ggml_type_name(info.ty),
                WeightFormat::ALL
                    .map(|f| f.name().to_uppercase())
                    .join(", ")
            )
        })?;
        let bytes = tensor_bytes(name, &info.dims, format)?;
        if info.offset % alignment != 0 {
            return Err(format!(
                "tensor '{name}' starts at data offset {}, not a multiple of the alignment {alignment}",
                info.offset
            ));
        }
        let start = data_start.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(bytes));
        let (Some(start), Some(end)) = (start, end) else {
            return Err(format!("tensor '{name}' has an offset past any file"));
        };
        if end > file_len as u64 {
            return Err(format!(
                "tensor '{name}' ({bytes} bytes at byte {start}) runs past the end of the file \
                 ({file_len} bytes): the file is truncated or its header is wrong"
            ));
        }
        tensors.push(TensorInfo {
            name: info.name,
            dims: info.dims.iter().map(|&d| d as usize).collect(),
            format,
            start: start as usize,
            end: end as usize,
        });
    }
    let mut by_start: Vec<&TensorInfo> = tensors.iter().collect();
    by_start.sort_by_key(|t| t.start);
    for pair in by_start.windows(2) {
        if pair[1].start < pair[0].end {
            return Err(format!(
                "tensors '{}' and '{}' overlap (bytes {}..{} and {}..{})",
                pair[0].name, pair[1].name, pair[0].start, pair[0].end, pair[1].start, pair[1].end
            ));
        }
    }
    Ok(tensors)
}

/// Bytes of a tensor of `dims` in `format`, or why it cannot exist.
fn tensor_bytes(
    name: &str,
    dims: &[u64],
    format: WeightFormat,
) -> std::result::Result<u64, String> {
    if dims.contains(&0) {
        return Err(format!("tensor '{name}' has a zero dimension {dims:?}"));
    }
    let count = dims
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= isize::MAX as u64)
        .ok_or_else(|| {
            format!("tensor '{name}' claims dimensions {dims:?}, too large for any file")
        })?;
    let weights = format.block_weights() as u64;
    if !dims[0].is_multiple_of(weights) {
        return Err(format!(
            "tensor '{name}' has rows of {} values, not whole {} blocks of {weights}",
            dims[0],
            format.name()
        ));
    }
    let per_block = format
        .block_bytes()
        .or(format.element_bytes())
        .expect("every format has a size") as u64;
    Ok(count / weights * per_block)
}

/// ggml's name of a type number (ggml.h `ggml_type`), for the ones the engine does not run.
pub fn ggml_type_name(ty: u32) -> String {
    if let Some(format) = WeightFormat::from_ggml_type(ty) {
        return format.name().to_uppercase();
    }
    let name = match ty {
        9 => "Q8_1",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        40 => "NVFP4",
        41 => "Q1_0",
        42 => "Q2_0",
        _ => return format!("{ty} (not a ggml type)"),
    };
    format!("{name} ({ty})")
}

/// Typed metadata reads that name the file and key when a value is missing or of another type
/// than the converters write (llama.cpp is as strict: a u64 where a u32 belongs is an error).
impl GgufFile {
    fn wrong_type(&self, key: &str, expected: &str, found: &Value) -> Error {
        file_error(
            &self.path,
            format!(
                "metadata '{key}' is a {}, expected {expected}",
                found.type_name()
            ),
        )
    }

    /// A required key.
    pub fn require<'s, T>(
        &'s self,
        key: &str,
        read: impl Fn(&'s Self, &str) -> Result<Option<T>>,
    ) -> Result<T> {
        read(self, key)?
            .ok_or_else(|| file_error(&self.path, format!("metadata '{key}' is missing")))
    }

    pub fn u32(&self, key: &str) -> Result<Option<u32>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::U32(v)) => Ok(Some(*v)),
            Some(v) => Err(self.wrong_type(key, "u32", v)),
        }
    }

    pub fn f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(v)) => Ok(Some(*v)),
            Some(v) => Err(self.wrong_type(key, "f32", v)),
        }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(v)) => Ok(Some(*v)),
            Some(v) => Err(self.wrong_type(key, "bool", v)),
        }
    }

    pub fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(v)) => Ok(Some(v)),
            Some(v) => Err(self.wrong_type(key, "string", v)),
        }
    }

    /// An array of integers of any integer type.
    pub fn ints(&self, key: &str) -> Result<Option<&[i64]>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(Array::Int { values, .. })) => Ok(Some(values)),
            Some(Value::Array(Array::String(v))) if v.is_empty() => Ok(Some(&[])),
            Some(v) => Err(self.wrong_type(key, "array of integers", v)),
        }
    }

    /// An array of f32 (or f64).
    pub fn floats(&self, key: &str) -> Result<Option<&[f64]>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(Array::Float(values))) => Ok(Some(values)),
            Some(v) => Err(self.wrong_type(key, "array of floats", v)),
        }
    }

    pub fn strings(&self, key: &str) -> Result<Option<&[String]>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(Array::String(values))) => Ok(Some(values)),
            Some(v) => Err(self.wrong_type(key, "array of strings", v)),
        }
    }

    /// The error for a metadata value that has the right type but not a usable value.
    pub fn bad_value(&self, key: &str, reason: impl std::fmt::Display) -> Error {
        file_error(&self.path, format!("metadata '{key}': {reason}"))
    }

    /// The error for a problem with a tensor of this file.
    pub fn tensor_error(&self, name: &str, reason: impl std::fmt::Display) -> Error {
        file_error(&self.path, format!("tensor '{name}' {reason}"))
    }
}
