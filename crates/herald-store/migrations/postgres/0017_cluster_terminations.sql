-- `terminate_connections` calls kept for a while (herald-cluster's `terminations`): a node
-- that did not hear one (its link to the others was down) applies it when the link is back,
-- to the user's connections that signed in before it. Times are the cluster's (the
-- database's clock), in Unix milliseconds; rows older than the keep are deleted as new ones
-- are written.
CREATE TABLE cluster_terminations (
    app_id        TEXT   NOT NULL,
    user_id       TEXT   NOT NULL,
    terminated_at BIGINT NOT NULL
);
CREATE INDEX cluster_terminations_at ON cluster_terminations (terminated_at);
