//! LLaVA-NeXT's "anyres" tiling, on the host: which resolution an image is tiled at, the views
//! the vision tower sees, and where each of their patch features lands in the prompt.
//!
//! It follows transformers' `LlavaNextImageProcessor` (Pillow backend) and
//! `LlavaNextModel.pack_image_features`:
//!
//! 1. `select_best_resolution` picks the pinpoint (height, width) that keeps the most of the
//!    image's pixels, then wastes the least;
//! 2. the image is resized into it keeping its aspect ratio (`get_patch_output_size`, sides
//!    rounded up), centred on black padding, and cut into crops of the tower's size, row by row;
//! 3. the base view is the whole image squashed to the tower's size; views are [base, crops..];
//! 4. the crops' patch features form one grid (crop rows × patches per side, likewise for
//!    columns), from which `unpad_image` removes the rows or columns that only saw padding;
//! 5. the language model receives the base view's patches, then each remaining grid row
//!    followed by the `image_newline` embedding.

use std::ops::Range;
use std::path::Path;

use image::DynamicImage;

use crate::error::{Error, Result};
use crate::vision::preprocess::{to_rgb8, ImageProcessorConfig};
use crate::vision::resample::{resize_window_rgb8, Window};

/// `select_best_resolution`: among `pinpoints` (height, width), the one where the image, scaled
/// to fit, keeps the most pixels (never more than it has), ties going to the least wasted area
/// and then to the earlier pinpoint.
pub fn select_best_resolution(
    image_hw: (usize, usize),
    pinpoints: &[(usize, usize)],
) -> (usize, usize) {
    let (oh, ow) = (image_hw.0 as f64, image_hw.1 as f64);
    let mut best = pinpoints[0];
    let (mut best_effective, mut best_wasted) = (0u64, u64::MAX);
    for &(h, w) in pinpoints {
        let scale = (w as f64 / ow).min(h as f64 / oh);
        // Python's int() of the positive products: truncation.
        let (dw, dh) = ((ow * scale) as u64, (oh * scale) as u64);
        let effective = (dw * dh).min(image_hw.0 as u64 * image_hw.1 as u64);
        let wasted = (h * w) as u64 - effective.min((h * w) as u64);
        if effective > best_effective || (effective == best_effective && wasted < best_wasted) {
            (best, best_effective, best_wasted) = ((h, w), effective, wasted);
        }
    }
    best
}

/// `get_patch_output_size`: the image's (height, width) once resized to fit `target_hw` keeping
/// its aspect ratio; the fitted side is exact, the other rounded up (at most the target's).
pub fn resized_in_pinpoint(image_hw: (usize, usize), target_hw: (usize, usize)) -> (usize, usize) {
    let (oh, ow) = image_hw;
    let (th, tw) = target_hw;
    let (scale_w, scale_h) = (tw as f64 / ow as f64, th as f64 / oh as f64);
    if scale_w < scale_h {
        (((oh as f64 * scale_w).ceil() as usize).min(th), tw)
    } else {
        (th, ((ow as f64 * scale_h).ceil() as usize).min(tw))
    }
}

/// `unpad_image`: the rows and columns of a `grid_hw` feature grid that saw the image rather
/// than the padding around it, for an image of `image_hw` pixels. Only the side with spare room
/// shrinks, by the same count at both ends.
pub fn unpadded(image_hw: (usize, usize), grid_hw: (usize, usize)) -> (Range<usize>, Range<usize>) {
    let (oh, ow) = (image_hw.0 as f64, image_hw.1 as f64);
    let (ch, cw) = grid_hw;
    // transformers rounds to 7 decimals before int(), so 2.9999999 counts as 3.
    let kept = |x: f64| ((x * 1e7).round() / 1e7) as usize;
    if ow / oh > cw as f64 / ch as f64 {
        let new_h = kept(oh * (cw as f64 / ow));
        let pad = ch.saturating_sub(new_h) / 2;
        (pad..ch - pad, 0..cw)
    } else {
        let new_w = kept(ow * (ch as f64 / oh));
        let pad = cw.saturating_sub(new_w) / 2;
        (0..ch, pad..cw - pad)
    }
}

