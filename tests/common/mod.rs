//! Test harness: a gateway on port 0 in front of a simulated vLLM, with a
//! fresh SQLite file and a fresh API key, plus small SSE and WebSocket clients.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sluice::backends::store::Store;
use sluice::config::{Config, StoreConfig};
use sluice::protocol::sse::SseParser;
use sluice_simulator::{Simulator, SimulatorConfig};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

/// A client WebSocket to the gateway.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub const MODEL: &str = "sim-llama";

pub struct TestGateway {
    pub url: String,
    /// The admin API's base URL, when `admin.listen` is configured.
    pub admin_url: Option<String>,
    pub key: String,
    pub key_id: String,
    pub sim: Simulator,
    pub store: Arc<dyn Store>,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

/// Defaults for tests: fast tokens, small timeouts.
pub fn sim_config() -> SimulatorConfig {
    SimulatorConfig {
        token_delay: Duration::from_millis(2),
        first_token_delay: Duration::from_millis(5),
        ..SimulatorConfig::default()
    }
}

impl TestGateway {
    pub async fn start() -> Self {
        Self::start_with(sim_config(), |_| {}).await
    }

    pub async fn start_with(sim: SimulatorConfig, customize: impl FnOnce(&mut Config)) -> Self {
        let sim = Simulator::start(sim).await.expect("simulator starts");
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config::default();
        config.store = StoreConfig {
            url: format!("sqlite://{}", dir.path().join("sluice.db").display()).into(),
            ..config.store
        };
        config.upstream.urls = vec![sim.url().parse().unwrap()];
        config.server.shutdown_grace = Duration::from_secs(2);
        // Most tests send unseeded prompts and expect them cached; the tests
        // of `cache.sampled` itself turn it off.
        config.cache.sampled = true;
        customize(&mut config);
        Self::start_on(sim, dir, config).await
    }

    /// A gateway with exactly this config (for production backends).
    pub async fn start_config(sim: Simulator, config: Config) -> Self {
        Self::start_on(sim, tempfile::tempdir().unwrap(), config).await
    }

    async fn start_on(sim: Simulator, dir: tempfile::TempDir, config: Config) -> Self {
        capture_logs();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gateway = sluice::Gateway::start(config)
            .await
            .expect("gateway starts");
        let admin_url = gateway.admin_addr().map(|addr| format!("http://{addr}"));
        let store = gateway.store();
        let name = format!("test-{}", uuid::Uuid::new_v4().simple());
        let key = sluice::tenancy::keys::create_key(store.as_ref(), &name)
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let server = tokio::spawn(gateway.serve(listener, async move { stop.cancelled().await }));
        Self {
            url: format!("http://{addr}"),
            admin_url,
            key: key.secret,
            key_id: key.id,
            sim,
            store,
            http: reqwest::Client::new(),
            shutdown,
            server: Some(server),
            _dir: dir,
        }
    }

    /// A WebSocket to `/v1/completions` with the test key in `Authorization`.
    #[allow(dead_code)] // not every test binary opens one
    pub async fn ws(&self) -> Ws {
        self.ws_to(&self.ws_url()).await
    }

    /// A WebSocket to `url` with the test key in `Authorization`.
    async fn ws_to(&self, url: &str) -> Ws {
        let mut request = url.into_client_request().unwrap();
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {}", self.key).parse().unwrap(),
        );
        tokio_tungstenite::connect_async(request).await.unwrap().0
    }

    pub fn completions_url(&self) -> String {
        format!("{}/v1/completions", self.url)
    }

    pub fn ws_url(&self) -> String {
        format!("{}/v1/completions", self.url.replacen("http", "ws", 1))
    }

    pub fn chat_url(&self) -> String {
        format!("{}/v1/chat/completions", self.url)
    }

    /// A WebSocket to `/v1/chat/completions` with the test key in `Authorization`.
    pub async fn chat_ws(&self) -> Ws {
        let url = format!("{}/v1/chat/completions", self.url.replacen("http", "ws", 1));
        self.ws_to(&url).await
    }

    /// The ids `GET /v1/models` lists for `key`.
    pub async fn model_ids(&self, key: &str) -> Vec<String> {
        let list: Value = self
            .http
            .get(format!("{}/v1/models", self.url))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    }

    pub async fn post_chat(&self, body: &Value) -> reqwest::Response {
        self.post_to(&self.chat_url(), body).await
    }

    pub async fn post(&self, body: &Value) -> reqwest::Response {
        self.post_to(&self.completions_url(), body).await
    }

