//! `load_image` on arbitrary bytes, damaged copies of the fixture's reference PNGs and PNG headers
//! claiming huge sizes; `ImageProcessorConfig::from_json` on arbitrary JSON; `preprocess` on
//! small random images (at most 64×64; the extreme aspect ratios belong to the input-hardening
//! branch) with random settings.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use image::{DynamicImage, ImageBuffer};
use llava_wgpu::vision::preprocess::{shortest_edge_size, MAX_IMAGE_PIXELS};
use llava_wgpu::vision::resample::Filter;
use llava_wgpu::vision::{load_image, ImageProcessorConfig};
use proptest::prelude::*;

use crate::support::{cases, json, largest_allocation, model_dir, Scratch};

fn reference_pngs() -> &'static [Vec<u8>] {
    static PNGS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    PNGS.get_or_init(|| {
        let mut paths: Vec<_> = std::fs::read_dir(model_dir().join("reference"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "png"))
            .collect();
        paths.sort();
        paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
    })
}

/// Decode `bytes` from a file; `Ok` within the pixel limit, or an error naming the file.
fn load(bytes: &[u8], name: &str) -> Result<Option<DynamicImage>, TestCaseError> {
    let scratch = Scratch::new("image");
    let path = scratch.write(name, bytes);
    match load_image(&path) {
        Ok(image) => {
            let pixels = image.width() as u64 * image.height() as u64;
            prop_assert!(pixels > 0 && pixels <= MAX_IMAGE_PIXELS);
            Ok(Some(image))
        }
        Err(e) => {
            let e = e.to_string();
            prop_assert!(e.starts_with(&path.display().to_string()), "{e}");
            Ok(None)
        }
    }
}

/// One damage to a file: a byte changed, a range overwritten, cut short, bytes inserted.
#[derive(Clone, Debug)]
enum Damage {
    Set(usize, u8),
    Fill(usize, usize, u8),
    Cut(usize),
    Insert(usize, Vec<u8>),
}

fn damage() -> impl Strategy<Value = Damage> {
    // Most damage lands in the first 256 bytes, where the headers are.
    let at = prop_oneof![3 => 0usize..256, 1 => any::<usize>()];
    prop_oneof![
        4 => (at.clone(), any::<u8>()).prop_map(|(i, b)| Damage::Set(i, b)),
        1 => (at.clone(), 1usize..64, any::<u8>()).prop_map(|(i, n, b)| Damage::Fill(i, n, b)),
        1 => any::<usize>().prop_map(Damage::Cut),
        1 => (at, prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, b)| Damage::Insert(i, b)),
    ]
}

fn apply(bytes: &mut Vec<u8>, d: &Damage) {
    let len = bytes.len().max(1);
    match d {
        // A file cut to nothing has no byte to set.
        Damage::Set(_, _) if bytes.is_empty() => {}
        Damage::Set(i, b) => bytes[i % len] = *b,
        Damage::Fill(i, n, b) => {
            let start = i % len;
            let end = (start + n).min(bytes.len());
            bytes[start..end].fill(*b);
        }
        Damage::Cut(n) => bytes.truncate(n % len),
        Damage::Insert(i, b) => {
            let at = i % len;
            bytes.splice(at..at, b.iter().copied());
        }
    }
}