/// One row of the packed image features the language model receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackedToken {
    /// Patch `index` (raster order on the view's own grid) of view `view` (0 = base view).
    Patch { view: usize, index: usize },
    /// The `image_newline` embedding that closes a grid row.
    Newline,
}

/// How one image is tiled and packed (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnyresLayout {
    /// The original image, (height, width) pixels.
    pub image_hw: (usize, usize),
    /// The selected pinpoint, (height, width) pixels.
    pub pinpoint_hw: (usize, usize),
    /// Crops per column and per row of the pinpoint: (rows, columns).
    pub crops: (usize, usize),
    /// Patches per side of one view.
    pub grid: usize,
    /// Rows of the crops' combined patch grid kept by unpadding.
    pub rows: Range<usize>,
    /// Columns of the crops' combined patch grid kept by unpadding.
    pub cols: Range<usize>,
}

impl AnyresLayout {
    /// The tiling of an image of `image_hw` pixels for a tower of `view_size` pixels and
    /// `patch_size`-pixel patches.
    pub fn new(
        image_hw: (usize, usize),
        pinpoints: &[(usize, usize)],
        view_size: usize,
        patch_size: usize,
    ) -> Self {
        let pinpoint_hw = select_best_resolution(image_hw, pinpoints);
        let crops = (pinpoint_hw.0 / view_size, pinpoint_hw.1 / view_size);
        let grid = view_size / patch_size;
        let (rows, cols) = unpadded(image_hw, (crops.0 * grid, crops.1 * grid));
        Self {
            image_hw,
            pinpoint_hw,
            crops,
            grid,
            rows,
            cols,
        }
    }

    /// Vision-tower passes: the base view and every crop.
    pub fn views(&self) -> usize {
        1 + self.crops.0 * self.crops.1
    }

    pub fn patches_per_view(&self) -> usize {
        self.grid * self.grid
    }

    /// Patch tokens the language model receives (newlines excluded).
    pub fn visual_tokens(&self) -> usize {
        self.patches_per_view() + self.rows.len() * self.cols.len()
    }

    /// `image_newline` rows: one per remaining grid row.
    pub fn newlines(&self) -> usize {
        self.rows.len()
    }

    /// Image placeholder tokens in the prompt: visual tokens and newlines.
    pub fn image_tokens(&self) -> usize {
        self.visual_tokens() + self.newlines()
    }

    /// The view and the patch on its grid that position (`y`, `x`) of the combined crop grid
    /// comes from.
    pub fn crop_patch(&self, y: usize, x: usize) -> PackedToken {
        let g = self.grid;
        PackedToken::Patch {
            view: 1 + (y / g) * self.crops.1 + x / g,
            index: (y % g) * g + x % g,
        }
    }

    /// The packed sequence, in transformers' order: the base view's patches, then each
    /// remaining grid row left to right followed by a newline.
    pub fn packed(&self) -> Vec<PackedToken> {
        let base = (0..self.patches_per_view()).map(|index| PackedToken::Patch { view: 0, index });
        let grid = self.rows.clone().flat_map(|y| {
            self.cols
                .clone()
                .map(move |x| self.crop_patch(y, x))
                .chain(std::iter::once(PackedToken::Newline))
        });
        base.chain(grid).collect()
    }
}

/// Per-view budgets for a before-projector selection on `views` views (docs/pruning.md, NeXT):
/// `floor(total / views)` each, the first `total mod views` views (base view first) one more.
pub fn split_budget(total: usize, views: usize) -> Vec<usize> {
    (0..views)
        .map(|v| total / views + usize::from(v < total % views))
        .collect()
}

impl AnyresLayout {
    /// The packed sequence after a per-view selection: `kept[v]` holds view `v`'s kept patch
    /// indices (ascending). Selection happens on each view's full grid; unpadding then removes
    /// the padding-only rows and columns (kept or not), and every remaining grid row still ends
    /// with a newline, even if none of its patches was kept.
    pub fn packed_kept(&self, kept: &[Vec<usize>]) -> Vec<PackedToken> {
        let is_kept = |token: &PackedToken| match *token {
            PackedToken::Patch { view, index } => kept[view].binary_search(&index).is_ok(),
            PackedToken::Newline => true,
        };
        self.packed().into_iter().filter(is_kept).collect()
    }
}

