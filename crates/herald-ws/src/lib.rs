//! Herald's real-time face: WebSocket connections speaking the Pusher Channels protocol v7.
//!
//! The channel layer (`herald-channels`: the hub, history, per-address limits, server frames)
//! is shared with SSE; this crate is the Pusher face over it. [`connection`] runs one socket:
//! the upgrade, the read and write loop, pings, the close codes (a connection whose outbox
//! overflows closes with 4100); [`session`] is the protocol state machine it drives
//! (subscriptions with their signatures, presence, sign-in, client events), over client
//! messages parsed once by [`protocol::client`]. [`protocol`] holds the wire format.

pub mod connection;
pub mod protocol;
pub mod session;
pub mod transport;

use std::{sync::Arc, time::Duration};

pub use herald_channels::{Frame, Hub, Outgoing, Publisher, history, hub, limits};

/// Limits and timings for WebSocket connections; every one has a safe default.
#[derive(Debug, Clone)]
pub struct WsConfig {
    /// Sent as `activity_timeout`: the client pings after this much silence.
    pub activity_timeout: Duration,
    /// How long the server waits for any message after its own ping before closing (4201).
    pub pong_timeout: Duration,
    /// Connections per app (4004 beyond).
    pub max_connections_per_app: u32,
    /// Channels one connection may be subscribed to.
    pub max_channels_per_connection: usize,
    /// Largest WebSocket message accepted from a client (1009 beyond, enforced by the
    /// transport before the message is buffered).
    pub max_message_bytes: usize,
    /// Members of one presence channel.
    pub max_presence_members: usize,
    /// Largest `user_info` of a presence member.
    pub max_user_info_bytes: usize,
    /// Client events one connection may send per second (4301 beyond).
    pub client_events_per_second: u32,
    /// Frames waiting to be written to one connection before it counts as too slow (4100).
    pub outbox_frames: usize,
    /// Subscribes one connection may send per second on average (0: no limit); beyond, they
    /// wait their turn (429 once the waiting and subscribed reach
    /// `max_channels_per_connection`)...
    pub subscribes_per_second: u32,
    /// ...and at once.
    pub subscribe_burst: u32,
    /// Connections and replayed history per client address (4100 beyond), shared with SSE.
    pub clients: Arc<limits::ClientLimiter>,
}

impl Default for WsConfig {
    fn default() -> Self {
        Self {
            activity_timeout: Duration::from_secs(120),
            pong_timeout: Duration::from_secs(30),
            max_connections_per_app: 10_000,
            max_channels_per_connection: 100,
            max_message_bytes: 10 * 1024,
            max_presence_members: 100,
            max_user_info_bytes: 1024,
            client_events_per_second: 10,
            outbox_frames: 1024,
            subscribes_per_second: 10,
            subscribe_burst: 100,
            clients: Arc::default(),
        }
    }
}

/// Close codes of the Pusher protocol that Herald sends.
pub mod close {
    /// An unknown app key, or an app deleted while its connections were open.
    pub const APP_DOES_NOT_EXIST: u16 = 4001;
    pub const OVER_CONNECTION_QUOTA: u16 = 4004;
    /// A `protocol` version other than 5 to 7, or one that is not a number.
    pub const UNSUPPORTED_PROTOCOL: u16 = 4007;
    pub const UNAUTHORIZED: u16 = 4009;
    /// Pusher's "over capacity, reconnect after backing off": a connection that cannot keep
    /// up with its events, or one more than its address may open (at once or per second).
    pub const OVER_CAPACITY: u16 = 4100;
    pub const RECONNECT: u16 = 4200;
    pub const PONG_NOT_RECEIVED: u16 = 4201;
    /// Pusher's "client event rejected due to rate limit": sent as a `pusher:error` code with
    /// the connection kept, never as a close (pusher-js never reconnects after one from 4300).
    pub const CLIENT_EVENT_RATE_LIMIT: u16 = 4301;
    /// WebSocket's own "protocol error" (RFC 6455): a malformed or forbidden frame.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// WebSocket's own "invalid frame payload data": a text message that is not UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// WebSocket's own "message too big".
    pub const MESSAGE_TOO_BIG: u16 = 1009;
}
