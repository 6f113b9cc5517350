//! A request's GPU memory without running it: every buffer `generate` would create, created in
//! the same order with the same lifetimes by the same functions, and no dispatch recorded.
//! `llava-wgpu memory` reads the allocation tracker afterwards.

use serde::Serialize;

use crate::error::Result;
use crate::gpu::MemoryStats;
use crate::model::llava::Engine;
use crate::sample::Sampler;

use super::output::VisualTokens;
use super::prefill::TurnStage2;
use super::request::GenerateRequest;

/// What [`Engine::allocate_request`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct RequestMemory {
    pub prompt_tokens: usize,
    pub max_new_tokens: usize,
    pub visual_tokens: VisualTokens,
    /// Bytes of the request's KV-cache buffers.
    pub kv_cache_bytes: u64,
    /// The tracker's counters at the request's end, peaks counted from its start.
    pub stats: MemoryStats,
}

impl Engine {
    /// Create every GPU buffer `request` needs, as [`Engine::generate`] does, without reading
    /// its image or computing anything. The image file is not opened: only the prompt, the
    /// pruning plan and the sampling settings decide the sizes.
    pub fn allocate_request(&self, request: &GenerateRequest) -> Result<RequestMemory> {
        let input = self.plan_prompt(request)?;
        self.gpu.memory.reset_peaks();
        // 2. Each image's pass: tower, selection scores and row list, projector; only the
        // projector output outlives it.
        let mut embeddings = Vec::with_capacity(input.images.len());
        for image in &input.images {
            let plan = &image.plan;
            let buffers = self.image_buffers(plan.n1())?;
            let _stage1 = match plan.before_projector {
                Some(_) => Some(self.stage1_buffers(plan.n1())?),
                None => None,
            };
            embeddings.push(buffers.embeddings);
        }
        // 3. Prefill: activations for the prompt, the KV cache per layer, stage 2's buffers
        // while its layers run (its kept-row list stays).
        let mut state = self.prefill_state(&input, self.new_kv_cache(&input)?)?;
        if let Some(stage2) = TurnStage2::of(&input) {
            state.stage2_rows = Some(self.stage2_buffers(&input, &stage2)?.into_rows());
        }
        // 4. Decode: the host reads the logits row when it samples, else the argmax id.
        let host_samples =
            !Sampler::new(request.sampling).is_greedy() || request.logprobs.is_some();
        let read = match host_samples {
            true => &state.buffers.logits,
            false => &state.next_token,
        };
        let _staging = self.gpu.staging_buffer(read.bytes());
        let stats = self.gpu.memory_stats();
        drop(embeddings);
        Ok(RequestMemory {
            prompt_tokens: input.prompt.ids.len(),
            max_new_tokens: input.max_new,
            visual_tokens: VisualTokens::sum(
                input
                    .images
                    .iter()
                    .map(|i| VisualTokens::of(&i.plan))
                    .collect::<Vec<_>>()
                    .iter(),
            ),
            kv_cache_bytes: state.cache.allocated_bytes(),
            stats,
        })
    }
}
