//! The console's usage page on a large inference log: fills a fresh
//! database with rows spread over 90 days across many keys (one heavy key
//! with a fifth of all rows), then times the aggregation for one key over
//! 30 days (by hour and by day), for the heavy key, for a team and for all
//! keys by model, both as the store's query and as the whole page over
//! HTTP (sign-in, query, render).
//!
//!     cargo bench --bench usage                       # 1,000,000 rows in PostgreSQL
//!     cargo bench --bench usage -- --store sqlite     # the same in SQLite
//!
//! Other flags: --rows N (1000000), --keys N (200), --runs N (20),
//! --postgres URL ($SLUICE_TEST_POSTGRES or postgres://postgres@127.0.0.1:5432/test).

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use chrono::{Duration as Span, Utc};
use rand::{Rng, SeedableRng};
use sluice::backends::store::InferenceRecord;
use sluice::backends::store::usage::{Granularity, UsageGroup, UsageQuery};
use sluice::config::Config;
use sluice::tenancy::audit::Actor;
use sluice::tenancy::tenants::{self, KeyPatch};

const TOKEN: &str = "usage-bench-admin-token-0123456789";

struct Args {
    store: String,
    rows: usize,
    keys: usize,
    runs: usize,
    postgres: String,
}

impl Args {
    fn parse() -> Self {
        let mut args = Self {
            store: "postgres".into(),
            rows: 1_000_000,
            keys: 200,
            runs: 20,
            postgres: std::env::var("SLUICE_TEST_POSTGRES")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().expect("a value after the flag");
            match flag.as_str() {
                "--store" => args.store = value(),
                "--rows" => args.rows = value().parse().unwrap(),
                "--keys" => args.keys = value().parse().unwrap(),
                "--runs" => args.runs = value().parse().unwrap(),
                "--postgres" => args.postgres = value(),
                _ => {}
            }
        }
        args
    }
}

