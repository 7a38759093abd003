-- Tenants: per-key limits and expiry, and teams of keys with limits of their own.
-- Limits are JSON: {"requests_per_minute", "tokens_per_minute", "max_concurrent", "models"}.
ALTER TABLE api_keys ADD COLUMN limits TEXT;
ALTER TABLE api_keys ADD COLUMN team_id TEXT;
ALTER TABLE api_keys ADD COLUMN expires_at TEXT;

CREATE TABLE IF NOT EXISTS teams (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    limits      TEXT,
    created_at  TEXT NOT NULL
);
