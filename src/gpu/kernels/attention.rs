//! Fused attention `O = softmax(Q·Kᵀ·scale + mask)·V` with grouped-query heads, a KV cache,
//! causal or bidirectional masking and optional per-key score accumulation: the launcher for
//! shaders/attention.wgsl and its CPU reference.
//!
//! Layouts (row-major f32): Q and O `[Tq, H·D]`, K and V `[C, Hkv·D]` where only the first
//! `Tk ≤ C` cache rows are valid (rows past them are never read). Query head `h` uses kv head
//! `h / (H / Hkv)`. Causal query row `i` sits at cache position `Tk − Tq + i` and sees keys
//! `j ≤ Tk − Tq + i`, which covers prefill, chunked prefill and decode.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::device::Gpu;
use crate::gpu::kernels::{check_lanes, grid, Constants, Dispatch, KernelCall, Shader, LANE_WIDTH};
use crate::gpu::tensor::{DType, Tensor};

/// How attention.wgsl splits the work (its BM, BN, THREADS, STRIDE and REDUCE_THREADS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionTiling {
    /// Virtual rows (query row × query head of one kv-head group) per workgroup (BM).
    pub block_rows: u32,
    /// Keys per staged K/V tile (BN).
    pub key_tile: u32,
    /// Threads per attention workgroup.
    pub threads: u32,
    /// Largest head dimension the Q and K/V tiles hold.
    pub max_head_dim: u32,
    /// Threads per workgroup of the score reduction.
    pub reduce_threads: u32,
}

/// The tiling every attention call uses. The shader's thread layout is written for it: 4 row
/// quads × 16 columns, two keys (c, c + 16) per thread (see `shader_structure_matches_the_tiling`).
pub const TILING: AttentionTiling = AttentionTiling {
    block_rows: 16,
    key_tile: 32,
    threads: 64,
    max_head_dim: 128,
    reduce_threads: 64,
};

impl AttentionTiling {
    /// Row stride of the Q and K/V tiles in vec4: one more than a row needs, so threads reading
    /// different rows at one column hit different banks.
    pub const fn stride(&self) -> u32 {
        self.max_head_dim / 4 + 1
    }

    /// Workgroup memory the attention entry points declare: the Q tile [BM][STRIDE] and the K/V
    /// tile [BN][STRIDE] in vec4, and logits and probabilities [BN][BM/4] vec4 each.
    pub const fn workgroup_bytes(&self) -> u32 {
        let vec4s = (self.block_rows + self.key_tile) * self.stride()
            + 2 * self.key_tile * (self.block_rows / 4);
        vec4s * 16
    }

    /// The constants for an f32 K/V (see [`AttentionTiling::constants_for`]).
    pub fn constants(&self) -> Constants {
        self.constants_for(DType::F32)
    }

    /// The constants for K/V of element type `kv` (f32, or f16 packed two per word).
    pub fn constants_for(&self, kv: DType) -> Constants {
        Constants::new(&[
            ("BM", self.block_rows),
            ("BN", self.key_tile),
            ("THREADS", self.threads),
            ("STRIDE", self.stride()),
            ("REDUCE_THREADS", self.reduce_threads),
            ("KV_F16", u32::from(kv == DType::F16)),
        ])
    }
}

/// Virtual rows per workgroup.
pub const BLOCK_ROWS: usize = TILING.block_rows as usize;
/// Keys per staged K/V tile.
pub const KEY_TILE: usize = TILING.key_tile as usize;
/// Largest supported head dimension (the shader's tiles are sized for it).
pub const MAX_HEAD_DIM: usize = TILING.max_head_dim as usize;
/// Workgroup memory the attention entry points declare (29 440 bytes).
pub const WORKGROUP_BYTES: u32 = TILING.workgroup_bytes();

/// How attention_lanes.wgsl splits the work: one 8-lane subgroup per workgroup, one virtual row
/// per lane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LanesTiling {
    /// Virtual rows per workgroup (the shader's ROWS and workgroup size).
    pub rows: u32,
}

/// The lanes layout's tiling.
pub const LANES: LanesTiling = LanesTiling { rows: LANE_WIDTH };

impl LanesTiling {
    /// The constants for head dimension `head_dim` (compiled in: one pipeline per model's head
    /// size) and K/V of element type `kv`.
    pub fn constants_for(&self, head_dim: usize, kv: DType) -> Constants {
        Constants::new(&[
            ("HEAD_DIM", head_dim as u32),
            ("KV_F16", u32::from(kv == DType::F16)),
        ])
    }
}

