-- An endpoint's throttleRate is one pace for the whole cluster. Each node used to pace the
-- attempts it sent itself, so N nodes could send an endpoint up to N times its rate. The
-- turns are now reserved here (`MessageStore::reserve_turn`), one row per endpoint paced
-- since this version, each reservation one statement under the row's lock.
--
-- `due` is the endpoint's theoretical arrival time (GCRA): when its next attempt would go were
-- no burst allowed, in nanoseconds since the epoch of the cluster's time (the database's
-- clock as the nodes read it); nanoseconds, since a rate above 1,000 a second spaces turns
-- less than a millisecond apart, and one of 65,535 about 15.26 microseconds. A row whose `due`
-- is past says nothing any more: the next
-- reservation starts a burst, as it would on a new row.
CREATE TABLE endpoint_paces (
    endpoint_id TEXT PRIMARY KEY REFERENCES endpoints (id) ON DELETE CASCADE,
    due         BIGINT NOT NULL
);
