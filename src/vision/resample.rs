//! Pillow's `Image.resize` for 8-bit images, reproduced exactly: separable convolution
//! (horizontal pass, then vertical), filter support widened by the downscale factor
//! (antialiasing), coefficients normalised and converted to 22-bit fixed point, and the
//! intermediate image rounded to 8 bits between the passes. transformers' CLIPImageProcessor
//! resizes through Pillow, so matching it bit for bit matters more than any "better" resampler.

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

/// For each output pixel: the first input index and the fixed-point weights.
struct Coefficients {
    first: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    let mut first = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
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

/// Resize an interleaved RGB8 image (`width × height × 3`) like Pillow does.
pub fn resize_rgb8(
    pixels: &[u8],
    width: usize,
    height: usize,
    out_w: usize,
    out_h: usize,
    filter: Filter,
) -> Vec<u8> {
    let mut current = pixels.to_vec();
    let mut w = width;
    if out_w != width {
        let c = coefficients(width, out_w, filter);
        let mut next = vec![0u8; out_w * height * 3];
        for y in 0..height {
            for xx in 0..out_w {
                for ch in 0..3 {
                    let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &k) in c.weights[xx].iter().enumerate() {
                        acc += current[(y * w + c.first[xx] + i) * 3 + ch] as i64 * k as i64;
                    }
                    next[(y * out_w + xx) * 3 + ch] = clip8(acc);
                }
            }
        }
        current = next;
        w = out_w;
    }
    if out_h != height {
        let c = coefficients(height, out_h, filter);
        let mut next = vec![0u8; w * out_h * 3];
        for yy in 0..out_h {
            for x in 0..w {
                for ch in 0..3 {
                    let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &k) in c.weights[yy].iter().enumerate() {
                        acc += current[((c.first[yy] + i) * w + x) * 3 + ch] as i64 * k as i64;
                    }
                    next[(yy * w + x) * 3 + ch] = clip8(acc);
                }
            }
        }
        current = next;
    }
    current
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

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(97, 133), (200, 84), (61, 84), (1000, 3)] {
            let c = coefficients(i, o, Filter::Bicubic);
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