/// Which of the two attention shaders runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionLayout {
    /// attention.wgsl: 16-row blocks, K/V tiles staged through workgroup memory. For GPUs.
    Tiled,
    /// attention_lanes.wgsl: 8-row blocks, the rows' Q values and probabilities shared by
    /// subgroup broadcasts, 2 keys and 2 output dimensions per thread. For drivers that run a
    /// workgroup on CPU SIMD lanes (see the shader's header).
    Lanes,
}

impl AttentionLayout {
    /// `Lanes` on a CPU adapter (`Capabilities::cpu`) whose subgroups hold a block's 8 rows,
    /// `Tiled` anywhere else: the same rule as `MatmulLayout::for_device`, for the same reason.
    pub fn for_device(gpu: &Gpu) -> Self {
        if gpu.caps.prefers_lanes(LANES.rows) {
            AttentionLayout::Lanes
        } else {
            AttentionLayout::Tiled
        }
    }

    /// Virtual rows per workgroup.
    pub fn block_rows(self) -> usize {
        match self {
            AttentionLayout::Tiled => BLOCK_ROWS,
            AttentionLayout::Lanes => LANES.rows as usize,
        }
    }

    /// The shader, the entry point (plain or scored) and the constants for a call.
    fn kernel(
        self,
        shape: &AttentionShape,
        kv: DType,
        scored: bool,
    ) -> (Shader, &'static str, Constants) {
        match (self, scored) {
            (AttentionLayout::Tiled, false) => {
                (Shader::Attention, "attention", TILING.constants_for(kv))
            }
            (AttentionLayout::Tiled, true) => (
                Shader::Attention,
                "attention_scored",
                TILING.constants_for(kv),
            ),
            (AttentionLayout::Lanes, false) => (
                Shader::AttentionLanes,
                "attention_lanes",
                LANES.constants_for(shape.head_dim, kv),
            ),
            (AttentionLayout::Lanes, true) => (
                Shader::AttentionLanes,
                "attention_lanes_scored",
                LANES.constants_for(shape.head_dim, kv),
            ),
        }
    }
}

/// The problem one attention call solves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Tq: query rows in this call.
    pub q_rows: usize,
    /// Tk: valid rows of the K/V cache (≤ its capacity).
    pub kv_rows: usize,
    /// H: query heads.
    pub heads: usize,
    /// Hkv: key/value heads (H % Hkv == 0).
    pub kv_heads: usize,
    /// D: dimension of every head, at most [`MAX_HEAD_DIM`].
    pub head_dim: usize,
    pub causal: bool,
}

impl AttentionShape {
    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads.max(1)
    }

    /// Workgroups per kv head with `rows` virtual rows per block.
    fn blocks(&self, rows: usize) -> usize {
        (self.q_rows * self.group()).div_ceil(rows)
    }

    /// Keys query row `i` sees: `[0, visible_keys(i))`.
    pub fn visible_keys(&self, i: usize) -> usize {
        if self.causal {
            self.kv_rows - self.q_rows + i + 1
        } else {
            self.kv_rows
        }
    }

    /// Σ over query rows in `[start, end)` of the keys each sees.
    fn visible_pairs(&self, start: usize, end: usize) -> u64 {
        (start..end).map(|i| self.visible_keys(i) as u64).sum()
    }

    fn describe(&self) -> String {
        format!(
            "Tq={} Tk={} H={} Hkv={} D={} {}",
            self.q_rows,
            self.kv_rows,
            self.heads,
            self.kv_heads,
            self.head_dim,
            if self.causal {
                "causal"
            } else {
                "bidirectional"
            }
        )
    }

    /// Check the shape on its own (tensors are checked by [`attention`]).
    pub fn validate(&self) -> Result<()> {
        let fail = |reason: String| Err(Error::shape("attention", format!("{reason} ({self:?})")));
        if self.head_dim == 0 || self.head_dim > MAX_HEAD_DIM {
            return fail(format!(
                "head_dim {} is not in 1..={MAX_HEAD_DIM}",
                self.head_dim
            ));
        }
        if self.heads == 0 || self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return fail(format!(
                "{} query heads cannot be grouped over {} kv heads",
                self.heads, self.kv_heads
            ));
        }
        if self.q_rows == 0 || self.kv_rows == 0 {
            return fail("no query rows or no keys".into());
        }
        if self.causal && self.q_rows > self.kv_rows {
            return fail(format!(
                "causal attention with {} query rows needs at least as many keys, got {}",
                self.q_rows, self.kv_rows
            ));
        }
        // Every index the shader computes must fit a u32. Saturating products: a wrapped one
        // could look small and pass.
        let q_len = self.q_rows.saturating_mul(self.heads);
        let kv_len = self.kv_rows.saturating_mul(self.kv_heads);
        let largest = (q_len.saturating_mul(self.head_dim))
            .max(kv_len.saturating_mul(self.head_dim))
            .max(score_partials_len(self));
        if largest > u32::MAX as usize / 2 {
            return fail("too large for 32-bit indexing".into());
        }
        Ok(())
    }
}

