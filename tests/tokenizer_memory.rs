//! A server tokenizes every request's whole conversation, and conversations rarely repeat.
//! Tokenizing thousands of distinct prompts must hold no memory afterwards: the `tokenizers`
//! BPE model's word cache once kept each prompt segment it saw (up to 10,000 of them), which made
//! `bench serve`'s soak grow by about 3.4 KB per request (found with heaptrack). Live heap bytes
//! are counted by a global allocator in this test binary.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicIsize, Ordering};

use llava_wgpu::text::TextTokenizer;

/// The system allocator, counting live bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A question like a soak's: distinct numbers in every one, and short, as the segments the old
/// cache kept were (it skipped those over 256 bytes).
fn prompt(i: usize) -> String {
    format!("USER: <image>\nQuestion {i}: what is in the image? ASSISTANT:")
}

#[test]
fn tokenizing_distinct_prompts_holds_no_memory() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights");
    for (model, image_id) in [("tiny-llava-shapes", None), ("tiny-random-llava", None)] {
        let dir = root.join(model);
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let image = image_id.unwrap_or(config["image_token_index"].as_u64().unwrap() as u32);
        let tokenizer = TextTokenizer::load(&dir, image, Some(1)).unwrap();
        let run = |range: std::ops::Range<usize>| {
            for i in range {
                tokenizer.encode_with_image(&prompt(i), 4).unwrap();
            }
        };
        run(0..200);
        let before = LIVE.load(Ordering::Relaxed);
        run(200..3200);
        let grown = LIVE.load(Ordering::Relaxed) - before;
        // 3,000 prompts at the old cache's ~1–3 KB each would be megabytes.
        assert!(
            grown < 64 << 10,
            "{model}: {grown} bytes still held after 3,000 prompts"
        );
    }
}
