//! Herald's integration suite: the real server on a random loopback port, a real local webhook
//! receiver, real HTTP. One binary, so it links once.
//!
//! The suite is backend-agnostic: `HERALD_TEST_STORE` selects the store (only `sqlite`, the
//! default, exists today); every test runs unchanged against each backend.

mod api;
mod channel_webhooks;
mod delivery;
mod harness;
mod history;
mod ingest;
mod listener;
mod process;
mod pusher;
mod sse;
mod tidy;
mod websocket;
