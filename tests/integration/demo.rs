//! `sluice demo`, as the README's first command runs it: a gateway in front
//! of a simulated vLLM that answers, and that leaves nothing behind on Ctrl-C.

use std::io::{BufRead, BufReader};
use std::time::Duration;

use serde_json::{Value, json};

#[tokio::test]
async fn the_demo_answers_and_leaves_no_files_behind_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let mut demo = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["demo", "--listen", "127.0.0.1:0", "--token-delay-ms", "1"])
        .current_dir(dir.path())
        .env("TMPDIR", dir.path())
        .env("SLUICE_LOG__LEVEL", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut url = None;
    let mut key = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("sluice demo: gateway on ") {
            url = rest.split(',').next().map(String::from);
        }
        if let Some(secret) = line.strip_prefix("demo API key (shown once): ") {
            key = Some(secret.to_string());
            break;
        }
    }
    let (url, key) = (
        url.expect("the demo's address"),
        key.expect("the demo's key"),
    );
    let answer: Value = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "sim-llama", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["object"], "chat.completion", "{answer}");
    // The banner's embeddings example answers too.
    let embedded: Value = reqwest::Client::new()
        .post(format!("{url}/v1/embeddings"))
        .bearer_auth(&key)
        .json(&json!({"model": "sim-llama", "input": ["the river", "the sea"], "dimensions": 8}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        embedded["data"][1]["embedding"].as_array().map(Vec::len),
        Some(8),
        "{embedded}"
    );
    // Its inference-log row is written (the SQLite write-ahead log grows).
    tokio::time::sleep(Duration::from_millis(300)).await;

    let interrupted = std::process::Command::new("kill")
        .args(["-INT", &demo.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let status = demo.wait().unwrap();
    assert!(status.success(), "{status}");
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("sluice-demo"))
        .collect();
    assert!(left.is_empty(), "the demo left {left:?}");
}
