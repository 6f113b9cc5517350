//! The shape checks that need no device: `AttentionShape::validate` (with
//! `score_partials_len`), `Weight::rows_per_chunk` and the dispatch `grid`. Launchers that take
//! `Tensor`s need a GPU buffer and are left to the kernel tests.

use llava_wgpu::gpu::kernels::attention::{
    score_partials_len, AttentionShape, BLOCK_ROWS, LANES, MAX_HEAD_DIM,
};
use llava_wgpu::gpu::kernels::grid;
use llava_wgpu::gpu::Weight;
use proptest::prelude::*;

/// Sizes from tiny to absurd: most small, some near the u32 and usize edges.
fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 0usize..300,
        1 => 0usize..100_000,
        1 => prop::sample::select(vec![
            1 << 16, 1 << 31, (1 << 32) + 1, 1 << 48, 1 << 62, usize::MAX / 2, usize::MAX,
        ]),
        1 => any::<usize>(),
    ]
}

fn attention_shape() -> impl Strategy<Value = AttentionShape> {
    (size(), size(), size(), size(), size(), any::<bool>()).prop_map(
        |(q_rows, kv_rows, heads, kv_heads, head_dim, causal)| AttentionShape {
            q_rows,
            kv_rows,
            heads,
            kv_heads,
            head_dim,
            causal,
        },
    )
}

/// The largest element count the attention shader indexes, in exact (saturating) arithmetic.
fn largest_index(s: &AttentionShape) -> u128 {
    let [q, kv, h, hkv, d] =
        [s.q_rows, s.kv_rows, s.heads, s.kv_heads, s.head_dim].map(|x| x as u128);
    let q_len = q.saturating_mul(h).saturating_mul(d);
    let kv_len = kv.saturating_mul(hkv).saturating_mul(d);
    q_len.max(kv_len).max(partials(s))
}

/// `score_partials_len` in exact (saturating) arithmetic: per kv head, per block (of the smaller
/// of the two layouts' blocks, which has the most), per key.
fn partials(s: &AttentionShape) -> u128 {
    let [q, kv, h, hkv] = [s.q_rows, s.kv_rows, s.heads, s.kv_heads].map(|x| x as u128);
    let blocks = q
        .saturating_mul(h / hkv.max(1))
        .div_ceil(BLOCK_ROWS.min(LANES.rows as usize) as u128);
    hkv.saturating_mul(blocks).saturating_mul(kv)
}

proptest! {
    #![proptest_config(crate::support::cases(20000))]

    #[test]
    fn accepted_attention_shapes_fit_32_bit_indexing(shape in attention_shape()) {
        let Ok(()) = shape.validate() else {
            let e = shape.validate().unwrap_err().to_string();
            prop_assert!(e.starts_with("shape mismatch in attention"), "{e}");
            return Ok(());
        };
        prop_assert!((1..=MAX_HEAD_DIM).contains(&shape.head_dim));
        prop_assert!(shape.kv_heads > 0 && shape.heads % shape.kv_heads == 0);
        prop_assert!(shape.q_rows > 0 && shape.kv_rows > 0);
        prop_assert!(!shape.causal || shape.q_rows <= shape.kv_rows);
        let largest = largest_index(&shape);
        prop_assert!(largest <= u32::MAX as u128 / 2, "{shape:?} indexes up to {largest}");
        prop_assert_eq!(score_partials_len(&shape) as u128, partials(&shape));
    }

    #[test]
    fn weight_chunks_fit_the_binding(
        max_binding in prop_oneof![0u64..10_000, any::<u64>()],
        row_bytes in prop_oneof![1usize..10_000, 1..=usize::MAX],
        n in size(),
    ) {
        match Weight::rows_per_chunk(max_binding, row_bytes, n) {
            Ok(rows) => {
                prop_assert!(rows >= 1 && rows <= n.max(1));
                prop_assert!(rows as u128 * row_bytes as u128 <= max_binding as u128);
            }
            Err(e) => {
                prop_assert!((row_bytes as u64) > max_binding);
                prop_assert!(e.to_string().contains("storage-binding limit"));
            }
        }
    }

    /// `max_per_dim` is a device limit (at least 65535 on every adapter, never 0).
    #[test]
    fn dispatch_grids_cover_the_count(count in any::<u32>(), max_per_dim in 1u32..=u32::MAX) {
        let [x, y, z] = grid(count, max_per_dim);
        prop_assert_eq!(z, 1);
        prop_assert!(x >= 1 && x <= max_per_dim.max(1));
        prop_assert!(x as u64 * y as u64 >= count as u64);
        if (count as u64) <= max_per_dim as u64 * max_per_dim as u64 {
            prop_assert!(y <= max_per_dim);
        }
    }
}
