-- Every change to keys and teams, by whom (a console session, the admin
-- token, the command line), with the record before and after as JSON.
CREATE TABLE IF NOT EXISTS audit_log (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      TIMESTAMPTZ NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    target  TEXT NOT NULL,
    before  TEXT,
    after   TEXT
);
CREATE INDEX IF NOT EXISTS audit_log_target ON audit_log (target, id);

-- Usage over a time range across all keys (one key's uses the key and time index).
CREATE INDEX IF NOT EXISTS inference_logs_time ON inference_logs (created_at);
