-- Channel history: recent events of history channels with gap-free offsets per channel, and
-- each channel's epoch and next offset. Per-app rules override the server's defaults.
ALTER TABLE apps ADD COLUMN history_rules TEXT;

CREATE TABLE channel_history (
    app_id     TEXT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    channel    TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    epoch      TEXT NOT NULL,
    event      TEXT NOT NULL,
    data       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (app_id, channel, seq)
) WITHOUT ROWID;

CREATE TABLE channel_positions (
    app_id      TEXT NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    channel     TEXT NOT NULL,
    epoch       TEXT NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (app_id, channel)
) WITHOUT ROWID;
