//! The kernel set: a small builder that turns (shader, entry point, injected constants,
//! bindings, uniform parameters, workgroup count) into a recorded [`Dispatch`], and one typed
//! launcher module per shader file. Each launcher module also holds the plain CPU reference (f64)
//! its tests compare against, and the typed decision (tile sizes, workgroup size) that both sizes
//! its dispatch and is injected into its shader (see `gpu::shaders`).

pub mod activation;
pub mod attention;
pub mod attention_decode;
pub mod copy;
pub mod decode_step;
pub mod embedding;
pub mod fma;
pub mod kv_store;
pub mod linear;
pub mod merge;
pub mod norm;
pub mod rope;
pub mod sample;
pub mod topk;

use crate::error::{Error, Result};
use crate::gpu::device::Gpu;
use crate::gpu::memory::{GpuBuffer, MemoryKind};
pub use crate::gpu::pipelines::Access;
pub use crate::gpu::pipelines::ModuleKey;
use crate::gpu::pipelines::PipelineKey;
pub use crate::gpu::shaders::{preprocess, Constants, Shader, ShaderFlags};

/// The workgroup size of a kernel whose threads each take one element, or stride over a row
/// (`WG` in its shader).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkgroupSize(pub u32);

impl WorkgroupSize {
    pub fn constants(self) -> Constants {
        Constants::new(&[("WG", self.0)])
    }

    /// Workgroups for one thread per item, spread over a grid (see [`grid`]).
    pub fn groups_for(self, gpu: &Gpu, items: usize) -> [u32; 3] {
        grid(
            items.div_ceil(self.0 as usize) as u32,
            gpu.limits.max_compute_workgroups_per_dimension,
        )
    }
}

/// One recorded kernel launch, with what a profiler needs to know about it. Cheap to clone (all
/// wgpu handles are reference counted), so a model can build its dispatches once and re-record
/// them every token.
#[derive(Clone, Debug)]
pub struct Dispatch {
    /// Kernel name for tables and traces, e.g. `matmul_f16`.
    pub kernel: &'static str,
    /// Human-readable shape, e.g. `M=577 N=1024 K=1024`.
    pub shape: String,
    /// The shader variant that runs: its capability flags and injected constants, so a test
    /// can confirm which path (subgroups or shared memory, f16 or not) a launch took.
    pub module: ModuleKey,
    pub pipeline: wgpu::ComputePipeline,
    pub bind_group: wgpu::BindGroup,
    pub workgroups: [u32; 3],
    /// Analytic floating-point operations (a multiply-add counts as 2).
    pub flops: u64,
    /// Analytic bytes read and written from global memory.
    pub bytes: u64,
    /// The uniform parameter block (kept so a caller may rewrite it between submissions).
    pub params: GpuBuffer,
}

/// Lanes in the group every `_lanes` layout works in (matmul, attention, norms, top-k): one
/// 8-lane subgroup, a SIMD vector of a CPU driver.
pub const LANE_WIDTH: u32 = 8;

/// Refuses a `_lanes` layout (`kernel` names it) on a device whose subgroups are narrower than
/// its lanes: its broadcasts and sums would mix groups and give wrong answers silently.
pub fn check_lanes(gpu: &Gpu, kernel: &str) -> Result<()> {
    let caps = &gpu.caps;
    if caps.lanes_fit(LANE_WIDTH) {
        return Ok(());
    }
    Err(Error::argument(
        "layout",
        format!(
            "the {kernel} lanes layout needs subgroups of at least {LANE_WIDTH} lanes; this device's can have {}",
            caps.subgroup_min_size
        ),
    ))
}

/// Builds a [`Dispatch`]: bindings are added in shader order starting at binding 1.
pub struct KernelCall<'a> {
    gpu: &'a Gpu,
    shader: Shader,
    entry: &'static str,
    flags: ShaderFlags,
    constants: Constants,
    params: Vec<u8>,
    bindings: Vec<(Access, wgpu::BufferBinding<'a>)>,
}

impl<'a> KernelCall<'a> {
    pub fn new(gpu: &'a Gpu, shader: Shader, entry: &'static str) -> Self {
        Self {
            gpu,
            shader,
            entry,
            flags: gpu.shader_flags(),
            constants: Constants::default(),
            params: Vec::new(),
            bindings: Vec::new(),
        }
    }

    /// Compile without the optional features (used where a kernel has no specialisation).
    pub fn flags(mut self, flags: ShaderFlags) -> Self {
        self.flags = flags;
        self
    }

    /// The values of the shader's `//#inject` constants (all of them, and no others).
    pub fn constants(mut self, constants: Constants) -> Self {
        self.constants = constants;
        self
    }

    pub fn params<P: bytemuck::Pod>(mut self, params: &P) -> Self {
        self.params = bytemuck::bytes_of(params).to_vec();
        self
    }

    pub fn read(mut self, buffer: &'a wgpu::Buffer) -> Self {
        self.bindings
            .push((Access::Read, buffer.as_entire_buffer_binding()));
        self
    }

