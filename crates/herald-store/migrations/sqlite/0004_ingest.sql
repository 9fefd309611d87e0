-- Webhooks in: sources (how to verify and re-publish) and every verified request, kept raw.
CREATE TABLE ingest_sources (
    id              TEXT PRIMARY KEY,
    app_id          TEXT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    uid             TEXT,
    name            TEXT NOT NULL DEFAULT '',
    kind            TEXT NOT NULL,
    secrets         TEXT NOT NULL,
    hmac            TEXT,
    tolerance_secs  INTEGER NOT NULL,
    event_type      TEXT NOT NULL DEFAULT '[]',
    channels        TEXT NOT NULL DEFAULT '[]',
    default_channel TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
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
    body        BLOB NOT NULL,
    event_type  TEXT NOT NULL,
    channels    TEXT NOT NULL,
    msg_id      TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    UNIQUE (source_id, delivery_id)
);
CREATE INDEX ingest_events_source ON ingest_events (source_id, id);