impl ImageProcessorConfig {
    /// The views of `image` the vision tower sees, each CHW f32 `[3, S, S]` normalised like
    /// [`Self::preprocess`]: the base view, then the crops of `layout`'s pinpoint in raster order.
    /// `source` names the image in errors.
    pub fn anyres_views(
        &self,
        image: &DynamicImage,
        source: &Path,
        layout: &AnyresLayout,
    ) -> Result<Vec<Vec<f32>>> {
        let s = self.crop_height;
        let (base, canvas) = self.anyres_rgb8(image, source, layout)?;
        let mut views = vec![self.normalise(&base, s, s)];
        let (th, tw) = layout.pinpoint_hw;
        for cy in 0..th / s {
            for cx in 0..tw / s {
                let mut crop = Vec::with_capacity(s * s * 3);
                for y in cy * s..(cy + 1) * s {
                    let row = (y * tw + cx * s) * 3;
                    crop.extend_from_slice(&canvas[row..row + s * 3]);
                }
                views.push(self.normalise(&crop, s, s));
            }
        }
        Ok(views)
    }

    /// What the views are cut from, RGB8: the base view (`S × S`) and the padded pinpoint
    /// canvas (pinpoint height × width) whose tiles are the crops.
    pub fn anyres_rgb8(
        &self,
        image: &DynamicImage,
        source: &Path,
        layout: &AnyresLayout,
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let s = self.crop_height;
        let (w, h) = (image.width() as usize, image.height() as usize);
        if (h, w) != layout.image_hw {
            return Err(Error::File {
                path: source.to_path_buf(),
                reason: format!(
                    "the image is {w}x{h}, its anyres layout was planned for {}x{}",
                    layout.image_hw.1, layout.image_hw.0
                ),
            });
        }
        let rgb = to_rgb8(image, self.do_convert_rgb);
        let base = resize(&rgb, (w, h), (s, s), self);
        Ok((base, self.padded_pinpoint(&rgb, layout)))
    }

    /// The image resized into the pinpoint keeping its aspect ratio and centred on black
    /// (`_pad_for_patching`: the odd pixel of padding goes after), RGB8 `height × width × 3`.
    fn padded_pinpoint(&self, rgb: &[u8], layout: &AnyresLayout) -> Vec<u8> {
        let (h, w) = layout.image_hw;
        let (th, tw) = layout.pinpoint_hw;
        let (nh, nw) = resized_in_pinpoint(layout.image_hw, layout.pinpoint_hw);
        let resized = resize(rgb, (w, h), (nw, nh), self);
        let (y0, x0) = ((th - nh) / 2, (tw - nw) / 2);
        let mut canvas = vec![0u8; th * tw * 3];
        for y in 0..nh {
            let dst = ((y0 + y) * tw + x0) * 3;
            canvas[dst..dst + nw * 3].copy_from_slice(&resized[y * nw * 3..(y + 1) * nw * 3]);
        }
        canvas
    }
}

