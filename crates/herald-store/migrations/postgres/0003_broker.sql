-- The PostgreSQL broker (herald-cluster): publications too large for a NOTIFY payload
-- (8,000 bytes) travel by reference. The publishing node inserts the whole notice here and
-- notifies its id; every node reads it when the notification arrives. Rows are only needed
-- for as long as a notification takes to arrive, so each node deletes those older than a few
-- minutes.
CREATE TABLE broker_payloads (
    id         BIGSERIAL PRIMARY KEY,
    body       TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX broker_payloads_created_at ON broker_payloads (created_at);
