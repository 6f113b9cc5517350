//! Compiled pipelines kept on disk between runs: wgpu's `PipelineCache` (the driver's own
//! compiled code, Vulkan only), loaded when the device opens and written back after new
//! pipelines compile, one file per adapter and driver in the user's cache directory.
//!
//! Where: `LLAVA_WGPU_CACHE_DIR` if set (`off` switches the cache off), else the platform's
//! cache directory (`$XDG_CACHE_HOME` or `~/.cache` on Linux, `~/Library/Caches` on macOS,
//! `%LOCALAPPDATA%` on Windows) under `llava-wgpu/pipelines/`. The file name is wgpu's key for
//! the adapter (vendor and device ids) and a SHA-256 of the driver's name and version, wgpu's
//! version and this crate's, so a driver or engine update starts a new file rather than feeding
//! a stale one to the driver (which would also reject it: the data carries its own header).
//!
//! A cache is an optimisation: a directory that cannot be created or a file that cannot be
//! written is reported once on stderr and the run goes on.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// Environment variable naming the cache directory, or `off`.
pub const ENV_CACHE_DIR: &str = "LLAVA_WGPU_CACHE_DIR";

/// The directory pipeline caches live in, or None when switched off or no home is known.
pub fn cache_dir() -> Option<PathBuf> {
    let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = env(ENV_CACHE_DIR) {
        return (dir != "off").then(|| PathBuf::from(dir).join("pipelines"));
    }
    let base = if cfg!(target_os = "windows") {
        env("LOCALAPPDATA").map(PathBuf::from)
    } else if cfg!(target_os = "macos") {
        env("HOME").map(|home| PathBuf::from(home).join("Library/Caches"))
    } else {
        env("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|home| PathBuf::from(home).join(".cache")))
    };
    base.map(|dir| dir.join("llava-wgpu").join("pipelines"))
}

/// The file for `info`'s adapter and driver under `dir`, or None where wgpu has no pipeline
/// cache for the backend.
pub fn cache_file(dir: &Path, info: &wgpu::AdapterInfo) -> Option<PathBuf> {
    let adapter = wgpu::util::pipeline_cache_key(info)?;
    let mut hash = Sha256::new();
    for part in [
        info.driver.as_str(),
        info.driver_info.as_str(),
        info.name.as_str(),
        env!("CARGO_PKG_VERSION"),
        WGPU_VERSION,
    ] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    let digest = hash.finalize();
    let short: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    Some(dir.join(format!("{adapter}_{short}.bin")))
}

/// The wgpu release the cache data comes from (its format is wgpu's own).
const WGPU_VERSION: &str = "wgpu-30";

/// An open pipeline cache and the file it persists to.
pub struct DiskPipelineCache {
    pub(crate) cache: wgpu::PipelineCache,
    path: PathBuf,
    /// Bytes the file held when loaded or last written: data of another size is new.
    saved_len: Mutex<usize>,
    /// Bytes read from the file at open (0 for a first run).
    pub loaded_bytes: usize,
}

impl DiskPipelineCache {
    /// Open the cache for `device` (which must have `Features::PIPELINE_CACHE`), from its file
    /// when there is one.
    pub fn open(device: &wgpu::Device, info: &wgpu::AdapterInfo) -> Option<Self> {
        let path = cache_file(&cache_dir()?, info)?;
        let data = std::fs::read(&path).ok();
        let loaded_bytes = data.as_ref().map_or(0, Vec::len);
        // SAFETY: the data was written by `get_data` of a cache for this adapter and driver
        // (the file name says so), and `fallback` makes wgpu start an empty cache when the
        // driver rejects it.
        let cache = unsafe {
            device.create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
                label: Some("llava-wgpu pipelines"),
                data: data.as_deref(),
                fallback: true,
            })
        };
        Some(Self {
            cache,
            path,
            saved_len: Mutex::new(loaded_bytes),
            loaded_bytes,
        })
    }

    /// Where the cache persists.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write the cache's data to its file if it changed since it was read or last written:
    /// to a temporary file renamed over the old one, so a reader never sees half a file.
    pub fn save(&self) {
        let Some(data) = self.cache.get_data() else {
            return;
        };
        let mut saved = self.saved_len.lock().unwrap_or_else(|e| e.into_inner());
        if data.is_empty() || data.len() == *saved {
            return;
        }
        match write_atomically(&self.path, &data) {
            Ok(()) => *saved = data.len(),
            Err(e) => {
                // Once: later saves would fail the same way.
                *saved = data.len();
                eprintln!(
                    "warning: could not write the pipeline cache {}: {e} (set {ENV_CACHE_DIR}=off to skip it)",
                    self.path.display()
                );
            }
        }
    }
}

fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}