/// Pillow's `resize` of an RGB8 image from `size` to `out` (width, height); a resize to the
/// same size is a copy, as in Pillow.
fn resize(
    rgb: &[u8],
    size: (usize, usize),
    out: (usize, usize),
    c: &ImageProcessorConfig,
) -> Vec<u8> {
    if size == out {
        return rgb.to_vec();
    }
    let window = Window {
        x: 0..out.0,
        y: 0..out.1,
    };
    resize_window_rgb8(rgb, size, out, &window, c.filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAVA_HF: [(usize, usize); 5] =
        [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];

    #[test]
    fn best_resolution_follows_the_aspect_ratio() {
        // Worked by hand from transformers' rule (height, width).
        assert_eq!(select_best_resolution((480, 640), &LLAVA_HF), (672, 672));
        assert_eq!(select_best_resolution((300, 1000), &LLAVA_HF), (336, 1008));
        assert_eq!(select_best_resolution((1000, 300), &LLAVA_HF), (1008, 336));
        // Smaller than every pinpoint: all keep the whole image, the least waste wins, and of
        // the two 336x672 halves the first listed.
        assert_eq!(select_best_resolution((100, 100), &LLAVA_HF), (336, 672));
    }

    #[test]
    fn resize_into_the_pinpoint_rounds_up() {
        // 640x480 into 672x672: width fits exactly, height 480·1.05 = 504.
        assert_eq!(resized_in_pinpoint((480, 640), (672, 672)), (504, 672));
        // 97x61 into 112x112: scale 112/97, height ceil(70.43) = 71.
        assert_eq!(resized_in_pinpoint((61, 97), (112, 112)), (71, 112));
    }

    #[test]
    fn unpadding_trims_the_spare_side_evenly() {
        // 640x480 on a 48x48 grid: 36 rows of image, 6 of padding each side.
        assert_eq!(unpadded((480, 640), (48, 48)), (6..42, 0..48));
        // 260x100 on 3x1 crops of 4: 10.4 rows of image → 10, one row of padding each side.
        assert_eq!(unpadded((260, 100), (12, 4)), (1..11, 0..4));
        // Taller than the grid: columns go instead.
        assert_eq!(unpadded((1000, 100), (24, 24)), (0..24, 11..13));
    }

    #[test]
    fn packed_order_is_base_then_rows_with_newlines() {
        let layout = AnyresLayout {
            image_hw: (2, 4),
            pinpoint_hw: (4, 8),
            crops: (1, 2),
            grid: 2,
            rows: 0..2,
            cols: 1..3,
        };
        use PackedToken::{Newline, Patch};
        let p = |view, index| Patch { view, index };
        assert_eq!(
            layout.packed(),
            vec![
                p(0, 0),
                p(0, 1),
                p(0, 2),
                p(0, 3),
                p(1, 1),
                p(2, 0),
                Newline,
                p(1, 3),
                p(2, 2),
                Newline,
            ]
        );
        assert_eq!(layout.image_tokens(), 10);
        assert_eq!(layout.visual_tokens(), 8);
        // Kept patches on each view's full grid: view 1's patch 0 sits in an unpadded-away
        // column and is dropped anyway; the second row keeps only its newline.
        let kept = vec![vec![1, 2], vec![0, 1], vec![0]];
        assert_eq!(
            layout.packed_kept(&kept),
            vec![p(0, 1), p(0, 2), p(1, 1), p(2, 0), Newline, Newline]
        );
    }

    #[test]
    fn extreme_shapes_give_consistent_layouts() {
        // 1x1, 10000x1 (no grid row survives unpadding), 1x10000, and a sweep of odd sizes.
        let mut sizes = vec![(1, 1), (1, 10000), (10000, 1), (3, 7)];
        sizes.extend((1..40).map(|i| (i * 37 % 901 + 1, i * 53 % 677 + 1)));
        for hw in sizes {
            let layout = AnyresLayout::new(hw, &LLAVA_HF, 336, 14);
            let (gh, gw) = (layout.crops.0 * 24, layout.crops.1 * 24);
            assert!(
                layout.rows.end <= gh && layout.cols.end <= gw,
                "{hw:?}: {layout:?}"
            );
            assert_eq!(layout.packed().len(), layout.image_tokens(), "{hw:?}");
            let (h, w) = resized_in_pinpoint(hw, layout.pinpoint_hw);
            assert!(h >= 1 && w >= 1 && h <= layout.pinpoint_hw.0 && w <= layout.pinpoint_hw.1);
        }
        // The 10000-wide strip keeps no grid row (transformers: new_height 0), only the base view.
        let strip = AnyresLayout::new((1, 10000), &LLAVA_HF, 336, 14);
        assert_eq!((strip.rows.len(), strip.image_tokens()), (0, 576));
    }

    #[test]
    fn budgets_split_evenly_base_view_first() {
        assert_eq!(split_budget(320, 5), vec![64; 5]);
        assert_eq!(split_budget(160, 3), vec![54, 53, 53]);
        assert_eq!(split_budget(7, 5), vec![2, 2, 1, 1, 1]);
        assert_eq!(split_budget(3, 5), vec![1, 1, 1, 0, 0]);
    }
}
