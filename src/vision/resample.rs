//! Pillow's `Image.resize` for 8-bit images, reproduced exactly: separable convolution
//! (horizontal pass, then vertical, unless the height shrinks much more: [`vertical_first`]),
//! filter support widened by the downscale factor
//! (antialiasing), coefficients normalised and converted to 22-bit fixed point, and the
//! intermediate image rounded to 8 bits between the passes. transformers' CLIPImageProcessor
//! resizes through Pillow, so matching it bit for bit matters more than any "better" resampler.

use std::ops::Range;

/// Pillow's resampling filters that CLIP processors use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// `Image.BILINEAR` (2): triangle, support 1.
    Bilinear,
    /// `Image.BICUBIC` (3): Keys cubic with a = −0.5, support 2.
    Bicubic,
}

impl Filter {
    /// From the `resample` field of preprocessor_config.json.
    pub fn from_pil(code: u64) -> Option<Self> {
        match code {
            2 => Some(Self::Bilinear),
            3 => Some(Self::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Self::Bilinear => 1.0,
            Self::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Self::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Self::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// For each output pixel of a range: the first input index and the fixed-point weights.
struct Coefficients {
    first: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

impl Coefficients {
    /// The input indices the range's pixels read: `[min first, max first + taps)`.
    fn inputs(&self) -> Range<usize> {
        let start = self.first.iter().copied().min().unwrap_or(0);
        let end = self
            .first
            .iter()
            .zip(&self.weights)
            .map(|(&f, w)| f + w.len())
            .max()
            .unwrap_or(0);
        start..end.max(start)
    }
}

/// Pillow's `precompute_coeffs` for the output pixels `range` of an `in_size → out_size`
/// resize (each pixel's weights depend only on its own position).
fn coefficients(
    in_size: usize,
    out_size: usize,
    range: Range<usize>,
    filter: Filter,
) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    let mut first = Vec::with_capacity(range.len());
    let mut weights = Vec::with_capacity(range.len());
    for xx in range {
        let center = (xx as f64 + 0.5) * scale;
        // Pillow truncates with a C cast after adding 0.5.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let count = xmax.saturating_sub(xmin);
        let mut k: Vec<f64> = (0..count)
            .map(|x| filter.weight((x as f64 + xmin as f64 - center + 0.5) / filter_scale))
            .collect();
        let total: f64 = k.iter().sum();
        if total != 0.0 {
            for w in &mut k {
                *w /= total;
            }
        }
        let fixed = k
            .iter()
            .map(|&w| {
                let scaled = w * (1u64 << PRECISION_BITS) as f64;
                if w < 0.0 {
                    (scaled - 0.5) as i32
                } else {
                    (scaled + 0.5) as i32
                }
            })
            .collect();
        first.push(xmin);
        weights.push(fixed);
    }
    Coefficients { first, weights }
}

fn clip8(value: i64) -> u8 {
    (value >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `Σ weights[i] · pixel(first + i)` in fixed point, rounded and clipped to 8 bits; `pixel(j)`
/// is channel value `j` of a row or column.
fn convolve(first: usize, weights: &[i32], pixel: impl Fn(usize) -> u8) -> u8 {
    let mut acc: i64 = 1 << (PRECISION_BITS - 1);
    for (i, &k) in weights.iter().enumerate() {
        acc += pixel(first + i) as i64 * k as i64;
    }
    clip8(acc)
}

/// Output columns `x` and rows `y` of a resize: a crop of the resized image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    pub x: Range<usize>,
    pub y: Range<usize>,
}

/// Resize an interleaved RGB8 image (`width × height × 3`) like Pillow does.
pub fn resize_rgb8(
    pixels: &[u8],
    width: usize,
    height: usize,
    out_w: usize,
    out_h: usize,
    filter: Filter,
) -> Vec<u8> {
    let window = Window {
        x: 0..out_w,
        y: 0..out_h,
    };
    resize_window_rgb8(pixels, (width, height), (out_w, out_h), &window, filter)
}

/// The pixels in `window` of [`resize_rgb8`]'s `size → out` result, row-major
/// `window.y.len() × window.x.len() × 3`, bit-identical to resizing everything and cropping.
/// Only the window is computed (and only the input rows its vertical taps read go through the
/// horizontal pass, as Pillow itself does), so the work follows the window, not `out`.
/// `window` must lie inside `out`.
pub fn resize_window_rgb8(
    pixels: &[u8],
    size: (usize, usize),
    out: (usize, usize),
    window: &Window,
    filter: Filter,
) -> Vec<u8> {
    let ((width, height), (out_w, out_h)) = (size, out);
    let cols = window.x.len();
    if cols == 0 || window.y.is_empty() {
        return Vec::new();
    }
    if vertical_first(size, out) {
        return resize_window_vertical_first(pixels, size, out, window, filter);
    }
    // Pillow: horizontal pass first, rounded to 8 bits, then the vertical pass.
    let vertical = (out_h != height).then(|| coefficients(height, out_h, window.y.clone(), filter));
    let rows = vertical
        .as_ref()
        .map_or(window.y.clone(), Coefficients::inputs);
    let horizontal = (out_w != width).then(|| coefficients(width, out_w, window.x.clone(), filter));
    let mut mid = vec![0u8; rows.len() * cols * 3];
    for (r, y) in rows.clone().enumerate() {
        let src = &pixels[y * width * 3..(y + 1) * width * 3];
        let dst = &mut mid[r * cols * 3..(r + 1) * cols * 3];
        let Some(c) = &horizontal else {
            dst.copy_from_slice(&src[window.x.start * 3..window.x.end * 3]);
            continue;
        };
        for (j, px) in dst.chunks_exact_mut(3).enumerate() {
            for (ch, v) in px.iter_mut().enumerate() {
                *v = convolve(c.first[j], &c.weights[j], |x| src[x * 3 + ch]);
            }
        }
    }
    let Some(c) = vertical else {
        return mid;
    };
    let mut next = vec![0u8; window.y.len() * cols * 3];
    for (j, row) in next.chunks_exact_mut(cols * 3).enumerate() {
        for (i, v) in row.iter_mut().enumerate() {
            *v = convolve(c.first[j], &c.weights[j], |y| {
                mid[(y - rows.start) * cols * 3 + i]
            });
        }
    }
    next
}

/// Pillow 13's pass order (`ImagingResampleInner`): the vertical pass runs first when the
/// height loses more than twice as many pixels as the width (`(h − out_h) > 0` and
/// `(h − out_h) > 2 · (w − out_w)`, in signed pixel counts). The order changes the result:
/// the intermediate image is rounded to 8 bits.
pub fn vertical_first(size: (usize, usize), out: (usize, usize)) -> bool {
    let lost_rows = size.1 as i64 - out.1 as i64;
    let lost_cols = size.0 as i64 - out.0 as i64;
    lost_rows > 0 && lost_rows > 2 * lost_cols
}

/// [`resize_window_rgb8`] with the vertical pass first: the window's rows over the input
/// columns its horizontal taps read, rounded to 8 bits, then the horizontal pass.
fn resize_window_vertical_first(
    pixels: &[u8],
    (width, height): (usize, usize),
    (out_w, out_h): (usize, usize),
    window: &Window,
    filter: Filter,
) -> Vec<u8> {
    let horizontal = (out_w != width).then(|| coefficients(width, out_w, window.x.clone(), filter));
    let columns = horizontal
        .as_ref()
        .map_or(window.x.clone(), Coefficients::inputs);
    let vertical = (out_h != height).then(|| coefficients(height, out_h, window.y.clone(), filter));
    let span = columns.len();
    let mut mid = vec![0u8; window.y.len() * span * 3];
    for (r, row) in mid.chunks_exact_mut(span * 3).enumerate() {
        for (i, v) in row.iter_mut().enumerate() {
            let at = |y: usize| pixels[y * width * 3 + columns.start * 3 + i];
            *v = match &vertical {
                Some(c) => convolve(c.first[r], &c.weights[r], at),
                None => at(window.y.start + r),
            };
        }
    }
    let Some(c) = horizontal else {
        return mid;
    };
    let cols = window.x.len();
    let mut next = vec![0u8; window.y.len() * cols * 3];
    for (r, row) in next.chunks_exact_mut(cols * 3).enumerate() {
        let src = &mid[r * span * 3..(r + 1) * span * 3];
        for (j, px) in row.chunks_exact_mut(3).enumerate() {
            for (ch, v) in px.iter_mut().enumerate() {
                *v = convolve(c.first[j], &c.weights[j], |x| {
                    src[(x - columns.start) * 3 + ch]
                });
            }
        }
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_the_identity() {
        let px: Vec<u8> = (0..5 * 4 * 3).map(|i| (i * 37 % 256) as u8).collect();
        assert_eq!(resize_rgb8(&px, 5, 4, 5, 4, Filter::Bicubic), px);
    }

    #[test]
    fn a_constant_image_stays_constant() {
        let px = vec![200u8; 97 * 61 * 3];
        let out = resize_rgb8(&px, 97, 61, 133, 84, Filter::Bicubic);
        assert!(out.iter().all(|&v| v == 200));
        let out = resize_rgb8(&px, 97, 61, 20, 13, Filter::Bilinear);
        assert!(out.iter().all(|&v| v == 200));
    }

    /// The resampler as it was before windows (both passes over the whole image), validated
    /// against transformers' pixels by tests/preprocess.rs and tests/next_preprocess.rs: the
    /// reference for the windowed one.
    fn whole_image_then_crop(
        pixels: &[u8],
        (width, height): (usize, usize),
        (out_w, out_h): (usize, usize),
        window: &Window,
        filter: Filter,
    ) -> Vec<u8> {
        // One pass along one axis over the whole image: (w, h) → (w', h').
        let horizontal = |current: &[u8], h: usize| {
            let c = coefficients(width, out_w, 0..out_w, filter);
            let mut next = vec![0u8; out_w * h * 3];
            for y in 0..h {
                for xx in 0..out_w {
                    for ch in 0..3 {
                        next[(y * out_w + xx) * 3 + ch] =
                            convolve(c.first[xx], &c.weights[xx], |x| {
                                current[(y * width + x) * 3 + ch]
                            });
                    }
                }
            }
            next
        };
        let vertical = |current: &[u8], w: usize| {
            let c = coefficients(height, out_h, 0..out_h, filter);
            let mut next = vec![0u8; w * out_h * 3];
            for yy in 0..out_h {
                for i in 0..w * 3 {
                    next[yy * w * 3 + i] =
                        convolve(c.first[yy], &c.weights[yy], |y| current[y * w * 3 + i]);
                }
            }
            next
        };
        let mut current = pixels.to_vec();
        if vertical_first((width, height), (out_w, out_h)) {
            current = vertical(&current, width);
            if out_w != width {
                current = horizontal(&current, out_h);
            }
        } else {
            if out_w != width {
                current = horizontal(&current, height);
            }
            if out_h != height {
                current = vertical(&current, out_w);
            }
        }
        let mut out = Vec::new();
        for y in window.y.clone() {
            out.extend_from_slice(
                &current[(y * out_w + window.x.start) * 3..(y * out_w + window.x.end) * 3],
            );
        }
        out
    }

    #[test]
    fn a_window_equals_the_whole_resize_cropped() {
        let (w, h) = (23, 157);
        let px: Vec<u8> = (0..w * h * 3).map(|i| (i * 7919 % 251) as u8).collect();
        let cases = [
            (
                (84, 574),
                Window {
                    x: 0..84,
                    y: 245..329,
                },
            ),
            ((84, 574), Window { x: 3..80, y: 0..1 }),
            (
                (84, 574),
                Window {
                    x: 0..84,
                    y: 573..574,
                },
            ),
            ((23, 40), Window { x: 5..9, y: 11..30 }),
            (
                (10, 157),
                Window {
                    x: 2..10,
                    y: 100..157,
                },
            ),
            (
                (23, 157),
                Window {
                    x: 1..22,
                    y: 0..157,
                },
            ),
            ((6, 9), Window { x: 0..6, y: 0..9 }),
            // Height shrinks by more than twice the width's loss: Pillow 13 goes vertical first.
            ((20, 40), Window { x: 0..20, y: 0..40 }),
            ((17, 31), Window { x: 2..15, y: 5..30 }),
            ((30, 50), Window { x: 1..29, y: 7..8 }),
            ((84, 574), Window { x: 4..4, y: 0..0 }),
        ];
        for (out, window) in cases {
            for filter in [Filter::Bicubic, Filter::Bilinear] {
                let want = whole_image_then_crop(&px, (w, h), out, &window, filter);
                let got = resize_window_rgb8(&px, (w, h), out, &window, filter);
                assert!(got == want, "{out:?} {window:?} {filter:?}");
            }
        }
    }

    #[test]
    fn pass_order_follows_pillow_13() {
        // (w, h) → (out_w, out_h): rows lost vs twice the columns lost.
        assert!(vertical_first((100, 260), (56, 56))); // 204 > 88
        assert!(!vertical_first((187, 120), (114, 20))); // 100 < 146
        assert!(!vertical_first((100, 100), (50, 50))); // 50 < 100
        assert!(vertical_first((50, 50), (100, 20))); // 30 > −100
        assert!(!vertical_first((50, 50), (20, 100))); // the height grows
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(97, 133), (200, 84), (61, 84), (1000, 3)] {
            let c = coefficients(i, o, 0..o, Filter::Bicubic);
            for w in &c.weights {
                let s: i64 = w.iter().map(|&k| k as i64).sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= w.len() as i64,
                    "{i}->{o}: {s}"
                );
            }
        }
    }
}
