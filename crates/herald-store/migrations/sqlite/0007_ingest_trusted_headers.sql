-- Headers that a source's signature does not cover (GitHub's X-GitHub-Event, Shopify's
-- X-Shopify-Topic, any {header:...} template) are read only when the source opts in.
ALTER TABLE ingest_sources ADD COLUMN trust_unsigned_headers INTEGER NOT NULL DEFAULT 0;

-- Sources created before the opt-in existed keep reading the headers they already read.
UPDATE ingest_sources
SET trust_unsigned_headers = 1
WHERE (kind IN ('github', 'shopify') AND event_type = '[]')
   OR event_type LIKE '%{header:%'
   OR channels LIKE '%{header:%';

-- hmac-sha256 sources no longer name a delivery-id header: it is not signed, so the body hash
-- deduplicates instead.
UPDATE ingest_sources SET hmac = json_remove(hmac, '$.id_header') WHERE hmac IS NOT NULL;
