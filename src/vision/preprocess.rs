//! CLIPImageProcessor, exactly as `preprocessor_config.json` describes it: convert to RGB
//! (compositing transparency onto white, as transformers 5 does), resize the shortest edge with
//! Pillow's resampler (the other edge truncated: 97×61 → 133×84 for 84), center crop, rescale by
//! 1/255, normalise with the file's mean and std. Optionally pad to a square with the mean colour
//! first, as the original LLaVA evaluation code (`expand2square`) does.

use std::path::Path;

use image::DynamicImage;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::vision::resample::{resize_window_rgb8, Filter, Window};

/// Refuse images whose decoded size would be absurd (a decompression bomb or a wrong file), and
/// padding to a square beyond it.
pub const MAX_IMAGE_PIXELS: u64 = 100_000_000;

/// Once resized (before the crop), an image's long side may be at most this many times the
/// model's input side (the larger of `crop_size`'s sides). With CLIP's processors (shortest edge
/// = crop) this accepts aspect ratios up to 64:1; a longer strip, of which the center crop would
/// see less than 1/64, is refused rather than silently reduced to a sliver of itself.
pub const MAX_ELONGATION: usize = 64;

#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessorConfig {
    pub do_convert_rgb: bool,
    pub do_resize: bool,
    pub shortest_edge: usize,
    pub filter: Filter,
    pub do_center_crop: bool,
    pub crop_height: usize,
    pub crop_width: usize,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
}

impl ImageProcessorConfig {
    /// CLIP's defaults for a given input size (used when the model directory has no
    /// preprocessor file).
    pub fn clip_default(image_size: usize) -> Self {
        Self {
            do_convert_rgb: true,
            do_resize: true,
            shortest_edge: image_size,
            filter: Filter::Bicubic,
            do_center_crop: true,
            crop_height: image_size,
            crop_width: image_size,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: [0.48145466, 0.4578275, 0.40821073],
            image_std: [0.26862954, 0.26130258, 0.27577711],
        }
    }

    /// Read `preprocessor_config.json`, or the `image_processor` entry of transformers 5's
    /// `processor_config.json`, or fall back to CLIP's defaults for `image_size`.
    pub fn load(model_dir: &Path, image_size: usize) -> Result<Self> {
        let pre = model_dir.join("preprocessor_config.json");
        let proc = model_dir.join("processor_config.json");
        let (path, value) = if pre.exists() {
            (pre.clone(), read_json(&pre)?)
        } else if proc.exists() {
            let v = read_json(&proc)?;
            match v.get("image_processor") {
                Some(inner) => (proc.clone(), inner.clone()),
                None => return Ok(Self::clip_default(image_size)),
            }
        } else {
            return Ok(Self::clip_default(image_size));
        };
        Self::from_json(&value, &path, image_size)
    }

    pub fn from_json(v: &Value, path: &Path, image_size: usize) -> Result<Self> {
        let fail = |field: &str, reason: String| Error::File {
            path: path.to_path_buf(),
            reason: format!("field `{field}`: {reason}"),
        };
        let mut c = Self::clip_default(image_size);
        let flag =
            |key: &str, default: bool| v.get(key).and_then(Value::as_bool).unwrap_or(default);
        c.do_convert_rgb = flag("do_convert_rgb", true);
        c.do_resize = flag("do_resize", true);
        c.do_center_crop = flag("do_center_crop", true);
        c.do_rescale = flag("do_rescale", true);
        c.do_normalize = flag("do_normalize", true);
        if let Some(size) = v.get("size") {
            c.shortest_edge = shortest_edge(size).ok_or_else(|| {
                fail(
                    "size",
                    format!("only {{\"shortest_edge\": N}} is supported, found {size}"),
                )
            })?;
        }
        if let Some(crop) = v.get("crop_size") {
            (c.crop_height, c.crop_width) = crop_size(crop).ok_or_else(|| {
                fail(
                    "crop_size",
                    format!("expected a positive size, found {crop}"),
                )
            })?;
        }
        if let Some(r) = v.get("resample") {
            c.filter = r.as_u64().and_then(Filter::from_pil).ok_or_else(|| {
                fail(
                    "resample",
                    format!("{r} is not bilinear (2) or bicubic (3)"),
                )
            })?;
        }
        if let Some(f) = v.get("rescale_factor") {
            c.rescale_factor = f
                .as_f64()
                .ok_or_else(|| fail("rescale_factor", format!("{f} is not a number")))?;
        }
        for (key, value) in [
            ("image_mean", &mut c.image_mean),
            ("image_std", &mut c.image_std),
        ] {
            if let Some(found) = v.get(key).filter(|x| !x.is_null()) {
                *value = three_numbers(found)
                    .ok_or_else(|| fail(key, format!("expected three numbers, found {found}")))?;
            }
        }
        if c.image_std.iter().any(|&s| s <= 0.0) {
            return Err(fail("image_std", "must be positive".into()));
        }
        if !c.do_center_crop {
            return Err(fail(
                "do_center_crop",
                format!(
                    "false is not supported: the vision tower takes {image_size}x{image_size} \
                     pixels, and without the crop the resized image's shape follows the input's"
                ),
            ));
        }
        if c.crop_height != image_size || c.crop_width != image_size {
            return Err(fail(
                "crop_size",
                format!(
                    "{}x{} does not match the vision tower's image_size {image_size}",
                    c.crop_height, c.crop_width
                ),
            ));
        }
        Ok(c)
    }