/// Optional score accumulation: `scores[j] = Σ_{i ∈ [q_start, q_end)} Σ_h P_h[i, j]` for every
/// key `j < Tk` (a sum over rows and all query heads; the caller divides for a mean).
pub struct ScoreOutput<'a> {
    pub q_start: usize,
    pub q_end: usize,
    /// Scratch of at least [`score_partials_len`] f32 elements.
    pub partials: &'a Tensor,
    /// At least Tk f32 elements; the first Tk are written.
    pub scores: &'a Tensor,
}

/// Elements the `partials` scratch of a [`ScoreOutput`] needs for this shape (enough for any
/// query range, in either layout: one row per block of the smaller blocks).
pub fn score_partials_len(shape: &AttentionShape) -> usize {
    if shape.heads == 0 || shape.kv_heads == 0 {
        return 0;
    }
    // Saturates (rather than wraps) for shapes too large to index, which `validate` refuses.
    let blocks = shape
        .q_rows
        .saturating_mul(shape.group())
        .div_ceil(BLOCK_ROWS.min(LANES.rows as usize));
    shape
        .kv_heads
        .saturating_mul(blocks)
        .saturating_mul(shape.kv_rows)
}

/// The conventional softmax scale, `1 / sqrt(head_dim)`.
pub fn default_scale(head_dim: usize) -> f32 {
    1.0 / (head_dim as f32).sqrt()
}

/// Allocate the `(partials, scores)` pair a [`ScoreOutput`] needs for this shape.
pub fn score_buffers(gpu: &Gpu, shape: &AttentionShape) -> Result<(Tensor, Tensor)> {
    shape.validate()?;
    let partials = Tensor::empty(
        gpu,
        &[score_partials_len(shape)],
        DType::F32,
        "attention.partials",
    )?;
    let scores = Tensor::empty(gpu, &[shape.kv_rows], DType::F32, "attention.scores")?;
    Ok((partials, scores))
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    q_rows: u32,
    kv_rows: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    group: u32,
    vrows: u32,
    blocks: u32,
    num_groups: u32,
    causal: u32,
    scale_log2: f32,
    q_start: u32,
    q_end: u32,
    first_block: u32,
    range_blocks: u32,
    partial_rows: u32,
}

fn check_tensors(
    shape: &AttentionShape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
) -> Result<()> {
    let d = shape.head_dim;
    let fail = |name: &str, t: &Tensor, want: String| {
        Err(Error::shape(
            "attention",
            format!(
                "{name} has shape {:?} ({:?}), expected {want} for {}",
                t.shape,
                t.dtype,
                shape.describe()
            ),
        ))
    };
    for (name, t) in [("Q", q), ("O", out)] {
        if t.dtype != DType::F32 || t.rows_cols() != (shape.q_rows, shape.heads * d) {
            return fail(
                name,
                t,
                format!("f32 [{}, {}]", shape.q_rows, shape.heads * d),
            );
        }
    }
    for (name, t) in [("K", k), ("V", v)] {
        let (rows, cols) = t.rows_cols();
        let dtype_ok = t.dtype == DType::F32 || (t.dtype == DType::F16 && cols % 2 == 0);
        if !dtype_ok || t.dtype != k.dtype || cols != shape.kv_heads * d || rows < shape.kv_rows {
            return fail(
                name,
                t,
                format!(
                    "f32 or f16 (both alike, even width) [C ≥ {}, {}]",
                    shape.kv_rows,
                    shape.kv_heads * d
                ),
            );
        }
    }
    Ok(())
}

