//! The replayed decode loop end to end: the embedding table on the GPU (the greedy id feeds the
//! next step without the host) against the host-fed loop (`--host-embeddings`), greedy and
//! sampled, for the same tokens and for the table's bytes. The kernels it is made of are checked
//! one by one in `decode.rs`.

mod fixture;

/// The replayed decode loop gives the same tokens and log-probabilities whether the next
/// token's row is gathered on the GPU (greedy ids never leave it before the next step) or
/// written by the host, greedy and sampled on the host, over 12 tokens past EOS; and the host
/// variant holds exactly the table's buffers fewer weight bytes.
#[test]
fn embeddings_on_the_gpu_decode_as_the_host_fed_loop() {
    use llava_wgpu::sample::SamplingParams;
    use llava_wgpu::{Engine, EngineOptions, GenerateRequest};
    let dir = fixture::model_dir();
    let on_gpu = Engine::load(&dir, EngineOptions::default()).unwrap();
    let host = EngineOptions {
        host_embeddings: true,
        ..EngineOptions::default()
    };
    let on_host = Engine::load(&dir, host).unwrap();
    let table = on_gpu
        .llama
        .embed_tokens
        .as_ref()
        .expect("the table is on the GPU");
    assert!(on_host.llama.embed_tokens.is_none());
    let table_bytes: u64 = table.chunks.iter().map(|c| c.buffer.size()).sum();
    let case = &fixture::cases()[1];
    let mut request = GenerateRequest::new(&case.image, &case.prompt);
    request.max_new_tokens = 12;
    request.ignore_eos = true;
    let mut sampled = request.clone();
    sampled.sampling = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        seed: 11,
    };
    sampled.logprobs = Some(3);
    for (label, r) in [("greedy", &request), ("sampled", &sampled)] {
        let a = on_gpu.generate(r, |_| {}).unwrap();
        let b = on_host.generate(r, |_| {}).unwrap();
        assert_eq!(a.generated_ids, b.generated_ids, "{label}");
        assert_eq!(a.generated_ids.len(), 12, "{label}");
        assert_eq!(a.text, b.text, "{label}");
        assert_eq!(
            serde_json::to_string(&a.logprobs).unwrap(),
            serde_json::to_string(&b.logprobs).unwrap(),
            "{label}"
        );
        assert_eq!(a.memory.weights_bytes - b.memory.weights_bytes, table_bytes);
    }
}
