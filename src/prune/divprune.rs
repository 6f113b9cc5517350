//! DivPrune's selection (arXiv 2503.02175; docs/pruning.md, "DivPrune"): the image rows that
//! enter the decoder are chosen greedily so that each new row is as far as possible, in cosine
//! distance, from the rows already chosen (max-min diversity). No attention is involved, so it
//! works with any attention kernel.
//!
//! The engine computes the Gram matrix of the rows on the GPU and runs the greedy part here: it
//! reads n² numbers once and does O(n · keep) work.

use crate::prune::gram_cosine;

/// Cosine distance `1 − cos(a, b)` from a Gram matrix of `n` rows (cos = 0 when a row is zero).
fn distance(gram: &[f32], n: usize, a: usize, b: usize) -> f64 {
    1.0 - gram_cosine(gram, n, a, b)
}

/// Index in `values` of the largest value, the first one on ties.
fn first_max(values: impl Iterator<Item = f64>) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, v) in values.enumerate() {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

/// Keep `keep` of the `candidates` (row indices into an `n`×`n` Gram matrix, ascending):
/// first the candidate farthest from its nearest other candidate, then, one at a time, the
/// unchosen candidate whose distance to the nearest chosen one is largest; ties to the lower
/// row. Returns the chosen rows, ascending.
pub fn select(gram: &[f32], n: usize, candidates: &[usize], keep: usize) -> Vec<usize> {
    assert_eq!(gram.len(), n * n, "the Gram matrix is n × n");
    if keep >= candidates.len() {
        return candidates.to_vec();
    }
    let d = |a: usize, b: usize| distance(gram, n, a, b);
    let nearest_other = candidates.iter().map(|&a| {
        candidates
            .iter()
            .filter(|&&b| b != a)
            .map(|&b| d(a, b))
            .fold(f64::INFINITY, f64::min)
    });
    let mut chosen = Vec::with_capacity(keep);
    let mut taken = vec![false; candidates.len()];
    // Distance from each candidate to the nearest chosen row.
    let mut to_chosen = vec![f64::INFINITY; candidates.len()];
    let mut next = first_max(nearest_other);
    while let Some(i) = next.filter(|_| chosen.len() < keep) {
        taken[i] = true;
        chosen.push(candidates[i]);
        for (j, &c) in candidates.iter().enumerate() {
            to_chosen[j] = to_chosen[j].min(d(c, candidates[i]));
        }
        let open = |j: usize| {
            if taken[j] {
                f64::NEG_INFINITY
            } else {
                to_chosen[j]
            }
        };
        next = first_max((0..candidates.len()).map(open));
    }
    chosen.sort_unstable();
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Gram matrix of `rows`, in f32 as the GPU gives it.
    fn gram(rows: &[Vec<f32>]) -> Vec<f32> {
        crate::prune::gram_of(&rows.concat(), rows[0].len())
    }

    /// Hand-worked: rows 0 and 1 point the same way, 2 is at 90° to them, 3 at 180° to 0.
    /// Nearest-other distances: 0 → 0 (row 1), 1 → 0, 2 → 1, 3 → 1 (row 2): the first pick is
    /// row 2 (tie with 3, lower row). Then distances to {2}: 0 → 1, 1 → 1, 3 → 1: row 0. Then
    /// to {2, 0}: 1 → 0, 3 → 1: row 3. Row 1 is last.
    #[test]
    fn picks_the_isolated_row_first_and_a_duplicate_last() {
        let rows = vec![
            vec![1.0, 0.0],
            vec![2.0, 0.0],
            vec![0.0, 1.0],
            vec![-1.0, 0.0],
        ];
        let g = gram(&rows);
        let all = [0, 1, 2, 3];
        assert_eq!(select(&g, 4, &all, 1), vec![2]);
        assert_eq!(select(&g, 4, &all, 2), vec![0, 2]);
        assert_eq!(select(&g, 4, &all, 3), vec![0, 2, 3]);
        assert_eq!(select(&g, 4, &all, 4), vec![0, 1, 2, 3]);
    }

    #[test]
    fn only_candidates_are_chosen_and_zero_rows_are_far_from_everything() {
        let rows = vec![
            vec![1.0, 0.0],
            vec![0.0, 0.0],
            vec![1.0, 0.1],
            vec![1.0, 0.2],
        ];
        let g = gram(&rows);
        // Row 1 is not a candidate: the choice is among 0, 2, 3; 0 and 3 are the farthest apart.
        assert_eq!(select(&g, 4, &[0, 2, 3], 2), vec![0, 3]);
        // A zero row has cosine 0 with every row: distance 1, the most isolated.
        assert_eq!(select(&g, 4, &[0, 1, 2, 3], 1), vec![1]);
    }

    /// Exact duplicates never make a row chosen twice: the budget is filled with distinct rows.
    #[test]
    fn duplicates_fill_the_budget_with_distinct_rows() {
        let rows = vec![vec![1.0, 1.0]; 5];
        let g = gram(&rows);
        let kept = select(&g, 5, &[0, 1, 2, 3, 4], 3);
        assert_eq!(kept, vec![0, 1, 2]);
    }
}
