//! Projector outputs of images already seen, so a new conversation about the same picture skips
//! the vision tower, stage 1 and the projector.
//!
//! Entries are keyed by a SHA-256 of the image's bytes together with everything that changes
//! the output (padding and the before-projector selection, see [`ImageKey::new`]). The cache is
//! bounded in bytes: the GPU bytes of the stored projector outputs. Inserting past the bound
//! evicts the least recently used entries first.

use sha2::{Digest, Sha256};

use crate::gpu::Tensor;
use crate::vision::anyres::PackedToken;

/// Which image, preprocessed and selected how: SHA-256 over the image bytes and a description of
/// the settings that change the projector output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ImageKey(pub [u8; 32]);

impl ImageKey {
    /// `settings` must name everything besides the bytes that changes the projector output
    /// (the caller passes padding and the before-projector selection).
    pub fn new(image_bytes: &[u8], settings: &str) -> Self {
        let mut hash = Sha256::new();
        hash.update((image_bytes.len() as u64).to_le_bytes());
        hash.update(image_bytes);
        hash.update(settings.as_bytes());
        Self(hash.finalize().into())
    }
}

/// What the image side of a request leaves for the language model.
#[derive(Clone, Debug)]
pub struct ProjectedImage {
    /// Projector output [N1, text width] (shared with every request that uses it; never
    /// written after the projector ran).
    pub embeddings: Tensor,
    /// Patch indices kept before the projector (None: all of them).
    pub kept: Option<Vec<usize>>,
    /// LLaVA-NeXT: what each row of `embeddings` is (None for LLaVA-1.5).
    pub packed: Option<Vec<PackedToken>>,
}

impl ProjectedImage {
    /// GPU bytes this entry holds.
    pub fn bytes(&self) -> u64 {
        self.embeddings.buffer.size()
    }
}

struct Entry {
    key: ImageKey,
    image: ProjectedImage,
    /// Value of the cache's clock at the last lookup or insert (LRU order).
    used: u64,
}

/// An LRU map from [`ImageKey`] to [`ProjectedImage`], bounded in GPU bytes.
pub struct ImageCache {
    entries: Vec<Entry>,
    capacity_bytes: u64,
    clock: u64,
    pub hits: u64,
    pub misses: u64,
}

/// Default bound: enough for a few dozen 7B images (576 rows × 4096 × 4 bytes = 9 MiB each).
pub const DEFAULT_IMAGE_CACHE_BYTES: u64 = 256 << 20;

impl ImageCache {
    pub fn new(capacity_bytes: u64) -> Self {
        Self {
            entries: Vec::new(),
            capacity_bytes,
            clock: 0,
            hits: 0,
            misses: 0,
        }
    }

    /// The stored output for `key`, marked as just used.
    pub fn get(&mut self, key: &ImageKey) -> Option<ProjectedImage> {
        self.clock += 1;
        let clock = self.clock;
        match self.entries.iter_mut().find(|e| e.key == *key) {
            Some(entry) => {
                entry.used = clock;
                self.hits += 1;
                Some(entry.image.clone())
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Store `image` under `key`, evicting least recently used entries until it fits. An image
    /// larger than the whole bound is not stored.
    pub fn insert(&mut self, key: ImageKey, image: ProjectedImage) {
        self.entries.retain(|e| e.key != key);
        if image.bytes() > self.capacity_bytes {
            return;
        }
        while self.bytes() + image.bytes() > self.capacity_bytes {
            self.evict_oldest();
        }
        self.clock += 1;
        self.entries.push(Entry {
            key,
            image,
            used: self.clock,
        });
    }

    /// GPU bytes of the stored projector outputs.
    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.image.bytes()).sum()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// Change the bound, evicting least recently used entries that no longer fit.
    pub fn set_capacity_bytes(&mut self, capacity_bytes: u64) {
        self.capacity_bytes = capacity_bytes;
        while self.bytes() > capacity_bytes {
            self.evict_oldest();
        }
    }

    fn evict_oldest(&mut self) {
        if let Some(oldest) = (0..self.entries.len()).min_by_key(|&i| self.entries[i].used) {
            self.entries.swap_remove(oldest);
        }
    }

    pub fn contains(&self, key: &ImageKey) -> bool {
        self.entries.iter().any(|e| e.key == *key)
    }
}
