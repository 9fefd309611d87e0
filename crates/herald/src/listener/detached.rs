//! Endless responses (SSE streams) served on the raw socket, off hyper's connection.
//!
//! hyper's HTTP/1 connection keeps a read buffer and a header write buffer of 8 KiB each
//! (`hyper::proto::h1::io`, `INIT_BUFFER_SIZE`; `max_buf_size` cannot go below it) for as long
//! as it lives, and an SSE response keeps it alive for hours: 16 KiB under every idle stream,
//! three times the whole budget of one (issue 15). A GET request is not an upgrade, so hyper's
//! upgrade machinery does not apply. Instead, the router marks such a response
//! ([`herald_api::sse::Endless`]); the listener's service parks it in the connection's
//! [`Detach`] slot instead of handing it to hyper, and the connection's task, once hyper has
//! flushed everything it had written before, takes the socket back out of hyper
//! (`into_parts`) and serves the parked response here: the head as hyper would write it, then
//! the body as HTTP/1.1 chunks, then the last chunk when the body ends. An HTTP/1.0 client
//! knows no chunks: its body is written as it is and ends with the connection
//! ([`Framing::UntilClose`]).
//!
//! Narrow by design: only a GET (HEAD must get no body) over HTTP/1.1 or HTTP/1.0, only a
//! marked response. The response says `connection: close`: the connection ends with the
//! stream, as it would have in practice anyway. Everything above the bytes (the stream's
//! events, keep-alives, limits and its end at shutdown) is the body's own, unchanged, but for
//! one thing only the writer can see: a client that stopped reading blocks the write, the body
//! is not polled, and its outbox overflow would go unnoticed; the writer gives up on it
//! (`Endless::too_slow`).

use std::{
    future::{Future, poll_fn},
    io,
    pin::Pin,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use axum::{body::Body, http::header, response::Response};
use herald_api::sse::Endless;
use hyper::body::Body as HttpBody;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

/// One connection's slot for a response to serve detached, and whether hyper has bytes it has
/// not flushed yet (then the socket cannot be taken from it: they would be lost).
///
/// Every connection has one, and an upgraded WebSocket keeps it (hyper hands the socket
/// wrapper that points at it to the upgrade), so it is kept small: the response is boxed.
#[derive(Default)]
pub(super) struct Detach {
    parked: Mutex<Option<Box<Response>>>,
    /// A write of hyper's was refused (`Pending`) since its last completed flush: hyper's
    /// write buffer may hold bytes. hyper writes its whole buffer before it flushes the socket,
    /// and flushes after every round of writing, so a completed flush means an empty buffer.
    unflushed: AtomicBool,
}

impl Detach {
    /// Keeps `response` for the connection's task to serve (see the module documentation).
    pub(super) fn park(&self, response: Response) {
        *self.parked.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(response));
    }

    /// The parked response, once hyper has nothing left to flush.
    pub(super) fn take_when_flushed(&self) -> Option<Response> {
        if self.unflushed.load(Ordering::Acquire) {
            return None;
        }
        self.parked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .map(|response| *response)
    }

    pub(super) fn wrote<T>(&self, result: &Poll<io::Result<T>>) {
        if result.is_pending() {
            self.unflushed.store(true, Ordering::Release);
        }
    }

    pub(super) fn flushed(&self, result: &Poll<io::Result<()>>) {
        if matches!(result, Poll::Ready(Ok(()))) {
            self.unflushed.store(false, Ordering::Release);
        }
    }
}

/// How a detached body is delimited, from the request's HTTP version. Put in the parked
/// response's extensions by the listener; a response without it is chunked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Framing {
    /// HTTP/1.1: chunks, and the last chunk at the end.
    #[default]
    Chunked,
    /// HTTP/1.0: the bytes as they are; the end is the connection's.
    UntilClose,
}

/// How long the rest of a write may take once the server is shutting down: a client that
/// stopped reading is no reason to hold the shutdown.
const SHUTDOWN_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// What is written at most in one go: a burst of events is coalesced into one write up to
/// this, as hyper's buffer coalesced them.
const MAX_WRITE_BYTES: usize = 64 * 1024;

/// Serves `response` on `io` (see the module documentation) until its body ends, the client
/// goes away or a write fails.
///
/// The response is taken apart before the future is made: an async function keeps its
/// arguments for its whole life, and the head's parts (the header map, a few hundred bytes)
/// are not needed once the head is written.
pub(super) fn serve<S>(
    io: S,
    response: Response,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (parts, body) = response.into_parts();
    let framing = parts
        .extensions
        .get::<Framing>()
        .copied()
        .unwrap_or_default();
    let ends = Ends {
        shutdown,
        too_slow: parts
            .extensions
            .get::<Endless>()
            .map(|endless| endless.too_slow.clone())
            .unwrap_or_default(),
    };
    stream(io, head(&parts, framing), body, framing, ends)
}

