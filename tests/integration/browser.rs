//! A web page on another origin, in headless Chromium, uses the gateway as a
//! browser app would: a streamed completion over `fetch()` with the key in
//! the `Authorization` header (CORS preflight included), a WebSocket with the
//! key as a subprotocol that it closes cleanly, and a WebSocket with a wrong
//! key whose refusal it can read. The test reads what the page rendered,
//! through the Chrome DevTools protocol.
//!
//! Needs Debian's `chromium` (`scripts/test.sh` installs it); without it the
//! test is skipped, except under CI or `SLUICE_REQUIRE_SERVICES`, where it fails.

use std::time::Duration;

use crate::common::*;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const PAGE: &str = r#"<!doctype html>
<html><body><pre id="result"></pre><script>
const gateway = new URL(location.href).searchParams.get("gateway");
const key = new URL(location.href).searchParams.get("key");
const result = {};
const body = JSON.stringify({model: "sim-llama", prompt: "browser", max_tokens: 3, stream: true});

async function viaFetch() {
  const response = await fetch(gateway + "/v1/completions", {
    method: "POST",
    headers: {"Authorization": "Bearer " + key, "Content-Type": "application/json"},
    body,
  });
  result.fetch_status = response.status;
  result.fetch_request_id = response.headers.get("x-request-id");
  const reader = response.body.getReader();
  let text = "";
  for (;;) {
    const {done, value} = await reader.read();
    if (done) break;
    text += new TextDecoder().decode(value);
  }
  result.fetch_events = text.split("\n\n").filter(e => e.includes("data: ")).length;
}

function viaSocket(protocols) {
  return new Promise(resolve => {
    const frames = [];
    const ws = new WebSocket(gateway.replace("http", "ws") + "/v1/completions", protocols);
    ws.onopen = () => ws.send(body);
    ws.onmessage = event => {
      frames.push(event.data);
      if (event.data === "[DONE]") ws.close(1000, "done");
    };
    ws.onclose = event => resolve({frames, code: event.code, clean: event.wasClean});
    ws.onerror = () => {};
  });
}

(async () => {
  try {
    await viaFetch();
    const good = await viaSocket(["sluice", "sluice-key." + key]);
    result.ws_frames = good.frames.length;
    result.ws_close = good.code;
    result.ws_clean = good.clean;
    const bad = await viaSocket(["sluice", "sluice-key.sk-sluice-wrong"]);
    result.refused_error = JSON.parse(bad.frames[0]).error.code;
    result.refused_close = bad.code;
  } catch (err) {
    result.error = String(err);
  }
  document.getElementById("result").textContent = JSON.stringify(result);
})();
</script></body></html>"#;

/// Chromium from Debian's package, if installed.
fn chromium() -> Option<String> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|path| std::path::Path::new(path).exists())
        .map(String::from)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_on_another_origin_streams_over_fetch_and_websocket() {
    let Some(chromium) = chromium() else {
        assert!(
            std::env::var_os("CI").is_none()
                && std::env::var_os("SLUICE_REQUIRE_SERVICES").is_none(),
            "chromium is not installed (scripts/test.sh installs it)"
        );
        eprintln!("skipped: no chromium");
        return;
    };
    let gw = TestGateway::start().await;

    // The page's own origin: another port.
    let site = axum::Router::new().route(
        "/",
        axum::routing::get(|| async { axum::response::Html(PAGE) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let site_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, site).await });
    let page = format!("{site_url}/?gateway={}&key={}", gw.url, gw.key);

    let profile = tempfile::tempdir().unwrap();
    let mut browser = tokio::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromium starts");

    // Chromium writes the port it chose into the profile.
    let port = eventually(Duration::from_secs(30), || async {
        let text = std::fs::read_to_string(profile.path().join("DevToolsActivePort")).ok()?;
        text.lines().next()?.trim().parse::<u16>().ok()
    })
    .await
    .expect("chromium's DevTools port");
    let targets: Value = eventually(Duration::from_secs(10), || async {
        let response = reqwest::get(format!("http://127.0.0.1:{port}/json/list"))
            .await
            .ok()?;
        response.json().await.ok()
    })
    .await
    .expect("DevTools targets");
    let debugger = targets
        .as_array()
        .and_then(|t| t.iter().find(|t| t["type"] == "page"))
        .and_then(|t| t["webSocketDebuggerUrl"].as_str())
        .expect("a page target")
        .to_string();
    let (mut devtools, _) = tokio_tungstenite::connect_async(debugger).await.unwrap();
    let mut next_id = 0;
    let mut call = async |method: &str, params: Value| -> Value {
        next_id += 1;
        let id = next_id;
        let message = json!({"id": id, "method": method, "params": params}).to_string();
        devtools.send(Message::Text(message.into())).await.unwrap();
        loop {
            let Some(Ok(Message::Text(text))) = devtools.next().await else {
                panic!("DevTools connection lost")
            };
            let reply: Value = serde_json::from_str(text.as_str()).unwrap();
            if reply["id"] == id {
                return reply;
            }
        }
    };
    call("Page.navigate", json!({"url": page})).await;
    let mut rendered = None;
    for _ in 0..100 {
        let reply = call(
            "Runtime.evaluate",
            json!({"expression": "document.getElementById('result') ? document.getElementById('result').textContent : ''", "returnByValue": true}),
        )
        .await;
        let text = reply["result"]["result"]["value"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if !text.is_empty() {
            rendered = Some(text);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = browser.kill().await;
    let rendered = rendered.expect("the page rendered no result in 20 s");
    let result: Value = serde_json::from_str(&rendered).unwrap();
    eprintln!("the page rendered {result}");
    assert!(result.get("error").is_none(), "{result}");
    assert_eq!(result["fetch_status"], 200, "{result}");
    assert!(
        result["fetch_request_id"].is_string(),
        "x-request-id readable: {result}"
    );
    assert_eq!(
        result["fetch_events"], 4,
        "three chunks and [DONE]: {result}"
    );
    assert_eq!(result["ws_frames"], 4, "{result}");
    assert_eq!(result["ws_close"], 1000, "{result}");
    assert_eq!(result["ws_clean"], true, "a clean close: {result}");
    assert_eq!(result["refused_error"], 401, "{result}");
    assert_eq!(result["refused_close"], 4401, "{result}");
    gw.stop().await;
}
