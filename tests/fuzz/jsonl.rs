//! `eval::read_jsonl` on arbitrary lines: valid examples, missing or mistyped fields, broken
//! JSON, blank lines, CRLF, invalid UTF-8. `Ok` holds one example per non-blank line, with its
//! fields as written; an error names the file and, for a bad line, its number.

use llava_wgpu::harness::eval::read_jsonl;
use proptest::prelude::*;
use serde_json::{json, Value};

use crate::support::{cases, json, regex, Scratch};

const FIELDS: &[&str] = &["image", "question", "answer", "type"];

/// One line of a question set.
fn line() -> impl Strategy<Value = String> {
    let text = prop_oneof![
        regex("\\PC{0,16}"),
        regex(".{0,8}"),
        Just("../x.png".to_string())
    ];
    let example = (
        text.clone(),
        text.clone(),
        text.clone(),
        prop::option::of(text),
    )
        .prop_map(|(i, q, a, t)| {
            let mut v = json!({"image": i, "question": q, "answer": a});
            if let Some(t) = t {
                v["type"] = Value::from(t);
            }
            v.to_string()
        });
    prop_oneof![
        6 => example,
        2 => json(FIELDS).prop_map(|v| v.to_string()),
        1 => prop::sample::select(vec!["", "   ", "\t", "{", "}", "null", "[]", "{\"image\": 1}"])
            .prop_map(str::to_string),
        1 => regex(".{0,24}"),
    ]
}

/// The lines joined by `\n` or `\r\n`, optionally followed by raw bytes (maybe not UTF-8).
fn file() -> impl Strategy<Value = Vec<u8>> {
    let lines = prop::collection::vec(line(), 0..12);
    let tail = prop_oneof![4 => Just(Vec::new()), 1 => prop::collection::vec(any::<u8>(), 1..8)];
    (lines, tail, any::<bool>()).prop_map(|(lines, tail, crlf)| {
        let mut bytes = lines.join(if crlf { "\r\n" } else { "\n" }).into_bytes();
        bytes.extend(tail);
        bytes
    })
}

proptest! {
    #![proptest_config(cases(5000))]

    #[test]
    fn question_sets_are_read_or_refused_by_name(bytes in file()) {
        let scratch = Scratch::new("jsonl");
        let path = scratch.write("set.jsonl", &bytes);
        match read_jsonl(&path) {
            Ok(examples) => {
                let text = String::from_utf8(bytes).unwrap();
                let kept: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
                prop_assert_eq!(examples.len(), kept.len());
                for (ex, line) in examples.iter().zip(kept) {
                    let v: Value = serde_json::from_str(line).unwrap();
                    prop_assert_eq!(&ex.question, v["question"].as_str().unwrap());
                    prop_assert_eq!(&ex.answer, v["answer"].as_str().unwrap());
                    prop_assert_eq!(ex.kind.as_deref(), v["type"].as_str());
                    prop_assert_eq!(&ex.image, &scratch.path().join(v["image"].as_str().unwrap()));
                }
            }
            Err(e) => {
                let e = e.to_string();
                prop_assert!(e.starts_with(&path.display().to_string()), "{e}");
            }
        }
    }
}