/// What ends a stream from outside its body.
struct Ends {
    /// The server is stopping: a write gets [`SHUTDOWN_WRITE_TIMEOUT`] more.
    shutdown: CancellationToken,
    /// The stream's outbox overflowed (see [`Endless`]): a write still blocked is abandoned
    /// and the connection closed, so a client that stopped reading gives back its
    /// subscription, its slots and what its outbox held.
    too_slow: CancellationToken,
}

/// Writes `out` (the head), then the body's frames as `framing` says. The write buffer is
/// freed after every write: an idle stream holds none.
async fn stream<S>(mut io: S, mut out: Vec<u8>, mut body: Body, framing: Framing, ends: Ends)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let next = poll_fn(|cx| next(cx, &mut body, &mut io, &mut out, framing)).await;
        if let (Next::End, Framing::Chunked) = (&next, framing) {
            out.extend_from_slice(b"0\r\n\r\n");
        }
        if matches!(next, Next::ClientGone) || write(&mut io, &out, &ends).await.is_err() {
            return;
        }
        out = Vec::new();
        if let Next::End = next {
            let _ = tokio::time::timeout(SHUTDOWN_WRITE_TIMEOUT, io.shutdown()).await;
            return;
        }
    }
}

enum Next {
    /// Chunks were added to the write buffer.
    Data,
    /// The body ended (after what was added to the write buffer, if anything).
    End,
    /// The client closed its side, the socket failed or the body did: nothing more can be
    /// delivered, and no last chunk says the stream ended well.
    ClientGone,
}

/// Adds what the body has ready to `out` (as chunks, if so framed); with nothing ready, watches the socket
/// for the client's hang-up, so a gone client's stream ends (and gives back its subscription
/// and its slots) at once, not at the next keep-alive that fails to write.
fn next(
    cx: &mut Context<'_>,
    body: &mut Body,
    io: &mut (impl AsyncRead + Unpin),
    out: &mut Vec<u8>,
    framing: Framing,
) -> Poll<Next> {
    while out.len() < MAX_WRITE_BYTES {
        match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    match framing {
                        Framing::Chunked => chunk(out, &data),
                        Framing::UntilClose => out.extend_from_slice(&data),
                    }
                }
            }
            Poll::Ready(Some(Err(e))) => {
                // Ended without the last chunk: the client sees a broken stream, not an end.
                tracing::debug!(error = %e, "a detached response's body failed");
                return Poll::Ready(Next::ClientGone);
            }
            Poll::Ready(None) => return Poll::Ready(Next::End),
            Poll::Pending => break,
        }
    }
    if !out.is_empty() {
        return Poll::Ready(Next::Data);
    }
    // A GET has no body: whatever the client sends now (a pipelined request, which the
    // `connection: close` of the head declines) is read and dropped.
    let mut scratch = [0u8; 64];
    loop {
        let mut buf = ReadBuf::new(&mut scratch);
        match Pin::new(&mut *io).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Next::ClientGone),
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => return Poll::Ready(Next::ClientGone),
            Poll::Pending => return Poll::Pending,
        }
    }
}

