//! The official OpenAI Python SDK, pointed at sluice with `base_url`, completes
//! a streaming and a non-streaming `completions.create` call.
//!
//! Needs a Python with the `openai` package: `$SLUICE_PYTHON`, else `python3`.
//! The test command (`scripts/test.sh`) provides one. Outside CI the test is
//! skipped with a message when none is available; with `CI` set it fails.

mod common;

use common::*;
use serde_json::{Value, json};

fn python() -> Option<String> {
    let candidate = std::env::var("SLUICE_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = std::process::Command::new(&candidate)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(candidate)
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_python_sdk_streams_and_completes() {
    let Some(python) = python() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but no Python with the openai package was found (set SLUICE_PYTHON)"
        );
        eprintln!(
            "SKIPPED: no Python with the openai package; run scripts/test.sh or set SLUICE_PYTHON"
        );
        return;
    };
    let gw = TestGateway::start().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_sdk.py");
    let output = tokio::process::Command::new(python)
        .args([script, &gw.url, &gw.key, MODEL])
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "SDK script failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_slice(&output.stdout).unwrap();
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
