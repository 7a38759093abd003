//! Headless Chromium driven over the Chrome DevTools protocol: navigate,
//! run script in the page, wait for what it renders, take screenshots.
//! Needs Debian's `chromium` (`scripts/test.sh` installs it); without it a
//! test is skipped, except under CI or `SLUICE_REQUIRE_SERVICES`.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::{Ws, eventually};

pub struct Browser {
    child: tokio::process::Child,
    devtools: Ws,
    next_id: u64,
    _profile: tempfile::TempDir,
}

/// Chromium from Debian's package, if installed.
fn chromium() -> Option<String> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|path| std::path::Path::new(path).exists())
        .map(String::from)
}

impl Browser {
    /// A fresh headless browser with one blank page, or `None` (skip) when
    /// Chromium is not installed and not required.
    pub async fn start() -> Option<Self> {
        let Some(chromium) = chromium() else {
            assert!(
                std::env::var_os("CI").is_none()
                    && std::env::var_os("SLUICE_REQUIRE_SERVICES").is_none(),
                "chromium is not installed (scripts/test.sh installs it)"
            );
            eprintln!("skipped: no chromium");
            return None;
        };
        let profile = tempfile::tempdir().unwrap();
        let child = tokio::process::Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
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
        let (devtools, _) = tokio_tungstenite::connect_async(debugger).await.unwrap();
        let mut browser = Self {
            child,
            devtools,
            next_id: 0,
            _profile: profile,
        };
        // Every page records what its Content-Security-Policy blocked.
        browser.call("Page.enable", json!({})).await;
        browser
            .call(
                "Page.addScriptToEvaluateOnNewDocument",
                json!({"source": "window.__cspViolations = []; document.addEventListener('securitypolicyviolation', e => window.__cspViolations.push(e.violatedDirective + ' ' + e.blockedURI));"}),
            )
            .await;
        Some(browser)
    }

    /// The serious and critical accessibility problems axe-core finds on the
    /// current page (`SLUICE_AXE`: the path of `axe.min.js`, which
    /// `scripts/test.sh` fetches), as `rule: element` lines; `None` when
    /// axe-core is not there and neither CI nor `SLUICE_REQUIRE_SERVICES` is set.
    pub async fn accessibility_problems(&mut self) -> Option<Value> {
        let Some(path) = std::env::var_os("SLUICE_AXE") else {
            assert!(
                std::env::var_os("CI").is_none()
                    && std::env::var_os("SLUICE_REQUIRE_SERVICES").is_none(),
                "SLUICE_AXE is not set (scripts/test.sh fetches axe-core and sets it)"
            );
            return None;
        };
        let source = std::fs::read_to_string(&path)
            .unwrap_or_else(|err| panic!("{}: {err}", path.to_string_lossy()));
        // DevTools evaluation is not subject to the page's CSP.
        self.call("Runtime.evaluate", json!({"expression": source}))
            .await;
        Some(
            self.eval(
                "axe.run(document, {resultTypes: ['violations']}).then(r => r.violations \
                 .filter(v => v.impact === 'serious' || v.impact === 'critical') \
                 .flatMap(v => v.nodes.map(n => v.id + ': ' + n.target.join(' '))))",
            )
            .await,
        )
    }

    /// What the current page's Content-Security-Policy blocked.
    pub async fn csp_violations(&mut self) -> Value {
        self.eval("window.__cspViolations || []").await
    }

    /// One DevTools call and its reply (events in between are skipped).
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let message = json!({"id": id, "method": method, "params": params}).to_string();
        self.devtools
            .send(Message::Text(message.into()))
            .await
            .unwrap();
        loop {
            let Some(Ok(Message::Text(text))) = self.devtools.next().await else {
                panic!("DevTools connection lost")
            };
            let reply: Value = serde_json::from_str(text.as_str()).unwrap();
            if reply["id"] == id {
                assert!(reply.get("error").is_none(), "{method}: {reply}");
                return reply["result"].clone();
            }
        }
    }

    /// The value of a script run in the page (promises awaited).
    pub async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression}: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Waits until `expression` is truthy in the page; returns its value.
    pub async fn wait_for(&mut self, expression: &str, what: &str) -> Value {
        let guarded =
            format!("(() => {{ try {{ return {expression}; }} catch {{ return null; }} }})()");
        for _ in 0..150 {
            let value = self.eval(&guarded).await;
            let truthy = !matches!(&value, Value::Null | Value::Bool(false))
                && value != json!("")
                && value != json!(0);
            if truthy {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let page = self
            .eval("document.body ? document.body.innerText : ''")
            .await;
        panic!("waited 15 s for {what} ({expression}); the page shows:\n{page}");
    }

    /// Opens `url` and waits for the page to load.
    pub async fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
        self.wait_loaded(url).await;
    }

    /// Waits for a navigation to `url` (its path, at least) to finish loading.
    pub async fn wait_loaded(&mut self, url: &str) {
        let path = url
            .split_once("://")
            .and_then(|(_, rest)| rest.find('/').map(|at| &rest[at..]))
            .unwrap_or("/")
            .split('?')
            .next()
            .unwrap_or("/")
            .to_string();
        self.wait_for(
            &format!(
                "document.readyState === 'complete' && location.pathname === {}",
                json!(path)
            ),
            &format!("the page {path}"),
        )
        .await;
    }

    /// The page's size, as a laptop's or a phone's screen.
    pub async fn viewport(&mut self, width: u32, height: u32, mobile: bool) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        )
        .await;
    }

    /// A PNG of the whole page.
    pub async fn screenshot(&mut self, path: &std::path::Path) {
        use base64::Engine;
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .unwrap();
        std::fs::write(path, png).unwrap();
    }

    pub async fn close(mut self) {
        let _ = self.child.kill().await;
    }
}
