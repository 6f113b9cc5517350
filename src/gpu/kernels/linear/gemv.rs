//! `y = W·x (+ bias) (+ y)` for a single row: the launcher for shaders/gemv.wgsl. The CPU
//! reference is `linear::reference` with `m = 1`.

use bytemuck::{Pod, Zeroable};

use super::{chunk_layout, flag_constants, flags_for, format_constant, kernel_name, LinearInput};
use crate::error::{Error, Result};
use crate::gpu::device::{Capabilities, Gpu};
use crate::gpu::kernels::{grid, Constants, Dispatch, KernelCall, Shader, LANE_WIDTH};
use crate::gpu::tensor::{Tensor, Weight, WeightFormat};

/// How gemv.wgsl splits the work (its WG, ROWS and MAX_SUBGROUPS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemvShape {
    /// Threads per workgroup: 64 on a GPU; one 8-lane subgroup on a CPU adapter with subgroups
    /// (`Capabilities::prefers_lanes`), whose workgroup then reduces without a barrier. Measured
    /// on lavapipe against 64 (`bench kernels --only decode --only quantized-gemv`, four and two
    /// alternating runs): f16 4096×4096 9.3–9.7 ms against 10.7–13.1, 11008×4096 25.8–26.2
    /// against 31.0–32.0; Q4_0, Q8_0 and the K-quants 5–10% faster.
    pub workgroup: u32,
    /// Output rows per workgroup, a multiple of 4 (the shader keeps them in vec4s). Each x value
    /// a thread loads serves all of them.
    pub rows: u32,
    /// Most subgroups a workgroup can hold on this device (workgroup / the smallest subgroup
    /// size): sizes the per-subgroup partial sums. 1 without subgroups (unused then).
    pub max_subgroups: u32,
}

impl GemvShape {
    const WORKGROUP: u32 = 64;
    /// Rows per workgroup on a GPU: 1,024 workgroups for a 4096-row weight keep a large GPU's
    /// memory system busy.
    const ROWS: u32 = 4;
    /// Rows per workgroup on a CPU adapter, where every value a lane loads costs about the same
    /// as a multiply and bandwidth is not the limit: more rows per x value loaded. Measured on
    /// lavapipe (`bench kernels --only quantized-gemv`, 4096×4096, time against 4 rows): f16
    /// 0.86× at 8 rows and 0.91× at 16, Q4_0 0.76× and 0.56×, Q8_0 0.75× and 0.60×.
    const CPU_ROWS: u32 = 16;

    pub fn for_device(caps: &Capabilities) -> Self {
        // On a CPU adapter the workgroup is one subgroup: its sums need no workgroup memory and
        // no barrier (which such a driver runs as a switch between the workgroup's subgroups).
        let workgroup = if caps.prefers_lanes(LANE_WIDTH) {
            LANE_WIDTH
        } else {
            Self::WORKGROUP
        };
        let max_subgroups = if caps.subgroups {
            workgroup.div_ceil(caps.subgroup_min_size.max(1))
        } else {
            1
        };
        Self {
            workgroup,
            rows: if caps.cpu { Self::CPU_ROWS } else { Self::ROWS },
            max_subgroups,
        }
    }

    /// The shader's constants for a weight chunk stored in `format`, with x as it is.
    pub fn constants(&self, format: WeightFormat) -> Constants {
        self.constants_for(format, LinearInput::Plain.mode())
    }

    /// The shader's constants for a weight chunk stored in `format` and x read in `x_mode`
    /// ([`LinearInput::mode`]).
    pub fn constants_for(&self, format: WeightFormat, x_mode: u32) -> Constants {
        Constants::new(&[
            ("WG", self.workgroup),
            ("ROWS", self.rows),
            ("MAX_SUBGROUPS", self.max_subgroups),
            ("X_MODE", x_mode),
        ])
        .with(format_constant(format))
        .with(flag_constants())
    }
}

impl LinearInput<'_> {
    /// The profiler's name suffix: `_rms` and `_silu` tell the fused launches apart, and
    /// `_subgroup` the variant compiled with SUBGROUPS.
    fn kernel_suffix(&self, subgroups: bool) -> &'static str {
        match (self, subgroups) {
            (LinearInput::Plain, false) => "",
            (LinearInput::Plain, true) => "_subgroup",
            (LinearInput::RmsNorm { .. }, false) => "_rms",
            (LinearInput::RmsNorm { .. }, true) => "_rms_subgroup",
            (LinearInput::SiluGate, false) => "_silu",
            (LinearInput::SiluGate, true) => "_silu_subgroup",
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    k: u32,
    w_stride: u32,
    x_offset: u32,
    col_offset: u32,
    flags: u32,
    y_offset: u32,
    scales: u32,
    eps: f32,
    _pad: [u32; 3],
}

