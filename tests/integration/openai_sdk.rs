//! The official OpenAI Python SDK, pointed at sluice with `base_url`: a
//! streaming and a non-streaming `completions.create` call, and every form of
//! `chat.completions.create` compared with the upstream's own answers.
//!
//! Needs a Python with the `openai` package: `$SLUICE_PYTHON`, else `python3`.
//! The test command (`scripts/test.sh`) provides one. Outside CI the test is
//! skipped with a message when none is available; with `CI` set it fails.

use crate::common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn openai_python_sdk_streams_and_completes() {
    let Some(python) = python_with_openai() else {
        return;
    };
    let gw = TestGateway::start().await;
    let result = run_sdk_script(&python, "openai_sdk.py", &[&gw.url, &gw.key, MODEL]).await;
    let expected = gw.sim.expected_texts(
        &json!({"model": MODEL, "prompt": "The river flows", "max_tokens": 6, "seed": 1}),
    );
    assert_eq!(result["text"], expected[0]);
    assert_eq!(result["streamed"], expected[0]);
    assert_eq!(result["finish_reason"], "length");
    assert_eq!(result["completion_tokens"], 6);
    assert_eq!(result["stream_usage"], 6);
    assert_eq!(result["auth_error"], 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_python_sdk_chat_matches_the_upstream_field_by_field() {
    let Some(python) = python_with_openai() else {
        return;
    };
    let gw = TestGateway::start().await;
    assert_openai_chat_matches_upstream(&python, &gw.url, &gw.sim.url(), &gw.key).await;
}
