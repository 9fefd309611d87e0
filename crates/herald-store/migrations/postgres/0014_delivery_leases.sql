-- A claim's lease used to be written only into its delivery's row (lease_token, leased_until),
-- and counted through deliveries_leased (app_id, endpoint_id, leased_until) WHERE lease_token
-- IS NOT NULL. So a lease changed an indexed column, and PostgreSQL wrote the leased row anew
-- with an entry in each of the table's seven indexes: about half of a claim's time.
--
-- The live leases are now also kept here, one row per leased delivery, and counted from here
-- (the claims' limits): a lease writes two index entries here instead of seven. The delivery's row keeps its lease columns: they are what a claim's
-- walk filters on and what an attempt's record is fenced on. No index of `deliveries` names
-- them any more, so a lease is a HOT update (no index entry) where its page has room: the
-- table leaves a fifth of each new page free for that.
--
-- A claim inserts (or, for a lapsed lease taken over, replaces) its deliveries' rows here; a
-- record deletes the row of its own lease; taking a delivery back (a manual attempt, a
-- refused delivery of a disabled endpoint, a single node's restart) deletes its row; deleting
-- a delivery deletes it (the foreign key). A lapsed lease's row stays until its delivery is
-- leased again or finished, and is not counted (`leased_until` is past).
--
-- Nodes of an older version, until they are all upgraded, lease without writing here: their
-- leases are not counted in the limits of the upgraded nodes' claims.
CREATE TABLE delivery_leases (
    msg_id       TEXT NOT NULL,
    endpoint_id  TEXT NOT NULL,
    app_id       TEXT NOT NULL,
    lease_token  BIGINT NOT NULL,
    leased_until BIGINT NOT NULL,
    PRIMARY KEY (msg_id, endpoint_id),
    FOREIGN KEY (msg_id, endpoint_id) REFERENCES deliveries (msg_id, endpoint_id)
        ON DELETE CASCADE
);
-- The live leases, for the claims' count (`live` in claim_statement): a range from now on.
-- A finished lease's entry stays until a scan finds its row deleted and marks it.
CREATE INDEX delivery_leases_live ON delivery_leases (leased_until) INCLUDE (app_id, endpoint_id);
INSERT INTO delivery_leases (msg_id, endpoint_id, app_id, lease_token, leased_until)
SELECT msg_id, endpoint_id, app_id, lease_token, leased_until
FROM deliveries WHERE lease_token IS NOT NULL AND leased_until IS NOT NULL;
DROP INDEX deliveries_leased;
ALTER TABLE deliveries SET (fillfactor = 80);
