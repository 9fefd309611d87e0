-- Socket.IO clients' rules per app (herald_core::socketio::SocketIoSettings) as JSON:
-- `{allowedOrigins, namespaceChannel, events: [{event, relay, webhook}]}`; NULL: none set.
ALTER TABLE apps ADD COLUMN socketio TEXT;
