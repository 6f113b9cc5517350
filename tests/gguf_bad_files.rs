//! Bad GGUF files each get an error naming the file and what is wrong, never a panic: a
//! truncated file, tensor data past the end, misaligned and overlapping offsets, a type the
//! engine does not run, a wrong architecture, an mmproj given as the model, a missing mmproj,
//! a pair whose projector width is not the text model's, metadata of the wrong value type; and
//! the command line exits non-zero with the message (and runs a good pair, naming its types).

#[path = "session/mod.rs"]
mod session;

use std::path::{Path, PathBuf};
use std::process::Command;

use llava_wgpu::{Engine, EngineOptions};

fn weights() -> PathBuf {
    session::private_runtime_dir();
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights")
}

fn tiny(file: &str) -> PathBuf {
    weights().join("tiny-random-llava/gguf/f16").join(file)
}

const TEXT: &str = "ggml-model-f16.gguf";
const MMPROJ: &str = "mmproj-model-f16.gguf";

/// The error of loading `text` with `mmproj`.
fn load_error(text: &Path, mmproj: Option<&Path>) -> String {
    let options = EngineOptions {
        mmproj: mmproj.map(Path::to_path_buf),
        ..EngineOptions::default()
    };
    match Engine::load(text, options) {
        Ok(_) => panic!("{} loaded", text.display()),
        Err(e) => e.to_string(),
    }
}

/// A damaged copy of the tiny pair's text file, loaded with the intact mmproj.
fn damaged_text(name: &str, damage: impl FnOnce(&mut Vec<u8>)) -> (PathBuf, String) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("gguf-bad-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut bytes = std::fs::read(tiny(TEXT)).unwrap();
    damage(&mut bytes);
    let path = dir.join(TEXT);
    std::fs::write(&path, bytes).unwrap();
    let err = load_error(&path, Some(&tiny(MMPROJ)));
    assert!(
        err.starts_with(&path.display().to_string()),
        "names no file: {err}"
    );
    (path, err)
}

/// Where the tensor info of `name` is: (type field, offset field) byte positions.
fn info_fields(bytes: &[u8], name: &str) -> (usize, usize) {
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend(name.as_bytes());
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("no tensor info {name}"));
    let dims_at = at + needle.len();
    let n_dims = u32::from_le_bytes(bytes[dims_at..dims_at + 4].try_into().unwrap()) as usize;
    let ty = dims_at + 4 + 8 * n_dims;
    (ty, ty + 4)
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

