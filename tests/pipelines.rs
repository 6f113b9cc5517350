//! `Engine::load` compiles every compute pipeline a request can record, so no request (pruned or
//! not, greedy or sampled on the host) pays a shader compile: the pipeline cache's miss counter
//! does not move across requests of every method.

mod fixture;

use llava_wgpu::prune::{Method, PruneOptions, Stage1Score};
use llava_wgpu::sample::SamplingParams;
use llava_wgpu::{Engine, EngineOptions, GenerateRequest};

fn requests() -> Vec<(&'static str, GenerateRequest)> {
    let case = &fixture::cases()[1];
    let base = |prune: PruneOptions| {
        let mut r = GenerateRequest::new(&case.image, &case.prompt);
        r.max_new_tokens = 3;
        r.prune = prune;
        r
    };
    let method = |method: Method, keep: usize| PruneOptions {
        method,
        keep: Some(keep),
        ..Default::default()
    };
    let mut sampled = base(PruneOptions::default());
    sampled.sampling = SamplingParams {
        temperature: 0.8,
        top_p: 0.9,
        seed: 3,
    };
    sampled.logprobs = Some(2);
    vec![
        (
            "star",
            base(PruneOptions {
                stage1_keep: Some(32),
                stage2_layer: Some(2),
                ..method(Method::Star, 7)
            }),
        ),
        ("fastv", base(method(Method::Fastv, 7))),
        (
            "star cls",
            base(PruneOptions {
                stage1_score: Some(Stage1Score::Cls),
                ..method(Method::Star, 7)
            }),
        ),
        ("fastervlm", base(method(Method::Fastervlm, 9))),
        ("vispruner", base(method(Method::Vispruner, 9))),
        ("random", base(method(Method::Random, 9))),
        ("dart", base(method(Method::Dart, 9))),
        ("divprune", base(method(Method::Divprune, 9))),
        (
            "adaptive",
            base(PruneOptions {
                keep_mass: Some(0.5),
                stage1_keep_mass: Some(0.9),
                ..method(Method::Star, 9)
            }),
        ),
        (
            "vispruner attention",
            base(PruneOptions {
                stage1_score: Some(Stage1Score::Attention),
                ..method(Method::Vispruner, 9)
            }),
        ),
        ("none", base(PruneOptions::default())),
        ("host sampling", sampled),
    ]
}

#[test]
fn no_request_compiles_a_pipeline_after_load() {
    let engine = Engine::load(&fixture::model_dir(), EngineOptions::default()).unwrap();
    let at_load = engine.gpu.pipelines_compiled();
    assert!(at_load > 0, "{at_load} pipelines at load");
    for (label, request) in requests() {
        engine.generate(&request, |_| {}).unwrap();
        let now = engine.gpu.pipelines_compiled();
        assert_eq!(
            now - at_load,
            0,
            "the {label} request compiled {} pipelines",
            now - at_load
        );
    }
}
