-- Herald's embedded schema. Times are integer milliseconds since the Unix epoch; lists and maps
-- are JSON text; payloads are the producer's exact bytes.

CREATE TABLE apps (
    id            TEXT PRIMARY KEY,
    uid           TEXT UNIQUE,
    name          TEXT NOT NULL,
    throttle_rate INTEGER,
    metadata      TEXT NOT NULL DEFAULT '{}',
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);

-- API tokens are stored as SHA-256 hashes; app_id NULL means environment-wide.
CREATE TABLE api_tokens (
    token_hash BLOB PRIMARY KEY,
    app_id     TEXT REFERENCES apps(id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE event_types (
    name          TEXT PRIMARY KEY,
    description   TEXT NOT NULL,
    archived      INTEGER NOT NULL DEFAULT 0,
    deprecated    INTEGER NOT NULL DEFAULT 0,
    schemas       TEXT,
    group_name    TEXT,
    feature_flags TEXT,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);

CREATE TABLE endpoints (
    id               TEXT PRIMARY KEY,
    app_id           TEXT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    uid              TEXT,
    url              TEXT NOT NULL,
    description      TEXT NOT NULL DEFAULT '',
    throttle_rate    INTEGER,
    disabled         INTEGER NOT NULL DEFAULT 0,
    event_types      TEXT,
    channels         TEXT,
    metadata         TEXT NOT NULL DEFAULT '{}',
    headers          TEXT NOT NULL DEFAULT '{}',
    secret           TEXT NOT NULL,
    previous_secrets TEXT NOT NULL DEFAULT '[]',
    failing_since    INTEGER,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    UNIQUE (app_id, uid)
);
CREATE INDEX endpoints_app ON endpoints (app_id, id);

CREATE TABLE messages (
    id         TEXT PRIMARY KEY,
    app_id     TEXT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    event_id   TEXT,
    event_type TEXT NOT NULL,
    channels   TEXT,
    tags       TEXT,
    payload    BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (app_id, event_id)
);
CREATE INDEX messages_app ON messages (app_id, id);

-- The durable delivery queue: one row per (message, endpoint).
-- status: 0 success, 1 pending, 2 fail, 3 sending (leased until next_attempt_at).
-- attempts counts the scheduled attempts made so far; 0 means the first attempt is still due.
CREATE TABLE deliveries (
    msg_id          TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    endpoint_id     TEXT NOT NULL REFERENCES endpoints(id) ON DELETE CASCADE,
    app_id          TEXT NOT NULL,
    status          INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    trigger_type    INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER,
    updated_at      INTEGER NOT NULL,
    PRIMARY KEY (msg_id, endpoint_id)
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status IN (1, 3);
CREATE INDEX deliveries_endpoint ON deliveries (endpoint_id, status, updated_at);

CREATE TABLE attempts (
    id                   TEXT PRIMARY KEY,
    msg_id               TEXT NOT NULL,
    endpoint_id          TEXT NOT NULL,
    app_id               TEXT NOT NULL,
    url                  TEXT NOT NULL,
    status               INTEGER NOT NULL,
    response_status_code INTEGER NOT NULL,
    response             TEXT NOT NULL,
    response_duration_ms INTEGER NOT NULL,
    trigger_type         INTEGER NOT NULL,
    created_at           INTEGER NOT NULL
);
CREATE INDEX attempts_endpoint ON attempts (endpoint_id, id);
CREATE INDEX attempts_msg ON attempts (msg_id, id);

-- Responses replayed for a repeated Idempotency-Key.
CREATE TABLE idempotency (
    scope      TEXT NOT NULL,
    key        TEXT NOT NULL,
    status     INTEGER NOT NULL,
    body       BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
);
