//! Adapter choice and device creation.
//!
//! Real GPUs come first. A CPU adapter (Mesa's lavapipe, WARP, SwiftShader) is used only when no
//! GPU exists or when the user names it, and then with a one-line warning: it is correct but
//! one to three orders of magnitude slower than any GPU. The device is created with the adapter's
//! own limits (not WebGPU's conservative defaults) and with every optional feature the engine
//! can use that the adapter has.

use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::gpu::disk_cache::DiskPipelineCache;
use crate::gpu::memory::{GpuBuffer, MemoryKind, MemoryStats, MemoryTracker};
use crate::gpu::pipelines::PipelineCache;
use crate::gpu::profiler::{ProfileReport, Profiler, TimingMode};
use crate::gpu::shaders::ShaderFlags;

/// Environment variable that picks the adapter (same syntax as [`GpuOptions::adapter`]).
pub const ENV_ADAPTER: &str = "LLAVA_WGPU_ADAPTER";
/// Environment variable that picks the backend (same syntax as [`BackendChoice::parse`]).
pub const ENV_BACKEND: &str = "LLAVA_WGPU_BACKEND";
/// Environment variable that lowers the storage-binding limit the engine plans with, in bytes,
/// so that tests exercise the chunked-weight path on tiny tensors.
pub const ENV_MAX_BINDING: &str = "LLAVA_WGPU_MAX_BINDING_BYTES";
/// Environment variable listing optional features to ignore even when present
/// (comma separated: `f16`, `subgroups`, `timestamps`, `timestamps-inside-passes`), to test
/// the fallback paths, and `cpu-tuning` to tune kernels as for a GPU on a CPU adapter.
pub const ENV_DISABLE: &str = "LLAVA_WGPU_DISABLE";

/// Which graphics API to go through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    Vulkan,
    Metal,
    Dx12,
    Gl,
}

impl BackendChoice {
    /// Accepts the names the command line lists and the usual abbreviations (`vk`, `d3d12`, ...).
    pub fn parse(text: &str) -> Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "vulkan" | "vk" => Ok(Self::Vulkan),
            "metal" | "mtl" => Ok(Self::Metal),
            "dx12" | "d3d12" => Ok(Self::Dx12),
            "gl" | "gles" | "opengl" => Ok(Self::Gl),
            other => Err(Error::argument(
                "gpu.backend",
                format!("'{other}' is not one of vulkan, metal, dx12, gl"),
            )),
        }
    }

    fn backends(self) -> wgpu::Backends {
        match self {
            Self::Vulkan => wgpu::Backends::VULKAN,
            Self::Metal => wgpu::Backends::METAL,
            Self::Dx12 => wgpu::Backends::DX12,
            Self::Gl => wgpu::Backends::GL,
        }
    }
}

impl std::str::FromStr for BackendChoice {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        Self::parse(text)
    }
}

/// How to choose and configure the device. `Default` means: best real GPU on any backend,
/// every useful feature on, the adapter's own binding limit.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Restrict to one backend. `None` reads `LLAVA_WGPU_BACKEND`, else all primary backends.
    pub backend: Option<BackendChoice>,
    /// `cpu`, `gpu`, an index into the `devices` listing, or a case-insensitive substring of the
    /// adapter name. `None` reads `LLAVA_WGPU_ADAPTER`, else picks automatically.
    pub adapter: Option<String>,
    /// Plan with at most this many bytes per storage binding (None reads `LLAVA_WGPU_MAX_BINDING_BYTES`).
    pub max_binding_bytes: Option<u64>,
    /// Ignore SHADER_F16 even when present.
    pub disable_f16: bool,
    /// Ignore SUBGROUP even when present (shared-memory reductions are used instead).
    pub disable_subgroups: bool,
    /// Ignore timestamp queries even when present.
    pub disable_timestamps: bool,
    /// Ignore TIMESTAMP_QUERY_INSIDE_PASSES (profile with one pass per dispatch instead).
    pub disable_timestamps_inside_passes: bool,
    /// Tune kernels as for a GPU even on a CPU adapter (the matmul layout and the GEMV's rows
    /// per workgroup; see `Capabilities::cpu`): to compare, and to test the GPU tuning here.
    pub disable_cpu_tuning: bool,
}

