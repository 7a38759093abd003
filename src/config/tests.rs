//! The loader's promises: defaults, overrides, and errors that name the key and its origin.

use std::path::Path;
use std::time::Duration;

use secrecy::ExposeSecret;

use super::*;

fn load(toml_text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, toml_text).unwrap();
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    Config::load_with_env(Some(&path), env)
}

#[test]
fn the_shipped_configs_are_valid() {
    for file in ["gateway.toml", "examples/production.toml"] {
        let path = format!("{}/{file}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap();
        load(&text, &[]).unwrap_or_else(|err| panic!("{file}: {err}"));
    }
    let production = load(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/production.toml"
        ))
        .unwrap(),
        &[],
    )
    .unwrap();
    assert!(production.limits.redis_url().is_some());
    assert_eq!(production.limits.default.requests_per_minute, Some(600));
}

#[test]
fn nonsensical_limits_stop_startup_naming_the_key() {
    let err = load("[limits.default]\nrequests_per_minute = 0\n", &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("limits.default") && err.contains("requests_per_minute"),
        "{err}"
    );
    let err = load("[limits.default]\ntokens_per_minute = -5\n", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("tokens_per_minute"), "{err}");
    let err = load("[limits]\nedges = 0\n", &[]).unwrap_err().to_string();
    assert!(err.contains("limits.edges"), "{err}");
    let err = load("[limits]\nurl = \"kafka://x\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("limits.url"), "{err}");
}

#[test]
fn the_defaults_are_documented_values() {
    let config = load("", &[]).unwrap();
    assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(config.server.shutdown_grace, Duration::from_secs(10));
    assert_eq!(config.upstream.urls[0].as_str(), "http://127.0.0.1:8000/");
    assert_eq!(config.telemetry.protocol, OtlpProtocol::HttpProtobuf);
    assert!(matches!(config.queue.backend, QueueBackend::Memory { .. }));
}

#[test]
fn unknown_keys_are_rejected_with_their_name() {
    let err = load("[server]\nlisten = \"127.0.0.1:1\"\nlisnen = 3\n", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("lisnen"), "{err}");
    assert!(err.contains("server"), "{err}");
    assert!(err.contains("gateway.toml"), "{err}");
}

#[test]
fn malformed_toml_names_the_file() {
    let err = load("[server\n", &[]).unwrap_err().to_string();
    assert!(err.contains("gateway.toml"), "{err}");
}

#[test]
fn a_missing_config_file_is_an_error() {
    let err = Config::load_with_env(Some(Path::new("/nonexistent/gateway.toml")), [])
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/gateway.toml"), "{err}");
}

#[test]
fn invalid_values_name_the_key() {
    for (toml, key) in [
        ("[store]\nurl = \"mysql://x\"\n", "store.url"),
        (
            "[server]\nmax_body_bytes = \"big\"\n",
            "server.max_body_bytes",
        ),
        ("[server]\nlisten = \"nowhere\"\n", "server.listen"),
        ("[upstream]\nurls = [\"ftp://x\"]\n", "upstream.urls"),
        ("[log]\nformat = \"xml\"\n", "log.format"),
        ("[telemetry]\nprotocol = \"thrift\"\n", "telemetry.protocol"),
        (
            "[plugin_host]\nmax_instances = 8\n",
            "plugin_host.max_instances",
        ),
        (
            "[[plugins]]\nname = \"p\"\npath = \"p.wasm\"\non_error = \"maybe\"\n",
            "plugins",
        ),
        (
            "[queue]\nurl = \"kafka://k:9092\"\nmax_outbox_bytes = 100\n[worker]\nin_process = false\n",
            "queue.max_outbox_bytes",
        ),
        (
            "[queue]\nurl = \"kafka://k:9092\"\n[queue.producer]\n\"message.max.bytes\" = \"1MB\"\n[worker]\nin_process = false\n",
            "queue.producer.message.max.bytes",
        ),
        ("[resume]\nurl = \"kafka://k\"\n", "resume.url"),
        ("[responses]\nurl = \"http://x\"\n", "responses.url"),
        (
            "[resume]\nmax_stream_bytes = 2000\nmax_total_bytes = 1000\n",
            "resume.max_stream_bytes",
        ),
        ("[resume]\ngrace_ms = 0\n", "resume.grace_ms"),
    ] {
        let err = load(toml, &[]).unwrap_err().to_string();
        assert!(err.contains(key), "{toml}: {err}");
    }
    let config = load("[plugin_host]\nmax_instances = 64\n", &[]).unwrap();
    assert_eq!(config.plugin_host.max_instances, 64);
    assert_eq!(config.plugin_host.idle_instances(), 16);
    let config = load("[plugin_host]\nmax_instances = 16\n", &[]).unwrap();
    assert_eq!(config.plugin_host.idle_instances(), 8, "the default fits");
    let err = load(
        "[plugin_host]\nmax_instances = 64\nmax_idle_instances = 33\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("plugin_host.max_idle_instances"), "{err}");
}

#[test]
fn environment_overrides_the_file_and_is_named_in_errors() {
    let config = load(
        "[store]\nurl = \"sqlite://a.db\"\n",
        &[
            ("SLUICE_STORE__URL", "sqlite://b.db"),
            ("SLUICE_WORKER__CONCURRENCY", "7"),
            ("SLUICE_PLUGIN_HOST__WATCH", "false"),
            ("SLUICE_TELEMETRY__SAMPLE_RATIO", "0.25"),
            ("SLUICE_UPSTREAM__URLS", "http://a:8000, http://b:8000"),
        ],
    )
    .unwrap();
    assert_eq!(config.store.url.expose_secret(), "sqlite://b.db");
    assert_eq!(config.worker.concurrency.get(), 7);
    assert!(!config.plugin_host.watch);
    assert_eq!(config.telemetry.sample_ratio, 0.25);
    assert_eq!(config.upstream.urls.len(), 2);
    let err = load("", &[("SLUICE_CACHE__URL", "memcached://x")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("SLUICE_CACHE__URL"), "{err}");
    let err = load("", &[("SLUICE_WORKER__CONCURRENCY", "many")])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("worker.concurrency") && err.contains("SLUICE_WORKER__CONCURRENCY"),
        "{err}"
    );
}

#[test]
fn environment_values_that_look_like_numbers_stay_strings_for_string_keys() {
    let config = load(
        "[queue]\nurl = \"kafka://127.0.0.1:9092\"\n[worker]\nin_process = false\n",
        &[
            ("SLUICE_UPSTREAM__API_KEY", "12345"),
            ("SLUICE_QUEUE__EDGE_ID", "007"),
            ("SLUICE_CACHE__KEY_PREFIX", "true"),
            ("SLUICE_TELEMETRY__SERVICE_NAME", "1.5"),
        ],
    )
    .unwrap();
    assert_eq!(
        config
            .upstream
            .api_key
            .as_ref()
            .map(ExposeSecret::expose_secret),
        Some("12345")
    );
    assert!(
        !format!("{config:?}").contains("12345"),
        "secrets stay out of Debug output"
    );
    let QueueBackend::Kafka(kafka) = config.queue.backend else {
        panic!("not kafka")
    };
    assert_eq!(kafka.edge_id, "007");
    assert_eq!(config.telemetry.service_name, "1.5");
    let config = load(
        "[cache]\nurl = \"redis://h:6379\"\n",
        &[("SLUICE_CACHE__KEY_PREFIX", "true")],
    )
    .unwrap();
    assert_eq!(config.cache.backend(), CacheBackend::Redis);
    assert_eq!(config.cache.key_prefix, "true");
}

#[test]
fn other_sluice_variables_are_not_config_keys() {
    let config = load(
        "",
        &[
            ("SLUICE_CONFIG", "x.toml"),
            ("SLUICE_PYTHON", "/usr/bin/python3"),
        ],
    )
    .unwrap();
    assert_eq!(config.server.listen.port(), 8080);
    let err = load("", &[("SLUICE_SERVER__LISEN", "1")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("SLUICE_SERVER__LISEN"), "{err}");
}

#[test]
fn kafka_settings_from_env_use_dotted_names() {
    let config = load(
        "[queue]\nurl = \"kafka://127.0.0.1:9092\"\n[queue.producer]\n\"linger.ms\" = 2\n[worker]\nin_process = false\n",
        &[("SLUICE_QUEUE__CONSUMER__FETCH_WAIT_MAX_MS", "1")],
    )
    .unwrap();
    let QueueBackend::Kafka(kafka) = config.queue.backend else {
        panic!("not kafka")
    };
    assert_eq!(
        kafka.consumer.get("fetch.wait.max.ms").map(String::as_str),
        Some("1")
    );
    assert_eq!(
        kafka.producer.get("linger.ms").map(String::as_str),
        Some("2")
    );
}

#[test]
fn plugin_paths_are_relative_to_the_config_file() {
    let config = load(
        "[[plugins]]\nname = \"p\"\npath = \"plugins/p.wasm\"\n[plugins.config]\nwords = [\"a\"]\n",
        &[],
    )
    .unwrap();
    let plugin = &config.plugins[0];
    assert!(plugin.path.is_absolute(), "{:?}", plugin.path);
    assert!(plugin.path.ends_with("plugins/p.wasm"));
    assert_eq!(plugin.config_json, r#"{"words":["a"]}"#);
    assert_eq!(plugin.on_error, OnError::FailOpen);
}

#[test]
fn keys_in_lists_are_named_one_way_with_where_they_came_from() {
    let two = "[[models]]\nname = \"a\"\nendpoints = [\"http://a:8000\"]\n\
               [[models]]\nname = \"b\"\nendpoints = [\"http://b:8000\"]\n";
    let err = load(&format!("{two}balance = \"fastest\"\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("`models[1].balance`"), "{err}");
    assert!(err.contains("gateway.toml"), "{err}");
    let err = load(&format!("{two}aliases = [\"a\"]\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("`models[1].name`"), "{err}");
    assert!(
        err.contains("gateway.toml"),
        "names where the value came from: {err}"
    );
}

#[test]
fn kafka_retention_must_outlast_a_requests_waits() {
    let kafka = "[worker]\nin_process = false\n[queue]\nurl = \"kafka://k:9092\"\nqueue_timeout_ms = 30000\nmax_attempts = 3\n";
    let err = load(&format!("{kafka}retention_ms = 60000\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("queue.retention_ms") && err.contains("90000"),
        "{err}"
    );
    let config = load(kafka, &[]).unwrap();
    let QueueBackend::Kafka(kafka) = config.queue.backend else {
        panic!("not kafka")
    };
    assert_eq!(kafka.retention, Duration::from_secs(600));
}
