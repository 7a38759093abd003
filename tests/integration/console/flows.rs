//! One operator's session in the console, page by page.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use super::TOKEN;
use crate::common::chromium::Browser;
use crate::common::*;

/// A completion as a client of `key` sends it: its HTTP status.
async fn call_api(gw: &TestGateway, key: &str, i: usize) -> u16 {
    let body = json!({"model": MODEL, "prompt": format!("console request {i}"), "max_tokens": 3});
    post_as(&gw.http, &gw.url, key, body)
        .await
        .status()
        .as_u16()
}

/// Sets an input's value as typing would.
fn fill(selector: &str, value: &str) -> String {
    format!(
        "(() => {{ const e = document.querySelector({}); e.value = {}; e.dispatchEvent(new Event('input')); return true; }})()",
        json!(selector),
        json!(value)
    )
}

fn click(selector: &str) -> String {
    format!(
        "(() => {{ document.querySelector({}).click(); return true; }})()",
        json!(selector)
    )
}

/// Checks the page broke none of its CSP's rules, and saves its picture.
async fn shoot(browser: &mut Browser, shots: Option<&Path>, name: &str) {
    assert_eq!(
        browser.csp_violations().await,
        json!([]),
        "the {name} page within its Content-Security-Policy"
    );
    if let Some(problems) = browser.accessibility_problems().await {
        assert_eq!(
            problems,
            json!([]),
            "the {name} page's accessibility (axe-core)"
        );
    }
    if let Some(dir) = shots {
        std::fs::create_dir_all(dir).unwrap();
        browser.screenshot(&dir.join(format!("{name}.png"))).await;
    }
}

