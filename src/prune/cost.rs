//! The cost model of docs/pruning.md: per decoder layer with n tokens, hidden d and MLP width m,
//! `F(n) = 4nd² + 2n²d + 3ndm` multiply-adds (SwiGLU has three matrices). The papers' FastV
//! formula uses `2ndm` (the test below checks docs/pruning.md's figure with it).

/// Multiply-adds of one LLaMA decoder layer over `n` tokens.
pub fn layer_macs(n: u64, d: u64, m: u64) -> u64 {
    4 * n * d * d + 2 * n * n * d + 3 * n * d * m
}

/// Prefill multiply-adds with `tokens[l]` tokens entering layer `l`.
pub fn prefill_macs(tokens: &[usize], d: usize, m: usize) -> u64 {
    tokens
        .iter()
        .map(|&n| layer_macs(n as u64, d as u64, m as u64))
        .sum()
}

#[cfg(test)]
mod tests {
    /// The FastV paper's variant with a two-matrix MLP.
    fn layer_macs_paper(n: u64, d: u64, m: u64) -> u64 {
        4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    }

    #[test]
    fn star_reference_setting_saves_58_percent_with_the_paper_formula() {
        // docs/pruning.md: LLaVA-1.5-7B, N1 = 518, K = 14, N2 = 29 gives 58.0% fewer FLOPs with the
        // papers' formula counting visual tokens only.
        let (d, m) = (4096u64, 11008u64);
        let full: u64 = (0..32).map(|_| layer_macs_paper(576, d, m)).sum();
        let pruned: u64 = (0..32)
            .map(|l| layer_macs_paper(if l < 14 { 518 } else { 29 }, d, m))
            .sum();
        let reduction = 1.0 - pruned as f64 / full as f64;
        assert!((reduction - 0.58).abs() < 0.005, "{reduction}");
    }
}
