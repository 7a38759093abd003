-- Every change to keys and teams, by whom (a console session, the admin
-- token, the command line), with the record before and after as JSON.
CREATE TABLE IF NOT EXISTS audit_log (
    id      BIGSERIAL PRIMARY KEY,
    at      TIMESTAMPTZ NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    target  TEXT NOT NULL,
    before  TEXT,
    after   TEXT
);
CREATE INDEX IF NOT EXISTS audit_log_target ON audit_log (target, id);

-- Usage by key over a time range reads only this index (an index-only scan);
-- usage across all keys reads the time index.
CREATE INDEX IF NOT EXISTS inference_logs_usage ON inference_logs (key_id, created_at)
    INCLUDE (model, prompt_tokens, completion_tokens, cache_hit, status);
DROP INDEX IF EXISTS inference_logs_key_time;
CREATE INDEX IF NOT EXISTS inference_logs_time ON inference_logs (created_at);
