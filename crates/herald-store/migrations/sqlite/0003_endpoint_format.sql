-- Endpoints of two formats share the delivery engine: the app's messages signed by the
-- Standard Webhooks scheme, or Pusher channel webhooks signed with the app's Pusher secret.
ALTER TABLE endpoints ADD COLUMN format TEXT NOT NULL DEFAULT 'standard-webhooks';
