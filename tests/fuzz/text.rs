//! Templates and the fixture's tokenizer.json on arbitrary unicode prompts: empty, very long,
//! with any number of `<image>` markers and other special tokens. `encode_with_images` succeeds
//! exactly when the rendered text holds one `<image>` per image, and then expands each in place;
//! decoding arbitrary ids never panics.

use std::str::FromStr;
use std::sync::OnceLock;

use llava_wgpu::text::{StreamDecoder, Template, TextTokenizer};
use proptest::prelude::*;

use crate::support::{cases, model_dir, regex};

/// The fixture's `<image>` id (config.json `image_token_index`) and BOS.
const IMAGE_ID: u32 = 659;
const BOS: u32 = 1;

fn tokenizer() -> &'static TextTokenizer {
    static TOKENIZER: OnceLock<TextTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| TextTokenizer::load(&model_dir(), IMAGE_ID, Some(BOS)).unwrap())
}

/// Prompts built from pieces that matter to a LLaMA tokenizer, plus arbitrary unicode.
fn prompt() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => regex("\\PC{0,12}"),
        2 => regex(".{0,6}"),
        2 => prop::sample::select(vec![
            "<image>", "<image", "image>", "<s>", "</s>", "<unk>", "<pad>", "\n", " ", "\t",
            "\r\n", "\u{0}", "\u{FEFF}", "\u{FFFD}", "e\u{301}", "👩‍👩‍👧", "▁", "<0x0A>", "USER:",
            "ASSISTANT:",
        ])
        .prop_map(str::to_string),
    ];
    prop_oneof![
        8 => prop::collection::vec(piece, 0..24).prop_map(|p| p.concat()),
        1 => (regex("\\PC{1,4}"), 1usize..2000).prop_map(|(s, n)| s.repeat(n)),
        1 => (0usize..64).prop_map(|n| "<image>".repeat(n)),
    ]
}

fn template() -> impl Strategy<Value = Template> {
    prop::sample::select(Template::ALL.to_vec())
}

proptest! {
    #![proptest_config(cases(3000))]

    #[test]
    fn prompts_encode_with_their_images_or_are_refused(
        prompt in prompt(), template in template(),
        rows in prop::collection::vec(0usize..700, 0..4),
    ) {
        let text = template.render(&prompt, "<image>");
        let markers = text.matches("<image>").count();
        match tokenizer().encode_with_images(&text, &rows) {
            Ok(p) => {
                prop_assert_eq!(markers, rows.len(), "accepted {:?}", text);
                let spans: Vec<usize> = p.images.iter().map(|s| s.len).collect();
                prop_assert_eq!(&spans, &rows);
                let images = p.ids.iter().filter(|&&id| id == IMAGE_ID).count();
                prop_assert_eq!(images, rows.iter().sum::<usize>());
                for (span, next) in p.images.iter().zip(p.images.iter().skip(1)) {
                    prop_assert!(span.end() <= next.start);
                }
                for span in &p.images {
                    prop_assert!(p.ids[span.start..span.end()].iter().all(|&id| id == IMAGE_ID));
                }
                prop_assert_eq!(p.ids.first(), Some(&BOS));
                // (`vocab_size` builds the whole vocabulary map: call it once.)
                let vocab = tokenizer().vocab_size();
                prop_assert!(p.ids.iter().all(|&id| (id as usize) < vocab));
            }
            Err(e) => {
                prop_assert_ne!(markers, rows.len(), "refused {:?}: {}", text, e);
                let e = e.to_string();
                prop_assert!(e.starts_with("invalid argument prompt"), "{e}");
                prop_assert!(e.contains(&format!("holds {markers} image placeholder")), "{e}");
            }
        }
    }

    #[test]
    fn template_names_parse_or_are_refused(name in prop_oneof![regex(".{0,12}"), regex("[a-z-]{3,9}")]) {
        match Template::from_str(&name) {
            Ok(t) => prop_assert_eq!(t.name(), name),
            Err(e) => prop_assert!(e.to_string().contains("invalid argument template"), "{}", e),
        }
    }

    #[test]
    fn arbitrary_ids_decode_and_stream_without_panic(
        ids in prop::collection::vec(prop_oneof![4 => 0u32..700, 1 => any::<u32>()], 0..48),
    ) {
        let t = tokenizer();
        let whole = t.decode(&ids);
        let mut stream = StreamDecoder::new();
        let mut streamed = String::new();
        for &id in &ids {
            match stream.push(t, id) {
                Ok(piece) => streamed.push_str(&piece),
                Err(e) => {
                    prop_assert!(e.to_string().contains("tokenizer.json"), "{}", e);
                    return Ok(());
                }
            }
        }
        // The increments add up to the text so far. It need not be a prefix of the whole
        // decode: the byte-fallback decoder turns `<0x00>` alone into "\0" but `<0x00> <0x83>`
        // into two U+FFFD, so text streamed before an invalid byte can differ (ids [3, 131]).
        prop_assert_eq!(streamed.as_str(), stream.text());
        if let Err(e) = whole {
            prop_assert!(e.to_string().contains("tokenizer.json"), "{}", e);
        }
    }
}
