//! Merging the patches a selection before the projector drops into the ones it keeps
//! (`--merge`, docs/pruning.md, "Merging the dropped patches"): each dropped patch joins the
//! kept patch its layer −2 feature is most similar to, and each kept row becomes the mean of
//! its group, so a dropped object still reaches the language model through its nearest kept
//! token. This is the host half: who joins whom. The mean runs on the GPU
//! (`gpu::kernels::merge`).

use crate::prune::gram_cosine;

/// The groups of `kept` (ascending patch indices of the `n` patches): one per kept patch, in
/// `kept`'s order, each starting with that patch and followed, ascending, by the dropped
/// patches whose cosine similarity (from `gram`, the n × n Gram matrix of the feature rows) is
/// largest with it; a tie goes to the earlier kept patch.
pub fn groups(gram: &[f32], n: usize, kept: &[usize]) -> Vec<Vec<usize>> {
    assert_eq!(gram.len(), n * n, "the Gram matrix is n × n");
    let mut groups: Vec<Vec<usize>> = kept.iter().map(|&k| vec![k]).collect();
    if kept.is_empty() {
        return groups;
    }
    let mut is_kept = vec![false; n];
    for &k in kept {
        is_kept[k] = true;
    }
    for dropped in (0..n).filter(|&i| !is_kept[i]) {
        let mut best = (0, f64::NEG_INFINITY);
        for (g, &k) in kept.iter().enumerate() {
            let similarity = gram_cosine(gram, n, dropped, k);
            // Strictly greater: the earlier kept patch wins a tie (and NaN never wins).
            if similarity > best.1 {
                best = (g, similarity);
            }
        }
        groups[best.0].push(dropped);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prune::gram_of;

    #[test]
    fn each_dropped_patch_joins_its_most_similar_kept_patch() {
        // Patches 0..6 along three axes: 0, 3 on x; 1, 4 on y; 2 on z; 5 between x and y,
        // nearer y. Keep 0, 1 and 2.
        let features = [
            1.0, 0.0, 0.0, //
            0.0, 1.0, 0.0, //
            0.0, 0.0, 1.0, //
            2.0, 0.1, 0.0, //
            0.0, 3.0, 0.2, //
            0.4, 0.6, 0.0, //
        ];
        let gram = gram_of(&features, 3);
        let got = groups(&gram, 6, &[0, 1, 2]);
        assert_eq!(got, vec![vec![0, 3], vec![1, 4, 5], vec![2]]);
    }

    #[test]
    fn ties_and_zero_rows_go_to_the_earlier_kept_patch() {
        // Patch 2 is exactly between 0 and 1; patch 3 is zero (similar to nothing).
        let features = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0];
        let gram = gram_of(&features, 2);
        assert_eq!(groups(&gram, 4, &[0, 1]), vec![vec![0, 2, 3], vec![1]]);
    }

    #[test]
    fn every_patch_is_in_exactly_one_group() {
        let n = 30;
        let features: Vec<f32> = (0..n * 5).map(|i| ((i * 37) % 23) as f32 - 11.0).collect();
        let gram = gram_of(&features, 5);
        let kept = [2, 7, 11, 19, 29];
        let got = groups(&gram, n, &kept);
        let mut all: Vec<usize> = got.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
        for (group, &k) in got.iter().zip(&kept) {
            assert_eq!(group[0], k);
        }
    }
}
