//! The image the model saw, once per pruning stage, with the patches that stage dropped dimmed,
//! so a user sees what was kept.

use std::path::Path;

use image::{DynamicImage, Rgb, RgbImage};

use crate::error::{Error, Result};
use crate::vision::anyres::AnyresLayout;
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
    save(&canvas, path)
}

fn save(canvas: &RgbImage, path: &Path) -> Result<()> {
    canvas.save(path).map_err(|e| Error::File {
        path: path.to_path_buf(),
        reason: format!("cannot write the overlay: {e}"),
    })
}

/// LLaVA-NeXT: one row of panels per entry of `kept` (the (view, patch index) pairs a stage
/// kept): the base view, then the crops at their places in the padded pinpoint canvas, with
/// dropped patches dimmed. `base` and `canvas` are RGB8 as the processor made them
/// (`ImageProcessorConfig::anyres_rgb8`).
pub fn write_anyres(
    (base, canvas): (&[u8], &[u8]),
    layout: &AnyresLayout,
    patch_size: usize,
    kept: &[Vec<(usize, usize)>],
    path: &Path,
) -> Result<()> {
    if kept.is_empty() {
        return Err(Error::argument(
            "kept",
            "no stage to draw: give the patches each stage kept",
        ));
    }
    let s = layout.grid * patch_size;
    let (th, tw) = layout.pinpoint_hw;
    let row_height = s.max(th);
    let scale = (MIN_HEIGHT / row_height.max(1)).max(1);
    let width = (s + GAP + tw) * scale;
    let height = kept.len() * row_height * scale + (kept.len() - 1) * GAP;
    let mut out = RgbImage::from_pixel(width as u32, height as u32, Rgb([255, 255, 255]));
    for (stage, pairs) in kept.iter().enumerate() {
        let mut keep = vec![vec![false; layout.patches_per_view()]; layout.views()];
        for &(view, index) in pairs {
            keep[view][index] = true;
        }
        let top = stage * (row_height * scale + GAP);
        // The base view: view 0.
        let base_cell = |y: usize, x: usize| (0, (y / patch_size) * layout.grid + x / patch_size);
        draw(&mut out, (top, 0), (base, s, s), scale, &keep, base_cell);
        // The canvas: crop (y / s, x / s), patch of that crop's own grid.
        let crops_per_row = tw / s;
        let canvas_cell = |y: usize, x: usize| {
            let view = 1 + (y / s) * crops_per_row + x / s;
            (
                view,
                ((y % s) / patch_size) * layout.grid + (x % s) / patch_size,
            )
        };
        let left = (s + GAP) * scale;
        draw(
            &mut out,
            (top, left),
            (canvas, th, tw),
            scale,
            &keep,
            canvas_cell,
        );
    }
    save(&out, path)
}

/// Copy `image` (RGB8 `h × w`) scaled by `scale` to `out` at (top, left), dimming the pixels
/// whose (view, patch) `cell` is not kept.
fn draw(
    out: &mut RgbImage,
    (top, left): (usize, usize),
    (image, h, w): (&[u8], usize, usize),
    scale: usize,
    keep: &[Vec<bool>],
    cell: impl Fn(usize, usize) -> (usize, usize),
) {
    for y in 0..h * scale {
        for x in 0..w * scale {
            let (sy, sx) = (y / scale, x / scale);
            let (view, index) = cell(sy, sx);
            let src = &image[(sy * w + sx) * 3..(sy * w + sx) * 3 + 3];
            let px: [u8; 3] = if keep[view][index] {
                [src[0], src[1], src[2]]
            } else {
                std::array::from_fn(|c| (src[c] as u32 * DIM / 100) as u8)
            };
            out.put_pixel((left + x) as u32, (top + y) as u32, Rgb(px));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anyres_overlay_dims_exactly_the_dropped_patches_of_every_view() {
        // A 56x112 image on a 56-px tower with 14-px patches: base view + 1x2 crops, 4x4 grids.
        let layout = AnyresLayout::new((56, 112), &[(56, 112)], 56, 14);
        assert_eq!((layout.views(), layout.grid), (3, 4));
        let base = vec![200u8; 56 * 56 * 3];
        let canvas: Vec<u8> = (0..56 * 112).flat_map(|i| [(i % 251) as u8; 3]).collect();
        let path = std::env::temp_dir().join(format!("anyres-overlay-{}.png", std::process::id()));
        let kept = vec![vec![(0, 0), (2, 5)]];
        write_anyres((&base, &canvas), &layout, 14, &kept, &path).unwrap();
        let out = image::open(&path).unwrap().to_rgb8();
        std::fs::remove_file(&path).unwrap();
        let scale = MIN_HEIGHT / 56;
        let left = (56 + GAP) * scale;
        let at = |x: usize, y: usize| out.get_pixel(x as u32, y as u32).0[0];
        let dim = |v: u8| (v as u32 * DIM / 100) as u8;
        assert_eq!(at(3, 3), 200, "base view patch 0 kept");
        assert_eq!(
            at(20 * scale, 20 * scale),
            dim(200),
            "base view patch 5 dropped"
        );
        for (y, x) in [(14, 56 + 14), (27, 56 + 27), (20, 56 + 20)] {
            let want = canvas[(y * 112 + x) * 3];
            assert_eq!(at(left + x * scale, y * scale), want, "crop 2 patch 5 kept");
        }
        for (y, x) in [(14, 14), (0, 56), (30, 56 + 14), (14, 56 + 28)] {
            let want = dim(canvas[(y * 112 + x) * 3]);
            assert_eq!(at(left + x * scale, y * scale), want, "({y}, {x}) dropped");
        }
    }
}
