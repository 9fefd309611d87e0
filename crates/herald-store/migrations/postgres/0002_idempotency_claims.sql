-- An Idempotency-Key's row exists from the moment a request claims it, so every node sees the
-- key in progress: status and body stay NULL while the request runs, and claimed_until (ms)
-- says until when the claim holds (a later claim takes over an expired one). Saving the
-- response sets status and body and clears claimed_until; releasing deletes the claim.
ALTER TABLE idempotency
    ALTER COLUMN status DROP NOT NULL,
    ALTER COLUMN body DROP NOT NULL,
    ADD COLUMN claimed_until BIGINT;
-- A row is either a claim or a response, never half of each.
ALTER TABLE idempotency ADD CONSTRAINT idempotency_claim_or_response CHECK (
    (status IS NULL) = (body IS NULL) AND (status IS NULL) = (claimed_until IS NOT NULL)
);
