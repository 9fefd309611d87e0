-- A claim whose walk of the queue in time order is crowded out (the earliest due deliveries
-- all belong to endpoints or apps at their limit: one busy endpoint's backlog) looks for the
-- rest endpoint by endpoint instead: a skip scan over the endpoints with unfinished deliveries
-- in the lane, then each one's earliest due deliveries (see `claim_statement` in
-- postgres/messages.rs). One index per lane, with the lane's predicate, as the lanes' time
-- indexes have.
CREATE INDEX deliveries_due_first_by_endpoint ON deliveries (endpoint_id, next_attempt_at)
    WHERE status IN (1, 3) AND attempts = 0 AND trigger_type = 0;
CREATE INDEX deliveries_due_retry_by_endpoint ON deliveries (endpoint_id, next_attempt_at)
    WHERE status IN (1, 3) AND NOT (attempts = 0 AND trigger_type = 0);
