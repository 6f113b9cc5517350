//! The image the model saw, once per pruning stage, with the patches that stage dropped dimmed,
//! so a user sees what was kept.

use std::path::Path;

use image::{DynamicImage, Rgb, RgbImage};

use crate::error::{Error, Result};
use crate::vision::ImageProcessorConfig;

/// Brightness of a dropped patch, as a fraction of the original.
const DIM: u32 = 25;
/// Panels are scaled up by a whole factor to at least this height so small inputs stay readable.
const MIN_HEIGHT: usize = 336;
/// White space between two panels, in pixels.
const GAP: usize = 8;

/// How the vision encoder cuts the crop into visual tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchGrid {
    /// Pixels per patch side.
    pub patch_size: usize,
    /// Patches per side; token `i` is row `i / grid`, column `i % grid`.
    pub grid: usize,
}

/// Write one panel per entry of `kept` (the visual-token indices a stage kept, in stage order)
/// side by side. `image` (read from `source`) is cropped by `processor` as the model saw it.
pub fn write(
    image: &DynamicImage,
    source: &Path,
    processor: &ImageProcessorConfig,
    pad_to_square: bool,
    patches: PatchGrid,
    kept: &[&[usize]],
    path: &Path,
) -> Result<()> {
    if kept.is_empty() {
        return Err(Error::argument(
            "kept",
            "no stage to draw: give the indices each stage kept",
        ));
    }
    let (rgb, h, w) = processor.crop_rgb8(image, source, pad_to_square)?;
    let scale = (MIN_HEIGHT / h.max(1)).max(1);
    let (ph, pw) = (h * scale, w * scale);
    let width = kept.len() * pw + (kept.len() - 1) * GAP;
    let mut canvas = RgbImage::from_pixel(width as u32, ph as u32, Rgb([255, 255, 255]));
    for (panel, indices) in kept.iter().enumerate() {
        let mut keep = vec![false; patches.grid * patches.grid];
        for &i in indices.iter() {
            keep[i] = true;
        }
        let grid = patches.grid;
        for y in 0..ph {
            for x in 0..pw {
                let (sy, sx) = (y / scale, x / scale);
                let cell = (sy / patches.patch_size).min(grid - 1) * grid
                    + (sx / patches.patch_size).min(grid - 1);
                let src = &rgb[(sy * w + sx) * 3..(sy * w + sx) * 3 + 3];
                let px: [u8; 3] = if keep[cell] {
                    [src[0], src[1], src[2]]
                } else {
                    std::array::from_fn(|c| (src[c] as u32 * DIM / 100) as u8)
                };
                canvas.put_pixel((panel * (pw + GAP) + x) as u32, y as u32, Rgb(px));
            }
        }
    }
    canvas.save(path).map_err(|e| Error::File {
        path: path.to_path_buf(),
        reason: format!("cannot write the overlay: {e}"),
    })
}
