//! Property-based fuzzing of the input path (issue #12): every input a user can hand the engine
//! (config.json, safetensors shards and their index, GGUF files, prompts, images, preprocessor settings,
//! eval question sets, the shape checks of the kernels, with and without a device) ends in `Ok` or a
//! named library `Error`, never in a panic or an unbounded allocation.
//!
//! One module per target. Each property runs a few thousand cases by default; set
//! `PROPTEST_CASES` to run more, and pick a target by name:
//!
//! ```sh
//! PROPTEST_CASES=1000000 cargo test --release --test fuzz jsonl -- --test-threads 1
//! ```
//!
//! The whole binary runs under [`support::CappedAlloc`]: one allocation above
//! [`support::HARD_CAP`] aborts the process, and a property may read the largest allocation its
//! thread made during a call to bound it more tightly.

mod checkpoint;
mod config;
mod gguf;
mod jsonl;
mod launchers;
mod shapes;
mod support;
mod text;
mod vision;

#[global_allocator]
static ALLOCATOR: support::CappedAlloc = support::CappedAlloc;