/// Check everything [`attention`] is given before anything is recorded.
fn check_call(
    gpu: &Gpu,
    layout: AttentionLayout,
    shape: &AttentionShape,
    scale: f32,
    [q, k, v, out]: [&Tensor; 4],
) -> Result<()> {
    shape.validate()?;
    check_tensors(shape, q, k, v, out)?;
    if !scale.is_finite() {
        return Err(Error::argument(
            "attention scale",
            format!("{scale} is not finite"),
        ));
    }
    if layout == AttentionLayout::Lanes {
        check_lanes(gpu, "attention")?;
    }
    let available = gpu.limits.max_compute_workgroup_storage_size;
    if layout == AttentionLayout::Tiled && available < WORKGROUP_BYTES {
        return Err(Error::shape(
            "attention",
            format!(
                "needs {WORKGROUP_BYTES} bytes of workgroup memory, the device offers {available}"
            ),
        ));
    }
    Ok(())
}

/// The score range and scratch buffers must fit the shape.
fn check_scores(shape: &AttentionShape, so: &ScoreOutput) -> Result<()> {
    if so.q_start >= so.q_end || so.q_end > shape.q_rows {
        return Err(Error::shape(
            "attention scores",
            format!(
                "query range {}..{} is empty or outside 0..{}",
                so.q_start, so.q_end, shape.q_rows
            ),
        ));
    }
    let need = score_partials_len(shape);
    for (name, t, want) in [
        ("partials", so.partials, need),
        ("scores", so.scores, shape.kv_rows),
    ] {
        if t.dtype != DType::F32 || t.numel() < want {
            return Err(Error::shape(
                "attention scores",
                format!(
                    "{name} has shape {:?} ({:?}), needs at least {want} f32 elements",
                    t.shape, t.dtype
                ),
            ));
        }
    }
    Ok(())
}

/// The uniform block for a call without score accumulation.
fn plain_params(layout: AttentionLayout, shape: &AttentionShape, scale: f32) -> Params {
    let group = shape.group();
    let blocks = shape.blocks(layout.block_rows());
    Params {
        q_rows: shape.q_rows as u32,
        kv_rows: shape.kv_rows as u32,
        heads: shape.heads as u32,
        kv_heads: shape.kv_heads as u32,
        head_dim: shape.head_dim as u32,
        group: group as u32,
        vrows: (shape.q_rows * group) as u32,
        blocks: blocks as u32,
        num_groups: (shape.kv_heads * blocks) as u32,
        causal: shape.causal as u32,
        scale_log2: scale * std::f32::consts::LOG2_E,
        q_start: 0,
        q_end: 0,
        first_block: 0,
        range_blocks: 0,
        partial_rows: 0,
    }
}

/// Analytic cost of the main pass: (flops, bytes). The bytes are the compulsory traffic, as the
/// matmul counts it: Q read and O written once, and the K and V rows the last query row sees
/// read once (`kv_bytes` per element); a block's rereads of K/V hit the cache and are not
/// counted, so the roofline places attention by its real arithmetic intensity.
fn main_pass_cost(shape: &AttentionShape, kv_bytes: u64) -> (u64, u64) {
    let (d, heads) = (shape.head_dim as u64, shape.heads as u64);
    let kv = 2 * shape.kv_rows as u64 * shape.kv_heads as u64 * d * kv_bytes;
    let qo_bytes = 2 * shape.q_rows as u64 * heads * d * 4;
    let flops = 4 * d * heads * shape.visible_pairs(0, shape.q_rows);
    (flops, qo_bytes + kv)
}

/// The attention workgroup grid: one workgroup per (kv head, block of virtual rows).
fn attention_grid(gpu: &Gpu, layout: AttentionLayout, shape: &AttentionShape) -> [u32; 3] {
    let num_groups = shape.kv_heads * shape.blocks(layout.block_rows());
    grid(
        num_groups as u32,
        gpu.limits.max_compute_workgroups_per_dimension,
    )
}

/// Record the attention for `shape` in the layout this device runs best
/// ([`AttentionLayout::for_device`]): one dispatch, or two with score accumulation (the
/// attention with its second scoring pass, then the reduction of the partial sums).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    gpu: &Gpu,
    shape: &AttentionShape,
    scale: f32,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    scores: Option<ScoreOutput>,
) -> Result<Vec<Dispatch>> {
    let layout = AttentionLayout::for_device(gpu);
    attention_in(gpu, layout, shape, scale, [q, k, v, out], scores)
}

