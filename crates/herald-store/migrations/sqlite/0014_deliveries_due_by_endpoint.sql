-- One endpoint's due deliveries, earliest first: the claim that asks only for the endpoints
-- held back at their limit (see src/sqlite/gate.rs) seeks here instead of walking the whole
-- queue past every other endpoint's backlog.
CREATE INDEX deliveries_due_by_endpoint ON deliveries (endpoint_id, next_attempt_at)
    WHERE status IN (1, 3);
