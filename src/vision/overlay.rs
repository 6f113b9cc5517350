//! `--kept-overlay`: the image the model saw, once per pruning stage, with the patches that
//! stage dropped dimmed, so a user sees what was kept.

use std::path::Path;

use crate::error::{Error, Result};
use crate::generate::{GenerateOutput, GenerateRequest};
use crate::model::llava::Engine;
use crate::vision::load_image;

/// Brightness of a dropped patch, as a fraction of the original.
const DIM: u32 = 25;

/// Write one panel per stage (stage 1, then the final selection) side by side, scaled up to at
/// least 336 pixels so small inputs stay readable.
pub fn write(
    engine: &Engine,
    request: &GenerateRequest,
    output: &GenerateOutput,
    path: &Path,
) -> Result<()> {
    let kept = output.kept_visual_indices.as_ref().ok_or_else(|| {
        Error::argument(
            "--kept-overlay",
            "needs a pruning method (--prune ...): nothing was dropped",
        )
    })?;
    let panels: Vec<&Vec<usize>> = [kept.stage1.as_ref(), kept.stage2.as_ref()]
        .into_iter()
        .flatten()
        .collect();
    let image = load_image(&request.image)?;
    let (rgb, h, w) = engine
        .image_processor
        .crop_rgb8(&image, request.pad_to_square);
    let patch = engine.config.vision.patch_size;
    let grid = engine.config.vision.grid();
    let scale = (336 / h.max(1)).max(1);
    let gap = 8;
    let (ph, pw) = (h * scale, w * scale);
    let width = panels.len() * pw + (panels.len() - 1) * gap;
    let mut canvas =
        image::RgbImage::from_pixel(width as u32, ph as u32, image::Rgb([255, 255, 255]));
    for (p, kept) in panels.iter().enumerate() {
        let mut keep = vec![false; grid * grid];
        for &i in kept.iter() {
            keep[i] = true;
        }
        for y in 0..ph {
            for x in 0..pw {
                let (sy, sx) = (y / scale, x / scale);
                let cell = (sy / patch).min(grid - 1) * grid + (sx / patch).min(grid - 1);
                let src = &rgb[(sy * w + sx) * 3..(sy * w + sx) * 3 + 3];
                let px: [u8; 3] = if keep[cell] {
                    [src[0], src[1], src[2]]
                } else {
                    std::array::from_fn(|c| (src[c] as u32 * DIM / 100) as u8)
                };
                canvas.put_pixel((p * (pw + gap) + x) as u32, y as u32, image::Rgb(px));
            }
        }
    }
    canvas.save(path).map_err(|e| Error::File {
        path: path.to_path_buf(),
        reason: format!("cannot write the overlay: {e}"),
    })
}