impl GpuOptions {
    /// Fill unset fields from the environment variables documented above.
    pub fn with_env(mut self) -> Result<Self> {
        if self.backend.is_none() {
            if let Ok(text) = std::env::var(ENV_BACKEND) {
                if !text.trim().is_empty() {
                    self.backend = Some(BackendChoice::parse(&text).map_err(|_| {
                        Error::argument(
                            ENV_BACKEND,
                            format!("'{text}' is not one of vulkan, metal, dx12, gl"),
                        )
                    })?);
                }
            }
        }
        if self.adapter.is_none() {
            if let Ok(text) = std::env::var(ENV_ADAPTER) {
                if !text.trim().is_empty() {
                    self.adapter = Some(text);
                }
            }
        }
        if self.max_binding_bytes.is_none() {
            if let Ok(text) = std::env::var(ENV_MAX_BINDING) {
                let bytes: u64 = text.trim().parse().map_err(|_| {
                    Error::argument(ENV_MAX_BINDING, format!("'{text}' is not a byte count"))
                })?;
                if bytes < 256 {
                    return Err(Error::argument(
                        ENV_MAX_BINDING,
                        "must be at least 256 bytes",
                    ));
                }
                self.max_binding_bytes = Some(bytes);
            }
        }
        if let Ok(text) = std::env::var(ENV_DISABLE) {
            for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                match item {
                    "f16" => self.disable_f16 = true,
                    "subgroups" => self.disable_subgroups = true,
                    "timestamps" => self.disable_timestamps = true,
                    "timestamps-inside-passes" => self.disable_timestamps_inside_passes = true,
                    "cpu-tuning" => self.disable_cpu_tuning = true,
                    other => {
                        return Err(Error::argument(
                            ENV_DISABLE,
                            format!("unknown feature '{other}' (f16, subgroups, timestamps, timestamps-inside-passes, cpu-tuning)"),
                        ))
                    }
                }
            }
        }
        Ok(self)
    }

    fn backends(&self) -> wgpu::Backends {
        match self.backend {
            Some(choice) => choice.backends(),
            // GL only as a last resort: it is included so that a machine with nothing else still
            // runs, but `rank` places it below every Vulkan/Metal/DX12 adapter.
            None => wgpu::Backends::PRIMARY | wgpu::Backends::GL,
        }
    }
}

/// The optional capabilities the kernels specialise on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// The adapter runs shaders on the CPU (lavapipe, SwiftShader, WARP), so kernels are tuned
    /// for SIMD lanes rather than GPU tiles (false with `GpuOptions::disable_cpu_tuning`).
    pub cpu: bool,
    /// Native `f16` arithmetic in WGSL (`enable f16;`).
    pub shader_f16: bool,
    /// Subgroup operations (`enable subgroups;`), used for reductions.
    pub subgroups: bool,
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
    /// Timestamp queries at pass boundaries.
    pub timestamps: bool,
    /// Timestamp queries between dispatches inside one pass.
    pub timestamps_inside_passes: bool,
}

impl Capabilities {
    /// Whether the kernels' `_lanes` layouts are the ones to run: a CPU adapter whose subgroups
    /// hold a `width`-lane group (the layouts exchange values by subgroup broadcasts and sums
    /// within it). Every `*Layout::for_device` asks this.
    pub fn prefers_lanes(&self, width: u32) -> bool {
        self.cpu && self.subgroups && self.subgroup_min_size >= width
    }

    /// Whether a `width`-lane layout runs correctly here at all: with subgroups only if they
    /// hold its lanes (without, its shaders exchange values through workgroup memory).
    pub fn lanes_fit(&self, width: u32) -> bool {
        !self.subgroups || self.subgroup_min_size >= width
    }
}

/// A description of one adapter, for `llava-wgpu devices` and for logs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdapterSummary {
    pub index: usize,
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    pub vendor_id: u32,
    pub device_id: u32,
    pub max_storage_buffer_binding_size: u64,
    pub max_buffer_size: u64,
    pub max_compute_workgroup_storage_size: u32,
    pub max_compute_invocations_per_workgroup: u32,
    pub max_compute_workgroups_per_dimension: u32,
    pub max_storage_buffers_per_shader_stage: u32,
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
    pub shader_f16: bool,
    pub subgroups: bool,
    pub timestamp_query: bool,
    pub timestamp_query_inside_passes: bool,
    pub is_cpu: bool,
    /// The adapter a run with the same options would open.
    pub chosen: bool,
}

