//! Real backends for production-mode tests: a fresh PostgreSQL database, a
//! fresh Redis key prefix and fresh Kafka topics per test, so runs never
//! interfere. When a backend is unreachable the test is skipped with a
//! message, unless `CI` or `SLUICE_REQUIRE_SERVICES` is set: then it fails.

use std::time::Duration;

use sluice::config::Config;

pub struct Services {
    pub id: String,
    pub postgres: String,
    pub redis: String,
    pub kafka: String,
    admin_postgres: String,
}

fn required() -> bool {
    std::env::var_os("CI").is_some() || std::env::var_os("SLUICE_REQUIRE_SERVICES").is_some()
}

async fn reachable(host_port: &str) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(host_port)
        )
        .await,
        Ok(Ok(_))
    )
}

fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split(['/', '?']).next().unwrap_or(rest).to_string()
}

impl Services {
    /// Fresh resources on the configured backends, or `None` (skip) when they
    /// are unreachable and not required.
    pub async fn fresh() -> Option<Self> {
        let postgres = std::env::var("SLUICE_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let redis =
            std::env::var("SLUICE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let kafka = std::env::var("SLUICE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into());
        for (name, address) in [
            ("PostgreSQL", host_port(&postgres)),
            ("Redis", host_port(&redis)),
            ("Kafka", kafka.clone()),
        ] {
            if !reachable(&address).await {
                assert!(
                    !required(),
                    "{name} is not reachable at {address}, and CI/SLUICE_REQUIRE_SERVICES is set"
                );
                eprintln!(
                    "SKIPPED: {name} is not reachable at {address} (scripts/test.sh starts it)"
                );
                return None;
            }
        }
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let database = format!("sluice_test_{id}");
        let admin = sqlx::PgPool::connect(&postgres)
            .await
            .expect("connect to PostgreSQL");
        sqlx::query(&format!("CREATE DATABASE {database}"))
            .execute(&admin)
            .await
            .expect("create database");
        admin.close().await;
        let (base, _) = postgres
            .rsplit_once('/')
            .expect("postgres URL has a database");
        Some(Self {
            postgres: format!("{base}/{database}"),
            admin_postgres: postgres,
            redis,
            kafka,
            id,
        })
    }

    /// A config for this test's resources: PostgreSQL store, Redis cache and Kafka queue
    /// with settings that suit tansu. `extra` is appended TOML (it may override sections' keys).
    pub fn config(&self, upstream: &str, extra: &str) -> Config {
        let base = format!(
            r#"
            [server]
            shutdown_grace_ms = 2000
            [store]
            url = "{postgres}"
            max_connections = 4
            [cache]
            url = "{redis}"
            key_prefix = "sluice-test-{id}:"
            sampled = true
            [resume]
            key_prefix = "sluice-test-{id}:stream:"
            grace_ms = 200
            [upstream]
            urls = ["{upstream}"]
            idle_timeout_ms = 10000
            [log]
            level = "warn"
            "#,
            postgres = self.postgres,
            redis = self.redis,
            id = self.id,
        );
        config_from_toml(&merge_toml(&base, extra))
    }

    /// The `[queue]` section for Kafka with this test's topics.
    pub fn kafka_queue(&self, in_process_worker: bool) -> String {
        format!(
            r#"
            [queue]
            url = "kafka://{kafka}"
            request_topic = "sluice-test-{id}.requests"
            response_topic = "sluice-test-{id}.responses"
            cancel_topic = "sluice-test-{id}.cancels"
            worker_group = "sluice-test-{id}-workers"
            partitions = 4
            worker_timeout_ms = 1500
            heartbeat_ms = 200
            queue_timeout_ms = 20000
            [queue.producer]
            "linger.ms" = 0
            [queue.consumer]
            "fetch.wait.max.ms" = 1
            "fetch.error.backoff.ms" = 10
            "session.timeout.ms" = 6000
            "heartbeat.interval.ms" = 500
            [worker]
            in_process = {in_process_worker}
            "#,
            kafka = self.kafka,
            id = self.id,
        )
    }

    pub async fn drop_database(&self) {
        if let Ok(admin) = sqlx::PgPool::connect(&self.admin_postgres).await {
            let database = format!("sluice_test_{}", self.id);
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
                .execute(&admin)
                .await;
        }
    }
}

/// Merges two TOML documents, the second winning key by key.
pub fn merge_toml(base: &str, extra: &str) -> String {
    fn merge(into: &mut toml::Table, from: toml::Table) {
        for (key, value) in from {
            match (into.get_mut(&key), value) {
                (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
                (_, value) => {
                    into.insert(key, value);
                }
            }
        }
    }
    let mut table: toml::Table = base.parse().expect("base TOML");
    merge(&mut table, extra.parse().expect("extra TOML"));
    toml::to_string(&table).expect("TOML")
}

pub fn config_from_toml(text: &str) -> Config {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    let mut config = Config::load_with_env(Some(&path), []).expect("test config is valid");
    // The file is temporary: nothing to watch.
    config.source = None;
    config
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Redis server of this test's own on `port`, to kill (SIGKILL) mid-test.
pub fn start_redis(port: u16) -> std::process::Child {
    let binary = std::env::var("SLUICE_TEST_REDIS_SERVER")
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "redis-server".into());
    let child = std::process::Command::new(binary)
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server runs");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}
