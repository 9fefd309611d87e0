-- Ids (a prefix and a KSUID of 0-9A-Za-z) sort by creation time in byte order only, and Herald
-- compares them so: retention deletes the rows whose id is below a time's lower bound,
-- `recover` requeues the deliveries of messages between two such bounds, and every list pages
-- by id. A column compares under its collation, and a database's default collation is often
-- not byte order (en_US.UTF-8, or ICU's, in the usual Docker images and hosted databases,
-- where 'msg_3Jb' < 'msg_3JK'): there, retention would delete young rows and `recover` would
-- requeue the wrong ones. Every id column, and every column holding an id, compares
-- bytewise from here on, whatever the database's default. Each ALTER rewrites its table and
-- rebuilds its indexes under an exclusive lock, all in this migration's one transaction: on a
-- large store stop every node, start one to migrate, then the rest (README: Upgrading).
DO $$
DECLARE
    col record;
BEGIN
    FOR col IN
        SELECT c.table_name, c.column_name
        FROM information_schema.columns c
        JOIN information_schema.tables t
          ON t.table_schema = c.table_schema AND t.table_name = c.table_name
        WHERE c.table_schema = current_schema()
          AND t.table_type = 'BASE TABLE'
          -- Herald's tables only: the schema may hold others'.
          AND c.table_name IN (
              'apps', 'api_tokens', 'event_types', 'endpoints', 'messages', 'deliveries',
              'attempts', 'idempotency', 'ingest_sources', 'ingest_events', 'channel_history',
              'channel_positions', 'channel_occupancy', 'cluster_nodes',
              'cluster_presence_members', 'cluster_channel_occupancy', 'delivery_leases',
              'endpoint_paces', 'cluster_terminations')
          AND c.data_type = 'text'
          AND (c.column_name = 'id' OR c.column_name LIKE '%\_id')
          AND c.collation_name IS DISTINCT FROM 'C'
        ORDER BY c.table_name, c.column_name
    LOOP
        EXECUTE format('ALTER TABLE %I ALTER COLUMN %I TYPE text COLLATE "C"',
                       col.table_name, col.column_name);
    END LOOP;
END
$$;
