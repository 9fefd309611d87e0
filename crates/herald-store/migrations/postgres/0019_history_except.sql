-- The socket a kept event must not go to live (a client event's sender, a Pusher trigger's
-- `socket_id`), kept with the event so that one read back from the store for live subscribers
-- (a node's catch-up, a gap filled at a join, another node's event by reference) still
-- leaves its sender out.
ALTER TABLE channel_history ADD COLUMN except_subscriber TEXT;
