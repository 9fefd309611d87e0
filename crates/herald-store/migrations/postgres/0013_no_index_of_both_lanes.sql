-- deliveries_due (next_attempt_at) WHERE status IN (1, 3) held every unfinished delivery, both
-- lanes together. Since the lanes have time indexes of their own (deliveries_due_first,
-- deliveries_due_retry), only the health check's count of due deliveries read it, and it cost
-- an entry at every write of an unfinished delivery: its insert, each lease (a lease changes
-- an indexed column, so no update of a delivery is HOT) and each retry's record. The count now
-- reads the two lanes' indexes (`DUE_DELIVERIES` in src/postgres/messages.rs).
DROP INDEX deliveries_due;
