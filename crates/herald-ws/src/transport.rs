//! WebSocket transport settings shared by every route, so the conformance suite that runs
//! against the development echo route exercises the same transport production uses.
//!
//! tungstenite allocates its read buffer per connection up front and keeps it for the
//! connection's life, so it is kept small: 512 bytes hold any ordinary Pusher client message
//! (a subscribe with its signature, a ping, a client event) in one read, and a larger message
//! gets room for its whole length once its frame header is read, up to the message limit.
//! It was 4 KiB, the largest single cost of an idle connection. The write buffer only grows
//! when a burst is written, and a large one lets fan-out coalesce frames into few writes.
//!
//! The message limit is enforced by the transport itself, before a byte of an oversized
//! frame is buffered: a frame header announcing more, or fragments adding up to more, fail the
//! read. A failed read leaves the socket writable, so [`read_error_close`] turns it into the
//! close frame RFC 6455 names (1009, 1007 or 1002) instead of a silently torn connection.

use axum::extract::{
    WebSocketUpgrade,
    ws::{CloseFrame, Message, WebSocket},
};

use crate::close;

/// Allocated per connection when it opens (see the module documentation).
const READ_BUFFER_BYTES: usize = 512;

/// Applies Herald's transport settings, accepting messages up to `max_message_bytes`: larger
/// ones fail the read (see [`read_error_close`]) without being buffered.
pub fn configure(ws: WebSocketUpgrade, max_message_bytes: usize) -> WebSocketUpgrade {
    ws.read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(max_message_bytes)
        .max_frame_size(max_message_bytes)
}

/// The close frame owed to the peer after reading failed: 1009 for a message over the limit,
/// 1007 for a text message that is not UTF-8, 1002 for any other protocol violation. `None`
/// when the connection itself is gone (I/O errors, a peer that vanished without closing), as
/// there is no one to tell.
///
/// axum wraps tungstenite's error; its variant tells the reason.
pub fn read_error_close(error: &axum::Error) -> Option<(u16, &'static str)> {
    use tungstenite::error::{Error, ProtocolError};
    let inner = std::error::Error::source(error)?.downcast_ref::<Error>()?;
    match inner {
        Error::Capacity(_) => Some((close::MESSAGE_TOO_BIG, "message too big")),
        Error::Utf8(_) => Some((close::INVALID_PAYLOAD, "text message is not valid UTF-8")),
        // The peer dropped the connection: nothing can be sent.
        Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        Error::Protocol(_) => Some((close::PROTOCOL_ERROR, "WebSocket protocol violation")),
        _ => None,
    }
}

/// Echoes every data message back: the `--dev` route that the Autobahn suite drives.
pub async fn echo(mut socket: WebSocket) {
    loop {
        let reply = match socket.recv().await {
            None => return,
            Some(Err(e)) => {
                if let Some((code, reason)) = read_error_close(&e) {
                    let _ = socket
                        .send(Message::Close(Some(CloseFrame {
                            code,
                            reason: reason.into(),
                        })))
                        .await;
                }
                return;
            }
            Some(Ok(Message::Text(text))) => Message::Text(text),
            Some(Ok(Message::Binary(bytes))) => Message::Binary(bytes),
            // Pings are answered by the transport. After a close frame keep reading until
            // the stream ends, or the transport's close reply is never flushed.
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_))) => continue,
        };
        if socket.send(reply).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every idle connection holds this much for as long as it is open: 10,000 connections
    /// at 4 KiB were 40 MB of empty buffers.
    #[test]
    fn the_per_connection_read_buffer_starts_small() {
        const { assert!(READ_BUFFER_BYTES <= 512) };
        // Room for a subscribe with a private channel's signature in one read.
        const { assert!(READ_BUFFER_BYTES >= 256) };
    }
}