    async fn post_to(&self, url: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(url)
            .bearer_auth(&self.key)
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    /// Stops the server and waits for it (and its inference-log writer) to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
        }
    }

    /// Waits until `count` responses in all have been stored in the cache, so
    /// that an identical request is a hit from now on.
    pub async fn wait_cached(&self, count: u32) {
        let stored = eventually(Duration::from_secs(10), || async {
            let metrics = self.metrics().await;
            let stored = metric(&metrics, r#"sluice_cache_stores_total{result="stored"}"#);
            (stored.unwrap_or(0.0) >= f64::from(count)).then_some(())
        })
        .await;
        assert!(
            stored.is_some(),
            "{count} responses were not cached in 10 s"
        );
    }

    /// Sends `body` until the gateway answers it without calling the upstream
    /// (a cache hit); false if that does not happen within `timeout`.
    pub async fn until_hit(&self, body: &Value, timeout: Duration) -> bool {
        eventually(timeout, || async {
            let before = self.sim.received().len();
            sse_events(self.post(body).await).await;
            (self.sim.received().len() == before).then_some(())
        })
        .await
        .is_some()
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The Prometheus text a process serves at `{base_url}/metrics`, if it answers.
pub async fn scrape_metrics(base_url: &str) -> Option<String> {
    reqwest::get(format!("{base_url}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// The value of one series (`name{labels}`) in a Prometheus text exposition.
pub fn metric(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.parse().ok())
}

/// Reads a whole SSE response into its `data:` payloads (including `[DONE]`).
pub async fn sse_events(response: reqwest::Response) -> Vec<String> {
    let mut reader = SseReader::new(response);
    let mut events = Vec::new();
    while let Some(event) = reader.next().await {
        events.push(event);
    }
    events
}

pub struct SseReader {
    response: reqwest::Response,
    parser: SseParser,
}

impl SseReader {
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            response,
            parser: SseParser::new(),
        }
    }

    pub async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(event) = self.parser.next_event() {
                return Some(String::from_utf8(event.chunk.payload().to_vec()).unwrap());
            }
            match self.response.chunk().await {
                Ok(Some(bytes)) => self.parser.push(&bytes),
                _ => return None,
            }
        }
    }
}

/// The concatenated text per choice index of a list of chunk payloads.
pub fn texts(events: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for event in events {
        let Ok(value) = serde_json::from_str::<Value>(event) else {
            continue;
        };
        for choice in value["choices"].as_array().into_iter().flatten() {
            let index = choice["index"].as_u64().unwrap() as usize;
            if out.len() <= index {
                out.resize(index + 1, String::new());
            }
            let text = choice["text"]
                .as_str()
                .or(choice["delta"]["content"].as_str());
            out[index].push_str(text.unwrap_or_default());
        }
    }
    out
}

pub fn request_id(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("x-request-id")
        .expect("x-request-id header")
        .to_str()
        .unwrap()
        .to_string()
}

