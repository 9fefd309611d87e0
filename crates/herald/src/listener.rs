//! The HTTP listener every face shares (APIs, WebSockets, SSE, webhooks in).
//!
//! It accepts TCP connections up to a cap, serves each with hyper's HTTP/1 server under a limit
//! on the request head's size and the time to send it, and drains gracefully at shutdown.
//! `axum::serve` offers none of these knobs, so the accept loop lives here; everything above the
//! connection is still the axum router.
//!
//! - **Connection cap**: a socket beyond `max_connections` is closed at once. The slot is held by
//!   the socket itself, so an upgraded WebSocket keeps counting until it closes.
//! - **Header read timeout**: a client has `header_read_timeout` to send a complete request head,
//!   counted from the connection's start and, on a kept-alive connection, from the end of the
//!   previous response: slowloris clients and idle keep-alive sockets are both cut off.
//! - **Head size**: a request line plus headers over `max_header_bytes` gets 431.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{Router, body::Body, extract::ConnectInfo};
use hyper::{Request, body::Incoming, server::conn::http1};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower_service::Service;

/// The listener's limits; see the module documentation.
#[derive(Debug, Clone)]
pub struct ListenerLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_connections: 25_000,
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 32 * 1024,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then stops accepting and waits
/// for in-flight requests (upgraded WebSockets are out of its reach and watch `shutdown`
/// themselves).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &ListenerLimits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        // Partial heads are buffered up to this; bodies stream through it.
        .max_buf_size((limits.max_header_bytes + 16 * 1024).max(64 * 1024));
    let connections = TaskTracker::new();
    let mut refused: u64 = 0;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            refused += 1;
            // Once per power of two, so a flood does not flood the log too.
            if refused.is_power_of_two() {
                tracing::warn!(
                    %peer,
                    refused,
                    max_connections = limits.max_connections,
                    "connection refused: the listener is at its connection cap"
                );
            }
            drop(stream);
            continue;
        };
        let io = TokioIo::new(Counted {
            stream,
            _slot: slot,
        });
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            // A router clone is a reference count; each request gets its own.
            router.clone().call(request.map(Body::new))
        });
        let connection = http.serve_connection(io, service).with_upgrades();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = shutdown.cancelled() => {
                    // Finish the request in flight (if any), then close.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// A socket that holds one of the listener's connection slots for as long as it lives, through
/// an upgrade to WebSocket too.
struct Counted {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
