//! `llava-wgpu chat` driven through stdin: the first answer equals a one-shot `generate` with the
//! same settings (STAR, 6 tokens), `/stats` reports the per-stage visual tokens of that plan,
//! a follow-up reuses the session, bad commands are answered without leaving, and the end of
//! input exits with status 0.

mod fixture;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use llava_wgpu::prune::{Method, PruneOptions};
use llava_wgpu::{Engine, EngineOptions, GenerateRequest};

#[test]
fn chat_through_stdin() {
    fixture::private_runtime_dir();
    let demo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/tiny-llava-shapes");
    let mut child = Command::new(env!("CARGO_BIN_EXE_llava-wgpu"))
        .args(["chat", "--model"])
        .arg(&demo)
        .arg("--image")
        .arg(demo.join("example1.png"))
        .args(["-n", "6"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let script = "Which shape is green?\n/stats\nHow many objects are in the image?\n/stats\n/prune nonsense\n/frobnicate\n/reset\n/image /no/such/file.png\n";
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let engine = Engine::load(&demo, EngineOptions::default()).unwrap();
    let mut request = GenerateRequest::new(demo.join("example1.png"), "Which shape is green?");
    request.max_new_tokens = 6;
    request.prune = PruneOptions {
        method: Method::Star,
        ..PruneOptions::default()
    };
    let run = engine.generate(&request, |_| {}).unwrap();
    let answers: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("> "))
        .collect();
    assert_eq!(answers[0].trim(), run.text.trim(), "{stdout}");
    let v = &run.visual_tokens;
    let stats = format!(
        "visual tokens: encoder {}, after stage 1 {}, after stage 2 {}",
        v.encoder, v.after_stage1, v.after_stage2
    );
    assert_eq!(stdout.matches(&stats).count(), 2, "{stdout}");
    assert!(stdout.contains("reused 0)"), "{stdout}");
    let second_reuse = stdout
        .split("(reused ")
        .nth(2)
        .and_then(|s| s.split(')').next())
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap();
    assert!(second_reuse >= run.prompt_tokens, "{stdout}");
    assert!(
        stdout.contains("error: invalid argument prune.method"),
        "{stdout}"
    );
    assert!(stdout.contains("unknown command /frobnicate"), "{stdout}");
    assert!(stdout.contains("(new conversation)"), "{stdout}");
    assert!(stdout.contains("is not a file"), "{stdout}");
}