fn percentile(times: &mut [Duration], q: f64) -> f64 {
    times.sort();
    let at = ((times.len() as f64 - 1.0) * q).round() as usize;
    times[at].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().unwrap();
    let (url, database) = match args.store.as_str() {
        "sqlite" => (
            format!("sqlite://{}", dir.path().join("usage.db").display()),
            None,
        ),
        _ => {
            let name = format!(
                "sluice_bench_usage_{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            );
            let admin = sqlx::PgPool::connect(&args.postgres).await.unwrap();
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&admin)
                .await
                .unwrap();
            let (base, _) = args.postgres.rsplit_once('/').unwrap();
            (format!("{base}/{name}"), Some((admin, name)))
        }
    };
    let mut config = Config::default();
    config.store.url = url.clone().into();
    config.cache.url = "off".to_string().into();
    config.log.level = "error".into();
    config.admin.listen = Some("127.0.0.1:0".parse().unwrap());
    config.admin.token = Some(TOKEN.to_string().into());
    let gateway = sluice::Gateway::start(config).await.unwrap();
    let store = gateway.store();
    let admin = format!("http://{}", gateway.admin_addr().unwrap());

    // Keys (ten of them in a team) and the log.
    let actor = Actor::cli();
    let team = tenants::create_team(store.as_ref(), &actor, "bench-team", &Default::default())
        .await
        .unwrap();
    let mut ids = Vec::new();
    for k in 0..args.keys {
        let patch = KeyPatch {
            team: Some((k < 10).then(|| team.id.clone())),
            ..KeyPatch::default()
        };
        let key = tenants::create_key(store.as_ref(), &actor, &format!("bench-{k}"), &patch, None)
            .await
            .unwrap();
        ids.push(key.id);
    }
    let models = ["llama-3-8b", "llama-3-70b", "qwen-2.5-7b", "mistral-7b"];
    let started = Instant::now();
    let now = Utc::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut batch = Vec::with_capacity(5000);
    for row in 0..args.rows {
        // A fifth of the rows are the heavy key's (ids[0]); the rest spread evenly.
        let key = match row % 5 {
            0 => &ids[0],
            _ => &ids[1 + rng.random_range(0..ids.len() - 1)],
        };
        batch.push(InferenceRecord {
            request_id: format!("req-{row}"),
            key_id: key.clone(),
            route: "/v1/chat/completions".into(),
            model: models[rng.random_range(0..models.len())].into(),
            prompt_tokens: rng.random_range(10..2000),
            completion_tokens: rng.random_range(1..500),
            cache_hit: rng.random_bool(0.1),
            continuations: 0,
            status: if rng.random_bool(0.01) { 503 } else { 200 },
            ttft_ms: Some(rng.random_range(20.0..400.0)),
            total_ms: rng.random_range(100.0..9000.0),
            created_at: now - Span::seconds(rng.random_range(0..90 * 86_400)),
        });
        if batch.len() == batch.capacity() {
            store.insert_inferences(&batch).await.unwrap();
            batch.clear();
        }
    }
    store.insert_inferences(&batch).await.unwrap();
    let filled = started.elapsed();
    if let Some((admin, _)) = &database {
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        sqlx::query("VACUUM ANALYZE inference_logs")
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
        let _ = admin;
    }
    println!(
        "{} rows over 90 days, {} keys, in {} ({:.0} s to fill)",
        args.rows,
        args.keys,
        args.store,
        filled.as_secs_f64()
    );

    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(gateway.serve(listener, std::future::pending()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let signed_in = http
        .post(format!("{admin}/console/sign-in"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={TOKEN}"))
        .send()
        .await
        .unwrap();
    let cookie = signed_in.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();

    let today = now.date_naive();
    let from = today - Span::days(29);
    let month = |granularity, group, key_id: Option<&str>, team_id: Option<&str>| UsageQuery {
        from: from.and_hms_opt(0, 0, 0).unwrap().and_utc(),
        to: (today + Span::days(1))
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc(),
        granularity,
        group,
        key_id: key_id.map(String::from),
        team_id: team_id.map(String::from),
        model: None,
    };
    let typical = ids[ids.len() / 2].clone();
    let heavy = ids[0].clone();
    let cases = [
        (
            "one key, 30 days, by hour",
            month(Granularity::Hour, UsageGroup::Key, Some(&typical), None),
            format!("key={typical}&granularity=hour"),
        ),
        (
            "one key, 30 days, by day",
            month(Granularity::Day, UsageGroup::Key, Some(&typical), None),
            format!("key={typical}&granularity=day"),
        ),
        (
            "the heavy key (1/5 of rows), 30 days, by hour",
            month(Granularity::Hour, UsageGroup::Key, Some(&heavy), None),
            format!("key={heavy}&granularity=hour"),
        ),
        (
            "a team of 10 keys, 30 days, by day",
            month(Granularity::Day, UsageGroup::Team, None, Some(&team.id)),
            format!("team={}&group=team&granularity=day", team.id),
        ),
        (
            "all keys per model, 30 days, by day",
            month(Granularity::Day, UsageGroup::Model, None, None),
            "group=model&granularity=day".to_string(),
        ),
    ];
    println!();
    println!("| query | rows in range | store p50 | store p95 | page p50 | page p95 |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, query, params) in cases {
        let mut store_times = Vec::new();
        let mut page_times = Vec::new();
        let mut counted = 0;
        for run in 0..args.runs + 2 {
            let started = Instant::now();
            let rows = store.usage(&query).await.unwrap();
            let took = started.elapsed();
            counted = rows.iter().map(|r| r.requests).sum::<i64>();
            let started = Instant::now();
            let page = http
                .get(format!(
                    "{admin}/console/usage?from={from}&to={today}&{params}"
                ))
                .header("cookie", &cookie)
                .send()
                .await
                .unwrap();
            assert_eq!(page.status(), 200);
            let _ = page.bytes().await.unwrap();
            let page_took = started.elapsed();
            if run >= 2 {
                store_times.push(took);
                page_times.push(page_took);
            }
        }
        println!(
            "| {name} | {counted} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |",
            percentile(&mut store_times, 0.5),
            percentile(&mut store_times, 0.95),
            percentile(&mut page_times, 0.5),
            percentile(&mut page_times, 0.95),
        );
    }
    if let Some((admin, name)) = database {
        store.close().await;
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&admin)
            .await;
    }
}