fn summarize(index: usize, adapter: &wgpu::Adapter) -> AdapterSummary {
    let info = adapter.get_info();
    let limits = adapter.limits();
    let features = adapter.features();
    AdapterSummary {
        index,
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: info.driver.clone(),
        driver_info: info.driver_info.clone(),
        vendor_id: info.vendor,
        device_id: info.device,
        max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
        max_buffer_size: limits.max_buffer_size,
        max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
        max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
        max_compute_workgroups_per_dimension: limits.max_compute_workgroups_per_dimension,
        max_storage_buffers_per_shader_stage: limits.max_storage_buffers_per_shader_stage,
        subgroup_min_size: info.subgroup_min_size,
        subgroup_max_size: info.subgroup_max_size,
        shader_f16: features.contains(wgpu::Features::SHADER_F16),
        subgroups: features.contains(wgpu::Features::SUBGROUP),
        timestamp_query: features.contains(wgpu::Features::TIMESTAMP_QUERY),
        timestamp_query_inside_passes: features
            .contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES),
        is_cpu: info.device_type == wgpu::DeviceType::Cpu,
        chosen: false,
    }
}

/// Preference order: discrete > integrated > virtual > unknown > CPU; within a type, the native
/// APIs before GL.
fn rank(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let device = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    let backend = if info.backend == wgpu::Backend::Gl {
        1
    } else {
        0
    };
    (device, backend)
}

fn new_instance(options: &GpuOptions) -> wgpu::Instance {
    let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle();
    descriptor.backends = options.backends();
    wgpu::Instance::new(descriptor)
}

/// Every adapter the chosen backends expose, in a stable order (best first).
pub fn list_adapters(options: &GpuOptions) -> Vec<AdapterSummary> {
    let instance = new_instance(options);
    let adapters = sorted_adapters(&instance, options);
    let chosen = chosen_position(&adapters, options.adapter.as_deref()).ok();
    adapters
        .iter()
        .enumerate()
        .map(|(i, a)| AdapterSummary {
            chosen: chosen == Some(i),
            ..summarize(i, a)
        })
        .collect()
}

fn sorted_adapters(instance: &wgpu::Instance, options: &GpuOptions) -> Vec<wgpu::Adapter> {
    let backends = options.backends();
    // GL is only asked for when nothing native exists: probing EGL on a headless machine is slow
    // and noisy, and a GL adapter is never preferred over a Vulkan/Metal/DX12 one.
    let mut adapters =
        pollster::block_on(instance.enumerate_adapters(backends - wgpu::Backends::GL));
    if adapters.is_empty() && backends.contains(wgpu::Backends::GL) {
        adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::GL));
    }
    adapters.sort_by_key(|a| rank(&a.get_info()));
    adapters
}

fn choose_adapter(adapters: Vec<wgpu::Adapter>, wanted: Option<&str>) -> Result<wgpu::Adapter> {
    let position = chosen_position(&adapters, wanted)?;
    Ok(adapters.into_iter().nth(position).expect("index in range"))
}

/// Which of `adapters` (best first) a run opens: the first, or the one `wanted` names (`cpu`,
/// `gpu`, an index, or part of a name).
fn chosen_position(adapters: &[wgpu::Adapter], wanted: Option<&str>) -> Result<usize> {
    let names = || {
        adapters
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{i}: {} ({:?})", a.get_info().name, a.get_info().backend))
            .collect::<Vec<_>>()
            .join("; ")
    };
    if adapters.is_empty() {
        return Err(Error::NoAdapter(
            "no Vulkan, Metal, DX12 or GL adapter was found. On Linux without a GPU install \
             Mesa's software Vulkan driver (Debian/Ubuntu: apt-get install mesa-vulkan-drivers)"
                .into(),
        ));
    }
    let Some(wanted) = wanted.map(str::trim) else {
        return Ok(0);
    };
    let is_cpu = |a: &wgpu::Adapter| a.get_info().device_type == wgpu::DeviceType::Cpu;
    let position = match wanted.to_ascii_lowercase().as_str() {
        "cpu" => adapters.iter().position(is_cpu),
        "gpu" => adapters.iter().position(|a| !is_cpu(a)),
        text => match text.parse::<usize>() {
            Ok(index) => (index < adapters.len()).then_some(index),
            Err(_) => adapters
                .iter()
                .position(|a| a.get_info().name.to_ascii_lowercase().contains(text)),
        },
    };
    position.ok_or_else(|| {
        Error::argument(
            "gpu.adapter",
            format!("no adapter matches '{wanted}'; available: {}", names()),
        )
    })
}

