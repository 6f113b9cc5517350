//! Tokenization and templating against the ids HF's LlavaProcessor produced for the fixture.

mod fixture;

use llava_wgpu::model::LlavaConfig;
use llava_wgpu::text::{StreamDecoder, Template, TextTokenizer};

fn tokenizer() -> (LlavaConfig, TextTokenizer) {
    let config = LlavaConfig::load(&fixture::model_dir()).unwrap();
    let tok = TextTokenizer::load(
        &fixture::model_dir(),
        config.image_token_index,
        config.text.bos_token_id,
    )
    .unwrap();
    (config, tok)
}

#[test]
fn prompt_ids_match_the_hf_processor() {
    let (config, tok) = tokenizer();
    for case in fixture::cases() {
        let text = Template::LlavaHf.render(&case.prompt, &tok.image_token);
        assert_eq!(text, case.json["templated_prompt"].as_str().unwrap());
        let encoded = tok.encode_with_image(&text, config.image_tokens()).unwrap();
        assert_eq!(encoded.ids, case.input_ids, "case {}", case.index);
        assert_eq!(
            encoded.ids[encoded.images[0].start],
            config.image_token_index
        );
        assert_eq!(encoded.ids[0], 1, "BOS first");
    }
}

#[test]
fn streaming_decode_reproduces_the_greedy_text() {
    let (_, tok) = tokenizer();
    for case in fixture::cases() {
        let mut stream = StreamDecoder::new();
        let mut printed = String::new();
        for &id in &case.greedy_ids {
            printed.push_str(&stream.push(&tok, id).unwrap());
        }
        assert_eq!(
            printed,
            case.json["greedy_text"].as_str().unwrap(),
            "case {}",
            case.index
        );
    }
}

#[test]
fn placeholders_must_match_the_images() {
    let (_, tok) = tokenizer();
    let e = tok
        .encode_with_image("no image here", 36)
        .unwrap_err()
        .to_string();
    assert!(e.contains("holds 0 image placeholder(s)"), "{e}");
    let e = tok
        .encode_with_image("<image> and <image>", 36)
        .unwrap_err()
        .to_string();
    assert!(e.contains("holds 2 image placeholder(s)"), "{e}");
}

/// Two placeholders expand to their own images' rows, in order, with the text between kept.
#[test]
fn several_placeholders_expand_in_order() {
    let (config, tok) = tokenizer();
    let image = config.image_token_index;
    let one = tok.encode_with_images("USER: <image>\nQ", &[3]).unwrap();
    let two = tok
        .encode_with_images("USER: <image>\n<image>\nQ", &[3, 5])
        .unwrap();
    let [a, b] = [two.images[0], two.images[1]];
    assert_eq!((a.len, b.len), (3, 5));
    assert!(two.ids[a.start..a.end()].iter().all(|&id| id == image));
    assert!(two.ids[b.start..b.end()].iter().all(|&id| id == image));
    // Between them: exactly the ids of the text between the placeholders, as in the one-image
    // prompt after its image.
    let between = &two.ids[a.end()..b.start];
    assert!(!between.is_empty() && between.iter().all(|&id| id != image));
    assert_eq!(between, &one.ids[one.images[0].end()..][..between.len()]);
    assert_eq!(two.text_tokens(), two.ids.len() - 8);
    assert_eq!(two.text_after_images(), two.ids.len() - b.end());
    assert!(tok
        .encode_with_images("text only", &[])
        .unwrap()
        .images
        .is_empty());
}
