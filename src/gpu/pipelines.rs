//! Shader modules and compute pipelines, compiled once per variant and reused. Needs only a
//! `wgpu::Device`, so it sits below device.rs, which owns one cache per device.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::gpu::shaders::{preprocess, Constants, Shader, ShaderFlags};

/// How a kernel uses one storage binding (must match the `var<storage, ...>` in the shader).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    Read,
    ReadWrite,
}

/// One compiled variant of a shader file: its capability flags and injected constants.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ModuleKey {
    pub shader: Shader,
    pub flags: ShaderFlags,
    pub constants: Constants,
}

/// `matmul[TILE_M=64 ...]+subgroups`: the label wgpu and error messages show.
impl fmt::Display for ModuleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.shader, self.constants)?;
        if self.flags.subgroups {
            f.write_str("+subgroups")?;
        }
        if self.flags.f16 {
            f.write_str("+f16")?;
        }
        Ok(())
    }
}

/// One pipeline: an entry point of a module variant with its binding layout.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    pub module: ModuleKey,
    pub entry: &'static str,
    /// Binding 0 is always the uniform parameter block; these are bindings 1.. in order.
    pub storage: Vec<Access>,
}

impl PipelineKey {
    fn label(&self) -> String {
        format!("{}::{}", self.module, self.entry)
    }
}

#[derive(Clone)]
pub(crate) struct CachedPipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

/// Pipelines compiled once per [`PipelineKey`] and modules once per [`ModuleKey`].
pub(crate) struct PipelineCache {
    pipelines: Mutex<HashMap<PipelineKey, CachedPipeline>>,
    modules: Mutex<HashMap<ModuleKey, wgpu::ShaderModule>>,
    /// Pipelines compiled so far (cache misses), to check that none compiles after load.
    compiled: AtomicUsize,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the maps inconsistent (inserts are atomic).
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn shader_error(key: &ModuleKey, entry: &str, reason: String) -> Error {
    Error::Shader {
        shader: key.to_string(),
        entry: entry.into(),
        reason,
    }
}

fn layout_entry(binding: u32, ty: wgpu::BufferBindingType) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty,
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

impl PipelineCache {
    pub(crate) fn new() -> Self {
        Self {
            pipelines: Mutex::new(HashMap::new()),
            modules: Mutex::new(HashMap::new()),
            compiled: AtomicUsize::new(0),
        }
    }

    /// Pipelines compiled so far: every cache miss of [`PipelineCache::pipeline`].
    pub(crate) fn compiled(&self) -> usize {
        self.compiled.load(Ordering::Relaxed)
    }

    fn module(&self, device: &wgpu::Device, key: &ModuleKey) -> Result<wgpu::ShaderModule> {
        if let Some(module) = lock(&self.modules).get(key) {
            return Ok(module.clone());
        }
        let source = preprocess(key.shader.source(), key.flags, &key.constants)
            .map_err(|reason| shader_error(key, "*", reason))?;
        let label = key.to_string();
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&label),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        if let Some(error) = pollster::block_on(scope.pop()) {
            return Err(shader_error(key, "*", error.to_string()));
        }
        lock(&self.modules).insert(key.clone(), module.clone());
        Ok(module)
    }

    /// The pipeline for `key`, compiled on first use (through the driver's `disk` cache when
    /// there is one).
    pub(crate) fn pipeline(
        &self,
        device: &wgpu::Device,
        disk: Option<&wgpu::PipelineCache>,
        key: &PipelineKey,
    ) -> Result<CachedPipeline> {
        if let Some(cached) = lock(&self.pipelines).get(key) {
            return Ok(cached.clone());
        }
        let module = self.module(device, &key.module)?;
        let mut entries = vec![layout_entry(0, wgpu::BufferBindingType::Uniform)];
        for (i, access) in key.storage.iter().enumerate() {
            let read_only = *access == Access::Read;
            let ty = wgpu::BufferBindingType::Storage { read_only };
            entries.push(layout_entry(i as u32 + 1, ty));
        }
        let label = key.label();
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(&label),
            entries: &entries,
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(&label),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some(key.entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &[],
                // Every kernel initialises the workgroup memory it reads.
                zero_initialize_workgroup_memory: false,
            },
            cache: disk,
        });
        if let Some(error) = pollster::block_on(scope.pop()) {
            return Err(shader_error(&key.module, key.entry, error.to_string()));
        }
        let cached = CachedPipeline { pipeline, layout };
        self.compiled.fetch_add(1, Ordering::Relaxed);
        lock(&self.pipelines).insert(key.clone(), cached.clone());
        Ok(cached)
    }
}
