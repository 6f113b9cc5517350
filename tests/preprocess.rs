//! CLIP preprocessing against the pixels HF transformers' CLIPImageProcessor (Pillow backend)
//! produced for the fixture images: square, larger square (downscale), wide and tall
//! non-square, grayscale and RGBA (composited onto white).

mod fixture;

use llava_wgpu::vision::{load_image, ImageProcessorConfig};

/// The resampler reproduces Pillow's fixed-point arithmetic, so the 8-bit pixels are identical
/// and the only difference is the float arithmetic of rescale + normalise (f64 here, f32 in
/// numpy): a few ulp of values of magnitude ≤ 2.2.
const PIXEL_BOUND: f32 = 1e-6;

#[test]
fn pixels_match_transformers() {
    let config = ImageProcessorConfig::load(&fixture::model_dir(), 84).unwrap();
    for case in fixture::cases() {
        let image = load_image(&case.image).unwrap();
        for (pad, key) in [(false, "pixel_values"), (true, "pixel_values_pad_square")] {
            let want = fixture::tensor(&format!("case{}.{key}", case.index));
            let got = config.preprocess(&image, pad);
            assert_eq!(got.len(), want.len());
            let worst = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= PIXEL_BOUND,
                "case {} ({}) {key}: max |Δ| = {worst}",
                case.index,
                case.image.display()
            );
        }
    }
}

#[test]
fn unreadable_images_are_named_errors() {
    let dir = std::env::temp_dir().join(format!("llava-wgpu-preprocess-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let corrupt = dir.join("corrupt.png");
    let mut bytes = std::fs::read(&fixture::cases()[0].image).unwrap();
    bytes.truncate(bytes.len() / 3);
    std::fs::write(&corrupt, &bytes).unwrap();
    let text = dir.join("notes.png");
    std::fs::write(&text, b"this is not an image").unwrap();
    for path in [corrupt, text, dir.join("missing.png")] {
        let err = load_image(&path).unwrap_err().to_string();
        assert!(
            err.contains(path.file_name().unwrap().to_str().unwrap()),
            "{err}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
