//! `Y = X·Wᵀ (+ bias) (+ Y)`: the launcher for shaders/matmul.wgsl (tiled, for GPUs) and
//! shaders/matmul_lanes.wgsl (columns per thread, X rows shared by subgroup broadcasts, for
//! drivers that run shaders on a CPU). The CPU reference is `linear::reference`.

use bytemuck::{Pod, Zeroable};

use super::{
    check_linear, chunk_layout, flag_constants, flags_for, format_constant, kernel_name,
    LinearInput,
};
use crate::error::{Error, Result};
use crate::gpu::device::Gpu;
use crate::gpu::kernels::{check_lanes, Constants, Dispatch, KernelCall, Shader};
use crate::gpu::tensor::{Tensor, Weight, WeightFormat};

/// How matmul.wgsl tiles the output (its TILE_M, TILE_N, TILE_K and THREADS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulTiling {
    /// Output rows per workgroup.
    pub tile_m: u32,
    /// Output columns per workgroup.
    pub tile_n: u32,
    /// Reduction steps staged through workgroup memory at a time.
    pub tile_k: u32,
    /// Threads per workgroup.
    pub threads: u32,
}

/// The tiling every tiled matmul uses. The shader's per-thread work is unrolled for it: an 8×8
/// grid of threads, each owning 8×8 outputs, and tile loads sized for 64 threads (see
/// `shader_structure_matches_the_tiling`).
pub const TILING: MatmulTiling = MatmulTiling {
    tile_m: 64,
    tile_n: 64,
    tile_k: 32,
    threads: 64,
};

impl MatmulTiling {
    /// The constants of matmul.wgsl but the weight's `FORMAT` (see `MatmulLayout::shader`),
    /// reading X as stored.
    pub fn constants(&self) -> Constants {
        self.constants_for(LinearInput::Plain.mode())
    }

    /// The constants of matmul.wgsl but `FORMAT`, reading X in `x_mode` ([`LinearInput::mode`]).
    pub fn constants_for(&self, x_mode: u32) -> Constants {
        Constants::new(&[
            ("TILE_M", self.tile_m),
            ("TILE_N", self.tile_n),
            ("TILE_K", self.tile_k),
            ("THREADS", self.threads),
        ])
        .with(flag_constants())
        .with(Constants::new(&[("X_MODE", x_mode)]))
    }
}

/// How matmul_lanes.wgsl splits the output: each workgroup multiplies `rows` rows of X by
/// `columns · threads` rows of W, `columns` per thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LanesShape {
    /// Rows of X a workgroup shares (a thread holds them as two vec4 per column).
    pub rows: u32,
    /// Output columns per thread.
    pub columns: u32,
    /// Threads per workgroup.
    pub threads: u32,
}

/// The shape matmul_lanes.wgsl is written for: columns `a` and `b`, each with two vec4
/// accumulators of four rows (see `lanes_shape_matches_the_shader`).
pub const LANES: LanesShape = LanesShape {
    rows: 8,
    columns: 2,
    threads: 64,
};

impl LanesShape {
    /// The constants of matmul_lanes.wgsl but the weight's `FORMAT`.
    pub fn constants(&self) -> Constants {
        Constants::new(&[
            ("ROWS", self.rows),
            ("COLUMNS", self.columns),
            ("THREADS", self.threads),
        ])
        .with(flag_constants())
    }
}

/// Which of the two matmul shaders runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulLayout {
    /// matmul.wgsl: 64×64 output tiles staged through workgroup memory. For GPUs.
    Tiled,
    /// matmul_lanes.wgsl: two columns per thread, the workgroup's rows of X shared by subgroup
    /// broadcasts, no workgroup memory. For drivers that run a workgroup on CPU SIMD lanes,
    /// where the tiled kernel's register blocking spills and every value a lane loads costs.
    Lanes,
}

impl MatmulLayout {
    /// The layout for `gpu`: `Lanes` on a CPU adapter (`Capabilities::cpu`) whose subgroups hold
    /// a block's rows, `Tiled` on anything else. Without subgroups every lane of the lanes
    /// layout loads all 8 rows of X itself, which measured 3× slower than the tiled kernel on
    /// lavapipe.
    pub fn for_device(gpu: &Gpu) -> Self {
        if gpu.caps.prefers_lanes(LANES.rows) {
            MatmulLayout::Lanes
        } else {
            MatmulLayout::Tiled
        }
    }

