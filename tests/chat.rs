//! `llava-wgpu chat`, driven two ways.
//!
//! Through stdin: the first answer equals a one-shot `generate` with the same settings (STAR,
//! 6 tokens), `/stats` reports the per-stage visual tokens of that plan, a follow-up reuses the
//! session, a text-only question and an image attached later work, bad commands are answered on
//! stderr without leaving, and the end of input exits with status 0.
//!
//! Through a pseudo-terminal (rexpect), as a person types: the prompt shows the attached image,
//! Up recalls the previous question, Enter asks it again, and Ctrl-D leaves.

mod fixture;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use llava_wgpu::prune::{Method, PruneOptions};
use llava_wgpu::{Engine, EngineOptions, GenerateRequest};

fn demo() -> PathBuf {
    fixture::private_runtime_dir();
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/tiny-llava-shapes")
}

/// The demo model's answer to `prompt` about `images` (a one-shot run, STAR, `tokens` tokens).
fn expected_answer(images: &[&str], prompt: &str, tokens: usize) -> llava_wgpu::GenerateOutput {
    let engine = Engine::load(&demo(), EngineOptions::default()).unwrap();
    let paths = images.iter().map(|i| demo().join(i)).collect();
    let mut request = GenerateRequest::with_images(paths, prompt);
    request.max_new_tokens = tokens;
    request.prune = PruneOptions {
        method: Method::Star,
        ..PruneOptions::default()
    };
    engine.generate(&request, |_| {}).unwrap()
}

#[test]
fn chat_through_stdin() {
    let demo = demo();
    let mut child = Command::new(env!("CARGO_BIN_EXE_llava-wgpu"))
        .args(["chat", "-m"])
        .arg(&demo)
        .arg("-i")
        .arg(demo.join("example1.png"))
        .args(["-n", "6"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let script = format!(
        "Which shape is green?\n/stats\nHow many objects are in the image?\n/stats\n\
         /prune nonsense\n/prune star keep=5000\n/frobnicate\n/image /no/such/file.png\n\
         /image {}\n/reset\nWhat can you see?\n/image {}\nWhich color does the cross have?\n/stats\n",
        demo.join("config.json").display(),
        demo.join("example1.png").display(),
    );
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(script.as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");

    let run = expected_answer(&["example1.png"], "Which shape is green?", 6);
    // Each answer follows the prompt it answers ("> ", or "[1 image] > " with an image attached).
    let answers: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_once("> ").map(|(_, rest)| rest))
        .collect();
    assert_eq!(answers[0].trim(), run.text.trim(), "{stdout}");
    assert!(stdout.contains("[1 image] > "), "{stdout}");
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
    // Errors name what the user typed, on stderr, and the chat goes on.
    assert!(
        stderr.contains("error: invalid argument --prune: 'nonsense' is not one of"),
        "{stderr}"
    );
    assert!(
        stderr.contains("error: invalid argument --keep"),
        "{stderr}"
    );
    assert!(!stdout.contains("PruneOptions") && !stderr.contains("PruneOptions"));
    assert!(stderr.contains("unknown command /frobnicate"), "{stderr}");
    assert!(stderr.contains("/no/such/file.png"), "{stderr}");
    assert!(
        stderr.contains("config.json: not a recognised image format"),
        "{stderr}"
    );
    assert!(stdout.contains("(new conversation)"), "{stdout}");
    // After /reset: a text-only question, then an image attached to the next one (its stage
    // counts are the first turn's again: the second /stats, after a text-only follow-up, has
    // none).
    assert!(stdout.contains("encoder 0, after stage 1 0"), "{stdout}");
    assert!(
        stdout.contains("conversation 4 messages, 1 images"),
        "{stdout}"
    );
}

#[test]
fn chat_in_a_terminal_recalls_lines_with_up() {
    let demo = demo();
    let question = "Which color does the cross have?";
    let expected = expected_answer(&["example1.png"], question, 4);
    let mut command = Command::new(env!("CARGO_BIN_EXE_llava-wgpu"));
    command
        .args(["chat", "-m"])
        .arg(&demo)
        .arg("--image")
        .arg(demo.join("example1.png"))
        .args(["-n", "4"]);
    // Every wait is bounded: a hung chat fails the test instead of blocking it.
    let mut chat = rexpect::session::spawn_command(command, Some(120_000)).unwrap();
    chat.exp_string("[1 image] > ").unwrap();
    chat.send_line(question).unwrap();
    chat.exp_string(expected.text.trim()).unwrap();
    chat.exp_string("> ").unwrap();
    // Up arrow (ESC [ A): the previous line comes back for editing; Enter asks it again.
    chat.send("\x1b[A").unwrap();
    chat.flush().unwrap();
    chat.exp_string(question).unwrap();
    chat.send("\r").unwrap();
    chat.flush().unwrap();
    chat.exp_string("> ").unwrap();
    chat.send_line("/stats").unwrap();
    // The recalled question was a second turn of the same conversation.
    chat.exp_string("conversation 4 messages, 1 images")
        .unwrap();
    chat.send_control('d').unwrap();
    chat.exp_eof().unwrap();
}
