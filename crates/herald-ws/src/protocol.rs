//! The Pusher protocol's JSON frames. Server frames are built once and shared, by the channel
//! layer (re-exported here from `herald_channels::protocol`); client frames are parsed in
//! [`client`], with `data` kept as raw JSON so relayed client events are forwarded unchanged.

pub mod client;

pub use herald_channels::protocol::*;
