-- API tokens get an id, so they can be listed and revoked without their secret, and an
-- optional expiry (milliseconds since the epoch; NULL never expires). Tokens from before
-- (the dev token) get an id made here.
ALTER TABLE api_tokens ADD COLUMN id TEXT;
ALTER TABLE api_tokens ADD COLUMN expires_at INTEGER;
UPDATE api_tokens SET id = 'tok_' || lower(hex(randomblob(13))) WHERE id IS NULL;
CREATE UNIQUE INDEX api_tokens_id ON api_tokens (id);
CREATE INDEX api_tokens_app ON api_tokens (app_id, id);