/// CRC-32 (PNG's chunk checksum), bit by bit.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PNG signature and a valid IHDR chunk for `w × h`, then `tail` (an IDAT or nothing).
fn png_header(w: u32, h: u32, bit_depth: u8, color: u8, tail: &[u8]) -> Vec<u8> {
    let mut chunk = b"IHDR".to_vec();
    chunk.extend(w.to_be_bytes());
    chunk.extend(h.to_be_bytes());
    chunk.extend([bit_depth, color, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(13u32.to_be_bytes());
    out.extend(&chunk);
    out.extend(crc32(&chunk).to_be_bytes());
    out.extend(tail);
    out
}

proptest! {
    #![proptest_config(cases(3000))]

    #[test]
    fn arbitrary_bytes_are_decoded_or_refused_by_name(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        prefix in prop::sample::select(vec![&b""[..], b"\x89PNG\r\n\x1a\n", b"\xFF\xD8\xFF", b"BM", b"GIF89a", b"RIFF\0\0\0\0WEBP", b"II*\0"]),
        ext in prop::sample::select(vec!["png", "jpg", "bin", ""]),
    ) {
        let mut file = prefix.to_vec();
        file.extend(bytes);
        load(&file, &format!("x.{ext}"))?;
    }

    #[test]
    fn damaged_reference_pngs_are_decoded_or_refused_by_name(
        which in 0usize..5, damages in prop::collection::vec(damage(), 1..4),
    ) {
        let mut bytes = reference_pngs()[which % reference_pngs().len()].clone();
        for d in &damages {
            apply(&mut bytes, d);
        }
        let (result, largest) = largest_allocation(|| load(&bytes, "damaged.png"));
        result?;
        prop_assert!(largest <= 512 << 20, "allocated {largest} bytes");
    }

    #[test]
    fn png_headers_beyond_the_pixel_limit_are_refused_without_allocating(
        w in 1u32..=u32::MAX, h in 1u32..=u32::MAX,
        depth in prop::sample::select(vec![1u8, 8, 16]), color in prop::sample::select(vec![0u8, 2, 6]),
    ) {
        let too_big = w as u64 * h as u64 > MAX_IMAGE_PIXELS;
        let (w, h) = if too_big { (w, h) } else { (w.min(64), h.min(64)) };
        let bytes = png_header(w, h, depth, color, b"\0\0\0\0IEND\xAE\x42\x60\x82");
        let start = Instant::now();
        let (result, largest) = largest_allocation(|| load(&bytes, "header.png"));
        prop_assert!(result?.is_none(), "{w}x{h} with no pixel data decoded");
        if too_big {
            prop_assert!(largest < 1 << 20, "{w}x{h}: allocated {largest} bytes");
            prop_assert!(start.elapsed() < Duration::from_secs(1));
        }
    }
}

const PROCESSOR_FIELDS: &[&str] = &[
    "do_convert_rgb",
    "do_resize",
    "do_center_crop",
    "do_rescale",
    "do_normalize",
    "size",
    "shortest_edge",
    "crop_size",
    "height",
    "width",
    "resample",
    "rescale_factor",
    "image_mean",
    "image_std",
];

/// A random image of one of the colour types a decoder produces, at most 64×64.
fn small_image() -> impl Strategy<Value = DynamicImage> {
    (1u32..=64, 1u32..=64, 0u8..6, any::<u64>()).prop_map(|(w, h, kind, seed)| {
        let n = (w * h) as usize;
        let byte = |i: usize| (seed.wrapping_mul(i as u64 + 1).rotate_left(17) >> 56) as u8;
        let bytes = |c: usize| (0..n * c).map(byte).collect::<Vec<u8>>();
        match kind {
            0 => DynamicImage::ImageLuma8(ImageBuffer::from_raw(w, h, bytes(1)).unwrap()),
            1 => DynamicImage::ImageLumaA8(ImageBuffer::from_raw(w, h, bytes(2)).unwrap()),
            2 => DynamicImage::ImageRgb8(ImageBuffer::from_raw(w, h, bytes(3)).unwrap()),
            3 => DynamicImage::ImageRgba8(ImageBuffer::from_raw(w, h, bytes(4)).unwrap()),
            4 => DynamicImage::ImageRgba16(
                ImageBuffer::from_raw(w, h, (0..n * 4).map(|i| byte(i) as u16 * 257).collect())
                    .unwrap(),
            ),
            _ => DynamicImage::ImageRgb32F(
                ImageBuffer::from_raw(
                    w,
                    h,
                    (0..n * 3).map(|i| byte(i) as f32 / 200.0 - 0.1).collect(),
                )
                .unwrap(),
            ),
        }
    })
}

fn processor() -> impl Strategy<Value = ImageProcessorConfig> {
    let flags = prop::array::uniform5(any::<bool>());
    let sizes = (1usize..=64, 1usize..=64, 1usize..=64);
    let filter = prop::sample::select(vec![Filter::Bilinear, Filter::Bicubic]);
    let stats = (
        prop::array::uniform3(-2.0f64..2.0),
        prop::array::uniform3(0.01f64..4.0),
    );
    (flags, sizes, filter, stats).prop_map(|(f, (edge, ch, cw), filter, (mean, std))| {
        ImageProcessorConfig {
            do_convert_rgb: f[0],
            do_resize: f[1],
            shortest_edge: edge,
            filter,
            do_center_crop: f[2],
            crop_height: ch,
            crop_width: cw,
            do_rescale: f[3],
            rescale_factor: 1.0 / 255.0,
            do_normalize: f[4],
            image_mean: mean,
            image_std: std,
        }
    })
}

proptest! {
    #![proptest_config(cases(2000))]

    #[test]
    fn small_images_preprocess_to_the_promised_shape(
        image in small_image(), c in processor(), pad in any::<bool>(),
    ) {
        // Shapes past the elongation or size limits are refused, naming the file.
        let pixels = match c.preprocess(&image, std::path::Path::new("fuzz.png"), pad) {
            Ok(pixels) => pixels,
            Err(e) => {
                prop_assert!(e.to_string().contains("fuzz.png"), "{}", e);
                return Ok(());
            }
        };
        let (mut w, mut h) = (image.width() as usize, image.height() as usize);
        if pad {
            (w, h) = (w.max(h), w.max(h));
        }
        if c.do_resize {
            (w, h) = shortest_edge_size(w, h, c.shortest_edge);
        }
        if c.do_center_crop {
            (w, h) = (c.crop_width, c.crop_height);
        }
        prop_assert_eq!(pixels.len(), 3 * w * h);
        prop_assert!(pixels.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn processor_configs_are_read_or_refused_by_name(
        v in json(PROCESSOR_FIELDS), image_size in 1usize..400,
    ) {
        let path = Path::new("fuzz/preprocessor_config.json");
        match ImageProcessorConfig::from_json(&v, path, image_size) {
            Ok(c) => {
                prop_assert!(c.shortest_edge > 0);
                prop_assert_eq!((c.crop_height, c.crop_width), (image_size, image_size));
                prop_assert!(c.image_std.iter().all(|&s| s > 0.0));
            }
            Err(e) => {
                let e = e.to_string();
                prop_assert!(e.starts_with("fuzz/preprocessor_config.json: field `"), "{e}");
            }
        }
    }
}
