//! `eval` and the server run unchanged on a LLaVA-NeXT model (the tiny random fixture): the
//! server's answer equals `Engine::generate` with the model's own prompt format, and eval's rows
//! at a 100% budget equal the unpruned row.

mod next_fixture;

use base64::Engine as _;
use serde_json::{json, Value};

use llava_wgpu::harness::eval;
use llava_wgpu::prune::{Method, PruneOptions};
use llava_wgpu::serve::{ServeOptions, Server};
use llava_wgpu::text::Template;
use llava_wgpu::{Engine, EngineOptions, GenerateRequest};

use next_fixture::{MISTRAL, VICUNA};

fn engine(variant: &str) -> Engine {
    Engine::load(&next_fixture::model_dir(variant), EngineOptions::default()).unwrap()
}

#[test]
fn the_server_answers_a_next_model_as_generate_does() {
    let case = &next_fixture::cases(MISTRAL)[1];
    let reference = engine(MISTRAL);
    assert_eq!(reference.config.default_template(), Template::MistralInst);
    let mut request = GenerateRequest::new(&case.image, &case.prompt);
    request.template = Template::MistralInst;
    request.max_new_tokens = 4;
    request.prune = PruneOptions {
        method: Method::Star,
        keep: Some(9),
        ..Default::default()
    };
    let want = reference.generate(&request, |_| {}).unwrap();

    let options = ServeOptions {
        port: 0,
        ..ServeOptions::default()
    };
    let server = Server::start(engine(MISTRAL), options).unwrap();
    let image =
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(&case.image).unwrap());
    let body = json!({
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{image}")}},
            {"type": "text", "text": case.prompt},
        ]}],
        "max_tokens": 4,
        "prune": {"method": "star", "keep": 9},
    });
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(300)))
        .build()
        .into();
    let mut response = agent
        .post(&format!("http://{}/v1/chat/completions", server.addr))
        .header("Content-Type", "application/json")
        .send(&body.to_string())
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let answer: Value =
        serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
    server.shutdown().unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], json!(want.text));
    assert_eq!(answer["usage"]["prompt_tokens"], json!(want.prompt_tokens));
    assert_eq!(
        answer["visual_tokens"]["after_stage2"],
        json!(want.visual_tokens.after_stage2)
    );
}

#[test]
fn eval_runs_every_method_on_a_next_model() {
    let engine = engine(VICUNA);
    let cases = next_fixture::cases(VICUNA);
    let dir = std::env::temp_dir().join(format!("llava-wgpu-next-eval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The expected answers are what the unpruned model says (two tokens), so the unpruned row
    // scores every question.
    let mut lines = String::new();
    for case in cases.iter().take(2) {
        let mut request = GenerateRequest::new(&case.image, &case.prompt);
        request.template = Template::VicunaV1;
        request.max_new_tokens = 2;
        let answer = engine.generate(&request, |_| {}).unwrap().text;
        let line = json!({"image": case.image, "question": case.prompt, "answer": answer});
        lines.push_str(&format!("{line}\n"));
    }
    let path = dir.join("questions.jsonl");
    std::fs::write(&path, lines).unwrap();
    let examples = eval::read_jsonl(&path).unwrap();
    let report = eval::run(&engine, "next", &examples, 2, |_| {}).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(report.rows[0].outcomes, "11", "the unpruned row");
    for row in &report.rows {
        if row.budget == 1.0 && row.method != "random" {
            assert_eq!(row.outcomes, "11", "{} keeping every token", row.method);
        }
    }
}
