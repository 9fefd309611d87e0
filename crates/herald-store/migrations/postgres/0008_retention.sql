-- Retention (see the README's "Retention"): when each message's payload is expunged, the
-- apps' own payload retention, and the indexes the sweeper and the deletion of an app walk.
ALTER TABLE messages ADD COLUMN payload_expires_at BIGINT;
-- Only payloads still to expunge are indexed: an expunged one has no expiry left.
CREATE INDEX messages_payload_expiry ON messages (payload_expires_at)
    WHERE payload_expires_at IS NOT NULL;
ALTER TABLE apps ADD COLUMN payload_retention_days BIGINT;
CREATE INDEX attempts_app ON attempts (app_id, id);
CREATE INDEX ingest_events_app ON ingest_events (app_id, id);
-- The sweeper deletes a steady trickle from these tables: vacuum them once 5% of their rows
-- are dead rather than the default 20%, so the space is reused sooner and they stay smaller.
ALTER TABLE messages SET (autovacuum_vacuum_scale_factor = 0.05);
ALTER TABLE deliveries SET (autovacuum_vacuum_scale_factor = 0.05);
ALTER TABLE attempts SET (autovacuum_vacuum_scale_factor = 0.05);
ALTER TABLE ingest_events SET (autovacuum_vacuum_scale_factor = 0.05);
