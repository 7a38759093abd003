//! Plugins that misbehave, hoard memory or fail to load, `sluice plugin check`, and hot reload under traffic.

use super::*;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_plugins_never_take_the_gateway_down() {
    let body = json!({"model": MODEL, "prompt": "still works", "max_tokens": 4, "stream": true});
    // `on-tokens` (the batched token hook) runs on cache hits: the cache is filled first.
    let fill_cache = async |gw: &TestGateway| {
        let events = sse_events(gw.post(&body).await).await;
        assert_eq!(texts(&events), gw.sim.expected_texts(&body));
        gw.wait_cached(1).await;
    };
    for mode in ["loop", "alloc", "trap", "bad-utf8", "huge", "short"] {
        for hook in ["on-request", "cache-key", "on-token", "on-tokens"] {
            if mode == "short" && hook != "on-tokens" {
                continue;
            }
            // Fail-open: the plugin is skipped and the client gets the normal answer.
            let gw = gateway_with(vec![misbehaving(mode, hook, FailOpen)]).await;
            if hook == "on-tokens" {
                fill_cache(&gw).await;
            }
            let events = sse_events(gw.post(&body).await).await;
            assert_eq!(
                texts(&events),
                gw.sim.expected_texts(&body),
                "{mode} in {hook}, fail-open"
            );
            let metrics = gw.metrics().await;
            let label = if hook == "on-tokens" {
                "on-token"
            } else {
                hook
            };
            let count = |counter: &str| {
                metric(
                    &metrics,
                    &format!(r#"{counter}{{hook="{label}",plugin="bad"}}"#),
                )
                .map_or(0, |v| v as u64)
            };
            let (timeouts, traps) = (
                count("sluice_plugin_timeouts_total"),
                count("sluice_plugin_traps_total"),
            );
            match mode {
                "loop" => assert_eq!(timeouts, 1, "{mode} in {hook}\n{metrics}"),
                // Filling 16 MiB can hit the CPU deadline first on a loaded machine.
                "alloc" => assert_eq!(timeouts + traps, 1, "{mode} in {hook}\n{metrics}"),
                _ => assert_eq!(traps, 1, "{mode} in {hook}\n{metrics}"),
            }

            // Fail-closed: before the stream an OpenAI-shaped 500, during it an error event.
            let gw = gateway_with(vec![misbehaving(mode, hook, FailClosed)]).await;
            if hook == "on-tokens" {
                fill_cache(&gw).await;
            }
            let response = gw.post(&body).await;
            if hook.starts_with("on-token") {
                assert_eq!(response.status(), 200);
                let events = sse_events(response).await;
                let error: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
                assert_eq!(
                    error["error"]["code"], 500,
                    "{mode} in {hook}, fail-closed: {events:?}"
                );
                assert_eq!(events.last().unwrap(), "[DONE]");
            } else {
                assert_eq!(response.status(), 500, "{mode} in {hook}, fail-closed");
                let id = request_id(&response);
                let error: Value = response.json().await.unwrap();
                let message = error["error"]["message"].as_str().unwrap();
                assert!(message.contains("policy plugin failed"), "{error}");
                assert!(message.contains(&id), "the request id: {error}");
                let without_id = message.replace(&id, "");
                assert!(
                    !without_id.contains("bad") && !without_id.contains(mode),
                    "no plugin name or failure detail for the client: {error}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_that_hoard_memory_do_not_leak_it_across_requests() {
    let gw = gateway_with(vec![misbehaving("alloc", "on-request", FailOpen)]).await;
    let body = json!({"model": MODEL, "prompt": "hoard", "max_tokens": 1});
    gw.post(&body).await.bytes().await.unwrap();
    let before = rss_bytes();
    for _ in 0..40 {
        assert_eq!(gw.post(&body).await.status(), 200);
    }
    let grown = rss_bytes().saturating_sub(before);
    // 40 instances each filled their 16 MiB cap: 640 MiB if any were kept.
    assert!(
        grown < 128 << 20,
        "resident memory grew by {} MiB",
        grown >> 20
    );
}

#[tokio::test]
async fn plugins_that_cannot_load_stop_startup_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"definitely not wasm").unwrap();
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    for (path, expected) in [
        (garbage, "not a WebAssembly file"),
        (core, "core WebAssembly module"),
    ] {
        let mut bad = misbehaving("none", "on-request", FailOpen);
        bad.path = path;
        let mut config = sluice::Config {
            plugins: vec![bad],
            ..Default::default()
        };
        config.store.url = format!("sqlite://{}", dir.path().join("x.db").display()).into();
        let err = sluice::Gateway::start(config)
            .await
            .err()
            .expect("startup fails")
            .to_string();
        assert!(
            err.contains("plugin `bad`") && err.contains(expected),
            "{err}"
        );
    }
    let mut config = sluice::Config {
        plugins: vec![misbehaving("init-fail", "on-request", FailOpen)],
        ..Default::default()
    };
    config.store.url = format!("sqlite://{}", dir.path().join("y.db").display()).into();
    let err = sluice::Gateway::start(config)
        .await
        .err()
        .expect("startup fails")
        .to_string();
    assert!(err.contains("configured to fail"), "{err}");
}

fn gateway_toml(mask: &str, extra: &str) -> String {
    format!(
        r#"
        [plugin_host]
        watch = true
        [[plugins]]
        name = "censor"
        path = "{path}"
        on_error = "fail-closed"
        [plugins.config]
        words = ["the", "a", "of"]
        mask = "{mask}"
        {extra}
        "#,
        path = plugin_wasm("token_censor").display(),
    )
}

async fn reloads(gw: &TestGateway, plugin: &str, result: &str) -> u64 {
    let series = format!(r#"sluice_plugin_reloads_total{{plugin="{plugin}",result="{result}"}}"#);
    metric(&gw.metrics().await, &series).map_or(0, |v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_under_load_keeps_old_streams_on_the_old_version() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("gateway.toml");
    std::fs::write(&config_path, gateway_toml("[v1]", "")).unwrap();
    let slow = SimulatorConfig {
        token_delay: Duration::from_millis(25),
        first_token_delay: Duration::from_millis(5),
        ..SimulatorConfig::default()
    };
    let path = config_path.clone();
    let gw = TestGateway::start_with(slow, move |c| {
        let loaded = sluice::Config::load(Some(&path)).unwrap();
        c.plugins = loaded.plugins;
        c.plugin_host = loaded.plugin_host;
        c.source = loaded.source;
        c.cache.url = "off".to_string().into();
    })
    .await;

    let body = |i: usize| json!({"model": MODEL, "prompt": format!("stream {i}"), "max_tokens": 40, "stream": true});
    let mut old = Vec::new();
    for i in 0..50 {
        let response = gw.post(&body(i)).await;
        assert_eq!(response.status(), 200);
        let mut reader = SseReader::new(response);
        let first = reader.next().await.expect("first chunk");
        old.push(tokio::spawn(async move {
            let mut events = vec![first];
            while let Some(event) = reader.next().await {
                events.push(event);
            }
            events
        }));
    }
    std::fs::write(&config_path, gateway_toml("[v2]", "")).unwrap();
    assert!(
        eventually(Duration::from_secs(30), || async {
            (reloads(&gw, "censor", "ok").await >= 2).then_some(())
        })
        .await
        .is_some(),
        "the edited config was reloaded"
    );
    let gw_ref = &gw;
    let fresh: Vec<Vec<String>> = futures::future::join_all((50..60).map(|i| async move {
        let request = body(i);
        sse_events(gw_ref.post(&request).await).await
    }))
    .await;

    for (i, task) in old.into_iter().enumerate() {
        let events = task.await.unwrap();
        assert_eq!(
            events.last().map(String::as_str),
            Some("[DONE]"),
            "stream {i} completed"
        );
        let text = &texts(&events)[0];
        assert!(
            !text.contains("[v2]"),
            "stream {i} started before the reload stays on v1: {text}"
        );
        let raw = &gw.sim.expected_texts(&body(i))[0];
        assert_eq!(
            text.len(),
            raw.len() + text.matches("[v1]").count() * 4 - count_masked(raw),
            "stream {i}: {text}"
        );
    }
    for events in &fresh {
        let text = &texts(events)[0];
        assert!(!text.contains("[v1]"), "new streams use v2: {text}");
    }
    assert!(fresh.iter().any(|e| texts(e)[0].contains("[v2]")));
}

/// Bytes of `raw` that the test config's words cover ("the", "a", "of" as substrings).
fn count_masked(raw: &str) -> usize {
    let lower = raw.to_lowercase();
    let mut i = 0;
    let mut covered = 0;
    'scan: while i < lower.len() {
        for word in ["the", "a", "of"] {
            if lower[i..].starts_with(word) {
                covered += word.len();
                i += word.len();
                continue 'scan;
            }
        }
        i += 1;
    }
    covered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_plugin_file_leaves_the_previous_version_serving() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("censor.wasm");
    std::fs::copy(plugin_wasm("token_censor"), &wasm).unwrap();
    let config_path = dir.path().join("gateway.toml");
    let toml = gateway_toml("[v1]", "").replace(
        &plugin_wasm("token_censor").display().to_string(),
        &wasm.display().to_string(),
    );
    std::fs::write(&config_path, &toml).unwrap();
    let path = config_path.clone();
    let gw = TestGateway::start_with(sim_config(), move |c| {
        let loaded = sluice::Config::load(Some(&path)).unwrap();
        c.plugins = loaded.plugins;
        c.plugin_host = loaded.plugin_host;
        c.source = loaded.source;
    })
    .await;
    std::fs::write(&wasm, b"\0asm garbage").unwrap();
    assert!(
        eventually(Duration::from_secs(30), || async {
            (reloads(&gw, "censor", "failed").await >= 1).then_some(())
        })
        .await
        .is_some()
    );
    let events = sse_events(
        gw.post(&json!({"model": MODEL, "prompt": "p", "max_tokens": 30, "stream": true}))
            .await,
    )
    .await;
    assert!(
        texts(&events)[0].contains("[v1]"),
        "the previous version still filters: {events:?}"
    );

    // A good file again (here: a different plugin at the same path) is picked up.
    std::fs::copy(plugin_wasm("misbehave"), &wasm).unwrap();
    std::fs::write(
        &config_path,
        toml.replace(
            "words = [\"the\", \"a\", \"of\"]\n        mask = \"[v1]\"",
            "mode = \"none\"",
        ),
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(30), || async {
            (reloads(&gw, "censor", "ok").await >= 2).then_some(())
        })
        .await
        .is_some()
    );
    let events = sse_events(
        gw.post(&json!({"model": MODEL, "prompt": "q", "max_tokens": 30, "stream": true}))
            .await,
    )
    .await;
    assert!(!texts(&events)[0].contains("[v1]"));
}

/// Replaces `path` by renaming a new file onto it, as a deploy does.
fn move_into_place(path: &std::path::Path, contents: &[u8]) {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, contents).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_happens_under_traffic_in_the_readme_layout() {
    // The README's layout: gateway.toml, the plugin and sluice.db in one
    // folder, so every request's inference-log write touches the folder.
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("filter.wasm");
    std::fs::copy(plugin_wasm("token_censor"), &wasm).unwrap();
    let config_path = dir.path().join("gateway.toml");
    let toml = gateway_toml("[v1]", "").replace(
        &plugin_wasm("token_censor").display().to_string(),
        &wasm.display().to_string(),
    );
    std::fs::write(&config_path, &toml).unwrap();
    let (path, db) = (config_path.clone(), dir.path().join("sluice.db"));
    let gw = std::sync::Arc::new(
        TestGateway::start_with(sim_config(), move |c| {
            let loaded = sluice::Config::load(Some(&path)).unwrap();
            c.plugins = loaded.plugins;
            c.plugin_host = loaded.plugin_host;
            c.source = loaded.source;
            c.cache.url = "off".to_string().into();
            c.store.url = format!("sqlite://{}", db.display()).into();
        })
        .await,
    );
    // About 20 requests a second for the whole test.
    let stop = tokio_util::sync::CancellationToken::new();
    let traffic = {
        let (gw, stop) = (gw.clone(), stop.clone());
        tokio::spawn(async move {
            let mut sent = 0u32;
            while !stop.is_cancelled() {
                let body =
                    json!({"model": MODEL, "prompt": format!("traffic {sent}"), "max_tokens": 2});
                assert_eq!(gw.post(&body).await.status(), 200);
                sent += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            sent
        })
    };
    let probe = json!({"model": MODEL, "prompt": "probe", "max_tokens": 30});
    let probe_text = || async {
        let body: Value = gw.post(&probe).await.json().await.unwrap();
        body["choices"][0]["text"].as_str().unwrap().to_string()
    };
    assert!(probe_text().await.contains("[v1]"));

    // A new version moved into place is served while the traffic goes on.
    move_into_place(&wasm, &std::fs::read(plugin_wasm("v1_guard")).unwrap());
    let served = eventually(Duration::from_secs(15), || async {
        let text = probe_text().await;
        (text == text.to_uppercase() && !text.contains("[v1]")).then_some(())
    })
    .await;
    assert!(
        served.is_some(),
        "the new version was not served under traffic"
    );

    // A broken file: reported once, the previous version keeps serving.
    move_into_place(&wasm, b"\0asm not a component");
    assert!(
        eventually(Duration::from_secs(15), || async {
            (reloads(&gw, "censor", "failed").await == 1).then_some(())
        })
        .await
        .is_some()
    );
    // Another change to the config reloads the chain; the same broken file is not counted again.
    let guarded = format!(
        "{toml}\n[[plugins]]\nname = \"guard\"\npath = \"{}\"\n[plugins.config]\nblock = [\"zzz\"]\n",
        plugin_wasm("prompt_guard").display()
    );
    std::fs::write(&config_path, guarded).unwrap();
    assert!(
        eventually(Duration::from_secs(15), || async {
            (reloads(&gw, "guard", "ok").await == 1).then_some(())
        })
        .await
        .is_some()
    );
    // An invalid config: one failure, and the gateway's own reads of the
    // files it watches do not start reload after reload.
    std::fs::write(&config_path, "[[plugins]\nnot toml").unwrap();
    assert!(
        eventually(Duration::from_secs(15), || async {
            (reloads(&gw, "config", "failed").await == 1).then_some(())
        })
        .await
        .is_some()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(reloads(&gw, "config", "failed").await, 1);
    assert_eq!(reloads(&gw, "censor", "failed").await, 1);
    let text = probe_text().await;
    assert_eq!(
        text,
        text.to_uppercase(),
        "the last good version still serves"
    );
    stop.cancel();
    assert!(traffic.await.unwrap() > 20, "traffic flowed throughout");
}

#[test]
fn plugin_check_reports_bad_input_once_and_clearly() {
    let check = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["--config", "/dev/null", "plugin", "check"])
            .args(args)
            .output()
            .expect("sluice runs");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, stderr) = check(&["/nonexistent/plugin.wasm"]);
    assert!(!ok);
    assert_eq!(stderr.matches("No such file").count(), 1, "{stderr}");
    let censor = plugin_wasm("token_censor");
    let (ok, stderr) = check(&[censor.to_str().unwrap(), "--plugin-config", "not json"]);
    assert!(!ok);
    assert!(stderr.contains("--plugin-config is not JSON"), "{stderr}");
    let (ok, _) = check(&[censor.to_str().unwrap()]);
    assert!(ok);
}

fn plugin_check_stdout(name: &str) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["--config", "/dev/null", "plugin", "check"])
        .arg(plugin_wasm(name))
        .output()
        .expect("sluice runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn plugin_check_reports_the_version_routes_and_hooks() {
    let guard = plugin_check_stdout("prompt_guard");
    assert!(
        guard.contains("a valid sluice:plugin@0.4.0 component"),
        "{guard}"
    );
    assert!(
        guard.contains(
            "on-request (request-hook):     yes, on every route (generation, embeddings, rerank"
        ),
        "{guard}"
    );
    assert!(
        guard.contains("on-token (token-hook):         no"),
        "{guard}"
    );
    assert!(
        guard.contains("on-tool-call (tool-call-hook): yes, on /v1/chat/completions, /v1/messages and /v1/responses"),
        "{guard}"
    );
    let v2 = plugin_check_stdout("v2_guard");
    assert!(v2.contains("a valid sluice:plugin@0.2.0 component"), "{v2}");
    assert!(
        v2.contains(
            "on-request (request-hook):     yes, on /v1/completions and /v1/chat/completions only"
        ),
        "{v2}"
    );
    let old = plugin_check_stdout("v1_guard");
    assert!(
        old.contains("a valid sluice:plugin@0.1.0 component"),
        "{old}"
    );
    assert!(
        old.contains("on-request (request-hook):     yes, on /v1/completions only"),
        "{old}"
    );
    assert!(
        old.contains(
            "on-token (token-hook):         yes, on /v1/completions, /v1/chat/completions, /v1/messages and /v1/responses"
        ),
        "{old}"
    );
}