    /// Whether this layout computes fused inputs ([`LinearInput`] other than `Plain`) as it
    /// loads X: the tiled kernel does. The lanes kernel does not: every workgroup along N loads
    /// all of X, once per thread, so a fused norm or activation would be computed N/2 times per
    /// value instead of once (docs/benchmarks.md, "What was fused").
    pub fn fuses_inputs(self) -> bool {
        self == MatmulLayout::Tiled
    }

    /// The shader, its entry point, and its constants for a weight chunk in `format` with X
    /// read in `x_mode`.
    fn shader(self, format: WeightFormat, x_mode: u32) -> (Shader, &'static str, Constants) {
        let (shader, entry, constants) = match self {
            MatmulLayout::Tiled => (Shader::Matmul, "matmul", TILING.constants_for(x_mode)),
            MatmulLayout::Lanes => (Shader::MatmulLanes, "matmul_lanes", LANES.constants()),
        };
        (shader, entry, constants.with(format_constant(format)))
    }

    /// Workgroups for an `m`-row product with a `cols`-row chunk of W. The tiled grid is
    /// (column tiles, row tiles); the lanes grid is (row blocks, column blocks), so consecutive
    /// workgroups share columns of W (see matmul_lanes.wgsl).
    fn grid(self, m: usize, cols: usize) -> [u32; 3] {
        match self {
            MatmulLayout::Tiled => [
                cols.div_ceil(TILING.tile_n as usize) as u32,
                m.div_ceil(TILING.tile_m as usize) as u32,
                1,
            ],
            MatmulLayout::Lanes => [
                m.div_ceil(LANES.rows as usize) as u32,
                cols.div_ceil((LANES.columns * LANES.threads) as usize) as u32,
                1,
            ],
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    w_stride: u32,
    x_stride: u32,
    y_stride: u32,
    col_offset: u32,
    flags: u32,
    scales: u32,
    eps: f32,
    _pad: [u32; 2],
}

/// One dispatch per row-chunk of `w`, in the layout this device runs best
/// ([`MatmulLayout::for_device`]). `accumulate` adds the product to what `y` holds (a fused
/// residual connection).
pub fn matmul(
    gpu: &Gpu,
    x: &Tensor,
    w: &Weight,
    y: &Tensor,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    matmul_in(gpu, MatmulLayout::for_device(gpu), x, w, y, accumulate)
}

/// [`matmul`] with the layout chosen by the caller (tests and `bench kernels` run both).
pub fn matmul_in(
    gpu: &Gpu,
    layout: MatmulLayout,
    x: &Tensor,
    w: &Weight,
    y: &Tensor,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    matmul_with(gpu, layout, x, LinearInput::Plain, w, y, accumulate)
}

/// [`matmul_in`] of the rows `input` computes from the rows of `x` (`x [M, 2K]` for
/// [`LinearInput::SiluGate`]). A fused input needs a layout that [fuses
/// inputs](MatmulLayout::fuses_inputs).
pub fn matmul_with(
    gpu: &Gpu,
    layout: MatmulLayout,
    x: &Tensor,
    input: LinearInput,
    w: &Weight,
    y: &Tensor,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    let (m, n_total, k) = check_fused(x, &input, w, y)?;
    if layout == MatmulLayout::Lanes {
        check_lanes(gpu, "matmul")?;
    }
    if input.mode() != LinearInput::Plain.mode() && !layout.fuses_inputs() {
        return Err(Error::argument(
            "layout",
            format!("the {layout:?} matmul reads X as stored; {input:?} needs the tiled layout"),
        ));
    }
    let flags = flags_for(w, accumulate);
    // Without a bias or a γ their slots are bound to X (read-only twice is allowed), never read.
    let bias = w.bias.as_ref().map_or(&x.buffer, |b| &b.buffer);
    let (gamma, eps) = input.gamma_binding(&x.buffer);
    let x_stride = input.row_len(k);
    w.chunks
        .iter()
        .map(|chunk| {
            let (shader, entry, constants) = layout.shader(chunk.format, input.mode());
            let (w_stride, scales) = chunk_layout(chunk, k);
            let params = Params {
                m: m as u32,
                n: chunk.rows as u32,
                k: k as u32,
                w_stride,
                x_stride: x_stride as u32,
                y_stride: n_total as u32,
                col_offset: chunk.first_row as u32,
                flags,
                scales,
                eps,
                _pad: [0; 2],
            };
            let flops = 2 * (m * chunk.rows * k) as u64;
            let bytes = (m * x_stride * 4 + chunk.rows * chunk.format.row_bytes(k)) as u64
                + (m * chunk.rows * 4) as u64 * if accumulate { 2 } else { 1 };
            let call = KernelCall::new(gpu, shader, entry)
                .constants(constants)
                .params(&params)
                .read(&x.buffer)
                .read(&chunk.buffer)
                .read(bias)
                .read_write(&y.buffer);
            let call = match layout {
                MatmulLayout::Tiled => call.read(gamma),
                MatmulLayout::Lanes => call,
            };
            call.build(
                kernel_name(entry, chunk.format, fused_suffix(&input)),
                format!("M={m} N={} K={k}", chunk.rows),
                layout.grid(m, chunk.rows),
                flops,
                bytes,
            )
        })
        .collect()
}

/// The profiler's name suffix of a fused matmul: `_rms`, `_silu`, or none.
fn fused_suffix(input: &LinearInput) -> &'static str {
    match input {
        LinearInput::Plain => "",
        LinearInput::RmsNorm { .. } => "_rms",
        LinearInput::SiluGate => "_silu",
    }
}

/// (M, N, K) once `x [M, K]` (`[M, 2K]` for silu·up), `w [N, K]` and `y [M, N]` fit together
/// and a norm's γ has K values.
fn check_fused(
    x: &Tensor,
    input: &LinearInput,
    w: &Weight,
    y: &Tensor,
) -> Result<(usize, usize, usize)> {
    if let LinearInput::Plain = input {
        return check_linear("matmul", x, w, y);
    }
    let (m, x_cols) = x.rows_cols();
    let (y_rows, y_cols) = y.rows_cols();
    if x_cols != input.row_len(w.k) || y_rows != m || y_cols != w.n || !input.gamma_fits(w.k) {
        return Err(Error::shape(
            "matmul",
            format!(
                "X {:?} as {input:?} · {}ᵀ [{}, {}] does not give Y {:?}",
                x.shape, w.name, w.n, w.k, y.shape
            ),
        ));
    }
    Ok((m, w.n, w.k))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// matmul.wgsl hard-codes how the tiling splits over threads; these are its assumptions.
    #[test]
    fn shader_structure_matches_the_tiling() {
        let MatmulTiling {
            tile_m,
            tile_n,
            tile_k,
            threads,
        } = TILING;
        // An 8×8 grid of threads (tx = tid % 8, ty = tid / 8), each owning 8 rows × 8 columns.
        assert_eq!(threads, 8 * 8);
        assert_eq!((tile_m, tile_n), (8 * 8, 8 * 8));
        // load_x_tile: TILE_K × TILE_M/4 vec4, 8 per thread.
        assert_eq!(tile_k * tile_m / 4, 8 * threads);
        // load_w_tile_f16: one (row quad, 8-half group) unit per thread.
        assert_eq!((tile_n / 4) * (tile_k / 8), threads);
        // load_w_tile_q8_0 / q4_0: one block per K step, one (row quad, quarter) unit per thread.
        assert_eq!(tile_k, 32);
        assert_eq!((tile_n / 4) * 4, threads);
        // load_w_tile_f32: (row quad, 4-float group) units, two per thread.
        assert_eq!((tile_n / 4) * (tile_k / 4), 2 * threads);
    }

    /// matmul_lanes.wgsl keeps a thread's rows in two vec4 accumulators per column, for the
    /// two columns `a` and `b`, and broadcasts from lanes 0..ROWS of a subgroup.
    #[test]
    fn lanes_shape_matches_the_shader() {
        assert_eq!(LANES.rows, 2 * 4);
        assert_eq!(LANES.columns, 2);
    }
}