/// An open device with everything the kernels need to know about it.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    pub caps: Capabilities,
    /// The storage-binding size weights are chunked by: the adapter's limit, or less when forced.
    pub max_binding_bytes: u64,
    /// The adapter's real storage-binding limit, which activation tensors must fit.
    pub adapter_binding_bytes: u64,
    pub(crate) pipelines: PipelineCache,
    /// The driver's compiled pipelines kept on disk between runs (Vulkan; see `disk_cache.rs`).
    pub(crate) disk_cache: Option<DiskPipelineCache>,
    /// Every buffer created through [`Gpu::create_buffer`] / [`Gpu::create_buffer_init`].
    pub memory: Arc<MemoryTracker>,
    /// Present while profiling: recorders time every dispatch into it.
    pub(crate) profiler: Mutex<Option<Profiler>>,
    /// Errors wgpu reported outside an error scope; checked at every synchronisation point so a
    /// failure surfaces as an `Error` instead of a panic in wgpu's default handler.
    uncaptured: Arc<Mutex<Vec<String>>>,
}

/// The optional features a device asks for (those the adapter lacks are left out): f16, subgroups
/// and timestamps unless switched off, and the pipeline cache.
fn wanted_features(options: &GpuOptions) -> wgpu::Features {
    let mut wanted = wgpu::Features::PIPELINE_CACHE;
    if !options.disable_f16 {
        wanted |= wgpu::Features::SHADER_F16;
    }
    if !options.disable_subgroups {
        wanted |= wgpu::Features::SUBGROUP;
    }
    if !options.disable_timestamps {
        wanted |= wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS;
        if !options.disable_timestamps_inside_passes {
            wanted |= wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
        }
    }
    wanted
}

impl Drop for Gpu {
    fn drop(&mut self) {
        self.save_pipeline_cache();
    }
}

impl Gpu {
    /// Choose an adapter as described in the module docs and open a device on it.
    pub fn new(options: GpuOptions) -> Result<Self> {
        let options = options.with_env()?;
        let instance = new_instance(&options);
        let adapters = sorted_adapters(&instance, &options);
        let explicit = options.adapter.clone();
        let adapter = choose_adapter(adapters, explicit.as_deref())?;
        let info = adapter.get_info();
        if info.device_type == wgpu::DeviceType::Cpu {
            let why = if explicit.is_some() {
                "as requested"
            } else {
                "no GPU adapter was found"
            };
            eprintln!(
                "warning: running on the CPU adapter '{}' ({:?}, {why}): correct but far slower than a GPU",
                info.name, info.backend
            );
        }
        Self::from_adapter(adapter, &options)
    }

    fn from_adapter(adapter: wgpu::Adapter, options: &GpuOptions) -> Result<Self> {
        let info = adapter.get_info();
        let features = adapter.features() & wanted_features(options);
        let limits = adapter.limits();
        let descriptor = wgpu::DeviceDescriptor {
            label: Some("llava-wgpu"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        };
        let (device, queue) =
            pollster::block_on(adapter.request_device(&descriptor)).map_err(|e| Error::Device {
                adapter: info.name.clone(),
                reason: e.to_string(),
            })?;

        let disk_cache = features
            .contains(wgpu::Features::PIPELINE_CACHE)
            .then(|| DiskPipelineCache::open(&device, &info))
            .flatten();
        let uncaptured = Arc::new(Mutex::new(Vec::new()));
        let sink = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |error: wgpu::Error| {
            if let Ok(mut errors) = sink.lock() {
                errors.push(error.to_string());
            }
        }));

