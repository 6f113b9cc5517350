//! `llava-wgpu memory`: the GPU bytes a full-depth request allocates, per kind and at the peak,
//! for one or more pruning settings. The engine is loaded with `allocate_only` (weight buffers
//! created, nothing uploaded) and each setting's buffers come from
//! [`Engine::allocate_request`], so the figures are the allocation tracker's, not a formula.

use serde::Serialize;

use crate::error::Result;
use crate::generate::{GenerateRequest, RequestMemory};
use crate::gpu::MemoryKind;
use crate::harness::bench::Setting;
use crate::model::llava::Engine;

/// One setting's allocations.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryRow {
    pub label: String,
    #[serde(flatten)]
    pub memory: RequestMemory,
}

#[derive(Clone, Debug, Serialize)]
pub struct MemoryReport {
    pub model: String,
    pub adapter: String,
    /// The language model's linear layers and lm_head.
    pub weights_format: String,
    /// The vision tower and projector.
    pub vision_weights_format: String,
    /// The KV cache's element type.
    pub kv_format: String,
    pub rows: Vec<MemoryRow>,
}

/// Allocate (and free) the buffers of `request` under each setting in turn; the report names
/// the language model's and the vision tower's weight formats (`Engine::weight_labels`).
pub fn measure(
    engine: &Engine,
    model_label: &str,
    settings: &[Setting],
    request: &GenerateRequest,
) -> Result<MemoryReport> {
    let rows = settings
        .iter()
        .map(|setting| {
            let mut r = request.clone();
            r.prune = setting.prune.clone();
            Ok(MemoryRow {
                label: setting.label.clone(),
                memory: engine.allocate_request(&r)?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(MemoryReport {
        model: model_label.to_string(),
        adapter: engine.gpu.describe(),
        weights_format: engine.weight_labels[0].clone(),
        vision_weights_format: engine.weight_labels[1].clone(),
        kv_format: engine.kv_dtype.name().to_string(),
        rows,
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

impl MemoryReport {
    pub fn table(&self) -> String {
        let mut out = format!(
            "model: {} (KV cache {})\nadapter: {}\nallocated GPU bytes per kind at the request's peak, MiB \
             (GB = 10^9 bytes in the last column)\n\n",
            self.model, self.kv_format, self.adapter
        );
        out.push_str(&format!(
            "{:<22} {:>13} {:>7} {:>10} {:>8} {:>12} {:>8} {:>10} {:>8}\n",
            "setting",
            "visual tokens",
            "prompt",
            "weights",
            "kv",
            "activations",
            "scratch",
            "peak MiB",
            "peak GB"
        ));
        for row in &self.rows {
            let m = &row.memory;
            let v = &m.visual_tokens;
            let peak = |kind| mib(m.stats.peak.get(kind));
            out.push_str(&format!(
                "{:<22} {:>13} {:>7} {:>10.1} {:>8.1} {:>12.1} {:>8.2} {:>10.1} {:>8.3}\n",
                row.label,
                format!("{}>{}>{}", v.encoder, v.after_stage1, v.after_stage2),
                m.prompt_tokens,
                peak(MemoryKind::Weights),
                peak(MemoryKind::Kv),
                peak(MemoryKind::Activations),
                peak(MemoryKind::Scratch),
                mib(m.stats.peak_total),
                m.stats.peak_total as f64 / 1e9
            ));
        }
        out
    }
}
