-- Housekeeping deletes the tokens that expired a month ago (an app portal link mints one per
-- page view): found through this index rather than by reading every token each hour.
CREATE INDEX api_tokens_expiry ON api_tokens (expires_at) WHERE expires_at IS NOT NULL;
