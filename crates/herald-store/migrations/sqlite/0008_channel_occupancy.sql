-- Who is in which channel, as channel webhooks last reported it: a row per occupied channel
-- (user_id '') and per presence member. Written in the same commit as the webhook messages
-- that report the change, so a restart after a crash or kill can report the leaves the
-- stopped process never sent.
CREATE TABLE channel_occupancy (
    app_id  TEXT NOT NULL,
    channel TEXT NOT NULL,
    user_id TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (app_id, channel, user_id)
) WITHOUT ROWID;
