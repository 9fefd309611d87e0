//! Herald's integration suite: the real server on a random loopback port, a real local webhook
//! receiver, real HTTP. One binary, so it links once.
//!
//! The suite is backend-agnostic: `HERALD_TEST_STORE` selects the store (`sqlite`, the
//! default, or `postgres` on the server `HERALD_TEST_POSTGRES_URL` names, a throwaway database
//! per server); every test runs against each backend, and the few about SQLite's files say
//! `skipped on postgres: ...` there (`harness::sqlite_only`).

mod api;
mod auth;
mod channel_webhooks;
mod cli;
mod cluster;
mod cluster_presence;
mod console;
mod crash;
mod delivery;
mod harness;
mod history;
mod ingest;
mod listener;
mod metrics;
mod process;
mod pusher;
mod retention;
mod secrets;
mod socketio;
mod sse;
mod tidy;
mod tls;
mod websocket;
