//! DART's selection (arXiv 2502.11494; docs/pruning.md, "DART"): a few pivot tokens with the
//! largest key norms, then, for each pivot, the image tokens least similar to it. It keeps
//! the tokens that duplicate the others least, and needs no attention scores.
//!
//! Runs on the host from what the engine reads back after decoder layer K−1: each row's key L1
//! norm and its hidden state after the final norm.

use std::cmp::Ordering;
use std::ops::Range;

/// Image pivots: the image rows with the largest key norms.
pub const IMAGE_PIVOTS: usize = 4;
/// Text pivots: rows after the image with the largest key norms.
pub const TEXT_PIVOTS: usize = 4;

/// What DART reads about the rows of one window of the prompt (from the first image row to
/// the end of the prompt).
pub struct DartRows<'a> {
    /// (rows, width): each row's hidden state entering layer K, after the final RMSNorm.
    pub normed: &'a [f32],
    pub width: usize,
    /// (rows,): the L1 norm of each row's key in layer K−1 (after RoPE, every KV head).
    pub key_l1: &'a [f64],
    /// The image rows (the candidates), ascending.
    pub image_rows: &'a [usize],
    /// The rows text pivots come from: those after the last image.
    pub text_rows: Range<usize>,
}

/// The rows DART keeps and the pivots that chose them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DartChoice {
    /// Image rows kept (pivots included), ascending.
    pub kept: Vec<usize>,
    pub image_pivots: Vec<usize>,
    pub text_pivots: Vec<usize>,
}

/// Cosine similarity of two rows.
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na.sqrt() * nb.sqrt())
    }
}

/// Positions in `values` of the `count` first in `order`, ties to the lower position,
/// ascending.
fn first_by(values: &[f64], count: usize, order: impl Fn(f64, f64) -> Ordering) -> Vec<usize> {
    let mut positions: Vec<usize> = (0..values.len()).collect();
    positions.sort_by(|&a, &b| order(values[a], values[b]).then(a.cmp(&b)));
    positions.truncate(count);
    positions.sort_unstable();
    positions
}

/// The `count` rows of `rows` with the largest key norms, ascending (ties to the lower row).
fn largest_keys(key_l1: &[f64], rows: &[usize], count: usize) -> Vec<usize> {
    let norms: Vec<f64> = rows.iter().map(|&r| key_l1[r]).collect();
    let largest = first_by(&norms, count, |a, b| b.total_cmp(&a));
    largest.into_iter().map(|i| rows[i]).collect()
}

/// Keep `keep` image rows: min(4, keep) image pivots, up to 4 text pivots, and the remaining
/// budget split over the pivots in row order (the first `R mod P` pivots take one more); each
/// pivot takes, from the rows not yet kept, those least similar to it (ties to the lower row).
pub fn select(rows: &DartRows, keep: usize) -> DartChoice {
    let keep = keep.min(rows.image_rows.len());
    let image_pivots = largest_keys(rows.key_l1, rows.image_rows, IMAGE_PIVOTS.min(keep));
    let text: Vec<usize> = rows.text_rows.clone().collect();
    let text_pivots = largest_keys(rows.key_l1, &text, TEXT_PIVOTS);
    let mut pivots: Vec<usize> = image_pivots.iter().chain(&text_pivots).copied().collect();
    pivots.sort_unstable();
    let row = |r: usize| &rows.normed[r * rows.width..(r + 1) * rows.width];
    let mut open: Vec<usize> = rows
        .image_rows
        .iter()
        .copied()
        .filter(|r| !image_pivots.contains(r))
        .collect();
    let mut kept = image_pivots.clone();
    let rest = keep - image_pivots.len();
    for (m, &pivot) in pivots.iter().enumerate() {
        let share = rest / pivots.len() + usize::from(m < rest % pivots.len());
        let similarity: Vec<f64> = open.iter().map(|&r| cosine(row(pivot), row(r))).collect();
        let taken = first_by(&similarity, share, |a, b| a.total_cmp(&b));
        kept.extend(taken.iter().map(|&i| open[i]));
        let mut i = 0;
        open.retain(|_| {
            i += 1;
            taken.binary_search(&(i - 1)).is_err()
        });
    }
    kept.sort_unstable();
    DartChoice {
        kept,
        image_pivots,
        text_pivots,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-worked, in two dimensions: image rows 0..6 and text rows 6..8.
    fn rows() -> (Vec<f32>, Vec<f64>) {
        let normed = vec![
            1.0, 0.0, // 0: along x
            0.9, 0.1, // 1: close to 0
            0.0, 1.0, // 2: along y
            -1.0, 0.0, // 3: opposite 0
            0.7, 0.7, // 4
            0.0, -1.0, // 5: opposite 2
            0.0, 1.0, // 6: text, along y
            1.0, 1.0, // 7: text
        ];
        let key_l1 = vec![9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 8.0, 7.0];
        (normed, key_l1)
    }

    /// DART on `rows()` with image rows 0..6 and `text_rows` as the text pivots' candidates.
    fn select_rows(text_rows: Range<usize>, keep: usize) -> DartChoice {
        let (normed, key_l1) = rows();
        let image_rows: Vec<usize> = (0..6).collect();
        let input = DartRows {
            normed: &normed,
            width: 2,
            key_l1: &key_l1,
            image_rows: &image_rows,
            text_rows,
        };
        select(&input, keep)
    }

    #[test]
    fn pivots_take_the_rows_least_similar_to_them_in_row_order() {
        // keep 5: image pivots 0, 5, 4, 3 (the four largest image keys); text pivot 6. R = 1
        // over P = 5 pivots: the first in row order, 0, takes the open row least similar to it:
        // 2 (cos 0), not 1 (cos 0.99).
        let choice = select_rows(6..7, 5);
        assert_eq!(choice.image_pivots, vec![0, 3, 4, 5]);
        assert_eq!(choice.text_pivots, vec![6]);
        assert_eq!(choice.kept, vec![0, 2, 3, 4, 5]);
        // keep 2: pivots 0 and 5, text pivot 6; R = 0.
        assert_eq!(select_rows(6..7, 2).kept, vec![0, 5]);
    }

    #[test]
    fn the_budget_is_kept_exactly_and_split_with_the_remainder_first() {
        for keep in 1..=6 {
            let choice = select_rows(6..8, keep);
            assert_eq!(choice.kept.len(), keep, "keep {keep}");
            assert!(choice.kept.windows(2).all(|w| w[0] < w[1]));
            assert!(choice.image_pivots.iter().all(|p| choice.kept.contains(p)));
        }
        // keep 6: 4 image pivots (0, 5, 4, 3 by key norm), text pivots 6 and 7; R = 2 over six
        // pivots: the first two in row order (0 and 3) take one row each.
        let choice = select_rows(6..8, 6);
        assert_eq!(choice.image_pivots, vec![0, 3, 4, 5]);
        assert_eq!(choice.text_pivots, vec![6, 7]);
        assert_eq!(choice.kept, (0..6).collect::<Vec<_>>());
    }
}