pub async fn operate(
    mut browser: Browser,
    gw: &TestGateway,
    mut replica: SimulatorProcess,
    shots: Option<&Path>,
) {
    let admin = gw.admin_url.clone().expect("the admin listener");
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    // Not on the public port; without a session, pages send to sign-in and changes are refused.
    let public = plain
        .get(format!("{}/console/", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(public.status(), 404);
    let page = plain
        .get(format!("{admin}/console/keys"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 303);
    assert_eq!(page.headers()["location"], "/console/sign-in");
    let change = plain
        .post(format!("{admin}/console/keys"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("name=sneaky")
        .send()
        .await
        .unwrap();
    assert_eq!(change.status(), 401);

    // Some traffic for the overview's charts, through the run.
    let traffic = {
        let (http, url, key) = (gw.http.clone(), gw.completions_url(), gw.key.clone());
        tokio::spawn(async move {
            for i in 0.. {
                let body = json!({"model": MODEL, "prompt": format!("traffic {}", i % 7), "max_tokens": 8});
                let _ = http.post(&url).bearer_auth(&key).json(&body).send().await;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        })
    };

    browser.viewport(1280, 860, false).await;
    browser
        .call("Page.navigate", json!({"url": format!("{admin}/console/")}))
        .await;
    browser
        .wait_loaded(&format!("{admin}/console/sign-in"))
        .await;
    shoot(&mut browser, shots, "sign-in").await;

    // A wrong token is refused; the right one signs in.
    browser.eval(&fill("#token", "not-the-token")).await;
    browser.eval(&click("button[type=submit]")).await;
    let refused = browser
        .wait_for(
            "document.getElementById('sign-in-error').textContent",
            "the refusal",
        )
        .await;
    assert!(
        refused.as_str().unwrap().contains("not the admin token"),
        "{refused}"
    );
    browser.eval(&fill("#token", TOKEN)).await;
    browser.eval(&click("button[type=submit]")).await;
    browser.wait_loaded(&format!("{admin}/console/")).await;
    let cookies = browser
        .call(
            "Network.getCookies",
            json!({"urls": [format!("{admin}/console/")]}),
        )
        .await;
    let cookie = cookies["cookies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "sluice_console")
        .cloned()
        .expect("the session cookie");
    assert_eq!(cookie["httpOnly"], true, "{cookie}");
    assert_eq!(cookie["sameSite"], "Strict", "{cookie}");
    assert!(
        cookie["expires"].as_f64().unwrap() > 0.0,
        "it expires: {cookie}"
    );
    assert_eq!(
        browser.eval("document.cookie").await,
        "",
        "script cannot read it"
    );
    let html = browser
        .eval("document.documentElement.outerHTML + location.href")
        .await;
    assert!(
        !html.as_str().unwrap().contains(TOKEN),
        "the token is nowhere in the page"
    );

    // A change without the CSRF token is refused, even with the session.
    let forged = browser
        .eval("fetch('/console/keys', {method: 'POST', headers: {'Content-Type': 'application/x-www-form-urlencoded'}, body: 'name=forged'}).then(r => r.status)")
        .await;
    assert_eq!(forged, 403);

    // Keys: create one, its secret shown once; find it; it works.
    browser.open(&format!("{admin}/console/keys")).await;
    browser
        .eval(&fill("input[name=name]", "console-made"))
        .await;
    browser
        .eval(&click(
            "form.card[action='/console/keys'] button[type=submit]",
        ))
        .await;
    let secret = browser
        .wait_for(
            "document.getElementById('secret').value",
            "the new key's secret",
        )
        .await;
    let secret = secret.as_str().unwrap().to_string();
    assert!(secret.starts_with("sk-sluice-"), "{secret}");
    browser.eval(&click("[data-copy=secret]")).await;
    browser
        .wait_for(
            "document.getElementById('copy-status').textContent === 'Copied'",
            "the copy",
        )
        .await;
    shoot(&mut browser, shots, "key-created").await;
    assert_eq!(call_api(gw, &secret, 0).await, 200, "the new key works");
    browser
        .open(&format!("{admin}/console/keys?q=console-made"))
        .await;
    let found = browser
        .eval("[...document.querySelectorAll('table.keys tbody tr')].map(r => r.dataset.key)")
        .await;
    assert_eq!(found, json!(["console-made"]), "the search finds it alone");
    browser.open(&format!("{admin}/console/keys")).await;
    shoot(&mut browser, shots, "keys").await;

    // A limit set in the console, enforced by the API.
    browser.eval(&click("tr[data-key='console-made'] a")).await;
    browser
        .wait_for(
            "document.querySelector('h1').textContent === 'Key console-made'",
            "the key's page",
        )
        .await;
    let key_id = browser
        .eval("document.querySelector('dl.facts code').textContent")
        .await
        .as_str()
        .unwrap()
        .to_string();
    browser
        .eval(&fill("input[name=requests_per_minute]", "2"))
        .await;
    browser.eval(&click("form.card button[type=submit]")).await;
    browser
        .wait_for(
            "document.getElementById('notice').textContent.startsWith('Saved')",
            "saved",
        )
        .await;
    shoot(&mut browser, shots, "key").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut statuses = Vec::new();
    for i in 1..=3 {
        statuses.push(call_api(gw, &secret, i).await);
    }
    assert_eq!(statuses[0], 200, "{statuses:?}");
    assert_eq!(statuses[2], 429, "two a minute: {statuses:?}");

    // Revoked in the console: the API refuses the key.
    browser.eval("window.confirm = () => true").await;
    browser.eval(&click("form[action$='/revoke'] button")).await;
    browser
        .wait_for(
            "document.getElementById('notice').textContent.startsWith('Revoked')",
            "revoked",
        )
        .await;
    assert_eq!(
        browser
            .eval("document.getElementById('key-state').textContent")
            .await,
        "revoked"
    );
    // Until the auth cache forgets the key (a second), requests still count against its limit.
    let mut before_refusal = Vec::new();
    loop {
        let status = call_api(gw, &secret, 9).await;
        if status == 401 {
            break;
        }
        before_refusal.push(status);
        assert!(
            before_refusal.len() < 50,
            "the revoked key is refused: {before_refusal:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    statuses.extend(before_refusal);

    // Usage: every request of this key, from the inference log (written
    // off the request path: wait for the rows before reading the page).
    let made = statuses.len() as i64 + 1;
    let logged = eventually(Duration::from_secs(5), || async {
        let rows = gw.store.key_usage(None).await.unwrap();
        let mine = rows.iter().find(|r| r.key_id == key_id)?;
        (mine.requests == made).then_some(())
    })
    .await;
    assert!(logged.is_some(), "the key's {made} requests logged");
    browser
        .open(&format!(
            "{admin}/console/usage?key={key_id}&group=key&granularity=hour"
        ))
        .await;
    let requests = browser
        .wait_for(
            "document.querySelector(\"tr[data-group='console-made'] [data-col=requests]\").textContent",
            "the key's usage",
        )
        .await;
    assert_eq!(
        requests,
        json!((statuses.len() + 1).to_string()),
        "every request the key made, refused ones too: {statuses:?}"
    );
    let completion = browser
        .eval("document.querySelector(\"tr[data-group='console-made'] [data-col=completion_tokens]\").textContent")
        .await;
    let served = statuses.iter().filter(|s| **s == 200).count() + 1;
    assert_eq!(
        completion,
        json!((served * 3).to_string()),
        "three tokens per answer"
    );
    browser
        .wait_for(
            "document.querySelectorAll('#usage-charts canvas').length >= 2",
            "the charts",
        )
        .await;
    let csv = browser
        .eval("fetch(document.getElementById('csv-link').href).then(r => r.text())")
        .await;
    let csv = csv.as_str().unwrap();
    assert!(csv.starts_with("bucket,group,name,requests,"), "{csv}");
    assert!(
        csv.contains(&format!("{key_id},console-made,{},", statuses.len() + 1)),
        "{csv}"
    );
    // A date at the calendar's end is refused, not a failure.
    let edge = browser
        .eval("fetch('/console/usage?from=%2B262142-12-30&to=%2B262142-12-31').then(r => r.status)")
        .await;
    assert_eq!(edge, 400);
    browser
        .open(&format!("{admin}/console/usage?group=key&granularity=hour"))
        .await;
    browser
        .wait_for(
            "document.querySelectorAll('#usage-charts canvas').length >= 2",
            "the charts",
        )
        .await;
    shoot(&mut browser, shots, "usage").await;

    // Fleet: the replica whose process is killed goes down.
    browser.open(&format!("{admin}/console/fleet")).await;
    let row = format!("tr[data-endpoint='{}']", replica.url.trim_end_matches('/'));
    let state = |row: &str| format!("document.querySelector(\"{row} .state\").textContent");
    assert_eq!(
        browser.wait_for(&state(&row), "the replica's row").await,
        "up"
    );
    replica.kill();
    browser
        .wait_for(
            &format!("{} !== 'up'", state(&row)),
            "the killed replica shown down",
        )
        .await;
    shoot(&mut browser, shots, "fleet").await;

    // Playground: an answer streams, with its figures and request id.
    browser.open(&format!("{admin}/console/playground")).await;
    let prompt = "Hello from the console";
    browser.eval(&fill("#message", prompt)).await;
    browser.eval(&fill("#max-tokens", "12")).await;
    browser.eval(&click("#send")).await;
    let request_id = browser
        .wait_for(
            "document.getElementById('tps').textContent !== '–' && document.getElementById('request-id').textContent",
            "the answer's figures",
        )
        .await;
    let request_id = request_id.as_str().unwrap().to_string();
    let answer = browser
        .eval("document.querySelector('.turn.assistant p').textContent")
        .await;
    let expected = gw.sim.expected_chat_texts(&json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 12,
        "stream": true,
    }));
    assert_eq!(answer, json!(expected[0]), "the model's answer, whole");
    let ttft = browser
        .eval("document.getElementById('ttft').textContent")
        .await;
    assert!(ttft.as_str().unwrap().ends_with(" ms"), "{ttft}");
    let logged = eventually(Duration::from_secs(3), || async {
        let rows = gw.store.inferences_for(&request_id).await.unwrap();
        (!rows.is_empty()).then_some(rows)
    })
    .await
    .expect("the playground's request in the inference log");
    assert_eq!(logged[0].route, "/v1/chat/completions");
    shoot(&mut browser, shots, "playground").await;

    // Plugins: the loaded plugin, its WIT version and its calls.
    browser.open(&format!("{admin}/console/plugins")).await;
    let plugin = browser
        .eval("document.querySelector('main section h2').textContent")
        .await;
    assert_eq!(plugin, "pii-redactor");
    let text = browser
        .eval("document.querySelector('main').innerText")
        .await;
    let text = text.as_str().unwrap();
    assert!(text.contains("sluice:plugin@0.4.0"), "{text}");
    assert!(text.contains("pii-redactor: loaded"), "{text}");
    let calls = browser
        .eval("Number(document.querySelector('main section tbody td.num').textContent)")
        .await;
    assert!(calls.as_f64().unwrap() > 0.0, "its calls counted: {text}");
    shoot(&mut browser, shots, "plugins").await;

    // Teams: create one with a limit.
    browser.open(&format!("{admin}/console/teams")).await;
    browser.eval(&fill("input[name=name]", "research")).await;
    browser
        .eval(&fill("input[name=tokens_per_minute]", "100000"))
        .await;
    browser.eval(&click("form.card button[type=submit]")).await;
    browser
        .wait_for(
            "document.querySelector('h1').textContent === 'Team research'",
            "the team's page",
        )
        .await;
    browser
        .eval(&fill("input[name=requests_per_minute]", "600"))
        .await;
    browser.eval(&click("form.card button[type=submit]")).await;
    browser
        .wait_for(
            "document.getElementById('notice')",
            "the team's limits saved",
        )
        .await;
    let team = gw.store.find_team("research").await.unwrap().unwrap();
    assert_eq!(team.limits.requests_per_minute, Some(600));
    assert_eq!(team.limits.tokens_per_minute, Some(100_000), "kept");
    browser.open(&format!("{admin}/console/teams")).await;
    shoot(&mut browser, shots, "teams").await;

    // Overview: live figures and charts from the gateway's counters, and the backends.
    browser.open(&format!("{admin}/console/")).await;
    let rps = browser
        .wait_for(
            "document.querySelectorAll('#overview-charts canvas').length >= 5 && Number(document.querySelector('[data-figure=requests_per_s]').textContent) > 0 && document.querySelector('[data-figure=requests_per_s]').textContent",
            "the overview's figures",
        )
        .await;
    assert!(rps.as_str().unwrap().parse::<f64>().unwrap() > 0.0, "{rps}");
    let backends = browser
        .eval("document.querySelector('main').innerText")
        .await;
    assert!(
        backends.as_str().unwrap().contains("1 of 2 endpoints up"),
        "{backends}"
    );
    shoot(&mut browser, shots, "overview").await;
    if shots.is_some() {
        browser.viewport(390, 844, true).await;
        browser.open(&format!("{admin}/console/")).await;
        browser
            .wait_for(
                "document.querySelectorAll('#overview-charts canvas').length >= 5",
                "the charts",
            )
            .await;
        shoot(&mut browser, shots, "overview-phone").await;
        browser.viewport(1280, 860, false).await;
    }

    // Audit log: every change above, newest first, by this session.
    browser.open(&format!("{admin}/console/audit")).await;
    let actions = browser
        .eval("[...document.querySelectorAll('#audit tbody tr')].map(r => r.dataset.action)")
        .await;
    assert_eq!(
        actions,
        json!([
            "team.update",
            "team.create",
            "key.create",
            "key.revoke",
            "key.update",
            "key.create"
        ]),
        "the team's limit, the team, the playground's key, the revocation, the limit, the key"
    );
    let who = browser
        .eval("[...document.querySelectorAll('#audit tbody tr td:nth-child(2)')].map(c => c.textContent)")
        .await;
    let who: Vec<String> = serde_json::from_value(who).unwrap();
    assert!(
        who.iter()
            .all(|w| w.starts_with("console session ") && *w == who[0]),
        "{who:?}"
    );
    let update = browser
        .eval("document.querySelector(\"tr[data-action='key.update'] ul.changes\").textContent")
        .await;
    assert!(
        update
            .as_str()
            .unwrap()
            .contains("limits.requests_per_minute: – → 2"),
        "{update}"
    );
    shoot(&mut browser, shots, "audit").await;

    // Signing out ends the session and revokes the playground's key.
    browser.eval(&click(".sign-out button")).await;
    browser
        .wait_loaded(&format!("{admin}/console/sign-in"))
        .await;
    browser
        .call(
            "Page.navigate",
            json!({"url": format!("{admin}/console/keys")}),
        )
        .await;
    browser
        .wait_loaded(&format!("{admin}/console/sign-in"))
        .await;
    let audit: Value = gw
        .http
        .get(format!("{admin}/admin/audit?limit=1"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(audit["data"][0]["action"], "key.revoke", "{audit}");
    assert!(
        audit["data"][0]["after"]["name"]
            .as_str()
            .unwrap()
            .starts_with("console-playground-"),
        "{audit}"
    );

    // Repeated wrong tokens from one address: sign-in is throttled, the right token too.
    let mut last = 0;
    for token in ["a", "b", "c", "d", "e", TOKEN] {
        last = plain
            .post(format!("{admin}/console/sign-in"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={token}"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
    }
    assert_eq!(last, 429, "throttled after five failures");

    traffic.abort();
    browser.close().await;
}