/// [`attention`] in the layout the caller chooses (tests and `bench kernels` run both).
pub fn attention_in(
    gpu: &Gpu,
    layout: AttentionLayout,
    shape: &AttentionShape,
    scale: f32,
    [q, k, v, out]: [&Tensor; 4],
    scores: Option<ScoreOutput>,
) -> Result<Vec<Dispatch>> {
    check_call(gpu, layout, shape, scale, [q, k, v, out])?;
    let Some(so) = scores else {
        let (flops, bytes) = main_pass_cost(shape, k.dtype.bytes() as u64);
        let (shader, entry, constants) = layout.kernel(shape, k.dtype, false);
        let dispatch = KernelCall::new(gpu, shader, entry)
            .constants(constants)
            .params(&plain_params(layout, shape, scale))
            .read(&q.buffer)
            .read(&k.buffer)
            .read(&v.buffer)
            .read_write(&out.buffer)
            .build(
                entry,
                shape.describe(),
                attention_grid(gpu, layout, shape),
                flops,
                bytes,
            )?;
        return Ok(vec![dispatch]);
    };
    check_scores(shape, &so)?;
    attention_with_scores(gpu, layout, shape, scale, [q, k, v, out], so)
}

/// The scored attention and the reduction of its partial sums (checked by the caller).
fn attention_with_scores(
    gpu: &Gpu,
    layout: AttentionLayout,
    shape: &AttentionShape,
    scale: f32,
    [q, k, v, out]: [&Tensor; 4],
    so: ScoreOutput,
) -> Result<Vec<Dispatch>> {
    let (group, rows) = (shape.group(), layout.block_rows());
    let first_block = so.q_start * group / rows;
    let end_block = (so.q_end * group).div_ceil(rows);
    let range_blocks = end_block - first_block;
    let partial_rows = shape.kv_heads * range_blocks;
    let params = Params {
        q_start: so.q_start as u32,
        q_end: so.q_end as u32,
        first_block: first_block as u32,
        range_blocks: range_blocks as u32,
        partial_rows: partial_rows as u32,
        ..plain_params(layout, shape, scale)
    };

    // The scoring pass recomputes Q·Kᵀ for the rows in range (counted at 2·D per visible key)
    // and writes the partial sums.
    let (d, kv_rows) = (shape.head_dim as u64, shape.kv_rows);
    let (flops, bytes) = main_pass_cost(shape, k.dtype.bytes() as u64);
    let score_flops = 2 * d * shape.heads as u64 * shape.visible_pairs(so.q_start, so.q_end);
    let partial_bytes = (partial_rows * kv_rows * 4) as u64;
    let (shader, entry, constants) = layout.kernel(shape, k.dtype, true);
    let mut call = KernelCall::new(gpu, shader, entry)
        .constants(constants)
        .params(&params)
        .read(&q.buffer)
        .read(&k.buffer)
        .read(&v.buffer)
        .read_write(&out.buffer)
        .read_write(&so.partials.buffer);
    if layout == AttentionLayout::Tiled {
        // attention.wgsl's module declares `scores` at binding 6 for both entry points.
        call = call.read_write(&so.scores.buffer);
    }
    let scored = call.build(
        entry,
        format!("{} scores q={}..{}", shape.describe(), so.q_start, so.q_end),
        attention_grid(gpu, layout, shape),
        flops + score_flops,
        bytes + partial_bytes,
    )?;
    Ok(vec![
        scored,
        reduce_scores(gpu, &params, [q, k, v, out], &so)?,
    ])
}

/// attention.wgsl's `attention_scores_reduce`: the partial rows summed per key, in row order.
fn reduce_scores(
    gpu: &Gpu,
    params: &Params,
    [q, k, v, out]: [&Tensor; 4],
    so: &ScoreOutput,
) -> Result<Dispatch> {
    let (rows, kv_rows) = (params.partial_rows as usize, params.kv_rows as usize);
    let reduce_groups = kv_rows.div_ceil(TILING.reduce_threads as usize) as u32;
    KernelCall::new(gpu, Shader::Attention, "attention_scores_reduce")
        .constants(TILING.constants_for(k.dtype))
        .params(params)
        .read(&q.buffer)
        .read(&k.buffer)
        .read(&v.buffer)
        .read_write(&out.buffer)
        .read_write(&so.partials.buffer)
        .read_write(&so.scores.buffer)
        .build(
            "attention_scores_reduce",
            format!("rows={rows} Tk={kv_rows}"),
            grid(
                reduce_groups,
                gpu.limits.max_compute_workgroups_per_dimension,
            ),
            (rows * kv_rows) as u64,
            ((rows * kv_rows + kv_rows) * 4) as u64,
        )
}

