//! WebSocket transport settings shared by every route, so the conformance suite that runs
//! against the development echo route exercises the same transport production uses.
//!
//! tokio-tungstenite allocates its read buffer per connection up front, so it is kept small
//! (idle connections stay a few KB); the write buffer only grows when a burst is written, and
//! a large one lets fan-out coalesce frames into few writes.

use axum::extract::{
    WebSocketUpgrade,
    ws::{Message, WebSocket},
};

const READ_BUFFER_BYTES: usize = 4 * 1024;

/// Applies Herald's transport settings, accepting messages up to `max_message_bytes`.
pub fn configure(ws: WebSocketUpgrade, max_message_bytes: usize) -> WebSocketUpgrade {
    ws.read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(max_message_bytes)
        .max_frame_size(max_message_bytes)
}

/// Echoes every data message back: the `--dev` route that the Autobahn suite drives.
pub async fn echo(mut socket: WebSocket) {
    while let Some(Ok(message)) = socket.recv().await {
        let reply = match message {
            Message::Text(text) => Message::Text(text),
            Message::Binary(bytes) => Message::Binary(bytes),
            // Pings are answered by the transport. After a close frame keep reading until
            // the stream ends, or the transport's close reply is never flushed.
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) => continue,
        };
        if socket.send(reply).await.is_err() {
            break;
        }
    }
}
