-- Presence and occupancy across nodes (herald-cluster's presence): each node keeps its own
-- rows, so a node only ever writes what it knows (its sockets), and a dead node's rows are
-- found by its missing heartbeat and swept by any live node.
--
-- A node is alive while its heartbeat is younger than `cluster.node_ttl_secs`; it beats every
-- third of that. Rows whose node has no row here are a dead node's, swept one key at a time
-- under the same advisory lock a join or leave takes, so each removal is reported once.
CREATE TABLE cluster_nodes (
    node_id      TEXT PRIMARY KEY,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);

-- A user in a presence channel on one node (one row however many of the user's sockets are in
-- there on that node). A user is a member of the channel while any node has a row.
CREATE TABLE cluster_presence_members (
    app_id    TEXT NOT NULL,
    channel   TEXT NOT NULL,
    user_id   TEXT NOT NULL,
    node_id   TEXT NOT NULL,
    user_info TEXT NULL,
    joined_at BIGINT NOT NULL,
    PRIMARY KEY (app_id, channel, user_id, node_id)
);
CREATE INDEX cluster_presence_members_node ON cluster_presence_members (node_id);

-- A channel occupied on one node, with that node's subscription count (flushed in batches).
-- A channel is occupied while any node has a row.
CREATE TABLE cluster_channel_occupancy (
    app_id        TEXT NOT NULL,
    channel       TEXT NOT NULL,
    node_id       TEXT NOT NULL,
    subscriptions BIGINT NOT NULL,
    PRIMARY KEY (app_id, channel, node_id)
);
CREATE INDEX cluster_channel_occupancy_node ON cluster_channel_occupancy (node_id);