/// Appends `data` as one chunk (an empty one would end the body: skipped).
fn chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    out.extend_from_slice(format!("{:X}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Writes and flushes `out`; once the server is shutting down, for at most
/// [`SHUTDOWN_WRITE_TIMEOUT`] more; not at all once the stream is too slow.
async fn write(io: &mut (impl AsyncWrite + Unpin), out: &[u8], ends: &Ends) -> io::Result<()> {
    let write = async {
        io.write_all(out).await?;
        io.flush().await
    };
    tokio::pin!(write);
    tokio::select! {
        written = &mut write => written,
        () = ends.too_slow.cancelled() => Err(io::Error::other("the client fell too far behind")),
        () = ends.shutdown.cancelled() => tokio::select! {
            written = tokio::time::timeout(SHUTDOWN_WRITE_TIMEOUT, write) => {
                written.unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
            }
            () = ends.too_slow.cancelled() => Err(io::Error::other("the client fell too far behind")),
        },
    }
}

/// The response head as hyper writes it for a body of unknown length (chunked on HTTP/1.1;
/// for HTTP/1.0, no framing header: the body ends with the connection), with a `date` and
/// `connection: close`.
fn head(parts: &axum::http::response::Parts, framing: Framing) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    // As hyper answers: in the request's version.
    out.extend_from_slice(match framing {
        Framing::Chunked => b"HTTP/1.1 ",
        Framing::UntilClose => b"HTTP/1.0 ",
    });
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .status
            .canonical_reason()
            .unwrap_or_default()
            .as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        // Framing is this writer's to say.
        if [
            header::CONTENT_LENGTH,
            header::TRANSFER_ENCODING,
            header::CONNECTION,
            header::DATE,
        ]
        .contains(name)
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if framing == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"connection: close\r\ndate: ");
    out.extend_from_slice(httpdate::fmt_http_date(SystemTime::now()).as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderValue, StatusCode};

    fn parked() -> Detach {
        let detach = Detach::default();
        detach.park(Response::new(Body::empty()));
        detach
    }

    #[test]
    fn a_parked_response_waits_while_a_write_of_hypers_is_unflushed() {
        let detach = parked();
        detach.wrote::<usize>(&Poll::Pending);
        assert!(
            detach.take_when_flushed().is_none(),
            "bytes may be in hyper's buffer"
        );
        // A flush that does not complete changes nothing; a completed one clears it.
        detach.flushed(&Poll::Pending);
        assert!(detach.take_when_flushed().is_none());
        detach.wrote(&Poll::Ready(Ok(10usize)));
        detach.flushed(&Poll::Ready(Ok(())));
        assert!(detach.take_when_flushed().is_some());
        assert!(detach.take_when_flushed().is_none(), "taken once");
    }

    #[test]
    fn the_head_frames_the_body_as_chunks_and_closes_the_connection() {
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::OK;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        // Framing headers from the router are not repeated: the writer sets its own.
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        let (parts, _) = response.into_parts();
        let head = String::from_utf8(head(&parts, Framing::Chunked)).expect("ASCII");
        let lines: Vec<&str> = head.split("\r\n").collect();
        assert_eq!(lines[0], "HTTP/1.1 200 OK");
        assert_eq!(lines[1], "content-type: text/event-stream");
        assert_eq!(lines[2], "transfer-encoding: chunked");
        assert_eq!(lines[3], "connection: close");
        assert!(lines[4].starts_with("date: "), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "{head}");
        assert_eq!(head.matches("connection").count(), 1, "{head}");
        assert!(!head.contains("content-length"), "{head}");
    }

    /// An HTTP/1.0 client knows no chunks: the head says nothing of framing, the body goes
    /// out as it is, and its end is the connection's, with no last chunk.
    #[tokio::test]
    async fn an_http_1_0_stream_is_written_unframed_and_ends_with_the_connection() {
        let mut response = Response::new(Body::from("data: one\n\n"));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        let (parts, body) = response.into_parts();
        let head = head(&parts, Framing::UntilClose);
        let text = String::from_utf8(head.clone()).expect("ASCII");
        assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text}");
        assert!(!text.contains("transfer-encoding"), "{text}");
        assert!(text.contains("connection: close\r\n"), "{text}");

        let (server, mut client) = tokio::io::duplex(4096);
        let ends = Ends {
            shutdown: CancellationToken::new(),
            too_slow: CancellationToken::new(),
        };
        stream(server, head.clone(), body, Framing::UntilClose, ends).await;
        let mut received = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut client, &mut received)
            .await
            .expect("read");
        let mut expected = head;
        expected.extend_from_slice(b"data: one\n\n");
        assert_eq!(
            String::from_utf8_lossy(&received),
            String::from_utf8_lossy(&expected),
            "the body as it is, then the end of the connection"
        );
    }

    /// A client that stopped reading blocks the write for good; the stream's overflow ends it.
    #[tokio::test]
    async fn a_write_blocked_on_a_client_that_stopped_reading_gives_way_to_the_overflow() {
        // The client's end is kept but never read: 64 bytes fit, the rest waits.
        let (mut server, _client) = tokio::io::duplex(64);
        let ends = Ends {
            shutdown: CancellationToken::new(),
            too_slow: CancellationToken::new(),
        };
        let out = vec![b'x'; 4096];
        let write = write(&mut server, &out, &ends);
        tokio::pin!(write);
        assert!(
            futures_util::FutureExt::now_or_never(&mut write).is_none(),
            "blocked on the client"
        );
        ends.too_slow.cancel();
        let written = write.await;
        assert!(written.is_err(), "{written:?}");
    }

    #[test]
    fn chunks_are_sized_in_hex_and_empty_data_is_not_a_last_chunk() {
        let mut out = Vec::new();
        chunk(&mut out, b"");
        assert!(out.is_empty());
        chunk(&mut out, &[b'x'; 26]);
        assert_eq!(out, [&b"1A\r\n"[..], &[b'x'; 26], b"\r\n"].concat());
    }
}
