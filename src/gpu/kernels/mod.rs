//! The kernel set: a pipeline cache, a small builder that turns (shader, entry point, bindings,
//! uniform parameters, workgroup count) into a recorded [`Dispatch`], and one typed launcher
//! module per shader file. Each launcher module also holds the plain CPU reference (f64) its
//! tests compare against.
//!
//! Shaders are plain WGSL with a tiny preprocessor: lines between `//#if FLAG`, `//#else` and
//! `//#endif` are kept or dropped by the device's capabilities (`SUBGROUPS`, `F16`), and the
//! `enable f16;` directive is prepended where the F16 branch is kept. This keeps one .wgsl file per kernel family while
//! still compiling on adapters that lack an optional feature.

pub mod activation;
pub mod attention;
pub mod elementwise;
pub mod gemv;
pub mod matmul;
pub mod norm;
pub mod rope;
pub mod sample;
pub mod topk;

use std::collections::HashMap;
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::gpu::device::Gpu;

/// The WGSL sources, compiled into the binary so the engine needs no files at run time.
pub fn shader_source(shader: &str) -> Option<&'static str> {
    Some(match shader {
        "matmul" => include_str!("../../../shaders/matmul.wgsl"),
        "gemv" => include_str!("../../../shaders/gemv.wgsl"),
        "attention" => include_str!("../../../shaders/attention.wgsl"),
        "topk" => include_str!("../../../shaders/topk.wgsl"),
        "norm" => include_str!("../../../shaders/norm.wgsl"),
        "rope" => include_str!("../../../shaders/rope.wgsl"),
        "activation" => include_str!("../../../shaders/activation.wgsl"),
        "elementwise" => include_str!("../../../shaders/elementwise.wgsl"),
        "sample" => include_str!("../../../shaders/sample.wgsl"),
        _ => return None,
    })
}

/// Capability flags a shader can be specialised on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ShaderFlags {
    pub subgroups: bool,
    pub f16: bool,
}

/// Resolve `//#if FLAG` / `//#else` / `//#endif` blocks (not nested) and prepend the `enable`
/// directives the kept code needs.
pub fn preprocess(source: &str, flags: ShaderFlags) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(source.len() + 64);
    if flags.f16 && source.contains("//#if F16") {
        out.push_str("enable f16;\n");
    }
    // Naga accepts subgroup builtins when the device has SUBGROUP; it rejects the
    // `enable subgroups;` directive itself, so none is prepended for them.
    // (inside a block?, keeping lines?)
    let mut state: Option<bool> = None;
    for (number, line) in source.lines().enumerate() {
        let trimmed = line.trim();
        if let Some(flag) = trimmed.strip_prefix("//#if ") {
            if state.is_some() {
                return Err(format!("line {}: nested //#if", number + 1));
            }
            let on = match flag.trim() {
                "SUBGROUPS" => flags.subgroups,
                "F16" => flags.f16,
                other => return Err(format!("line {}: unknown flag {other}", number + 1)),
            };
            state = Some(on);
            out.push('\n');
            continue;
        }
        if trimmed == "//#else" {
            match state {
                Some(on) => state = Some(!on),
                None => return Err(format!("line {}: //#else without //#if", number + 1)),
            }
            out.push('\n');
            continue;
        }
        if trimmed == "//#endif" {
            if state.take().is_none() {
                return Err(format!("line {}: //#endif without //#if", number + 1));
            }
            out.push('\n');
            continue;
        }
        // Dropped lines become empty lines so compiler messages keep the file's line numbers.
        if state != Some(false) {
            out.push_str(line);
        }
        out.push('\n');
    }
    if state.is_some() {
        return Err("missing //#endif".into());
    }
    Ok(out)
}

/// How a kernel uses one storage binding (must match the `var<storage, ...>` in the shader).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    Read,
    ReadWrite,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PipelineKey {
    shader: &'static str,
    entry: &'static str,
    flags: ShaderFlags,
    /// Binding 0 is always the uniform parameter block; these are bindings 1.. in order.
    storage: Vec<Access>,
}

