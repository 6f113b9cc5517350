//! The allocation tracker (`gpu/memory.rs`): buffers of known sizes move the live and peak
//! counters of their kind by exactly their sizes, views share one count, and drops release it.
//! Expected sizes are worked out here from the buffer rules (16-byte rounding of activations,
//! rows padded to 8 halves for f16 weights), not read from the engine.

mod fixture;

use llava_wgpu::gpu::{DType, Gpu, GpuOptions, MemoryKind, Tensor, Weight, WeightFormat};
use llava_wgpu::model::llama::KvCache;
use llava_wgpu::prune::{Method, PruneOptions};
use llava_wgpu::{Engine, EngineOptions, GenerateOutput, GenerateRequest};

fn gpu(options: GpuOptions) -> Gpu {
    fixture::private_runtime_dir();
    Gpu::new(options).expect("no GPU adapter: install mesa-vulkan-drivers")
}

/// Activation and KV buffers: `bytes` rounded up to 16, at least 16.
fn padded(bytes: u64) -> u64 {
    bytes.max(16).div_ceil(16) * 16
}

#[test]
fn allocating_and_dropping_moves_the_counters_by_the_buffer_sizes() {
    let gpu = gpu(GpuOptions::default());
    let before = gpu.memory_stats();

    // 37 × 5 f32 = 740 bytes, rounded to 752.
    let a = Tensor::empty(&gpu, &[37, 5], DType::F32, "a").unwrap();
    assert_eq!(a.buffer.size(), 752);
    let kv = Tensor::empty_as(&gpu, &[3, 3], DType::F32, "kv", MemoryKind::Kv).unwrap();
    let after = gpu.memory_stats();
    assert_eq!(after.live.activations - before.live.activations, 752);
    assert_eq!(after.live.kv - before.live.kv, padded(36));
    assert_eq!(after.live.weights, before.live.weights);

    // A view shares the buffer: no new bytes, and the bytes stay until the view drops too.
    let view = a.view(&[2, 5]).unwrap();
    assert_eq!(gpu.memory_stats().live.activations, after.live.activations);
    drop(a);
    assert_eq!(gpu.memory_stats().live.activations, after.live.activations);
    drop(view);
    let dropped = gpu.memory_stats();
    assert_eq!(dropped.live.activations, before.live.activations);
    // The peak remembers the most that was alive.
    assert_eq!(dropped.peak.activations, after.live.activations);
    assert_eq!(dropped.peak_total, after.live.total());

    drop(kv);
    assert_eq!(gpu.memory_stats().live.kv, before.live.kv);
    gpu.memory.reset_peaks();
    let reset = gpu.memory_stats();
    assert_eq!(reset.peak, reset.live);
    assert_eq!(reset.peak_total, reset.live.total());
}

#[test]
fn weights_count_their_padded_rows_and_chunks() {
    // A binding limit of 4 KiB splits a [300, 37] f16 weight into chunks; each row holds
    // 37 halves padded to 40 (80 bytes), so 51 rows fit a chunk and 300 rows make 6 chunks.
    let gpu = gpu(GpuOptions {
        max_binding_bytes: Some(4096),
        ..Default::default()
    });
    let before = gpu.memory_stats().live.weights;
    let (n, k) = (300usize, 37usize);
    let values: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32).collect();
    let w = Weight::from_f32(&gpu, "w", n, k, &values, WeightFormat::F16)
        .unwrap()
        .with_bias(&gpu, &vec![0.5; n])
        .unwrap();
    assert!(w.chunks.len() > 1, "the forced limit must split the weight");
    let expected = (n * 40 * 2) as u64 + padded(n as u64 * 4);
    assert_eq!(gpu.memory_stats().live.weights - before, expected);
    drop(w);
    assert_eq!(gpu.memory_stats().live.weights, before);
}

#[test]
fn readback_staging_is_scratch_and_is_released() {
    let gpu = gpu(GpuOptions::default());
    let t = Tensor::from_f32(&gpu, &[10], &[1.0; 10], "t").unwrap();
    gpu.memory.reset_peaks();
    let before = gpu.memory_stats();
    assert_eq!(gpu.read_f32(&t).unwrap(), vec![1.0; 10]);
    let after = gpu.memory_stats();
    assert_eq!(after.live.scratch, before.live.scratch);
    // The staging buffer of 10 words existed during the read.
    assert_eq!(after.peak.scratch - before.live.scratch, 40);
}

/// The model tests run on (4 decoder layers, 2 KV heads of 16, 36 visual tokens), with its
/// KV cache in `kv` (F32 or F16).
fn fixture_engine_with(kv: DType) -> Engine {
    let options = EngineOptions {
        kv: Some(kv),
        ..EngineOptions::default()
    };
    Engine::load(&fixture::model_dir(), options).unwrap()
}

fn fixture_engine() -> Engine {
    fixture_engine_with(DType::F32)
}

fn generate(engine: &Engine, prune: PruneOptions, tokens: usize) -> GenerateOutput {
    let case = &fixture::cases()[1];
    let mut request = GenerateRequest::new(&case.image, &case.prompt);
    request.max_new_tokens = tokens;
    request.ignore_eos = true;
    request.prune = prune;
    engine.generate(&request, |_| {}).unwrap()
}

/// K and V of one layer holding `rows` rows of `width` f32: two buffers, each rounded to 16 bytes.
fn layer_kv_bytes(rows: usize, width: usize) -> u64 {
    layer_kv_bytes_of(rows, width, 4)
}

/// The same with `element` bytes per value (2 for the f16 cache).
fn layer_kv_bytes_of(rows: usize, width: usize, element: usize) -> u64 {
    2 * padded((rows * width * element) as u64)
}

