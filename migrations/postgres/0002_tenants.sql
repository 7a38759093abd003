-- Tenants: per-key limits and expiry, and teams of keys with limits of their own.
-- Limits are JSON: {"requests_per_minute", "tokens_per_minute", "max_concurrent", "models"}.
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS limits TEXT;
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS team_id TEXT;
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS expires_at TIMESTAMPTZ;

CREATE TABLE IF NOT EXISTS teams (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    limits      TEXT,
    created_at  TIMESTAMPTZ NOT NULL
);
