//! VisPruner's selection (docs/pruning.md, "Baselines"): important tokens by the CLS attention, then
//! diverse tokens by repeatedly dropping the members of one half that are most similar to the
//! other half. Runs on the host from N0 scores and the Gram matrix of the N0 feature rows, which
//! the GPU computes: each similarity is then a lookup, not a dot product over the features.

use crate::prune::{gram_cosine, top_k};

/// Keep `keep` of the `scores.len()` patches; `gram` is the Gram matrix of their feature rows
/// (the layer −2 features, n × n). Returns ascending patch indices.
pub fn select(scores: &[f32], gram: &[f32], keep: usize, important_ratio: f64) -> Vec<usize> {
    let n = scores.len();
    assert_eq!(gram.len(), n * n, "the Gram matrix is n × n");
    let keep = keep.min(n);
    let important_count = (keep as f64 * important_ratio).floor() as usize;
    let important = top_k(scores, important_count);
    let needed = keep - important.len();
    // The rest in descending score order (ties: lower index first).
    let mut list: Vec<usize> = (0..n)
        .filter(|i| important.binary_search(i).is_err())
        .collect();
    list.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    if needed == 0 {
        list.clear();
    }
    let cosine = |a: usize, b: usize| gram_cosine(gram, n, a, b);
    while list.len() > needed {
        // A: even positions (ceil(len/2) of them), B: odd positions.
        let a: Vec<usize> = list.iter().step_by(2).copied().collect();
        let b: Vec<usize> = list.iter().skip(1).step_by(2).copied().collect();
        let mut scored: Vec<(usize, f64)> = a
            .iter()
            .map(|&i| {
                let most_similar = b.iter().map(|&j| cosine(i, j));
                (i, most_similar.fold(f64::NEG_INFINITY, f64::max))
            })
            .collect();
        // Most similar first; a stable sort keeps the list order among equal similarities.
        scored.sort_by(|x, y| y.1.total_cmp(&x.1));
        let drop = 8.min(list.len() - needed).min(scored.len());
        list = scored[drop..].iter().map(|&(i, _)| i).chain(b).collect();
    }
    let mut kept: Vec<usize> = important.into_iter().chain(list).collect();
    kept.sort_unstable();
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prune::gram_of;

    #[test]
    fn keeps_the_budget_and_the_most_important_tokens() {
        let n = 40;
        let dim = 3;
        let scores: Vec<f32> = (0..n).map(|i| ((i * 7) % 40) as f32).collect();
        let features: Vec<f32> = (0..n * dim).map(|i| ((i * 13) % 17) as f32 - 8.0).collect();
        for keep in [1, 2, 5, 10, 39, 40] {
            let kept = select(&scores, &gram_of(&features, dim), keep, 0.5);
            assert_eq!(kept.len(), keep);
            assert!(kept.windows(2).all(|w| w[0] < w[1]));
            for i in top_k(&scores, keep / 2) {
                assert!(kept.contains(&i));
            }
        }
    }

    #[test]
    fn the_most_similar_a_token_is_dropped_first() {
        // Six tokens ranked by index; 0 and 1 point the same way, the rest are distinct axes.
        // Keeping 5 with no important share: A = [0, 2, 4], B = [1, 3, 5]; one A token goes,
        // the one most similar to B, which is 0 (identical to 1).
        let dim = 6;
        let mut features = vec![0f32; 6 * dim];
        features[0] = 1.0;
        features[dim] = 1.0;
        for i in 2..6 {
            features[i * dim + i] = 1.0;
        }
        let scores: Vec<f32> = (0..6).map(|i| 10.0 - i as f32).collect();
        let gram = gram_of(&features, dim);
        assert_eq!(select(&scores, &gram, 5, 0.0), vec![1, 2, 3, 4, 5]);
    }
}
