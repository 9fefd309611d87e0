-- deliveries_endpoint (endpoint_id, status, updated_at) had an entry for every delivery ever
-- made, and every update of a delivery (a lease, an attempt's record) changes an indexed
-- column, so each one added an entry to it as to every index of the table (no HOT update).
-- Deliveries that succeeded need no entry: an endpoint's success count is its total
-- (deliveries_endpoint_msg) less the others, and a partial index takes an entry only from a
-- row that matches it. The entries left are the deliveries still due or in flight and the
-- failed ones (what a recover walks), by message. The same change as SQLite's migration 0015.
DROP INDEX deliveries_endpoint;
CREATE INDEX deliveries_endpoint_unsettled ON deliveries (endpoint_id, status, msg_id)
    WHERE status <> 0;
