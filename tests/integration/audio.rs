//! Speech to text through the whole gateway in embedded mode:
//! `/v1/audio/transcriptions` and `/v1/audio/translations` with the official
//! OpenAI SDK (a WAV file, streamed and not) and raw multipart uploads,
//! compared with the simulated vLLM called directly; the stream's tokens
//! counted, the request logged by route, malformed uploads refused before
//! the upstream, and an alias sent upstream as its model's name.

use crate::common::*;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use sluice_simulator::wav;

/// A form with `file` (a WAV of `millis`) and the given text fields.
fn upload(millis: u32, fields: &[(&str, &str)]) -> Form {
    let file = Part::bytes(wav(millis, 3))
        .file_name("speech.wav")
        .mime_str("audio/wav")
        .unwrap();
    fields
        .iter()
        .fold(Form::new().part("file", file), |form, (name, value)| {
            form.text(name.to_string(), value.to_string())
        })
}

/// POSTs `form` to `base` + `path` (with `key` unless empty); the status and the raw body.
async fn post_form(base: &str, path: &str, key: &str, form: Form) -> (u16, String) {
    let mut request = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .multipart(form);
    if !key.is_empty() {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// The data of each SSE event, `id` and `created` left out of JSON ones.
fn events(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|event| event.split_once("data: ").map(|(_, data)| data))
        .map(|data| match serde_json::from_str::<Value>(data) {
            Ok(value) => unnamed(value),
            Err(_) => Value::String(data.to_string()),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_sdk_transcriptions_and_translations_match_the_upstream() {
    let Some(python) = python_with_openai() else {
        return;
    };
    let gw = TestGateway::start().await;
    let result = run_sdk_script(
        &python,
        "openai_audio.py",
        &[&gw.url, &gw.sim.url(), &gw.key, MODEL],
    )
    .await;
    let scenarios = result.as_object().unwrap();
    assert_eq!(scenarios.len(), 3);
    for (name, both) in scenarios {
        assert_eq!(both["gateway"], both["upstream"], "{name}");
    }
    // 2.2 s of audio: five words, billed as three seconds.
    let transcription = &scenarios["transcription"]["gateway"];
    assert_eq!(
        transcription["text"].as_str().unwrap().split(' ').count(),
        5
    );
    assert_eq!(transcription["usage"]["type"], "duration");
    assert_eq!(transcription["usage"]["seconds"].as_f64(), Some(3.0));
    let streamed = scenarios["streamed transcription"]["gateway"]
        .as_array()
        .unwrap();
    assert_eq!(streamed.len(), 5, "one event a word: {streamed:?}");
    assert_eq!(gw.sim.received().len(), 6);
}

#[tokio::test]
async fn uploads_answer_as_vllm_does_streamed_and_not() {
    let gw = TestGateway::start().await;
    let sim = gw.sim.url();
    for (path, fields) in [
        ("/v1/audio/transcriptions", vec![("model", MODEL)]),
        (
            "/v1/audio/translations",
            vec![("model", MODEL), ("response_format", "text")],
        ),
        (
            "/v1/audio/transcriptions",
            vec![
                ("model", MODEL),
                ("stream", "true"),
                ("stream_include_usage", "true"),
            ],
        ),
        (
            "/v1/audio/translations",
            vec![("model", MODEL), ("stream", "true")],
        ),
        // vLLM's own refusals come back as vLLM words them.
        (
            "/v1/audio/transcriptions",
            vec![("model", MODEL), ("response_format", "srt")],
        ),
        (
            "/v1/audio/transcriptions",
            vec![("model", MODEL), ("stream_include_usage", "true")],
        ),
    ] {
        let (status, through) = post_form(&gw.url, path, &gw.key, upload(1200, &fields)).await;
        let (direct_status, direct) = post_form(&sim, path, "", upload(1200, &fields)).await;
        assert_eq!(status, direct_status, "{path} {fields:?}: {through}");
        match serde_json::from_str::<Value>(&through) {
            Ok(answer) => assert_eq!(
                unnamed(answer),
                unnamed(serde_json::from_str(&direct).unwrap()),
                "{path} {fields:?}"
            ),
            Err(_) => assert_eq!(events(&through), events(&direct), "{path} {fields:?}"),
        }
    }
    // A stream whose client did not ask for usage gets none, though sluice
    // asked vLLM for it (to count the tokens).
    let (_, body) = post_form(
        &gw.url,
        "/v1/audio/transcriptions",
        &gw.key,
        upload(600, &[("model", MODEL), ("stream", "true")]),
    )
    .await;
    let events = events(&body);
    assert!(
        events.iter().all(|e| e.get("usage").is_none()),
        "{events:?}"
    );
    assert_eq!(events.last().unwrap(), "[DONE]");
    let sent = gw.sim.received().last().unwrap().body.clone();
    assert_eq!(sent["stream_include_usage"], "true");
    assert_eq!(
        sent["file"],
        json!({"filename": "speech.wav", "bytes": 19244})
    );
}

#[tokio::test]
async fn a_streamed_transcription_is_counted_logged_and_limited_by_its_tokens() {
    let gw = TestGateway::start().await;
    let (status, body) = post_form(
        &gw.url,
        "/v1/audio/transcriptions",
        &gw.key,
        upload(
            2000,
            &[("model", MODEL), ("stream", "true"), ("prompt", "names")],
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let request_id = gw.sim.received()[0].request_id.clone();
    let row = eventually(std::time::Duration::from_secs(5), || async {
        gw.store.inferences_for(&request_id).await.unwrap().pop()
    })
    .await
    .expect("the request was logged");
    assert_eq!(row.route, "/v1/audio/transcriptions");
    // Four words (two seconds); the prompt "names" is 5 tokens, plus 4.
    assert_eq!(
        (row.prompt_tokens, row.completion_tokens),
        (9, 4),
        "{row:?}"
    );
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"sluice_requests_total{route="/v1/audio/transcriptions",status="2xx",transport="sse"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn malformed_uploads_are_refused_naming_the_field_without_calling_upstream() {
    let gw = TestGateway::start().await;
    let path = "/v1/audio/transcriptions";
    for (form, field) in [
        (upload(500, &[]), "`model`"),
        (Form::new().text("model", MODEL), "`file`"),
        (
            Form::new().text("model", MODEL).text("file", "not a file"),
            "`file`",
        ),
        (
            upload(500, &[("model", MODEL), ("stream", "perhaps")]),
            "`stream`",
        ),
    ] {
        let (status, body) = post_form(&gw.url, path, &gw.key, form).await;
        assert_eq!(status, 400, "{body}");
        let error: Value = serde_json::from_str(&body).unwrap();
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{message}");
    }
    let response = gw
        .http
        .post(format!("{}{path}", gw.url))
        .bearer_auth(&gw.key)
        .json(&json!({"model": MODEL, "file": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("multipart/form-data"),
        "{error}"
    );
    assert!(gw.sim.received().is_empty());
}

#[tokio::test]
async fn an_upload_to_an_alias_goes_upstream_as_its_models_name() {
    use sluice::config::{Balance, ModelConfig};
    let gw = TestGateway::start_with(sim_config(), |c| {
        c.models = vec![ModelConfig {
            name: MODEL.into(),
            aliases: vec!["speech".into()],
            endpoints: c.upstream.urls.clone(),
            upstream_model: None,
            balance: Balance::RoundRobin,
            continue_streams: true,
            capacity: None,
        }];
    })
    .await;
    let (status, body) = post_form(
        &gw.url,
        "/v1/audio/transcriptions",
        &gw.key,
        upload(700, &[("model", "speech"), ("language", "en")]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let sent = &gw.sim.received()[0].body;
    assert_eq!(sent["model"], MODEL);
    assert_eq!(sent["language"], "en");
    assert_eq!(sent["file"]["bytes"], 22444);
}

#[tokio::test]
async fn a_client_that_leaves_a_streamed_transcription_stops_it_upstream() {
    let slow = sluice_simulator::SimulatorConfig {
        token_delay: std::time::Duration::from_millis(300),
        ..sim_config()
    };
    let gw = TestGateway::start_with(slow, |c| {
        c.resume.grace = std::time::Duration::from_millis(100)
    })
    .await;
    let form = upload(5000, &[("model", MODEL), ("stream", "true")]);
    let response = reqwest::Client::new()
        .post(format!("{}/v1/audio/transcriptions", gw.url))
        .bearer_auth(&gw.key)
        .multipart(form)
        .send()
        .await
        .unwrap();
    let mut stream = SseReader::new(response);
    let first = stream.next().await.expect("a first word");
    assert!(first.contains("transcription.chunk"), "{first}");
    drop(stream);
    let id = gw.sim.received()[0].request_id.clone();
    assert!(
        gw.sim
            .wait_for_abort(&id, std::time::Duration::from_secs(3))
            .await,
        "the upstream stream was dropped with its client"
    );
}
