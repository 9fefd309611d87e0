-- Retention (see the README's "Retention"): when each message's payload is expunged, the
-- apps' own payload retention, and the indexes the sweeper and the deletion of an app walk.
ALTER TABLE messages ADD COLUMN payload_expires_at INTEGER;
-- Only payloads still to expunge are indexed: an expunged one has no expiry left.
CREATE INDEX messages_payload_expiry ON messages (payload_expires_at)
    WHERE payload_expires_at IS NOT NULL;
ALTER TABLE apps ADD COLUMN payload_retention_days INTEGER;
CREATE INDEX attempts_app ON attempts (app_id, id);
CREATE INDEX ingest_events_app ON ingest_events (app_id, id);