#[derive(Clone)]
struct CachedPipeline {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

/// Pipelines compiled once per (shader, entry point, flags, binding layout) and reused.
pub(crate) struct PipelineCache {
    pipelines: Mutex<HashMap<PipelineKey, CachedPipeline>>,
    modules: Mutex<HashMap<(&'static str, ShaderFlags), wgpu::ShaderModule>>,
}

impl PipelineCache {
    pub(crate) fn new() -> Self {
        Self {
            pipelines: Mutex::new(HashMap::new()),
            modules: Mutex::new(HashMap::new()),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the maps inconsistent (inserts are atomic).
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Gpu {
    /// The flags this device compiles a shader with.
    pub fn shader_flags(&self) -> ShaderFlags {
        ShaderFlags {
            subgroups: self.caps.subgroups,
            f16: self.caps.shader_f16,
        }
    }

    fn module(&self, shader: &'static str, flags: ShaderFlags) -> Result<wgpu::ShaderModule> {
        if let Some(module) = lock(&self.pipelines.modules).get(&(shader, flags)) {
            return Ok(module.clone());
        }
        let fail = |reason: String| Error::Shader {
            shader: shader.into(),
            entry: "*".into(),
            reason,
        };
        let source = shader_source(shader).ok_or_else(|| fail("no such shader".into()))?;
        let source = preprocess(source, flags).map_err(fail)?;
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(shader),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
        if let Some(error) = pollster::block_on(scope.pop()) {
            return Err(fail(error.to_string()));
        }
        lock(&self.pipelines.modules).insert((shader, flags), module.clone());
        Ok(module)
    }

    fn pipeline(&self, key: &PipelineKey) -> Result<CachedPipeline> {
        if let Some(cached) = lock(&self.pipelines.pipelines).get(key) {
            return Ok(cached.clone());
        }
        let module = self.module(key.shader, key.flags)?;
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        }];
        for (i, access) in key.storage.iter().enumerate() {
            entries.push(wgpu::BindGroupLayoutEntry {
                binding: i as u32 + 1,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage {
                        read_only: *access == Access::Read,
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            });
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let layout = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(key.entry),
                entries: &entries,
            });
        let pipeline_layout = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(key.entry),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(key.entry),
                layout: Some(&pipeline_layout),
                module: &module,
                entry_point: Some(key.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &[],
                    // Every kernel initialises the workgroup memory it reads.
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        if let Some(error) = pollster::block_on(scope.pop()) {
            return Err(Error::Shader {
                shader: key.shader.into(),
                entry: key.entry.into(),
                reason: error.to_string(),
            });
        }
        let cached = CachedPipeline { pipeline, layout };
        lock(&self.pipelines.pipelines).insert(key.clone(), cached.clone());
        Ok(cached)
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
    pub pipeline: wgpu::ComputePipeline,
    pub bind_group: wgpu::BindGroup,
    pub workgroups: [u32; 3],
    /// Analytic floating-point operations (a multiply-add counts as 2).
    pub flops: u64,
    /// Analytic bytes read and written from global memory.
    pub bytes: u64,
    /// The uniform parameter block (kept so a caller may rewrite it between submissions).
    pub params: wgpu::Buffer,
}

/// Builds a [`Dispatch`]: bindings are added in shader order starting at binding 1.
pub struct KernelCall<'a> {
    gpu: &'a Gpu,
    shader: &'static str,
    entry: &'static str,
    flags: ShaderFlags,
    params: Vec<u8>,
    bindings: Vec<(Access, wgpu::BufferBinding<'a>)>,
}

impl<'a> KernelCall<'a> {
    pub fn new(gpu: &'a Gpu, shader: &'static str, entry: &'static str) -> Self {
        Self {
            gpu,
            shader,
            entry,
            flags: gpu.shader_flags(),
            params: Vec::new(),
            bindings: Vec::new(),
        }
    }

    /// Compile without the optional features (used where a kernel has no specialisation).
    pub fn flags(mut self, flags: ShaderFlags) -> Self {
        self.flags = flags;
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
            shader: self.shader,
            entry: self.entry,
            flags: self.flags,
            storage: self.bindings.iter().map(|(a, _)| *a).collect(),
        };
        let cached = self.gpu.pipeline(&key)?;
        let mut params = self.params;
        // Uniform blocks are padded to 16 bytes, as WGSL's uniform layout requires.
        params.resize(params.len().max(16).next_multiple_of(16), 0);
        let params_buffer = wgpu::util::DeviceExt::create_buffer_init(
            &self.gpu.device,
            &wgpu::util::BufferInitDescriptor {
                label: Some(kernel),
                contents: &params,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            },
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
    use super::*;

    #[test]
    fn preprocess_keeps_the_branch_for_the_flags() {
        let src = "a\n//#if SUBGROUPS\nb\n//#else\nc\n//#endif\nd\n";
        let on = preprocess(
            src,
            ShaderFlags {
                subgroups: true,
                f16: false,
            },
        )
        .unwrap();
        assert!(on.contains("b\n") && !on.contains("c\n"));
        let off = preprocess(src, ShaderFlags::default()).unwrap();
        assert!(!off.contains("enable") && off.contains("c\n") && !off.contains("b\n"));
        // Line numbers are preserved.
        assert_eq!(off.lines().count(), src.lines().count());
    }

    #[test]
    fn preprocess_rejects_malformed_blocks() {
        assert!(preprocess("//#if SUBGROUPS\n", ShaderFlags::default()).is_err());
        assert!(preprocess("//#endif\n", ShaderFlags::default()).is_err());
        assert!(preprocess("//#if NOPE\n//#endif\n", ShaderFlags::default()).is_err());
    }

    #[test]
    fn grid_covers_the_count_within_the_limit() {
        for count in [1u32, 5, 65535, 65536, 200_000, 10_000_000] {
            let [x, y, _] = grid(count, 65535);
            assert!(x <= 65535 && y <= 65535);
            assert!(x as u64 * y as u64 >= count as u64);
        }
    }
}
