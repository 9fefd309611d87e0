-- The messages attempted to one endpoint, newest first (Svix's listAttemptedMessages), without
-- sorting all of the endpoint's deliveries for each page.
CREATE INDEX deliveries_endpoint_msg ON deliveries (endpoint_id, msg_id);
