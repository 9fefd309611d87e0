-- Pusher Channels credentials per app: a numeric app id, a public key and a secret.
ALTER TABLE apps ADD COLUMN pusher_app_id INTEGER;
ALTER TABLE apps ADD COLUMN pusher_key TEXT;
ALTER TABLE apps ADD COLUMN pusher_secret TEXT;

-- Apps created before this migration get credentials now.
UPDATE apps
SET pusher_app_id = 1000000 + rowid,
    pusher_key = lower(hex(randomblob(10))),
    pusher_secret = lower(hex(randomblob(10)))
WHERE pusher_app_id IS NULL;

CREATE UNIQUE INDEX apps_pusher_app_id ON apps (pusher_app_id);
CREATE UNIQUE INDEX apps_pusher_key ON apps (pusher_key);