fn write_u64(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

#[test]
fn a_truncated_file_is_named() {
    let (_, err) = damaged_text("truncated", |b| b.truncate(b.len() / 2));
    assert!(err.contains("past the end of the file"), "{err}");
    let (_, err) = damaged_text("header", |b| b.truncate(300));
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn tensor_data_past_the_end_is_named() {
    let (_, err) = damaged_text("past-end", |b| {
        let (_, offset) = info_fields(b, "output.weight");
        write_u64(b, offset, 1 << 40);
    });
    assert!(
        err.contains("'output.weight'") && err.contains("past the end"),
        "{err}"
    );
}

#[test]
fn misaligned_and_overlapping_offsets_are_named() {
    let (_, err) = damaged_text("misaligned", |b| {
        let (_, offset) = info_fields(b, "token_embd.weight");
        let value = read_u64(b, offset);
        write_u64(b, offset, value + 2);
    });
    assert!(
        err.contains("'token_embd.weight'") && err.contains("alignment"),
        "{err}"
    );
    let (_, err) = damaged_text("overlap", |b| {
        let (_, first) = info_fields(b, "output.weight");
        let (_, second) = info_fields(b, "token_embd.weight");
        let start = read_u64(b, first);
        write_u64(b, second, start);
    });
    assert!(err.contains("overlap"), "{err}");
}

#[test]
fn an_unknown_type_is_named_with_the_tensor() {
    let (_, err) = damaged_text("iq2", |b| {
        let (ty, _) = info_fields(b, "blk.0.attn_q.weight");
        b[ty..ty + 4].copy_from_slice(&16u32.to_le_bytes());
    });
    assert!(
        err.contains("'blk.0.attn_q.weight'") && err.contains("IQ2_XXS (16)"),
        "{err}"
    );
    let (_, err) = damaged_text("bad-type", |b| {
        let (ty, _) = info_fields(b, "blk.0.attn_q.weight");
        b[ty..ty + 4].copy_from_slice(&99u32.to_le_bytes());
    });
    assert!(err.contains("99 (not a ggml type)"), "{err}");
}

/// Rewrite the string value of metadata `key` (same length) or its type number.
fn metadata_field(bytes: &[u8], key: &str) -> usize {
    let mut needle = (key.len() as u64).to_le_bytes().to_vec();
    needle.extend(key.as_bytes());
    bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap()
        + needle.len()
}

#[test]
fn a_wrong_architecture_is_named() {
    let (_, err) = damaged_text("arch", |b| {
        let at = metadata_field(b, "general.architecture") + 4 + 8;
        b[at..at + 5].copy_from_slice(b"gemma");
    });
    assert!(err.contains("unsupported architecture 'gemma'"), "{err}");
}

#[test]
fn metadata_of_the_wrong_value_type_is_named() {
    let (_, err) = damaged_text("value-type", |b| {
        let at = metadata_field(b, "llama.block_count");
        b[at..at + 4].copy_from_slice(&5u32.to_le_bytes()); // i32 instead of u32
    });
    assert!(
        err.contains("'llama.block_count' is a i32, expected u32"),
        "{err}"
    );
    let (_, err) = damaged_text("tokens-type", |b| {
        let at = metadata_field(b, "tokenizer.ggml.scores");
        b[at + 4..at + 8].copy_from_slice(&5u32.to_le_bytes()); // i32 elements
    });
    assert!(
        err.contains("'tokenizer.ggml.scores'") && err.contains("expected array of floats"),
        "{err}"
    );
}

#[test]
fn the_roles_of_the_two_files_are_checked() {
    let err = load_error(&tiny(MMPROJ), None);
    assert!(err.contains("mmproj") && err.contains("--mmproj"), "{err}");
    let err = load_error(&tiny(TEXT), None);
    assert!(
        err.contains("needs its mmproj") && err.contains("--mmproj"),
        "{err}"
    );
    let err = load_error(&tiny(MMPROJ), Some(&tiny(MMPROJ)));
    assert!(err.contains("given as the text model"), "{err}");
    let err = load_error(&tiny(TEXT), Some(&tiny(TEXT)));
    assert!(err.contains("not 'clip'"), "{err}");
}

#[test]
fn a_projector_of_another_width_is_not_a_pair() {
    let shapes = weights().join("tiny-llava-shapes/gguf/q4_k_m/mmproj-model-f16.gguf");
    let err = load_error(&tiny(TEXT), Some(&shapes));
    assert!(
        err.contains("mm.2.weight") && err.contains("256") && err.contains("64"),
        "{err}"
    );
}

#[test]
fn gguf_files_take_no_weight_format() {
    let options = EngineOptions {
        weight_format: Some(llava_wgpu::gpu::WeightFormat::Q4_0.into()),
        ..EngineOptions::default()
    };
    let err = Engine::load(&tiny(TEXT).with_file_name(""), options)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("weight_format") && err.contains("types its files store"),
        "{err}"
    );
}

/// The binary prints the error with the flag it came from and exits non-zero.
#[test]
fn the_command_line_names_the_problem_and_fails() {
    let bin = env!("CARGO_BIN_EXE_llava-wgpu");
    let image = weights().join("tiny-llava-shapes/example1.png");
    let run = |args: &[&str]| {
        let mut all = vec!["run", "--image", image.to_str().unwrap(), "--prompt", "q"];
        all.extend(args);
        Command::new(bin).args(&all).output().unwrap()
    };
    let text = tiny(TEXT);
    let out = run(&["--model", text.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--mmproj") && stderr.contains(TEXT),
        "{stderr}"
    );
    let dir = tiny("");
    let out = run(&["--model", dir.to_str().unwrap(), "--weights", "q4_0"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--weights"), "{stderr}");
}

/// Good files of other shapes: version 2 (GGUF v2 and v3 are the same bytes on little-endian
/// machines but for the version number) and a non-default `general.alignment`, both loading to
/// the same logits as the fixture.
#[test]
fn version_2_and_other_alignments_load() {
    use llava_wgpu::model::gguf::file::{Array, GgufFile, Value};
    use llava_wgpu::model::gguf::writer::{GgufWriter, Meta};
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("gguf-good-shapes");
    std::fs::create_dir_all(&dir).unwrap();
    // The fixture's text file rewritten with 128-byte alignment.
    let file = GgufFile::open(&tiny(TEXT)).unwrap();
    let mut out = GgufWriter::default();
    out.meta("general.alignment", Meta::U32(128));
    for key in &file.keys {
        let meta = match file.get(key).unwrap() {
            Value::U32(v) => Meta::U32(*v),
            Value::F32(v) => Meta::F32(*v),
            Value::Bool(v) => Meta::Bool(*v),
            Value::String(v) => Meta::Str(v.clone()),
            Value::Array(Array::String(v)) => Meta::Strs(v.clone()),
            Value::Array(Array::Float(v)) => Meta::F32s(v.iter().map(|&x| x as f32).collect()),
            Value::Array(Array::Int { values, .. }) => {
                Meta::I32s(values.iter().map(|&x| x as i32).collect())
            }
            other => panic!("{key}: {other:?}"),
        };
        out.meta(key, meta);
    }
    for t in &file.tensors {
        out.tensor(&t.name, &t.shape(), t.format, file.bytes(t).to_vec());
    }
    let aligned = dir.join("aligned.gguf");
    out.write(&aligned).unwrap();
    let reread = GgufFile::open(&aligned).unwrap();
    assert_eq!(reread.alignment, 128);
    assert!(reread.tensors.iter().all(|t| t.start % 128 == 0));
    // The fixture's text file as version 2.
    let mut bytes = std::fs::read(tiny(TEXT)).unwrap();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    let v2 = dir.join("v2.gguf");
    std::fs::write(&v2, bytes).unwrap();
    assert_eq!(GgufFile::open(&v2).unwrap().version, 2);
    // All three answer alike.
    let logits = |text: &Path| {
        let options = EngineOptions {
            mmproj: Some(tiny(MMPROJ)),
            ..EngineOptions::default()
        };
        let engine = Engine::load(text, options).unwrap();
        let image = weights().join("tiny-random-llava/reference/case0_square84.png");
        let mut request = llava_wgpu::GenerateRequest::new(image, "What is this?");
        request.capture_outputs = true;
        request.max_new_tokens = 1;
        engine.generate(&request, |_| {}).unwrap().first_logits
    };
    let want = logits(&tiny(TEXT));
    assert_eq!(logits(&aligned), want);
    assert_eq!(logits(&v2), want);
}

/// And a good pair through the binary: `run --json` names the types it ran and that it padded.
#[test]
fn the_command_line_runs_a_pair_and_reports_its_types() {
    let pair = weights().join("tiny-llava-shapes/gguf/q4_k_m");
    let out = Command::new(env!("CARGO_BIN_EXE_llava-wgpu"))
        .args(["run", "--json", "--model"])
        .arg(&pair)
        .arg("--image")
        .arg(weights().join("tiny-llava-shapes/example1.png"))
        .args(["--prompt", "Which color does the cross have?"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["text"], "white");
    assert_eq!(json["weights_format"], "gguf q4_k+q5_0+q6_k+q8_0");
    assert_eq!(json["vision_weights_format"], "gguf f16");
    assert_eq!(json["pad_to_square"], true);
    assert_eq!(json["template"], "llava-hf");
}
