-- API tokens get an id, so they can be listed and revoked without their secret, and an
-- optional expiry (milliseconds since the epoch; NULL never expires). Tokens from before
-- (the dev token) get an id made here.
ALTER TABLE api_tokens ADD COLUMN id TEXT;
ALTER TABLE api_tokens ADD COLUMN expires_at BIGINT;
UPDATE api_tokens SET id = 'tok_' || md5(random()::text || encode(token_hash, 'hex')) WHERE id IS NULL;
ALTER TABLE api_tokens ALTER COLUMN id SET NOT NULL;
CREATE UNIQUE INDEX api_tokens_id ON api_tokens (id);
CREATE INDEX api_tokens_app ON api_tokens (app_id, id);
