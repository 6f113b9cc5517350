//! Bad input gives a clear error naming the culprit and a non-zero exit, never a panic:
//! missing config or tensor, truncated safetensors, a misshaped tensor, an unsupported
//! architecture, a corrupt image, a prompt longer than the context.

mod fixture;

use std::path::{Path, PathBuf};
use std::process::Command;

use llava_wgpu::{Engine, EngineOptions, GenerateRequest};
use safetensors::tensor::TensorView;

/// A scratch copy of the fixture model that a test may damage.
struct ModelCopy {
    dir: PathBuf,
}

impl ModelCopy {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("llava-wgpu-bad-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(fixture::model_dir()).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
            }
        }
        Self { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Rewrite model.safetensors, letting `edit` drop or reshape tensors.
    fn rewrite_weights(&self, edit: impl Fn(&str, Vec<usize>) -> Option<Vec<usize>>) {
        let bytes = std::fs::read(self.path("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut kept = Vec::new();
        for (name, view) in st.tensors() {
            if let Some(shape) = edit(&name, view.shape().to_vec()) {
                kept.push((
                    name,
                    TensorView::new(view.dtype(), shape, view.data()).unwrap(),
                ));
            }
        }
        let out = safetensors::serialize(kept, None).unwrap();
        std::fs::write(self.path("model.safetensors"), out).unwrap();
    }

    /// Replace tensor `target` of model.safetensors by `shape`, its values made by `values`
    /// from the old raw bytes.
    fn replace_tensor(&self, target: &str, shape: Vec<usize>, values: impl Fn(&[u8]) -> Vec<u8>) {
        let bytes = std::fs::read(self.path("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let new = values(st.tensor(target).unwrap().data());
        let mut kept = Vec::new();
        for (name, view) in st.tensors() {
            let view = if name == target {
                TensorView::new(view.dtype(), shape.clone(), &new).unwrap()
            } else {
                view
            };
            kept.push((name, view));
        }
        let out = safetensors::serialize(kept, None).unwrap();
        std::fs::write(self.path("model.safetensors"), out).unwrap();
    }

    /// Rewrite a JSON file of the copy by replacing `from` with `to` (which must occur).
    fn edit_json(&self, file: &str, from: &str, to: &str) {
        let text = std::fs::read_to_string(self.path(file)).unwrap();
        assert!(text.contains(from), "{file} holds no {from}");
        std::fs::write(self.path(file), text.replacen(from, to, 1)).unwrap();
    }
}

impl Drop for ModelCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn load_error(dir: &Path) -> String {
    match Engine::load(dir, EngineOptions::default()) {
        Ok(_) => panic!("loading {} should have failed", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_missing_config_is_named() {
    let m = ModelCopy::new("config");
    std::fs::remove_file(m.path("config.json")).unwrap();
    let e = load_error(&m.dir);
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn a_missing_tensor_is_named() {
    let m = ModelCopy::new("tensor");
    m.rewrite_weights(|name, shape| {
        (name != "language_model.model.layers.2.mlp.up_proj.weight").then_some(shape)
    });
    let e = load_error(&m.dir);
    assert!(
        e.contains("layers.2.mlp.up_proj.weight") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn a_misshaped_tensor_is_named_with_both_shapes() {
    let m = ModelCopy::new("shape");
    m.rewrite_weights(|name, shape| {
        Some(
            if name == "vision_tower.encoder.layers.1.self_attn.q_proj.weight" {
                vec![32, 128]
            } else {
                shape
            },
        )
    });
    let e = load_error(&m.dir);
    assert!(
        e.contains("layers.1.self_attn.q_proj.weight")
            && e.contains("[32, 128]")
            && e.contains("[64, 64]"),
        "{e}"
    );
}

/// `embed_tokens` is read on the host, where no kernel checks its width: a [1322, 32] matrix
/// (the fixture's [661, 64] reshaped) used to load and then misalign every embedding row.
#[test]
fn an_embedding_of_the_wrong_width_is_named_with_both_widths() {
    let m = ModelCopy::new("embed-width");
    m.rewrite_weights(|name, shape| {
        Some(if name == "language_model.model.embed_tokens.weight" {
            vec![1322, 32]
        } else {
            shape
        })
    });
    let e = load_error(&m.dir);
    assert!(
        e.contains("embed_tokens.weight") && e.contains("32") && e.contains("hidden_size = 64"),
        "{e}"
    );
}

/// A vision tower whose checkpoint and config agree on 4 input channels used to load, then
/// slice out of bounds in `patchify` (the processor produces 3): refused at load.
#[test]
fn a_vision_tower_that_is_not_rgb_is_refused_at_load() {
    let m = ModelCopy::new("channels");
    m.edit_json("config.json", "\"num_channels\": 3", "\"num_channels\": 4");
    let patch = "vision_tower.embeddings.patch_embedding.weight";
    m.replace_tensor(patch, vec![64, 4, 14, 14], |old| {
        old.iter().chain(&old[..old.len() / 3]).copied().collect()
    });
    let e = load_error(&m.dir);
    assert!(
        e.contains("config.json") && e.contains("vision_config.num_channels") && e.contains('4'),
        "{e}"
    );
}

/// Without the center crop, a non-square image resizes to a non-square array the vision
/// tower cannot take (`patchify` sliced out of bounds): refused at load.
#[test]
fn a_processor_without_center_crop_is_refused_at_load() {
    let m = ModelCopy::new("no-crop");
    m.edit_json(
        "preprocessor_config.json",
        "\"do_center_crop\": true",
        "\"do_center_crop\": false",
    );
    let e = load_error(&m.dir);
    assert!(
        e.contains("preprocessor_config.json") && e.contains("do_center_crop"),
        "{e}"
    );
}

#[test]
fn a_truncated_safetensors_file_is_named() {
    let m = ModelCopy::new("truncated");
    let bytes = std::fs::read(m.path("model.safetensors")).unwrap();
    std::fs::write(m.path("model.safetensors"), &bytes[..bytes.len() - 1000]).unwrap();
    let e = load_error(&m.dir);
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    // A header that is cut off too.
    std::fs::write(m.path("model.safetensors"), &bytes[..100]).unwrap();
    let e = load_error(&m.dir);
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn an_unsupported_architecture_is_named() {
    let m = ModelCopy::new("arch");
    let config = std::fs::read_to_string(m.path("config.json")).unwrap();
    std::fs::write(
        m.path("config.json"),
        config.replace("\"llama\"", "\"gemma\""),
    )
    .unwrap();
    let e = load_error(&m.dir);
    assert!(
        e.contains("text_config.model_type") && e.contains("gemma"),
        "{e}"
    );
}

#[test]
fn a_corrupt_image_and_an_overlong_prompt_are_refused() {
    let engine = Engine::load(&fixture::model_dir(), EngineOptions::default()).unwrap();
    let m = ModelCopy::new("image");
    let corrupt = m.path("corrupt.png");
    let mut bytes = std::fs::read(&fixture::cases()[1].image).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&corrupt, bytes).unwrap();
    let e = engine
        .generate(&GenerateRequest::new(&corrupt, "What?"), |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("corrupt.png"), "{e}");
    // The fixture's context is 512 tokens.
    let long = "red blue green ".repeat(300);
    let e = engine
        .generate(
            &GenerateRequest::new(&fixture::cases()[0].image, long),
            |_| {},
        )
        .unwrap_err()
        .to_string();
    // The library names the API field (`prompt`); the CLI maps it to `--prompt`.
    assert!(
        e.contains("argument prompt:") && e.contains("context"),
        "{e}"
    );
}

/// The binary exits non-zero with `error: ...` on stderr, and never panics.
#[test]
fn the_cli_reports_errors_with_a_non_zero_exit() {
    let bin = env!("CARGO_BIN_EXE_llava-wgpu");
    let image = fixture::cases()[0].image.clone();
    let model = fixture::model_dir();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "run".into(),
                "--model".into(),
                "/nonexistent/model".into(),
                "--image".into(),
                image.display().to_string(),
                "--prompt".into(),
                "hi".into(),
            ],
            "/nonexistent/model",
        ),
        (
            vec![
                "run".into(),
                "--model".into(),
                model.display().to_string(),
                "--image".into(),
                "/nonexistent.png".into(),
                "--prompt".into(),
                "hi".into(),
            ],
            "/nonexistent.png",
        ),
        (
            vec![
                "run".into(),
                "--model".into(),
                model.display().to_string(),
                "--image".into(),
                image.display().to_string(),
                "--prompt".into(),
                "hi".into(),
                "--top-p".into(),
                "0".into(),
            ],
            "--top-p",
        ),
        (
            vec![
                "bench".into(),
                "kernels".into(),
                "--adapter".into(),
                "no-such-gpu".into(),
            ],
            "--adapter",
        ),
    ];
    for (args, culprit) in cases {
        let out = Command::new(bin).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        assert!(stderr.contains(culprit), "{args:?}: {stderr}");
    }
}

/// Arguments that cannot work fail at once, naming their flag, before the model loads: every
/// case points `--model` at a directory that does not exist, so an error about the model would
/// mean the argument was checked too late.
#[test]
fn arguments_are_checked_before_any_work() {
    let image = fixture::cases()[0].image.display().to_string();
    let not_an_image = fixture::model_dir()
        .join("config.json")
        .display()
        .to_string();
    let run = |extra: &[&str]| -> Vec<String> {
        let base = ["run", "--model", "/nonexistent/model", "-p", "hi"];
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let chat = |extra: &[&str]| -> Vec<String> {
        let base = ["chat", "--model", "/nonexistent/model"];
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            run(&["-i", &image, "--kept-overlay", "/nonexistent-dir/kept.png"]),
            "invalid argument --kept-overlay: cannot write",
        ),
        (
            run(&[
                "-i",
                &image,
                "--kept-overlay",
                "kept.png",
                "--prune",
                "none",
            ]),
            "invalid argument --kept-overlay",
        ),
        (
            run(&["--kept-overlay", "kept.png"]),
            "invalid argument --kept-overlay",
        ),
        (
            run(&["-i", &image, "--logprobs", "3"]),
            "invalid argument --logprobs",
        ),
        (
            run(&["-i", "/no/such.png"]),
            "invalid argument --image: /no/such.png",
        ),
        (run(&["-i", &not_an_image]), "not a recognised image format"),
        (run(&["-i", "/dev/null"]), "not a regular file"),
        (
            chat(&["--image", "/no/such.png"]),
            "invalid argument --image",
        ),
        (chat(&["-i", &not_an_image]), "invalid argument --image"),
        (chat(&["--top-p", "2"]), "invalid argument --top-p"),
    ];
    refused_before_loading(&cases);
}

/// Each command fails, naming its culprit, without touching its model (`/nonexistent/model`,
/// which a late check would name instead).
fn refused_before_loading(cases: &[(Vec<String>, &str)]) {
    let bin = env!("CARGO_BIN_EXE_llava-wgpu");
    for (args, culprit) in cases {
        let out = Command::new(bin).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(stderr.contains(culprit), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("/nonexistent/model"),
            "{args:?} loaded first: {stderr}"
        );
    }
}

/// `eval`'s plot path, report and pairing are checked before its model loads: a long
/// evaluation never fails at its end.
#[test]
fn eval_arguments_are_checked_before_any_work() {
    let eval = |extra: &[&str]| -> Vec<String> {
        let base = ["eval", "--model", "/nonexistent/model"];
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    refused_before_loading(&[
        (
            eval(&["--plot", "/nonexistent-dir/accuracy.png"]),
            "invalid argument --plot: cannot write",
        ),
        (
            eval(&[
                "--from-json",
                "Cargo.toml",
                "--plot",
                "/tmp/never-drawn.png",
            ]),
            "invalid argument --from-json: Cargo.toml is not an `eval --json` report",
        ),
        (
            eval(&["--methods", "star,dart", "--paired-with", "fastv"]),
            "invalid argument --paired-with: fastv is not among the methods",
        ),
    ]);
}

/// `devices` marks the adapter a run would open: the best one, or the one `--adapter` names.
#[test]
fn devices_marks_the_adapter_a_run_picks() {
    let bin = env!("CARGO_BIN_EXE_llava-wgpu");
    let chosen = |extra: &[&str]| -> Vec<bool> {
        let out = Command::new(bin)
            .args(["devices", "--json"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success());
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let list = list.as_array().unwrap().clone();
        list.iter()
            .map(|a| a["chosen"].as_bool().unwrap())
            .collect()
    };
    let best = chosen(&[]);
    assert_eq!(best.iter().filter(|&&c| c).count(), 1);
    assert!(best[0], "the best adapter is listed first and chosen");
    let last = (best.len() - 1).to_string();
    let by_index = chosen(&["--adapter", &last]);
    assert!(by_index[best.len() - 1] && by_index.iter().filter(|&&c| c).count() == 1);
    assert!(chosen(&["--adapter", "no-such-adapter"])
        .iter()
        .all(|&c| !c));
}
