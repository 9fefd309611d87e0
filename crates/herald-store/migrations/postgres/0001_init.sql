-- Herald's shared schema on PostgreSQL: the final state of migrations/sqlite/0001..0010 in one
-- step, with the same tables, columns and meanings, plus what a store shared by several nodes
-- cannot keep in one process's memory (delivery leases, a cluster-wide lease token sequence).
--
-- Times are BIGINT milliseconds since the Unix epoch, as in SQLite, so rows convert the same
-- way; lists and maps are JSON text (TEXT, not JSONB: the text is what the API wrote, and
-- filters cast it, e.g. channels::jsonb ? $1); payloads and bodies are the exact bytes (BYTEA);
-- flags are BOOLEAN; status and trigger codes are INTEGER (read them as i32).

CREATE TABLE apps (
    id                           TEXT PRIMARY KEY,
    uid                          TEXT UNIQUE,
    name                         TEXT NOT NULL,
    throttle_rate                BIGINT,
    metadata                     TEXT NOT NULL DEFAULT '{}',
    created_at                   BIGINT NOT NULL,
    updated_at                   BIGINT NOT NULL,
    -- Pusher Channels credentials: a numeric app id, a public key and a secret.
    pusher_app_id                BIGINT NOT NULL,
    pusher_key                   TEXT NOT NULL,
    pusher_secret                TEXT NOT NULL,
    -- A rotated-out Pusher secret keeps verifying until pusher_previous_secret_until.
    pusher_previous_secret       TEXT,
    pusher_previous_secret_until BIGINT,
    -- Per-app channel history rules (JSON array of {pattern, maxEvents, maxAgeSecs}).
    history_rules                TEXT
);
CREATE UNIQUE INDEX apps_pusher_app_id ON apps (pusher_app_id);
CREATE UNIQUE INDEX apps_pusher_key ON apps (pusher_key);

