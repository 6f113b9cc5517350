//! The cost model of docs/pruning.md: multiply-adds of one LLaMA decoder layer over n tokens,
//! counting each projection by its real width so grouped-query attention (fewer key/value heads
//! than query heads) is not charged for full-width k and v:
//!
//! `F(n) = n·d·(2·q + 2·kv) + 2n²·q + 3n·d·m`
//!
//! with hidden size d, query width q = heads · head_dim (q_proj and o_proj are d × q), key/value
//! width kv = kv_heads · head_dim (k_proj and v_proj), MLP width m (SwiGLU has three matrices).
//! For multi-head attention (q = kv = d) this is the usual `4nd² + 2n²d + 3ndm`. The papers' FastV
//! formula uses `2ndm` (the tests check docs/pruning.md's 58% figure with it).

/// The widths of one decoder layer that its cost depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerWidths {
    /// d: the residual stream.
    pub hidden: u64,
    /// heads · head_dim: the output width of q_proj and input width of o_proj.
    pub q: u64,
    /// kv_heads · head_dim: the output width of k_proj and v_proj.
    pub kv: u64,
    /// m: the MLP's intermediate size.
    pub mlp: u64,
}

impl LayerWidths {
    /// Multi-head attention with `heads · head_dim = d` (LLaVA-1.5's 7B and 13B).
    pub fn mha(d: u64, m: u64) -> Self {
        Self {
            hidden: d,
            q: d,
            kv: d,
            mlp: m,
        }
    }
}

/// Multiply-adds of one LLaMA decoder layer over `n` tokens: the q, k, v and o projections, the
/// attention scores and weighted values over every (query, key) pair, and the SwiGLU MLP.
pub fn layer_macs(n: u64, w: &LayerWidths) -> u64 {
    let projections = n * w.hidden * (2 * w.q + 2 * w.kv);
    let attention = 2 * n * n * w.q;
    let mlp = 3 * n * w.hidden * w.mlp;
    projections + attention + mlp
}

/// Prefill multiply-adds with `tokens[l]` tokens entering layer `l`.
pub fn prefill_macs(tokens: &[usize], widths: &LayerWidths) -> u64 {
    tokens.iter().map(|&n| layer_macs(n as u64, widths)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// For multi-head attention the width-aware count is the formula it replaced,
    /// `4nd² + 2n²d + 3ndm`, written out here, so LLaVA-1.5's theoretical numbers do not move.
    #[test]
    fn multi_head_attention_counts_what_the_old_formula_did() {
        let old = |n: u64, d: u64, m: u64| 4 * n * d * d + 2 * n * n * d + 3 * n * d * m;
        for (n, d, m) in [
            (1, 1, 1),
            (600, 4096, 11008),
            (676, 5120, 13824),
            (37, 512, 1408),
        ] {
            assert_eq!(
                layer_macs(n, &LayerWidths::mha(d, m)),
                old(n, d, m),
                "n={n}"
            );
        }
        // LLaVA-1.5-7B, unpruned prompt of 576 + 40 tokens over 32 layers: 32 · F(616), with
        // F(616) = 4·616·4096² + 2·616²·4096 + 3·616·4096·11008
        //        = 41 339 060 224 + 3 108 503 552 + 83 324 043 264 = 127 771 607 040.
        let f616 = 4 * 616 * 4096u64.pow(2) + 2 * 616u64.pow(2) * 4096 + 3 * 616 * 4096 * 11008;
        assert_eq!(f616, 127_771_607_040);
        let widths = LayerWidths::mha(4096, 11008);
        assert_eq!(prefill_macs(&[616; 32], &widths), 32 * f616);
    }

    /// Grouped-query attention: k and v are charged at their own width. tiny-llava-shapes has
    /// d = 256, 8 query heads and 4 KV heads of 32 (q = 256, kv = 128), m = 704; at n = 10:
    /// projections 10·256·(512 + 256) = 1 966 080, attention 2·100·256 = 51 200,
    /// MLP 3·10·256·704 = 5 406 720, total 7 424 000 (the MHA formula would give 8 079 360).
    #[test]
    fn grouped_query_attention_counts_k_and_v_at_their_width() {
        let w = LayerWidths {
            hidden: 256,
            q: 256,
            kv: 128,
            mlp: 704,
        };
        assert_eq!(layer_macs(10, &w), 7_424_000);
        assert_eq!(layer_macs(10, &LayerWidths::mha(256, 704)), 8_079_360);
    }
}
