-- The lanes' time indexes cover only rows with a due time, so a query that does not bound the
-- due time cannot use them.
--
-- The skip scan over the endpoints with unfinished deliveries (`endpoints_due` in
-- `claim_statement`, postgres/messages.rs) does not bound the due time, so it must use the
-- lane's by-endpoint index: each step takes that index's next entry. With the time index also
-- matching, the planner chose between the two on its row estimate for the lane. With
-- statistics taken while the queue was nearly empty, that estimate is one row, which makes the
-- two cost the same. Sometimes it then chose to read the time index whole and sort it for one
-- row, once per endpoint: 480 ms a claim over 100 endpoints with a backlog of 24,000
-- (PERFORMANCE.md, "PostgreSQL: shorter claims"). The walks in due order bound the due time
-- (`next_attempt_at <= now`, which implies it is not null), so they keep these indexes.
-- Unfinished deliveries always have a due time, so the indexes hold the same rows as before.
DROP INDEX deliveries_due_first;
CREATE INDEX deliveries_due_first ON deliveries (next_attempt_at)
    WHERE status IN (1, 3) AND attempts = 0 AND trigger_type = 0 AND next_attempt_at IS NOT NULL;
DROP INDEX deliveries_due_retry;
CREATE INDEX deliveries_due_retry ON deliveries (next_attempt_at)
    WHERE status IN (1, 3) AND NOT (attempts = 0 AND trigger_type = 0)
      AND next_attempt_at IS NOT NULL;
