-- deliveries_endpoint (endpoint_id, status, updated_at) had an entry for every delivery ever
-- made, moved on every change of status: with many endpoints each group commit dirtied a leaf
-- page of it per endpoint touched, written to the WAL in full (PERFORMANCE.md, "Many
-- endpoints"). Deliveries that succeeded need no entry: an endpoint's success count is its
-- total (deliveries_endpoint_msg) less the others. The entries left are the deliveries still
-- due or in flight (few, and gone when they succeed) and the failed ones (what a recover
-- walks), newest message last.
DROP INDEX deliveries_endpoint;
CREATE INDEX deliveries_endpoint_unsettled ON deliveries (endpoint_id, status, msg_id)
    WHERE status <> 0;