/// Multiply row `x_row` of `x [M, K]` by `wᵀ`, writing row `y_row` of `y [*, N]`. One dispatch
/// per row-chunk of `w`.
pub fn gemv(
    gpu: &Gpu,
    x: &Tensor,
    x_row: usize,
    w: &Weight,
    y: &Tensor,
    y_row: usize,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    gemv_with(gpu, x, x_row, LinearInput::Plain, w, y, y_row, accumulate)
}

/// [`gemv`] of the row `input` computes from row `x_row` of `x` (`x [M, 2K]` for
/// [`LinearInput::SiluGate`]).
#[allow(clippy::too_many_arguments)]
pub fn gemv_with(
    gpu: &Gpu,
    x: &Tensor,
    x_row: usize,
    input: LinearInput,
    w: &Weight,
    y: &Tensor,
    y_row: usize,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    let (x_cols, n_total) = check_shapes(x, x_row, &input, w, y, y_row)?;
    let k = w.k;
    let suffix = input.kernel_suffix(gpu.caps.subgroups);
    let flags = flags_for(w, accumulate);
    let shape = GemvShape::for_device(&gpu.caps);
    let bias = w.bias.as_ref().map_or(&x.buffer, |b| &b.buffer);
    let (gamma, eps) = input.gamma_binding(&x.buffer);
    w.chunks
        .iter()
        .map(|chunk| {
            let (w_stride, scales) = chunk_layout(chunk, k);
            let params = Params {
                n: chunk.rows as u32,
                k: k as u32,
                w_stride,
                x_offset: (x_row * x_cols) as u32,
                col_offset: chunk.first_row as u32,
                flags,
                y_offset: (y_row * n_total) as u32,
                scales,
                eps,
                _pad: [0; 3],
            };
            let groups = chunk.rows.div_ceil(shape.rows as usize) as u32;
            let bytes = (x_cols * 4 + chunk.rows * chunk.format.row_bytes(k)) as u64
                + (chunk.rows * 4) as u64 * if accumulate { 2 } else { 1 };
            KernelCall::new(gpu, Shader::Gemv, "gemv")
                .constants(shape.constants_for(chunk.format, input.mode()))
                .params(&params)
                .read(&x.buffer)
                .read(&chunk.buffer)
                .read(bias)
                .read_write(&y.buffer)
                .read(gamma)
                .build(
                    kernel_name("gemv", chunk.format, suffix),
                    format!("N={} K={k}", chunk.rows),
                    grid(groups, gpu.limits.max_compute_workgroups_per_dimension),
                    2 * (chunk.rows * k) as u64,
                    bytes,
                )
        })
        .collect()
}

/// The columns of x's rows and of y's, once x's row fits `input` and `w`, y fits `w`, both
/// rows exist and a norm's γ has K values.
fn check_shapes(
    x: &Tensor,
    x_row: usize,
    input: &LinearInput,
    w: &Weight,
    y: &Tensor,
    y_row: usize,
) -> Result<(usize, usize)> {
    let (x_rows, x_cols) = x.rows_cols();
    let (y_rows, n_total) = y.rows_cols();
    let gamma_fits = input.gamma_fits(w.k);
    if x_cols != input.row_len(w.k)
        || n_total != w.n
        || x_row >= x_rows
        || y_row >= y_rows
        || !gamma_fits
    {
        return Err(Error::shape(
            "gemv",
            format!(
                "row {x_row} of X {:?} as {input:?} · {}ᵀ [{}, {}] into row {y_row} of Y {:?}",
                x.shape, w.name, w.n, w.k, y.shape
            ),
        ));
    }
    Ok((x_cols, n_total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(subgroups: bool, subgroup_min_size: u32) -> Capabilities {
        Capabilities {
            cpu: false,
            shader_f16: false,
            subgroups,
            subgroup_min_size,
            subgroup_max_size: subgroup_min_size.max(64),
            timestamps: false,
            timestamps_inside_passes: false,
        }
    }

    /// The partial sums hold one slot per subgroup for the smallest subgroups the device may
    /// pick, whatever size in its range it picks.
    #[test]
    fn partial_sums_cover_every_subgroup() {
        for min_size in [4u32, 8, 16, 32, 64, 128] {
            let shape = GemvShape::for_device(&caps(true, min_size));
            let most_subgroups = shape.workgroup.div_ceil(min_size);
            assert!(
                shape.max_subgroups >= most_subgroups,
                "min subgroup size {min_size}"
            );
            assert!(shape.max_subgroups >= 1);
        }
        assert_eq!(GemvShape::for_device(&caps(false, 0)).max_subgroups, 1);
    }

    /// gemv.wgsl keeps a thread's row sums in vec4s and reduces with a power-of-two tree
    /// whose last step writes one row per thread.
    #[test]
    fn shader_structure_matches_the_shape() {
        for cpu in [false, true] {
            let shape = GemvShape::for_device(&Capabilities {
                cpu,
                ..caps(false, 0)
            });
            assert_eq!(shape.rows % 4, 0);
            assert!(shape.workgroup.is_power_of_two() && shape.workgroup >= shape.rows);
        }
    }
}
