-- App portal links carry a token scoped to their app that manages its endpoints and messages
-- only: not the app's own settings, its Pusher secret, its ingest sources, channels or live
-- tail. Until this version a portal link's token was an ordinary app token; tokens made
-- before it keep what they had.
ALTER TABLE api_tokens ADD COLUMN portal INTEGER NOT NULL DEFAULT 0;
