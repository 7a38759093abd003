-- OpenAI's Files and Batch APIs. Timestamps are Unix seconds (leases: Unix
-- milliseconds), as the APIs report them.

-- A file of a key (or of its team: `owner` is `key:<id>` or `team:<id>`).
CREATE TABLE IF NOT EXISTS files (
    id          TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    filename    TEXT NOT NULL,
    purpose     TEXT NOT NULL,
    bytes       BIGINT NOT NULL,
    -- Whole once every part is written; a half-uploaded file is never listed.
    complete    BOOLEAN NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT
);
CREATE INDEX IF NOT EXISTS files_owner ON files (owner, created_at);
CREATE INDEX IF NOT EXISTS files_expiry ON files (expires_at);

-- A file's content, in parts of up to `batch.file_part_bytes`.
CREATE TABLE IF NOT EXISTS file_parts (
    file_id  TEXT NOT NULL,
    part     INTEGER NOT NULL,
    data     BLOB NOT NULL,
    PRIMARY KEY (file_id, part)
);

CREATE TABLE IF NOT EXISTS batches (
    id                 TEXT PRIMARY KEY,
    owner              TEXT NOT NULL,
    -- The key that created it: its items run as that key.
    key_id             TEXT NOT NULL,
    endpoint           TEXT NOT NULL,
    input_file_id      TEXT NOT NULL,
    output_file_id     TEXT,
    error_file_id      TEXT,
    status             TEXT NOT NULL,
    completion_window  TEXT NOT NULL,
    metadata           TEXT,
    errors             TEXT,
    -- While finalizing: the status it ends in (completed, expired, cancelled).
    ending             TEXT,
    total              BIGINT NOT NULL DEFAULT 0,
    completed          BIGINT NOT NULL DEFAULT 0,
    failed             BIGINT NOT NULL DEFAULT 0,
    -- Who validates or finalizes it, until when (a runner that dies lets go).
    lease_until        BIGINT NOT NULL DEFAULT 0,
    created_at         BIGINT NOT NULL,
    in_progress_at     BIGINT,
    expires_at         BIGINT NOT NULL,
    finalizing_at      BIGINT,
    completed_at       BIGINT,
    failed_at          BIGINT,
    expired_at         BIGINT,
    cancelling_at      BIGINT,
    cancelled_at       BIGINT
);
CREATE INDEX IF NOT EXISTS batches_owner ON batches (owner, created_at);
CREATE INDEX IF NOT EXISTS batches_status ON batches (status);

-- One line of a batch's input. state: 0 waiting, 1 running (leased), 2 done.
CREATE TABLE IF NOT EXISTS batch_items (
    batch_id     TEXT NOT NULL,
    line         INTEGER NOT NULL,
    custom_id    TEXT NOT NULL,
    body         BLOB NOT NULL,
    state        INTEGER NOT NULL DEFAULT 0,
    runner       TEXT,
    lease_until  BIGINT NOT NULL DEFAULT 0,
    attempts     INTEGER NOT NULL DEFAULT 0,
    status_code  INTEGER,
    request_id   TEXT,
    -- The answer's body (a JSON document), or the error's.
    output       BLOB,
    PRIMARY KEY (batch_id, line),
    UNIQUE (batch_id, custom_id)
);
CREATE INDEX IF NOT EXISTS batch_items_waiting ON batch_items (state, lease_until);