    /// The 8-bit RGB image the model sees (after conversion, optional padding, resize and
    /// crop), row-major `height × width × 3`, with its size. Only the part of the resized image
    /// that survives the crop is resampled, so the work follows the crop, not the input's
    /// shape. `source` names the image in errors: padding that would exceed
    /// [`MAX_IMAGE_PIXELS`], or a shape more elongated than [`MAX_ELONGATION`], is refused.
    pub fn crop_rgb8(
        &self,
        image: &DynamicImage,
        source: &Path,
        pad_to_square: bool,
    ) -> Result<(Vec<u8>, usize, usize)> {
        let (w, h) = self.checked_sizes(image, source, pad_to_square)?;
        let mut rgb = to_rgb8(image, self.do_convert_rgb);
        if pad_to_square && w != h {
            rgb = self.pad_to_square(&rgb, w, h);
        }
        let (w, h) = if pad_to_square {
            (w.max(h), w.max(h))
        } else {
            (w, h)
        };
        let (rw, rh) = self.resized_size(w, h);
        let (out_h, out_w) = if self.do_center_crop {
            (self.crop_height, self.crop_width)
        } else {
            (rh, rw)
        };
        // transformers' center_crop: top = (h − crop_h) // 2, padding with zeros if smaller.
        let top = (rh as i64 - out_h as i64).div_euclid(2);
        let left = (rw as i64 - out_w as i64).div_euclid(2);
        let inside = |start: i64, len: usize, size: usize| {
            start.clamp(0, size as i64) as usize
                ..(start + len as i64).clamp(0, size as i64) as usize
        };
        let window = Window {
            x: inside(left, out_w, rw),
            y: inside(top, out_h, rh),
        };
        let part = resize_window_rgb8(&rgb, (w, h), (rw, rh), &window, self.filter);
        if (window.x.len(), window.y.len()) == (out_w, out_h) {
            return Ok((part, out_h, out_w));
        }
        let mut out = vec![0u8; out_h * out_w * 3];
        let (x0, y0) = (window.x.start as i64 - left, window.y.start as i64 - top);
        let row = window.x.len() * 3;
        for (r, src) in part.chunks_exact(row.max(1)).enumerate() {
            let dst = ((y0 as usize + r) * out_w + x0 as usize) * 3;
            out[dst..dst + row].copy_from_slice(src);
        }
        Ok((out, out_h, out_w))
    }