/// CPU reference in f64. `k` and `v` hold at least Tk rows of `Hkv·D` (only the first Tk are
/// read). Returns the output `[Tq, H·D]` and, when `score_range` is given, the per-key sums
/// `[Tk]` of the probabilities over that query range and all heads (empty otherwise).
pub fn reference(
    shape: &AttentionShape,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    score_range: Option<(usize, usize)>,
) -> (Vec<f64>, Vec<f64>) {
    let AttentionShape {
        q_rows,
        kv_rows,
        heads,
        kv_heads,
        head_dim: d,
        ..
    } = *shape;
    let group = shape.group();
    let mut out = vec![0f64; q_rows * heads * d];
    let mut scores = vec![0f64; if score_range.is_some() { kv_rows } else { 0 }];
    let mut probs = vec![0f64; kv_rows];
    for i in 0..q_rows {
        let visible = shape.visible_keys(i);
        for h in 0..heads {
            let kh = h / group;
            let qrow = &q[i * heads * d + h * d..][..d];
            let mut max = f64::NEG_INFINITY;
            for (j, pj) in probs.iter_mut().enumerate().take(visible) {
                let krow = &k[j * kv_heads * d + kh * d..][..d];
                let dot: f64 = qrow
                    .iter()
                    .zip(krow)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                *pj = dot * scale as f64;
                max = max.max(*pj);
            }
            let mut sum = 0f64;
            for pj in probs.iter_mut().take(visible) {
                *pj = (*pj - max).exp();
                sum += *pj;
            }
            let orow = &mut out[i * heads * d + h * d..][..d];
            for (j, pj) in probs.iter_mut().enumerate().take(visible) {
                *pj /= sum;
                let vrow = &v[j * kv_heads * d + kh * d..][..d];
                for (o, x) in orow.iter_mut().zip(vrow) {
                    *o += *pj * *x as f64;
                }
            }
            if let Some((start, end)) = score_range {
                if (start..end).contains(&i) {
                    for (s, pj) in scores.iter_mut().zip(&probs).take(visible) {
                        *s += pj;
                    }
                }
            }
        }
    }
    (out, scores)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// attention.wgsl hard-codes how the tiles split over threads; these are its assumptions.
    #[test]
    fn shader_structure_matches_the_tiling() {
        let t = TILING;
        // 4 row quads × 16 columns; each column thread computes keys c and c + 16.
        assert_eq!(t.block_rows / 4 * 16, t.threads);
        assert_eq!(t.key_tile, 2 * 16);
        // P·V reads up to 32 vec4 columns (c and c + 16 for c < 16): D ≤ 128.
        assert_eq!(t.max_head_dim, 4 * 32);
        // The score pass writes one key per thread of the first BN.
        assert!(t.key_tile <= t.threads);
        assert_eq!(WORKGROUP_BYTES, 29_440);
    }

    #[test]
    fn shapes_whose_sizes_overflow_are_refused() {
        // 2^62 keys × 20 heads wrapped to 2^63 × 10 = 0 in release builds and passed (found by
        // tests/fuzz); so did a query count whose partials product wrapped.
        let huge = AttentionShape {
            q_rows: 1,
            kv_rows: 1 << 62,
            heads: 20,
            kv_heads: 20,
            head_dim: 1,
            causal: false,
        };
        assert!(huge.validate().is_err());
        let wrapped_partials = AttentionShape {
            q_rows: 1 << 60,
            kv_rows: 1 << 60,
            heads: 1,
            kv_heads: 1,
            head_dim: 0,
            causal: false,
        };
        assert_eq!(score_partials_len(&wrapped_partials), usize::MAX);
        let fine = AttentionShape {
            kv_rows: 577,
            ..huge
        };
        assert!(fine.validate().is_ok());
    }
}
