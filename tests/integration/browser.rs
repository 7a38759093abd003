//! A web page on another origin, in headless Chromium, uses the gateway as a
//! browser app would: a streamed completion over `fetch()` with the key in
//! the `Authorization` header (CORS preflight included), a WebSocket with the
//! key as a subprotocol that it closes cleanly, and a WebSocket with a wrong
//! key whose refusal it can read. The test reads what the page rendered,
//! through the Chrome DevTools protocol.
//!
//! Needs Debian's `chromium` (`scripts/test.sh` installs it); without it the
//! test is skipped, except under CI or `SLUICE_REQUIRE_SERVICES`, where it fails.

use crate::common::chromium::Browser;
use crate::common::*;
use serde_json::Value;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_on_another_origin_streams_over_fetch_and_websocket() {
    let Some(mut browser) = Browser::start().await else {
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

    browser
        .call("Page.navigate", serde_json::json!({"url": page}))
        .await;
    let rendered = browser
        .wait_for(
            "document.getElementById('result').textContent",
            "the page's result",
        )
        .await;
    browser.close().await;
    let result: Value = serde_json::from_str(rendered.as_str().unwrap()).unwrap();
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
