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
        assert_eq!(encoded.ids[encoded.image_start], config.image_token_index);
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
fn a_prompt_without_or_with_two_placeholders_is_refused() {
    let (_, tok) = tokenizer();
    assert!(tok.encode_with_image("no image here", 36).is_err());
    let e = tok
        .encode_with_image("<image> and <image>", 36)
        .unwrap_err()
        .to_string();
    assert!(e.contains("exactly one"), "{e}");
}