/// Polls `check` every 20 ms until it returns Some or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `body` straight to the simulator, as the gateway's worker would, with the same request id.
pub async fn direct(sim: &Simulator, body: &Value, request_id: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/v1/completions", sim.url()))
        .header("x-request-id", request_id)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Sends a chat `body` straight to the simulator, with the same request id.
pub async fn direct_chat(sim: &Simulator, body: &Value, request_id: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", sim.url()))
        .header("x-request-id", request_id)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// A Python with the `openai` package: `$SLUICE_PYTHON`, else `python3`.
/// `None` (the test skips with a message) only outside CI; with `CI` set a
/// missing one fails the test.
pub fn python_with_openai() -> Option<String> {
    python_with("openai")
}

/// A Python with the `anthropic` package, as [`python_with_openai`].
pub fn python_with_anthropic() -> Option<String> {
    python_with("anthropic")
}

/// An SSE body without its `id:` lines (the ids a client resumes a stream
/// by), to compare with what vLLM itself sends.
#[allow(dead_code)] // used by the integration tests only
pub fn without_ids(body: &str) -> String {
    body.split_inclusive('\n')
        .filter(|line| !line.starts_with("id: "))
        .collect()
}

/// The response object of a Responses API answer: the JSON body, or the
/// `response` of a stream's `response.completed` event.
#[allow(dead_code)] // used by the integration tests only
pub fn response_object(body: &str) -> Value {
    if !body.contains("event: ") {
        return serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    }
    let completed = body
        .split("\n\n")
        .find(|e| e.contains("event: response.completed\n"))
        .unwrap_or_else(|| panic!("the stream completes: {body}"));
    let data: Value = serde_json::from_str(completed.split_once("data: ").unwrap().1).unwrap();
    data["response"].clone()
}

/// A Python with the OpenAI Agents SDK (`agents`), as [`python_with_openai`].
#[allow(dead_code)] // used by the integration tests only
pub fn python_with_agents() -> Option<String> {
    python_with("agents")
}

fn python_with(package: &str) -> Option<String> {
    let candidate = std::env::var("SLUICE_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = std::process::Command::new(&candidate)
        .args(["-c", &format!("import {package}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(candidate);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI is set but no Python with the {package} package was found (set SLUICE_PYTHON)"
    );
    eprintln!(
        "SKIPPED: no Python with the {package} package; run scripts/test.sh or set SLUICE_PYTHON"
    );
    None
}

/// Runs the Python script `tests/<script>` with `args`; the JSON it prints.
pub async fn run_sdk_script(python: &str, script: &str, args: &[&str]) -> Value {
    let path = format!("{}/tests/{script}", env!("CARGO_MANIFEST_DIR"));
    let output = tokio::process::Command::new(python)
        .arg(path)
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Runs `tests/openai_chat.py` (the OpenAI SDK's `chat.completions` through
/// the gateway and straight to the upstream) and checks that every scenario
/// came back the same both ways, field by field.
pub async fn assert_openai_chat_matches_upstream(
    python: &str,
    gateway_url: &str,
    upstream_url: &str,
    key: &str,
) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_chat.py");
    let output = tokio::process::Command::new(python)
        .args([script, gateway_url, upstream_url, key, MODEL])
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "SDK script failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_slice(&output.stdout).unwrap();
    let scenarios = result.as_object().unwrap();
    let mut compared = 0;
    for (name, outcome) in scenarios {
        if let Some(both) = outcome.as_object().filter(|o| o.contains_key("gateway")) {
            assert_eq!(both["gateway"], both["direct"], "{name}");
            compared += 1;
        }
    }
    assert_eq!(compared, 10, "5 scenarios, streamed and not");
    // What the scenarios hold, so the comparison is not of two empty answers.
    let tool = &result["tool_call/json"]["gateway"]["choices"][0];
    assert_eq!(tool["finish_reason"], "tool_calls");
    assert_eq!(
        tool["message"]["tool_calls"][0]["function"]["name"],
        "get_weather"
    );
    let arguments: Value = serde_json::from_str(
        tool["message"]["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(arguments["query"], "What is the weather in Oslo");
    let pieces = result["tool_call/stream"]["gateway"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| !c["choices"][0]["delta"]["tool_calls"].is_null())
        .count();
    assert!(pieces > 3, "the tool call streams in pieces ({pieces})");
    let n2 = &result["n2_logprobs/json"]["gateway"];
    assert_eq!(n2["choices"].as_array().unwrap().len(), 2);
    assert_eq!(
        n2["choices"][1]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    let streamed = result["plain/stream"]["gateway"].as_array().unwrap();
    assert_eq!(streamed[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = &streamed.last().unwrap()["usage"];
    assert_eq!(
        usage["completion_tokens"], 6,
        "the usage chunk the client asked for"
    );
    let text: String = streamed
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        Some(text.as_str()),
        result["plain/json"]["gateway"]["choices"][0]["message"]["content"].as_str()
    );
    assert_eq!(
        result["tool_result/json"]["gateway"]["choices"][0]["finish_reason"],
        "length"
    );
    assert_eq!(result["unknown_model"], 404);
    assert!(
        result["bad_role"]
            .as_str()
            .unwrap()
            .contains("messages[0].role"),
        "{}",
        result["bad_role"]
    );
    assert_eq!(result["models"], serde_json::json!([MODEL]));
}

/// A chunk payload without `created` (which differs between two calls a second apart).
pub fn without_created(event: &str) -> Value {
    let mut value: Value = serde_json::from_str(event).unwrap_or(Value::String(event.to_string()));
    if let Some(object) = value.as_object_mut() {
        object.remove("created");
    }
    value
}

/// POSTs `body` as JSON with `key` as the bearer token (none sent when
/// empty: the simulator called directly); returns the status and the JSON
/// answer (`null` when there is none).
pub async fn post_json(http: &reqwest::Client, url: &str, key: &str, body: &Value) -> (u16, Value) {
    let mut request = http.post(url).json(body);
    if !key.is_empty() {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// An answer without the fields that name one call (`id`, `created`): the
/// same request sent twice, or once through the gateway and once directly,
/// compares equal.
pub fn unnamed(mut answer: Value) -> Value {
    if let Some(fields) = answer.as_object_mut() {
        fields.remove("id");
        fields.remove("created");
    }
    answer
}

pub mod chromium;
pub mod processes;
pub mod services;

// Not every test binary that includes this harness starts processes.
#[allow(unused_imports)]
pub use processes::{Isolated, SimulatorProcess};

/// A completion sent as `key`, as a client sends it.
pub async fn post_as(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    body: Value,
) -> reqwest::Response {
    http.post(format!("{url}/v1/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// A new key with `patch`'s limits, team and expiry, made as the command
/// line makes it (and audited as such): its secret.
pub async fn new_key(
    store: &dyn Store,
    name: &str,
    patch: &sluice::tenancy::tenants::KeyPatch,
) -> String {
    let actor = sluice::tenancy::audit::Actor::cli();
    sluice::tenancy::tenants::create_key(store, &actor, name, patch, None)
        .await
        .unwrap()
        .secret
}

/// The path of a built example plugin (`plugins/wasm/<name>.wasm`), building
/// the plugins first (scripts/build-plugins.sh) if they are missing.
pub fn plugin_wasm(name: &str) -> std::path::PathBuf {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("plugins/wasm").join(format!("{name}.wasm"));
    if !path.exists() {
        BUILT.get_or_init(|| {
            let status = std::process::Command::new(root.join("scripts/build-plugins.sh"))
                .status()
                .expect("run scripts/build-plugins.sh");
            assert!(status.success(), "building the plugins failed");
        });
    }
    assert!(
        path.exists(),
        "{} is missing after building the plugins",
        path.display()
    );
    path
}

/// A `[[plugins]]` entry for `config`.
pub fn plugin(
    name: &str,
    wasm: &str,
    on_error: sluice::config::OnError,
    config: Value,
) -> sluice::config::PluginConfig {
    sluice::config::PluginConfig {
        name: name.to_string(),
        path: plugin_wasm(wasm),
        on_error,
        max_memory_bytes: 16 * 1024 * 1024,
        timeout: Duration::from_millis(50),
        keys: Vec::new(),
        config_json: config.to_string(),
    }
}

/// Reads frames from a WebSocket until `[DONE]`.
pub async fn ws_frames<S>(ws: &mut S) -> Vec<String>
where
    S: futures::Stream<Item = Result<tungstenite::Message, tungstenite::Error>> + Unpin,
{
    use futures::StreamExt;
    let mut frames = Vec::new();
    while let Some(Ok(tungstenite::Message::Text(text))) = ws.next().await {
        let done = text.as_str() == "[DONE]";
        frames.push(text.to_string());
        if done {
            break;
        }
    }
    frames
}

/// Reads a WebSocket's next frame, a chunk, and returns the request id its
/// response `id` names (`cmpl-<id>` or `chatcmpl-<id>`).
pub async fn first_chunk_request_id<S>(ws: &mut S) -> String
where
    S: futures::Stream<Item = Result<tungstenite::Message, tungstenite::Error>> + Unpin,
{
    use futures::StreamExt;
    let Some(Ok(tungstenite::Message::Text(first))) = ws.next().await else {
        panic!("no chunk")
    };
    let id = serde_json::from_str::<Value>(&first).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    id.split_once('-')
        .map(|(_, rest)| rest.to_string())
        .unwrap_or(id)
}

/// SSE payloads with each chunk's response `id` blanked: a cached answer
/// replays the chunks of the request that filled the cache, renamed for the
/// request it answers.
#[allow(dead_code)] // not every test binary compares replays
pub fn ids_blanked(events: &[String]) -> Vec<String> {
    events
        .iter()
        .map(|event| match event.find(r#""id":""#) {
            Some(at) => {
                let start = at + r#""id":""#.len();
                let end = start + event[start..].find('"').unwrap_or(0);
                format!("{}{}", &event[..start], &event[end..])
            }
            None => event.clone(),
        })
        .collect()
}

/// The gateway's log lines (warnings and errors by default; `SLUICE_TEST_LOG`
/// takes a filter), captured with the test's output: shown for a test that
/// fails, so its gateway's own account of what went wrong is in the report.
pub fn capture_logs() {
    static INSTALLED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    INSTALLED.get_or_init(|| {
        let filter = std::env::var("SLUICE_TEST_LOG").unwrap_or_else(|_| "sluice=warn".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    });
}
