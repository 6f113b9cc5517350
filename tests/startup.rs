//! Start-up and profiling outputs of the binary: the on-disk pipeline cache (created in the
//! directory `LLAVA_WGPU_CACHE_DIR` names, reused by the next run, none with `off`) and `run
//! --profile --roofline`'s PNG.

mod fixture;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use llava_wgpu::gpu::{Gpu, GpuOptions};

/// A fresh directory in the temp directory.
fn temp_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!(
        "llava-wgpu-startup-{tag}-{}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `run` on the fixture's first case with `extra` arguments and the cache in `cache`.
fn run(cache: &str, extra: &[&str]) -> Output {
    run_with_home(cache, extra, None)
}

/// [`run`] with `HOME` and `XDG_CACHE_HOME` in `home` when given (where the default cache goes).
fn run_with_home(cache: &str, extra: &[&str], home: Option<&Path>) -> Output {
    let case = &fixture::cases()[0];
    let mut command = Command::new(env!("CARGO_BIN_EXE_llava-wgpu"));
    command
        .args(["run", "--model"])
        .arg(fixture::model_dir())
        .arg("--image")
        .arg(&case.image)
        .args(["--prompt", "hi", "-n", "1"])
        .args(extra)
        .env("LLAVA_WGPU_CACHE_DIR", cache);
    if let Some(home) = home {
        command
            .env("HOME", home)
            .env("XDG_CACHE_HOME", home.join(".cache"));
    }
    command.output().unwrap()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .flat_map(|p| if p.is_dir() { files_under(&p) } else { vec![p] })
        .collect()
}

/// Where the driver has a pipeline cache (Vulkan: wgpu's `PIPELINE_CACHE`), the first run
/// writes one file named for the adapter and the second reads it and leaves one file; `off`
/// writes nothing.
#[test]
fn the_pipeline_cache_persists_per_adapter_and_can_be_switched_off() {
    let dir = temp_dir("cache");
    let first = run(dir.to_str().unwrap(), &[]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let files = files_under(&dir);
    let gpu = Gpu::new(GpuOptions::default()).unwrap();
    if !gpu.features.contains(wgpu::Features::PIPELINE_CACHE) {
        assert!(
            files.is_empty(),
            "{files:?} written without a pipeline cache"
        );
        return;
    }
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().to_string();
    assert!(name.starts_with("wgpu_pipeline_cache_vulkan_"), "{name}");
    assert!(std::fs::metadata(&files[0]).unwrap().len() > 0);
    let second = run(dir.to_str().unwrap(), &[]);
    assert!(second.status.success());
    assert_eq!(
        files_under(&dir),
        files,
        "the second run starts no new file"
    );
    assert_eq!(first.stdout, second.stdout, "the cache changes no output");
    std::fs::remove_dir_all(&dir).ok();

    // `off` writes nothing, not even where the default cache would go (the driver may keep its
    // own cache beside it: Mesa's mesa_shader_cache).
    let home = temp_dir("off");
    let ours = home.join(".cache/llava-wgpu");
    let off = run_with_home("off", &[], Some(&home));
    assert!(off.status.success());
    assert!(files_under(&ours).is_empty(), "{:?}", files_under(&ours));
    // And that is where it goes without the variable.
    let default = run_with_home("", &[], Some(&home));
    assert!(default.status.success());
    let files = files_under(&ours.join("pipelines"));
    assert_eq!(files.len(), 1, "{files:?}");
    std::fs::remove_dir_all(&home).ok();
}

/// `--roofline` writes a PNG after the profile; without `--profile` it is a usage error.
#[test]
fn run_profile_draws_a_roofline() {
    let dir = temp_dir("roofline");
    let png = dir.join("roofline.png");
    let out = run("off", &["--profile", "--roofline", png.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = image::open(&png).unwrap();
    assert!(img.width() > 100 && img.height() > 100);
    let refused = run("off", &["--roofline", png.to_str().unwrap()]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--profile"), "{stderr}");
    // A path that cannot be written is refused before the model loads, naming the flag.
    let bad = run(
        "off",
        &["--profile", "--roofline", "/nonexistent/dir/r.png"],
    );
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("invalid argument --roofline"), "{stderr}");
    assert!(
        !stderr.contains("GPU profile"),
        "the request ran first: {stderr}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