    pub fn read_write(mut self, buffer: &'a wgpu::Buffer) -> Self {
        self.bindings
            .push((Access::ReadWrite, buffer.as_entire_buffer_binding()));
        self
    }

    pub fn build(
        self,
        kernel: &'static str,
        shape: String,
        workgroups: [u32; 3],
        flops: u64,
        bytes: u64,
    ) -> Result<Dispatch> {
        let max = self.gpu.limits.max_compute_workgroups_per_dimension;
        if workgroups.iter().any(|&w| w > max) {
            return Err(Error::shape(
                kernel,
                format!("{workgroups:?} workgroups exceed the device limit of {max} per dimension ({shape})"),
            ));
        }
        let key = PipelineKey {
            module: ModuleKey {
                shader: self.shader,
                flags: self.flags,
                constants: self.constants,
            },
            entry: self.entry,
            storage: self.bindings.iter().map(|(a, _)| *a).collect(),
        };
        let disk = self.gpu.disk_cache.as_ref().map(|c| &c.cache);
        let cached = self.gpu.pipelines.pipeline(&self.gpu.device, disk, &key)?;
        let module = key.module;
        let mut params = self.params;
        // Uniform blocks are padded to 16 bytes, as WGSL's uniform layout requires.
        params.resize(params.len().max(16).next_multiple_of(16), 0);
        let params_buffer = self.gpu.create_buffer_init(
            &wgpu::util::BufferInitDescriptor {
                label: Some(kernel),
                contents: &params,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            },
            MemoryKind::Scratch,
        );
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: params_buffer.as_entire_binding(),
        }];
        for (i, (_, binding)) in self.bindings.into_iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: wgpu::BindingResource::Buffer(binding),
            });
        }
        let bind_group = self
            .gpu
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(kernel),
                layout: &cached.layout,
                entries: &entries,
            });
        Ok(Dispatch {
            kernel,
            shape,
            module,
            pipeline: cached.pipeline,
            bind_group,
            workgroups,
            flops,
            bytes,
            params: params_buffer,
        })
    }
}

/// Spread `count` workgroups over x and y so no dimension exceeds `max_per_dim`; shaders
/// recover the linear index as `wg.x + wg.y * num_workgroups.x` and skip the overshoot.
pub fn grid(count: u32, max_per_dim: u32) -> [u32; 3] {
    if count <= max_per_dim {
        [count.max(1), 1, 1]
    } else {
        let y = count.div_ceil(max_per_dim);
        [count.div_ceil(y), y, 1]
    }
}

#[cfg(test)]
mod tests {
    use super::linear::{gemv, matmul};
    use super::*;
    use crate::gpu::device::Capabilities;
    use crate::gpu::{DType, WeightFormat};
    use wgpu::naga;

    #[test]
    fn grid_covers_the_count_within_the_limit() {
        for count in [1u32, 5, 65535, 65536, 200_000, 10_000_000] {
            let [x, y, _] = grid(count, 65535);
            assert!(x <= 65535 && y <= 65535);
            assert!(x as u64 * y as u64 >= count as u64);
        }
    }

    /// The constants each launcher passes to its shader on a device with `caps`: one set per
    /// weight format for the linear kernels.
    fn launcher_constants(shader: Shader, caps: &Capabilities) -> Vec<Constants> {
        let per_format = |base: Constants| {
            WeightFormat::ALL
                .into_iter()
                .map(|f| base.clone().with(linear::format_constant(f)))
                .collect()
        };
        let one = match shader {
            Shader::Matmul => {
                return linear::LinearInput::MODES
                    .into_iter()
                    .flat_map(|mode| per_format(matmul::TILING.constants_for(mode)))
                    .collect()
            }
            Shader::MatmulLanes => return per_format(matmul::LANES.constants()),
            Shader::Gemv => {
                let shape = gemv::GemvShape::for_device(caps);
                return WeightFormat::ALL
                    .into_iter()
                    .flat_map(|f| {
                        linear::LinearInput::MODES.map(|mode| shape.constants_for(f, mode))
                    })
                    .collect();
            }
            Shader::Attention => attention::TILING.constants(),
            Shader::AttentionLanes => {
                return [1, 17, 64, 128]
                    .into_iter()
                    .flat_map(|d| {
                        [DType::F32, DType::F16].map(|kv| attention::LANES.constants_for(d, kv))
                    })
                    .collect()
            }
            Shader::Topk => topk::SHAPE.constants(),
            Shader::TopkLanes => topk::lanes_constants(),
            Shader::TopkMulti => topk::multi_constants(),
            Shader::Norm => norm::WORKGROUP.constants(),
            Shader::Rope => rope::WORKGROUP.constants(),
            Shader::Activation => activation::WORKGROUP.constants(),
            Shader::Sample => sample::WORKGROUP.constants(),
            Shader::Fma => fma::WORKGROUP.constants(),
            Shader::Copy => copy::WORKGROUP.constants(),
            Shader::Merge => merge::WORKGROUP.constants(),
            Shader::KvStore => kv_store::WORKGROUP.constants(),
            Shader::Embedding => {
                return WeightFormat::ALL
                    .into_iter()
                    .map(|f| {
                        embedding::WORKGROUP
                            .constants()
                            .with(linear::format_constant(f))
                    })
                    .collect()
            }
            Shader::AttentionDecode => {
                return [4, 64, 68, 128]
                    .into_iter()
                    .flat_map(|d| {
                        [DType::F32, DType::F16].map(|kv| attention_decode::constants(d, kv))
                    })
                    .collect()
            }
            Shader::DecodeStep => Constants::default(),
        };
        vec![one]
    }

