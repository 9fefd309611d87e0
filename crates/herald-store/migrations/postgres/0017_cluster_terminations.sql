-- `terminate_connections` calls kept for a while (herald-cluster's `terminations`): a node
-- that did not hear one (its link to the others was down) applies it when the link is back,
-- to the user's connections that signed in before it. One row per user, with the latest
-- termination: a later one covers an earlier one. Times are the cluster's (the database's
-- clock), in Unix milliseconds; rows older than the keep are deleted as new ones are written.
CREATE TABLE cluster_terminations (
    app_id        TEXT   NOT NULL,
    user_id       TEXT   NOT NULL,
    terminated_at BIGINT NOT NULL,
    PRIMARY KEY (app_id, user_id)
);
CREATE INDEX cluster_terminations_at ON cluster_terminations (terminated_at);