    /// The size before resizing (padded to a square if asked), after refusing padding beyond
    /// [`MAX_IMAGE_PIXELS`] and shapes more elongated than [`MAX_ELONGATION`].
    fn checked_sizes(
        &self,
        image: &DynamicImage,
        source: &Path,
        pad_to_square: bool,
    ) -> Result<(usize, usize)> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let fail = |reason: String| Error::File {
            path: source.to_path_buf(),
            reason: format!("the image is {w}x{h} pixels: {reason}"),
        };
        let side = w.max(h);
        if pad_to_square && (side as u64).pow(2) > MAX_IMAGE_PIXELS {
            return Err(fail(format!(
                "padded to a square it would be {side}x{side}, over the {MAX_IMAGE_PIXELS}-pixel limit"
            )));
        }
        let (pw, ph) = if pad_to_square { (side, side) } else { (w, h) };
        let (rw, rh) = self.resized_size(pw, ph);
        let input = self.crop_height.max(self.crop_width);
        if w == 0 || h == 0 || rw.max(rh) > MAX_ELONGATION * input {
            return Err(fail(format!(
                "resized to {rw}x{rh}, its long side would be more than {MAX_ELONGATION} times \
                 the model's {input}-pixel input (at most {MAX_ELONGATION}:1 is accepted)"
            )));
        }
        Ok((w, h))
    }

    /// `w × h` after the resize step (unchanged without `do_resize`).
    fn resized_size(&self, w: usize, h: usize) -> (usize, usize) {
        if self.do_resize {
            shortest_edge_size(w, h, self.shortest_edge)
        } else {
            (w, h)
        }
    }

    /// `rgb` (`w × h`) centred on a square of the mean colour, as LLaVA's `expand2square`.
    fn pad_to_square(&self, rgb: &[u8], w: usize, h: usize) -> Vec<u8> {
        let side = w.max(h);
        let fill: [u8; 3] = std::array::from_fn(|c| (self.image_mean[c] * 255.0) as u8);
        let mut square = fill.repeat(side * side);
        let (x0, y0) = ((side - w) / 2, (side - h) / 2);
        for y in 0..h {
            let dst = ((y + y0) * side + x0) * 3;
            square[dst..dst + w * 3].copy_from_slice(&rgb[y * w * 3..(y + 1) * w * 3]);
        }
        square
    }

    /// Preprocess a decoded image into CHW f32 pixels `[3, crop_height, crop_width]`; `source`
    /// names the image in errors (see [`Self::crop_rgb8`]).
    pub fn preprocess(
        &self,
        image: &DynamicImage,
        source: &Path,
        pad_to_square: bool,
    ) -> Result<Vec<f32>> {
        let (rgb, h, w) = self.crop_rgb8(image, source, pad_to_square)?;
        Ok(self.normalise(&rgb, h, w))
    }

    /// RGB8 `h × w × 3` to CHW f32: rescale (× 1/255) and normalise with the mean and std.
    pub(crate) fn normalise(&self, rgb: &[u8], h: usize, w: usize) -> Vec<f32> {
        let mut out = vec![0f32; 3 * h * w];
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    let mut v = rgb[(y * w + x) * 3 + c] as f64;
                    if self.do_rescale {
                        v *= self.rescale_factor;
                    }
                    if self.do_normalize {
                        v = (v - self.image_mean[c]) / self.image_std[c];
                    }
                    out[(c * h + y) * w + x] = v as f32;
                }
            }
        }
        out
    }
}

/// transformers' `get_resize_output_image_size(default_to_square=False)`: the shorter side
/// becomes `size`, the longer `int(size · long / short)`.
pub fn shortest_edge_size(w: usize, h: usize, size: usize) -> (usize, usize) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// `size`: a number or `{"shortest_edge": N}`, positive.
fn shortest_edge(size: &Value) -> Option<usize> {
    let n = match size {
        Value::Number(n) => n.as_u64(),
        _ => size.get("shortest_edge").and_then(Value::as_u64),
    };
    n.filter(|&n| n > 0).map(|n| n as usize)
}

/// `crop_size`: a number (square) or `{"height": H, "width": W}`, both positive.
fn crop_size(crop: &Value) -> Option<(usize, usize)> {
    let (h, w) = match crop {
        Value::Number(n) => (n.as_u64(), n.as_u64()),
        _ => (
            crop.get("height").and_then(Value::as_u64),
            crop.get("width").and_then(Value::as_u64),
        ),
    };
    match (h, w) {
        (Some(h), Some(w)) if h > 0 && w > 0 => Some((h as usize, w as usize)),
        _ => None,
    }
}

/// `image_mean` / `image_std`: exactly three numbers.
fn three_numbers(value: &Value) -> Option<[f64; 3]> {
    match value {
        Value::Array(a) if a.len() == 3 => Some([a[0].as_f64()?, a[1].as_f64()?, a[2].as_f64()?]),
        _ => None,
    }
}

/// RGB8 pixels; transparency is composited onto white with Pillow's integer `alpha_composite`.
pub(crate) fn to_rgb8(image: &DynamicImage, convert: bool) -> Vec<u8> {
    let has_alpha = image.color().has_alpha();
    if !(convert && has_alpha) {
        return image.to_rgb8().into_raw();
    }
    let rgba = image.to_rgba8();
    let mut out = Vec::with_capacity(rgba.len() / 4 * 3);
    for px in rgba.pixels() {
        let a = px[3] as u32;
        for c in 0..3 {
            let v = if a == 0 {
                255
            } else {
                // Pillow over an opaque white background: coef1 = a·128, coef2 = (255−a)·128,
                // then SHIFTFORDIV255(t + (0x80 << 7)) >> 7.
                let t = px[c] as u32 * a * 128 + 255 * (255 - a) * 128 + (0x80 << 7);
                let div255 = ((t >> 8) + t) >> 8;
                (div255 >> 7) as u8
            };
            out.push(v);
        }
    }
    out
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| Error::File {
        path: path.to_path_buf(),
        reason: format!("not valid JSON: {e}"),
    })
}