    fn caps(flags: ShaderFlags, subgroup_min_size: u32) -> Capabilities {
        Capabilities {
            cpu: false,
            shader_f16: flags.f16,
            subgroups: flags.subgroups,
            subgroup_min_size,
            subgroup_max_size: 128,
            timestamps: false,
            timestamps_inside_passes: false,
        }
    }

    fn compile(shader: Shader, flags: ShaderFlags, constants: &Constants) -> naga::Module {
        let what = format!("{shader} with {flags:?} and {constants}");
        let source =
            preprocess(shader.source(), flags, constants).unwrap_or_else(|e| panic!("{what}: {e}"));
        let module = naga::front::wgsl::parse_str(&source)
            .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&source)));
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&source)));
        module
    }

    /// The lanes layouts run on CPU adapters with subgroups holding 8 lanes, and are refused
    /// where subgroups are narrower (their sums would mix groups); without subgroups their
    /// workgroup-memory fallback is correct.
    #[test]
    fn lanes_layouts_need_whole_groups_of_eight() {
        let with = ShaderFlags {
            subgroups: true,
            f16: false,
        };
        let cpu = |flags, min| Capabilities {
            cpu: true,
            ..caps(flags, min)
        };
        assert!(cpu(with, 8).prefers_lanes(LANE_WIDTH) && cpu(with, 8).lanes_fit(LANE_WIDTH));
        assert!(cpu(with, 16).prefers_lanes(LANE_WIDTH));
        assert!(!cpu(with, 4).prefers_lanes(LANE_WIDTH) && !cpu(with, 4).lanes_fit(LANE_WIDTH));
        let without = ShaderFlags::default();
        assert!(
            !cpu(without, 8).prefers_lanes(LANE_WIDTH) && cpu(without, 8).lanes_fit(LANE_WIDTH)
        );
        assert!(
            !caps(with, 8).prefers_lanes(LANE_WIDTH),
            "a GPU keeps the tiled layouts"
        );
    }

    /// Every shader, with the constants its launcher injects (the linear kernels for every
    /// weight format), parses and validates for every flag combination and every subgroup size
    /// a device may report, and with a CPU adapter's tuning.
    #[test]
    fn every_shader_variant_compiles() {
        for shader in Shader::ALL {
            for flags in ShaderFlags::ALL {
                for (min_size, cpu) in [4, 8, 16, 32, 64, 128]
                    .map(|m| (m, false))
                    .into_iter()
                    .chain([(8, true)])
                {
                    let caps = Capabilities {
                        cpu,
                        ..caps(flags, min_size)
                    };
                    for constants in launcher_constants(shader, &caps) {
                        let mut given: Vec<_> = constants.names().collect();
                        let mut listed = shader.injected_names();
                        given.sort_unstable();
                        listed.sort_unstable();
                        assert_eq!(given, listed, "{shader}: launcher vs //#inject line");
                        compile(shader, flags, &constants);
                    }
                }
            }
        }
    }

    /// gemv's per-subgroup partial sums have a slot for every subgroup of the smallest size
    /// the device may use, checked on the compiled module rather than on the Rust decision.
    #[test]
    fn gemv_partial_sums_cover_the_smallest_subgroups() {
        let flags = ShaderFlags {
            subgroups: true,
            f16: false,
        };
        for min_size in [4u32, 8, 16, 32, 64, 128] {
            let shape = gemv::GemvShape::for_device(&caps(flags, min_size));
            let module = compile(Shader::Gemv, flags, &shape.constants(WeightFormat::Q4_K));
            let (_, partial) = module
                .global_variables
                .iter()
                .find(|(_, var)| var.name.as_deref() == Some("partial"))
                .expect("gemv.wgsl declares `partial`");
            let naga::TypeInner::Array { size, .. } = module.types[partial.ty].inner else {
                panic!("`partial` is not an array");
            };
            let len = match size {
                naga::ArraySize::Constant(len) => len.get(),
                other => panic!("`partial` has size {other:?}"),
            };
            let subgroups = shape.workgroup.div_ceil(min_size);
            assert!(
                len >= shape.rows * subgroups,
                "{len} slots for {} rows × {subgroups} subgroups of {min_size}",
                shape.rows
            );
        }
    }
}
