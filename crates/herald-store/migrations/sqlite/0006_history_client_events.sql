-- Client events are kept in channel history too: their data as the JSON the client sent, and
-- the sender's user id on presence channels.
ALTER TABLE channel_history ADD COLUMN raw_json INTEGER NOT NULL DEFAULT 0;
ALTER TABLE channel_history ADD COLUMN user_id TEXT;