#[test]
fn star_allocates_less_kv_than_no_pruning_by_the_dropped_rows() {
    for (kv, element) in [(DType::F32, 4), (DType::F16, 2)] {
        star_saves_kv_bytes(fixture_engine_with(kv), element);
    }
}

fn star_saves_kv_bytes(engine: Engine, element: usize) {
    let layer_kv_bytes = |rows, width| layer_kv_bytes_of(rows, width, element);
    let cfg = engine.config.text.clone();
    let (layers, width) = (
        cfg.num_hidden_layers,
        cfg.num_key_value_heads * cfg.head_dim,
    );
    let n0 = engine.config.image_tokens();
    let tokens = 4;
    let none = generate(&engine, PruneOptions::default(), tokens);
    let text_rows = none.prompt_tokens - n0;
    // Every generated token but the last is fed back and cached.
    let generated = tokens - 1;
    let want_none = layers as u64 * layer_kv_bytes(text_rows + n0 + generated, width);
    assert_eq!(none.memory.kv_cache_bytes, want_none, "unpruned KV bytes");
    assert_eq!(none.kv_cache_bytes, want_none);

    for (n1, n2, k) in [(32, 8, 2), (30, 5, 1), (35, 3, 3)] {
        let star = PruneOptions {
            method: Method::Star,
            stage1_keep: Some(n1),
            keep: Some(n2),
            stage2_layer: Some(k),
            ..Default::default()
        };
        let pruned = generate(&engine, star, tokens);
        // Layers before K hold the N1 visual rows, layers from K on only the N2 kept ones.
        let want = k as u64 * layer_kv_bytes(text_rows + n1 + generated, width)
            + (layers - k) as u64 * layer_kv_bytes(text_rows + n2 + generated, width);
        let label = format!("STAR N1={n1} N2={n2} K={k}");
        assert_eq!(pruned.memory.kv_cache_bytes, want, "{label}");
        assert_eq!(pruned.kv_cache_bytes, want, "{label}");
        assert!(pruned.memory.kv_cache_bytes < none.memory.kv_cache_bytes);
    }
}

#[test]
fn a_kv_layer_grows_keeping_its_rows() {
    let engine = fixture_engine();
    let gpu = &engine.gpu;
    let cfg = &engine.config.text;
    let width = cfg.num_key_value_heads * cfg.head_dim;
    let mut cache = KvCache::uniform(gpu, cfg, 5, DType::F32).unwrap();
    let before = gpu.memory_stats().live.kv;
    // Distinct values per element, so a misplaced row cannot pass.
    let k_rows: Vec<f32> = (0..3 * width).map(|i| i as f32 * 0.25 - 7.0).collect();
    let v_rows: Vec<f32> = (0..3 * width).map(|i| 100.0 - i as f32 * 0.5).collect();
    let layer = cfg.num_hidden_layers - 1;
    cache.layers[layer].k.write_f32(gpu, &k_rows).unwrap();
    cache.layers[layer].v.write_f32(gpu, &v_rows).unwrap();
    cache.layers[layer].len = 3;

    cache.grow_layer(gpu, layer, 11).unwrap();
    let grown = &cache.layers[layer];
    assert_eq!((grown.capacity(), grown.len), (11, 3));
    let k = gpu.read_f32(&grown.k).unwrap();
    let v = gpu.read_f32(&grown.v).unwrap();
    assert_eq!(&k[..3 * width], &k_rows[..]);
    assert_eq!(&v[..3 * width], &v_rows[..]);
    // The old buffers are gone and the new ones counted.
    assert_eq!(
        gpu.memory_stats().live.kv - before,
        layer_kv_bytes(11, width) - layer_kv_bytes(5, width)
    );
    assert_eq!(cache.allocated_bytes(), gpu.memory_stats().live.kv);

    // Shrinking below the rows held, or a layer that does not exist, is refused by name.
    let err = cache.grow_layer(gpu, layer, 2).unwrap_err().to_string();
    assert!(err.contains("capacity"), "{err}");
    let err = cache.grow_layer(gpu, 99, 20).unwrap_err().to_string();
    assert!(err.contains("layer"), "{err}");
}

/// `allocate_request` (what `llava-wgpu memory` prints) creates the buffers a real request
/// creates: the tracker sees the same KV and activation peaks when the request runs.
#[test]
fn measuring_a_request_allocates_what_running_it_allocates() {
    let engine = fixture_engine();
    let case = &fixture::cases()[1];
    let settings = [
        PruneOptions::default(),
        PruneOptions {
            method: Method::Star,
            stage1_keep: Some(30),
            keep: Some(6),
            stage2_layer: Some(2),
            ..Default::default()
        },
        PruneOptions {
            method: Method::Fastv,
            keep: Some(9),
            ..Default::default()
        },
    ];
    for prune in settings {
        let mut request = GenerateRequest::new(&case.image, &case.prompt);
        request.max_new_tokens = 5;
        request.ignore_eos = true;
        request.prune = prune.clone();
        let planned = engine.allocate_request(&request).unwrap();
        let ran = engine.generate(&request, |_| {}).unwrap();
        let label = format!("{:?}", prune.method);
        assert_eq!(planned.prompt_tokens, ran.prompt_tokens, "{label}");
        assert_eq!(planned.kv_cache_bytes, ran.kv_cache_bytes, "{label}");
        assert_eq!(planned.stats.peak.kv, ran.memory.kv_cache_bytes, "{label}");
        assert_eq!(
            planned.stats.peak.activations, ran.memory.activation_bytes,
            "{label}"
        );
        assert_eq!(planned.stats.live.weights, ran.memory.weights_bytes);
        // The planned buffers are released again.
        let after = engine.gpu.memory_stats().live;
        assert_eq!((after.kv, after.activations), (0, 0), "{label}");
    }
}
