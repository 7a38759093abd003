-- API keys: only a SHA-256 of the secret is stored.
CREATE TABLE IF NOT EXISTS api_keys (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    key_hash    TEXT NOT NULL UNIQUE,
    created_at  TIMESTAMPTZ NOT NULL,
    revoked_at  TIMESTAMPTZ
);

-- One row per completion request.
CREATE TABLE IF NOT EXISTS inference_logs (
    request_id         TEXT NOT NULL,
    key_id             TEXT NOT NULL,
    model              TEXT NOT NULL,
    prompt_tokens      BIGINT NOT NULL,
    completion_tokens  BIGINT NOT NULL,
    cache_hit          BOOLEAN NOT NULL,
    status             INTEGER NOT NULL,
    ttft_ms            DOUBLE PRECISION,
    total_ms           DOUBLE PRECISION NOT NULL,
    created_at         TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS inference_logs_key_time ON inference_logs (key_id, created_at);
CREATE INDEX IF NOT EXISTS inference_logs_request ON inference_logs (request_id);
