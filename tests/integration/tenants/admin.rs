//! The admin API: keys, teams, limits and usage.

use super::*;

const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";

#[tokio::test]
async fn the_admin_api_manages_keys_teams_limits_and_usage() {
    let gw = TestGateway::start_with(sim_config(), |c| {
        c.admin.listen = Some("127.0.0.1:0".parse().unwrap());
        c.admin.token = Some(ADMIN_TOKEN.to_string().into());
        assert!(
            !format!("{c:?}").contains(ADMIN_TOKEN),
            "the token never appears in Debug output"
        );
    })
    .await;
    let admin = gw.admin_url.clone().expect("the admin API listens");
    let call = |method: Method, path: &str, token: &str, body: Option<Value>| {
        let mut request = gw
            .http
            .request(method, format!("{admin}{path}"))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send()
    };
    use reqwest::Method;
    // The wrong token, or none, is refused in the OpenAI error shape.
    let response = call(Method::GET, "/admin/keys", "wrong", None)
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], 401);
    let response = gw
        .http
        .get(format!("{admin}/admin/keys"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    // The admin API is not on the public listener.
    let response = gw
        .http
        .get(format!("{}/admin/keys", gw.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);

    let team = call(
        Method::POST,
        "/admin/teams",
        ADMIN_TOKEN,
        Some(json!({"name": "ops", "limits": {"requests_per_minute": 50}})),
    )
    .await
    .unwrap();
    assert_eq!(team.status(), 201);
    let created = call(
        Method::POST,
        "/admin/keys",
        ADMIN_TOKEN,
        Some(json!({"name": "svc", "team": "ops", "limits": {"requests_per_minute": 2, "models": [MODEL]}})),
    )
    .await
    .unwrap();
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.unwrap();
    let secret = created["secret"].as_str().unwrap().to_string();
    assert_eq!(created["limits"]["requests_per_minute"], 2);
    assert!(created["team_id"].as_str().unwrap().starts_with("team_"));
    let statuses = |n: usize| {
        let secret = secret.clone();
        let gw = &gw;
        async move {
            let mut statuses = Vec::new();
            for i in 0..n {
                statuses.push(
                    post_as(&gw.http, &gw.url, &secret, small(1000 + i))
                        .await
                        .status()
                        .as_u16(),
                );
            }
            statuses
        }
    };
    assert_eq!(statuses(3).await, [200, 200, 429]);

    let updated = call(
        Method::PATCH,
        "/admin/keys/svc",
        ADMIN_TOKEN,
        Some(json!({"limits": {"requests_per_minute": 5}})),
    )
    .await
    .unwrap();
    assert_eq!(updated.status(), 200);
    let updated: Value = updated.json().await.unwrap();
    assert_eq!(updated["limits"]["requests_per_minute"], 5);
    assert_eq!(
        updated["limits"]["models"],
        json!([MODEL]),
        "untouched fields stay"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        statuses(4).await,
        [200, 200, 200, 429],
        "the new limit within a second"
    );

    let usage = eventually(Duration::from_secs(3), || async {
        let usage: Value = call(Method::GET, "/admin/keys/svc/usage", ADMIN_TOKEN, None)
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        // Refused requests are logged too (status 429), without tokens.
        (usage["requests"] == 7).then_some(usage)
    })
    .await
    .expect("usage of the seven requests, five admitted");
    assert_eq!(usage["completion_tokens"], 10);
    assert_eq!(
        (
            &usage["served"],
            &usage["refused"],
            &usage["client_closed"],
            &usage["failed"]
        ),
        (&json!(5), &json!(2), &json!(0), &json!(0)),
        "served and refused apart: {usage}"
    );
    let team_usage: Value = call(Method::GET, "/admin/teams/ops/usage", ADMIN_TOKEN, None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(team_usage["requests"], 7);

    // Bad input: 400 naming the problem, 404 for an unknown key, 409 for a taken name.
    for (body, needle) in [
        (
            json!({"name": "z", "limits": {"requests_per_minute": 0}}),
            "requests_per_minute",
        ),
        (
            json!({"name": "z", "limits": {"tokens_per_minute": -3}}),
            "tokens_per_minute",
        ),
        (json!({"name": "z", "limits": {"rpm": 3}}), "rpm"),
        (json!({"limits": {}}), "name"),
        (json!({"name": "z", "team": "no-such-team"}), "no-such-team"),
    ] {
        let response = call(Method::POST, "/admin/keys", ADMIN_TOKEN, Some(body.clone()))
            .await
            .unwrap();
        let status = response.status().as_u16();
        let error: Value = response.json().await.unwrap();
        assert!(matches!(status, 400 | 404), "{body}: {status}");
        assert!(
            error["error"]["message"].as_str().unwrap().contains(needle),
            "{body}: {error}"
        );
    }
    let malformed = gw
        .http
        .post(format!("{admin}/admin/keys"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    let error: Value = malformed.json().await.unwrap();
    assert_eq!(error["error"]["code"], 400);
    let missing = call(
        Method::GET,
        "/admin/keys/key_nonexistent",
        ADMIN_TOKEN,
        None,
    )
    .await
    .unwrap();
    assert_eq!(missing.status(), 404);
    let taken = call(
        Method::POST,
        "/admin/keys",
        ADMIN_TOKEN,
        Some(json!({"name": "svc"})),
    )
    .await
    .unwrap();
    assert_eq!(taken.status(), 409);

    // A key brought from another gateway: its own secret, hashed alike; a
    // short one refused, the same secret twice refused.
    let brought = "sk-from-another-gateway-0123456789";
    let imported = call(
        Method::POST,
        "/admin/keys",
        ADMIN_TOKEN,
        Some(json!({"name": "imported", "secret": brought})),
    )
    .await
    .unwrap();
    assert_eq!(imported.status(), 201);
    assert_eq!(
        post_as(&gw.http, &gw.url, brought, small(3000))
            .await
            .status(),
        200,
        "the brought secret works as a key"
    );
    let again = call(
        Method::POST,
        "/admin/keys",
        ADMIN_TOKEN,
        Some(json!({"name": "imported-twice", "secret": brought})),
    )
    .await
    .unwrap();
    assert_eq!(again.status(), 409);
    let error: Value = again.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("secret"),
        "{error}"
    );
    let short = call(
        Method::POST,
        "/admin/keys",
        ADMIN_TOKEN,
        Some(json!({"name": "short", "secret": "sk-short"})),
    )
    .await
    .unwrap();
    assert_eq!(short.status(), 400);

    // Revoked: refused within a second.
    let revoked = call(Method::DELETE, "/admin/keys/svc", ADMIN_TOKEN, None)
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    let revoked: Value = revoked.json().await.unwrap();
    assert!(revoked["revoked_at"].is_string());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        post_as(&gw.http, &gw.url, &secret, small(2000))
            .await
            .status(),
        401
    );
    let keys: Value = call(Method::GET, "/admin/keys", ADMIN_TOKEN, None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        keys["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["name"] == "svc")
    );

    // Every change is in the audit log, newest first, with the record
    // before and after; refused changes left nothing.
    let audit: Value = call(Method::GET, "/admin/audit", ADMIN_TOKEN, None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entries = audit["data"].as_array().unwrap();
    let actions: Vec<&str> = entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "key.revoke",
            "key.create",
            "key.update",
            "key.create",
            "team.create"
        ],
        "{audit}"
    );
    assert!(entries.iter().all(|e| e["actor"] == "admin API token"));
    let update = &entries[2];
    assert_eq!(update["before"]["limits"]["requests_per_minute"], 2);
    assert_eq!(update["after"]["limits"]["requests_per_minute"], 5);
    assert!(entries[0]["before"]["revoked_at"].is_null());
    assert!(entries[0]["after"]["revoked_at"].is_string());
    assert!(!audit.to_string().contains(&secret), "no secret in the log");
    let svc_id = entries[0]["target"].as_str().unwrap();
    let older: Value = call(
        Method::GET,
        &format!(
            "/admin/audit?target={svc_id}&limit=1&before={}",
            entries[0]["id"]
        ),
        ADMIN_TOKEN,
        None,
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(older["data"][0]["action"], "key.update", "{older}");
    assert_eq!(older["has_more"], true);
}

/// `sluice` run against the SQLite store at `db`: its exit status, stdout and stderr.
fn cli(db: &std::path::Path, args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .env("SLUICE_STORE__URL", format!("sqlite://{}", db.display()))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn the_command_line_takes_limits_as_the_admin_api_does_and_brings_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("cli.db");
    // 0 is not a limit, on the command line as in the admin API and gateway.toml.
    let (ok, _, stderr) = cli(
        &db,
        &[
            "keys",
            "create",
            "--name",
            "z",
            "--requests-per-minute",
            "0",
        ],
        "",
    );
    assert!(
        !ok && stderr.contains("requests_per_minute must be at least 1"),
        "{stderr}"
    );
    let (ok, stdout, stderr) = cli(
        &db,
        &[
            "keys",
            "create",
            "--name",
            "a",
            "--requests-per-minute",
            "5",
        ],
        "",
    );
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("sk-sluice-"),
        "a new secret is shown: {stdout}"
    );
    // `none` removes the key's own limit: the default applies again.
    let (ok, stdout, stderr) = cli(
        &db,
        &["keys", "limit", "a", "--requests-per-minute", "none"],
        "",
    );
    assert!(ok && stdout.contains("defaults"), "{stdout}{stderr}");
    // A brought secret, from standard input: never printed back.
    let brought = "sk-migrated-from-litellm-abcdef012345";
    let (ok, stdout, stderr) = cli(
        &db,
        &["keys", "create", "--name", "migrated", "--secret-stdin"],
        &format!("{brought}\n"),
    );
    assert!(ok, "{stderr}");
    assert!(!stdout.contains(brought), "{stdout}");
    let (ok, _, stderr) = cli(
        &db,
        &["keys", "create", "--name", "again", "--secret-stdin"],
        &format!("{brought}\n"),
    );
    assert!(!ok && stderr.contains("already exists"), "{stderr}");
    let (ok, stdout, stderr) = cli(&db, &["keys", "revoke", "a"], "");
    assert!(ok && stdout.contains("revoked key"), "{stdout}{stderr}");
    let (ok, _, stderr) = cli(&db, &["keys", "revoke", "a"], "");
    assert!(!ok && stderr.contains("no active key"), "{stderr}");

    // The command line's changes are in the audit log, by the OS user, and
    // `sluice audit` lists them newest first.
    let (ok, stdout, stderr) = cli(&db, &["audit"], "");
    assert!(ok, "{stderr}");
    let rows: Vec<&str> = stdout.lines().skip(1).collect();
    let actions: Vec<&str> = rows
        .iter()
        .map(|row| {
            ["key.create", "key.update", "key.revoke"]
                .into_iter()
                .find(|action| row.contains(&format!(" {action} ")))
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(
        actions,
        ["key.revoke", "key.create", "key.update", "key.create"],
        "{stdout}"
    );
    assert!(
        rows.iter().all(|row| row.contains("command line (")),
        "{stdout}"
    );
    assert!(
        rows[2].contains("limits.requests_per_minute: 5 → –"),
        "{stdout}"
    );
    assert!(!stdout.contains(brought), "no secret in the log");
}
