//! What every target shares: the case count, the capped allocator, scratch directories, the
//! fixture paths and a generator of arbitrary JSON.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::string::{string_regex, RegexGeneratorStrategy};
use proptest::test_runner::Config;
use serde_json::{Number, Value};

/// `default` cases, or `PROPTEST_CASES` if set (the long runs in docs/tests.md).
pub fn cases(default: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    Config {
        cases,
        ..Config::default()
    }
}

/// No single allocation in the fuzz binary may exceed this (the image crate's own limit is
/// 512 MiB); a larger request gets null, and Rust aborts the process naming the size.
pub const HARD_CAP: usize = 1 << 30;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, refusing requests above [`HARD_CAP`] and recording the largest request
/// per thread.
pub struct CappedAlloc;

fn note(size: usize) -> bool {
    let _ = LARGEST.try_with(|c| c.set(c.get().max(size)));
    size <= HARD_CAP
}

unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !note(layout.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !note(layout.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !note(new_size) {
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Run `f` and return its result with the largest single allocation it made on this thread.
pub fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|c| c.set(0));
    let out = f();
    (out, LARGEST.with(Cell::get))
}

pub fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/tiny-random-llava")
}

/// A fresh empty directory, removed on drop: in `/dev/shm` where it exists (a file written to a
/// disk-backed temp dir costs milliseconds, which thousands of cases feel), else the temp dir.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let shm = Path::new("/dev/shm");
        let root = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = root.join(format!("llava-wgpu-fuzz-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Write `bytes` to `name` inside the directory and return the file's path.
    pub fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Strings matching `pattern`. A `&str` strategy recompiles its regex for every value (slow for
/// unicode classes such as `\\PC`); this compiles it once.
pub fn regex(pattern: &str) -> RegexGeneratorStrategy<String> {
    string_regex(pattern).unwrap()
}

/// Numbers that break readers: zero, negatives, the edges of i64/u64/u32, huge and tiny floats.
pub fn number() -> impl Strategy<Value = Value> {
    let edge = prop::sample::select(vec![
        Value::from(0),
        Value::from(1),
        Value::from(-1),
        Value::from(2),
        Value::from(3),
        Value::from(14),
        Value::from(u32::MAX),
        Value::from(1u64 << 32),
        Value::from((1u64 << 32) + 2),
        Value::from(i64::MAX),
        Value::from(i64::MIN),
        Value::from(u64::MAX),
        Value::from(1e12),
        Value::from(1e308),
        Value::from(-1e308),
        Value::from(5e-324),
        Value::from(0.5),
        Value::from(-0.0),
    ]);
    prop_oneof![
        3 => edge,
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => any::<f64>().prop_map(|x| Number::from_f64(x).map_or(Value::Null, Value::Number)),
        2 => (0u64..700).prop_map(Value::from),
    ]
}

/// Arbitrary JSON whose object keys are often `keys` (the names a reader looks for).
pub fn json(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        prop::sample::select(keys).prop_map(Value::from),
        regex(".{0,8}").prop_map(Value::String),
    ];
    let key = prop_oneof![
        3 => prop::sample::select(keys).prop_map(str::to_string),
        1 => regex(".{0,6}"),
    ];
    leaf.prop_recursive(4, 48, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