        // Subgroup reductions are written for any power-of-two subgroup size of at least 4;
        // anything else falls back to shared memory.
        let subgroups = features.contains(wgpu::Features::SUBGROUP)
            && info.subgroup_min_size >= 4
            && info.subgroup_min_size.is_power_of_two();
        let caps = Capabilities {
            cpu: info.device_type == wgpu::DeviceType::Cpu && !options.disable_cpu_tuning,
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups,
            subgroup_min_size: info.subgroup_min_size,
            subgroup_max_size: info.subgroup_max_size,
            timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            timestamps_inside_passes: features
                .contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES),
        };
        let adapter_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let max_binding_bytes = match options.max_binding_bytes {
            Some(forced) => forced.min(adapter_binding),
            None => adapter_binding,
        };
        Ok(Self {
            device,
            queue,
            info,
            limits,
            features,
            caps,
            max_binding_bytes,
            adapter_binding_bytes: adapter_binding,
            pipelines: PipelineCache::new(),
            disk_cache,
            memory: MemoryTracker::new(),
            profiler: Mutex::new(None),
            uncaptured,
        })
    }

    /// Create a buffer, counted under `kind` (see `memory.rs`): the only way the engine makes one.
    pub fn create_buffer(
        &self,
        descriptor: &wgpu::BufferDescriptor,
        kind: MemoryKind,
    ) -> GpuBuffer {
        self.memory.create_buffer(&self.device, descriptor, kind)
    }

    /// Create a buffer holding `contents`, counted under `kind`.
    pub fn create_buffer_init(
        &self,
        descriptor: &wgpu::util::BufferInitDescriptor,
        kind: MemoryKind,
    ) -> GpuBuffer {
        self.memory
            .create_buffer_init(&self.device, descriptor, kind)
    }

    /// Live and peak bytes of the buffers created on this device, per kind.
    pub fn memory_stats(&self) -> MemoryStats {
        self.memory.stats()
    }

    /// Write the pipelines compiled so far to the on-disk cache (when there is one and they
    /// changed it). `Engine::load` calls it after compiling a model's pipelines, and dropping the
    /// device calls it again for any compiled later.
    pub fn save_pipeline_cache(&self) {
        if let Some(disk) = &self.disk_cache {
            disk.save();
        }
    }

    /// The on-disk pipeline cache: its file and the bytes read from it when the device opened
    /// (0 on a first run); None where the backend has none or it is switched off.
    pub fn pipeline_cache_file(&self) -> Option<(&std::path::Path, usize)> {
        self.disk_cache.as_ref().map(|c| (c.path(), c.loaded_bytes))
    }

    /// Compute pipelines compiled on this device so far. `Engine::load` compiles every one a
    /// request can use, so this does not change across requests.
    pub fn pipelines_compiled(&self) -> usize {
        self.pipelines.compiled()
    }

    /// The flags this device compiles a shader with.
    pub fn shader_flags(&self) -> ShaderFlags {
        ShaderFlags {
            subgroups: self.caps.subgroups,
            f16: self.caps.shader_f16,
        }
    }

    pub fn is_cpu(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// One line naming the device, for logs.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?}, driver {} {})",
            self.info.name,
            self.info.backend,
            self.info.device_type,
            self.info.driver,
            self.info.driver_info
        )
    }

    /// Block until all submitted work has finished, then report any error wgpu raised meanwhile.
    pub fn wait(&self, context: &str) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::gpu(context, e))?;
        self.check_errors(context)
    }

    /// Time every dispatch recorded from now on (see `profiler.rs`).
    pub fn start_profiling(&self) {
        let mode = if self.caps.timestamps_inside_passes {
            TimingMode::InsidePasses
        } else if self.caps.timestamps {
            TimingMode::PassPerDispatch
        } else {
            TimingMode::CpuWallClock
        };
        let profiler = Profiler::new(mode, self.queue.get_timestamp_period() as f64);
        *self.profiler.lock().unwrap_or_else(|p| p.into_inner()) = Some(profiler);
    }

    /// Record a host-side stage (e.g. preprocessing) in the profile, if profiling.
    pub fn profile_host_stage(&self, stage: &'static str, ms: f64) {
        if let Some(p) = self
            .profiler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            p.cpu_stages.push((stage, ms));
        }
    }

    /// Stop profiling and return the report (None if profiling was not started).
    pub fn finish_profiling(&self) -> Result<Option<ProfileReport>> {
        let taken = self
            .profiler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match taken {
            None => Ok(None),
            Some(mut profiler) => {
                profiler.collect(|| self.wait("profiler readback"))?;
                Ok(Some(profiler.report()))
            }
        }
    }

    /// Turn errors wgpu reported asynchronously into an `Error`.
    pub fn check_errors(&self, context: &str) -> Result<()> {
        let mut errors = self
            .uncaptured
            .lock()
            .map_err(|_| Error::gpu(context, "poisoned"))?;
        if errors.is_empty() {
            Ok(())
        } else {
            let reason = errors.join("; ");
            errors.clear();
            Err(Error::gpu(context, reason))
        }
    }
}
