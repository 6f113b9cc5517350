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
            let got = config.preprocess(&image, &case.image, pad).unwrap();
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

/// A grey PNG of `w × h` with a bright band across the middle row, written to `dir`.
fn write_strip(dir: &std::path::Path, w: u32, h: u32) -> std::path::PathBuf {
    let path = dir.join(format!("strip-{w}x{h}.png"));
    let image = image::RgbImage::from_fn(w, h, |x, y| {
        let band = (y as i64 - h as i64 / 2).abs() < 3 || (x as i64 - w as i64 / 2).abs() < 3;
        image::Rgb(if band { [250, 20, 90] } else { [60, 60, 60] })
    });
    image.save(&path).unwrap();
    path
}

/// A 1×100000 strip used to be resized to 84×8.4M (37 s, 4.5 GB for a 336 model) before the
/// crop, and a 1×10M strip aborted. Now such shapes are refused at once, naming the file and
/// its size, with or without padding to a square.
#[test]
fn extremely_elongated_images_are_refused_quickly() {
    let dir = std::env::temp_dir().join(format!("llava-wgpu-strip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = ImageProcessorConfig::load(&fixture::model_dir(), 84).unwrap();
    for (w, h) in [(1, 100_000), (100_000, 1), (1, 10_000_000)] {
        let path = write_strip(&dir, w, h);
        let start = std::time::Instant::now();
        let image = load_image(&path).unwrap();
        for pad in [false, true] {
            let err = match config.preprocess(&image, &path, pad) {
                Ok(_) => panic!("{w}x{h} (pad {pad}) was accepted"),
                Err(e) => e.to_string(),
            };
            assert!(
                err.contains(&format!("strip-{w}x{h}.png"))
                    && err.contains(&format!("{w}x{h} pixels")),
                "{err}"
            );
        }
        let secs = start.elapsed().as_secs_f64();
        assert!(secs < 10.0, "{w}x{h}: {secs:.1} s");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A 3×180 strip (60:1, inside the limit) is accepted and only its crop is resampled: the
/// result equals resizing the whole strip to 84×5040 and cropping its middle, computed here.
#[test]
fn a_tall_strip_inside_the_limit_is_the_middle_of_the_whole_resize() {
    use llava_wgpu::vision::resample::{resize_rgb8, Filter};
    let dir = std::env::temp_dir().join(format!("llava-wgpu-tall-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = write_strip(&dir, 3, 180);
    let config = ImageProcessorConfig::load(&fixture::model_dir(), 84).unwrap();
    assert_eq!(config.filter, Filter::Bicubic);
    let image = load_image(&path).unwrap();
    let (got, h, w) = config.crop_rgb8(&image, &path, false).unwrap();
    assert_eq!((h, w), (84, 84));
    let whole = resize_rgb8(
        &image.to_rgb8().into_raw(),
        3,
        180,
        84,
        5040,
        Filter::Bicubic,
    );
    let top = (5040 - 84) / 2;
    assert!(
        got == whole[top * 84 * 3..(top + 84) * 84 * 3],
        "crop differs"
    );
    std::fs::remove_dir_all(&dir).ok();
}
