-- A rotated-out Pusher secret keeps verifying (HTTP API requests, channel auths, SSE tokens)
-- until pusher_previous_secret_until, so backends can switch without refused requests.
ALTER TABLE apps ADD COLUMN pusher_previous_secret TEXT;
ALTER TABLE apps ADD COLUMN pusher_previous_secret_until INTEGER;