-- API tokens are stored as SHA-256 hashes; app_id NULL means environment-wide.
CREATE TABLE api_tokens (
    token_hash BYTEA PRIMARY KEY,
    app_id     TEXT REFERENCES apps(id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE event_types (
    name          TEXT PRIMARY KEY,
    description   TEXT NOT NULL,
    archived      BOOLEAN NOT NULL DEFAULT FALSE,
    deprecated    BOOLEAN NOT NULL DEFAULT FALSE,
    schemas       TEXT,
    group_name    TEXT,
    feature_flags TEXT,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);

CREATE TABLE endpoints (
    id               TEXT PRIMARY KEY,
    app_id           TEXT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    uid              TEXT,
    url              TEXT NOT NULL,
    description      TEXT NOT NULL DEFAULT '',
    throttle_rate    BIGINT,
    disabled         BOOLEAN NOT NULL DEFAULT FALSE,
    event_types      TEXT,
    channels         TEXT,
    metadata         TEXT NOT NULL DEFAULT '{}',
    headers          TEXT NOT NULL DEFAULT '{}',
    secret           TEXT NOT NULL,
    -- JSON array of [secret, expires_at_millis] pairs.
    previous_secrets TEXT NOT NULL DEFAULT '[]',
    failing_since    BIGINT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    -- 'standard-webhooks' (the app's messages) or 'pusher' (channel webhooks).
    format           TEXT NOT NULL DEFAULT 'standard-webhooks',
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
    payload    BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (app_id, event_id)
);
CREATE INDEX messages_app ON messages (app_id, id);

-- The durable delivery queue: one row per (message, endpoint).
-- status: 0 success, 1 pending, 2 fail, 3 sending.
-- attempts counts the scheduled attempts made so far; 0 means the first attempt is still due.
-- trigger_type: 0 scheduled, 1 manual.
--
-- Leases live in the row (SQLite keeps them in one process's memory): a claim sets
-- lease_token (a fresh value of delivery_lease_tokens, unique across nodes) and leased_until
-- (millis); the row is claimable again once leased_until has passed, so a dead node's claims
-- are taken over after they expire. An attempt record applies only while lease_token still
-- equals its token (the fence), then clears both columns; a manual enqueue clears them too.
CREATE TABLE deliveries (
    msg_id          TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    endpoint_id     TEXT NOT NULL REFERENCES endpoints(id) ON DELETE CASCADE,
    app_id          TEXT NOT NULL,
    status          INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    trigger_type    INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT,
    updated_at      BIGINT NOT NULL,
    lease_token     BIGINT NULL,
    leased_until    BIGINT NULL,
    PRIMARY KEY (msg_id, endpoint_id)
);
CREATE SEQUENCE delivery_lease_tokens AS BIGINT START WITH 1;
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status IN (1, 3);
-- The two claim lanes: first attempts, and retries and manual attempts.
CREATE INDEX deliveries_due_first ON deliveries (next_attempt_at)
    WHERE status IN (1, 3) AND attempts = 0 AND trigger_type = 0;
CREATE INDEX deliveries_due_retry ON deliveries (next_attempt_at)
    WHERE status IN (1, 3) AND NOT (attempts = 0 AND trigger_type = 0);
-- What is in flight cluster-wide, per app and endpoint (the claims' limits), and expired leases.
CREATE INDEX deliveries_leased ON deliveries (app_id, endpoint_id, leased_until)
    WHERE lease_token IS NOT NULL;
CREATE INDEX deliveries_endpoint ON deliveries (endpoint_id, status, updated_at);
-- The messages attempted to one endpoint, newest first (Svix's listAttemptedMessages).
CREATE INDEX deliveries_endpoint_msg ON deliveries (endpoint_id, msg_id);

CREATE TABLE attempts (
    id                   TEXT PRIMARY KEY,
    msg_id               TEXT NOT NULL,
    endpoint_id          TEXT NOT NULL,
    app_id               TEXT NOT NULL,
    url                  TEXT NOT NULL,
    status               INTEGER NOT NULL,
    response_status_code INTEGER NOT NULL,
    response             TEXT NOT NULL,
    response_duration_ms BIGINT NOT NULL,
    trigger_type         INTEGER NOT NULL,
    created_at           BIGINT NOT NULL
);
CREATE INDEX attempts_endpoint ON attempts (endpoint_id, id);
CREATE INDEX attempts_msg ON attempts (msg_id, id);

-- Responses replayed for a repeated Idempotency-Key. seq is the insertion order (SQLite's
-- rowid): the purge keeps the newest rows and bytes by it.
CREATE TABLE idempotency (
    scope      TEXT NOT NULL,
    key        TEXT NOT NULL,
    status     INTEGER NOT NULL,
    body       BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    seq        BIGINT GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (scope, key)
);
CREATE UNIQUE INDEX idempotency_seq ON idempotency (seq);
CREATE INDEX idempotency_created ON idempotency (created_at);

-- Webhooks in: sources (how to verify and re-publish) and every verified request, kept raw.
CREATE TABLE ingest_sources (
    id                     TEXT PRIMARY KEY,
    app_id                 TEXT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    uid                    TEXT,
    name                   TEXT NOT NULL DEFAULT '',
    kind                   TEXT NOT NULL,
    secrets                TEXT NOT NULL,
    hmac                   TEXT,
    tolerance_secs         BIGINT NOT NULL,
    event_type             TEXT NOT NULL DEFAULT '[]',
    channels               TEXT NOT NULL DEFAULT '[]',
    default_channel        TEXT,
    created_at             BIGINT NOT NULL,
    updated_at             BIGINT NOT NULL,
    -- Headers the signature does not cover are read only when the source opts in.
    trust_unsigned_headers BOOLEAN NOT NULL DEFAULT FALSE,
    UNIQUE (app_id, uid)
);
CREATE INDEX ingest_sources_app ON ingest_sources (app_id, id);

CREATE TABLE ingest_events (
    id          TEXT PRIMARY KEY,
    source_id   TEXT NOT NULL REFERENCES ingest_sources(id) ON DELETE CASCADE,
    app_id      TEXT NOT NULL,
    -- The provider's delivery id: a provider's retry carries the same one.
    delivery_id TEXT NOT NULL,
    headers     TEXT NOT NULL,
    body        BYTEA NOT NULL,
    event_type  TEXT NOT NULL,
    channels    TEXT NOT NULL,
    msg_id      TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    UNIQUE (source_id, delivery_id)
);
CREATE INDEX ingest_events_source ON ingest_events (source_id, id);

-- Channel history: recent events of history channels with gap-free offsets per channel (seq),
-- and each channel's epoch and next offset. Offsets are assigned in the database, in the
-- publishing transaction: it upserts the channel's channel_positions row, advancing
-- next_offset by the number of entries (INSERT ... ON CONFLICT DO UPDATE ... RETURNING),
-- which row-locks the position until commit. Publishers of one channel on any node therefore
-- take turns, a rolled-back write consumes no offset, and offsets rise in commit order.
CREATE TABLE channel_history (
    app_id     TEXT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    channel    TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    epoch      TEXT NOT NULL,
    event      TEXT NOT NULL,
    data       TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    -- Client events keep the JSON the client sent, and the sender's user id on presence
    -- channels.
    raw_json   BOOLEAN NOT NULL DEFAULT FALSE,
    user_id    TEXT,
    PRIMARY KEY (app_id, channel, seq)
);

CREATE TABLE channel_positions (
    app_id      TEXT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    channel     TEXT NOT NULL,
    epoch       TEXT NOT NULL,
    next_offset BIGINT NOT NULL,
    PRIMARY KEY (app_id, channel)
);

-- Who is in which channel, as channel webhooks last reported it: a row per occupied channel
-- (user_id '') and per presence member, written in the commit of the webhook messages that
-- report the change.
CREATE TABLE channel_occupancy (
    app_id  TEXT NOT NULL,
    channel TEXT NOT NULL,
    user_id TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (app_id, channel, user_id)
);