/// Decode an image file, refusing unreadable, corrupt or absurdly large ones with an error that
/// names the file.
pub fn load_image(path: &Path) -> Result<DynamicImage> {
    decode_image(&read_image_file(path)?, path)
}

/// Encoded image files larger than this are refused before they are read into memory.
pub const MAX_IMAGE_FILE_BYTES: u64 = 256 << 20;

/// The bytes of an image file: a regular file (a FIFO or a device would block or never end, so
/// they are refused before they are opened) of at most [`MAX_IMAGE_FILE_BYTES`].
pub fn read_image_file(path: &Path) -> Result<Vec<u8>> {
    let fail = |reason: String| Error::File {
        path: path.to_path_buf(),
        reason,
    };
    let metadata = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    if !metadata.is_file() {
        return Err(fail("not a regular file".into()));
    }
    let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let size = file.metadata().map_err(|e| fail(e.to_string()))?.len();
    if size > MAX_IMAGE_FILE_BYTES {
        return Err(fail(format!(
            "{size} bytes is larger than the {MAX_IMAGE_FILE_BYTES}-byte limit for an image file"
        )));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    std::io::Read::read_to_end(
        &mut std::io::Read::take(file, MAX_IMAGE_FILE_BYTES + 1),
        &mut bytes,
    )
    .map_err(|e| fail(e.to_string()))?;
    Ok(bytes)
}

/// Check that an image file can be read and its header decoded, without decoding its pixels
/// (a command line checks its images before loading a model). Returns (width, height).
pub fn probe_image(path: &Path) -> Result<(u32, u32)> {
    image_header(&read_image_file(path)?, path)
}

/// Decode an image held in memory (an upload, a data URL), refusing corrupt, unknown or absurdly
/// large ones with an error that names `source`.
pub fn decode_image(bytes: &[u8], source: &Path) -> Result<DynamicImage> {
    image_header(bytes, source)?;
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .and_then(|r| r.decode().map_err(std::io::Error::other))
        .map_err(|e| Error::File {
            path: source.to_path_buf(),
            reason: format!("corrupt or unsupported image: {e}"),
        })
}

/// The (width, height) an encoded image's header gives, refusing unknown formats and empty or
/// absurdly large images.
fn image_header(bytes: &[u8], source: &Path) -> Result<(u32, u32)> {
    let fail = |reason: String| Error::File {
        path: source.to_path_buf(),
        reason,
    };
    let probe = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| fail(e.to_string()))?;
    if probe.format().is_none() {
        return Err(fail(
            "not a recognised image format (png, jpeg, bmp, gif, webp, tiff)".into(),
        ));
    }
    let (w, h) = probe
        .into_dimensions()
        .map_err(|e| fail(format!("cannot read the image header: {e}")))?;
    if w == 0 || h == 0 || w as u64 * h as u64 > MAX_IMAGE_PIXELS {
        return Err(fail(format!(
            "{w}x{h} pixels is empty or larger than the {MAX_IMAGE_PIXELS}-pixel limit"
        )));
    }
    Ok((w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_truncates_the_long_side() {
        assert_eq!(shortest_edge_size(97, 61, 84), (133, 84));
        assert_eq!(shortest_edge_size(50, 130, 84), (84, 218));
        assert_eq!(shortest_edge_size(640, 480, 336), (448, 336));
    }

    #[test]
    fn pillow_alpha_composite_over_white() {
        // Fully transparent → white, opaque → unchanged, half alpha → blended as Pillow rounds.
        let img = image::RgbaImage::from_raw(
            3,
            1,
            vec![10, 20, 30, 0, 10, 20, 30, 255, 0, 100, 200, 128],
        )
        .unwrap();
        let rgb = to_rgb8(&DynamicImage::ImageRgba8(img), true);
        assert_eq!(&rgb[0..6], &[255, 255, 255, 10, 20, 30]);
        // (0·128 + 255·127)/255 ≈ 127.0, (100·128 + 255·127)/255 ≈ 177.2, (200·128 + 255·127)/255 ≈ 227.4
        assert_eq!(&rgb[6..9], &[127, 177, 227]);
    }
}
