//! The HTTP listener every face shares (APIs, WebSockets, SSE, webhooks in).
//!
//! It accepts TCP connections up to a cap, and up to a cap per client address, serves each with
//! hyper's HTTP/1 server under a limit on the request head's size, the time to send it and the
//! time to send the body, and drains gracefully at shutdown. `axum::serve` offers none of these
//! knobs, so the accept loop lives here; everything above the connection is still the axum
//! router.
//!
//! - **Connection cap**: a socket beyond `max_connections` is closed at once. The slot is held by
//!   the socket itself, so an upgraded WebSocket keeps counting until it closes.
//! - **Per-address cap**: so that one host cannot hold every slot, a socket from an address that
//!   already holds `max_connections_per_ip` is closed at once too (0: no limit). IPv6 peers are
//!   counted per /64, IPv4 per address (as the per-address limiter in `herald_channels::limits` counts them);
//!   peers in `trusted_proxies` (reverse proxies, which carry many clients) are not counted.
//!   The table holds only addresses with an open socket (an entry is removed when its count
//!   reaches zero), and every counted socket holds a slot of the connection cap, so it never
//!   holds more than `max_connections` entries.
//! - **Header read timeout**: a client has `header_read_timeout` to send a complete request head,
//!   counted from the connection's start and, on a kept-alive connection, from the end of the
//!   previous response: slowloris clients and idle keep-alive sockets are both cut off.
//! - **Body read timeout**: once a handler starts reading a request body, the whole body has
//!   `body_read_timeout` to arrive (hyper itself never times out a slow body). Past it, reading
//!   fails, the request is answered 408 and the connection is closed. The timer runs only while a
//!   body is being read: requests without a body (WebSocket upgrades, SSE streams, most GETs)
//!   never start one, and a long response is not a request body.
//! - **Body budget**: bodies being read hold their bytes of a node-wide budget
//!   (`max_body_bytes_reading`, 503 beyond) and of their client address's share of it
//!   (`max_body_bytes_reading_per_ip`, 429 beyond; kept in the per-address table), until each is
//!   collected; see [`TimedBody`].
//! - **Write timeout**: a write to the client that makes no progress for `write_timeout` (the
//!   client reads nothing: pipelined requests whose answers it never reads, a WebSocket it
//!   stopped reading) fails, and the connection is closed ([`WriteStall`]).
//! - **Head size**: a request line plus headers over `max_header_bytes` gets 431.
//! - **TLS** (when `tls.cert` is set; see `tls.rs`): the handshake runs in the connection's own
//!   task, never in the accept loop, so a slow or silent client holds up no one else; it has
//!   `header_read_timeout` to finish it, and the header timer starts again after it. The TLS
//!   stream wraps the counted socket, so caps and per-address counts hold as for plain HTTP.
//! - **Endless responses** (SSE streams, marked `herald_api::sse::Endless`): served on the raw
//!   socket by a task of their own once the router has answered, instead of by hyper, whose
//!   connection buffers would stay under every idle stream (see `detached`). The socket keeps
//!   its slots; the stream ends with shutdown as the body says.

use std::{
    collections::HashMap,
    error::Error as StdError,
    fmt,
    future::Future,
    io,
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU8, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    BoxError, Router,
    body::Body,
    extract::{ConnectInfo, State},
    http::{HeaderValue, StatusCode, header},
    response::Response,
    routing::get,
};
use herald_api::sse::Endless;
use herald_metrics::{ListenerMetrics, Refusal};
use hyper::{
    Method, Request, Version,
    body::{Body as HttpBody, Bytes, Frame, Incoming, SizeHint},
    server::conn::http1,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use ipnet::IpNet;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Sleep,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower_service::Service;

use bytes::BytesMut;
use detached::Detach;

mod detached;

/// The listener's limits; see the module documentation.
#[derive(Debug, Clone)]
pub struct ListenerLimits {
    pub max_connections: usize,
    /// Open sockets per client address (IPv6: per /64); 0: no limit.
    pub max_connections_per_ip: usize,
    /// Peers the per-address cap does not count (reverse proxies).
    pub trusted_proxies: Vec<IpNet>,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    /// How long a write to the client may make no progress (the client reads nothing) before
    /// the connection is closed.
    pub write_timeout: Duration,
    pub max_header_bytes: usize,
    /// Bytes of request bodies being read at once, over every connection: a body that would
    /// take more is refused with 503 (see [`TimedBody`]).
    pub max_body_bytes_reading: usize,
    /// The share of that budget one client address (IPv6: one /64) may hold; a body that
    /// would take more is refused with 429 (0: no share of its own). Peers in
    /// `trusted_proxies` are not held to it.
    pub max_body_bytes_reading_per_ip: usize,
    /// How long a connection's request in flight at shutdown may take to finish (the
    /// configuration's `shutdown_grace_secs`): a client that stopped reading its response
    /// must not hold the server's exit.
    pub drain_timeout: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_connections: 25_000,
            // Room for a full WebSocket/SSE allotment (`ws.max_connections_per_ip`, 1,000) and
            // as many again for HTTP (producers' connection pools, a provider's webhook bursts
            // from one egress address), while one address holds at most 8% of the cap.
            max_connections_per_ip: 2_000,
            trusted_proxies: Vec::new(),
            header_read_timeout: Duration::from_secs(10),
            // The whole body: at the default 1 MiB body limit, at least ~35 KB/s.
            body_read_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            max_header_bytes: 32 * 1024,
            // 256 bodies of the default 1 MiB API limit at once; every connection at the
            // 25,000 cap sending a 1 MiB body slowly would otherwise hold 25 GiB.
            max_body_bytes_reading: 256 * 1024 * 1024,
            // An eighth, as for connections: one address sending slow bodies on its 2,000
            // connections could otherwise hold the whole budget and have every other client's
            // bodies refused.
            max_body_bytes_reading_per_ip: 32 * 1024 * 1024,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then stops accepting and waits
/// for in-flight requests (upgraded WebSockets are out of its reach and watch `shutdown`
/// themselves). Accepted and refused connections are counted in `metrics`. With `tls`, every
/// admitted connection does its TLS handshake first, on its own task.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &ListenerLimits,
    metrics: Arc<ListenerMetrics>,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let per_address = Arc::new(PerAddress::new(
        limits.max_connections_per_ip,
        limits.max_body_bytes_reading_per_ip,
        limits.trusted_proxies.clone(),
    ));
    let body_timeout = limits.body_read_timeout;
    let body_budget = Arc::new(Semaphore::new(
        limits.max_body_bytes_reading.min(Semaphore::MAX_PERMITS),
    ));
    // Bodies refused for want of budget, for the log.
    let over_budget = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let drain_timeout = limits.drain_timeout;
    let write_timeout = limits.write_timeout;
    let handshake_timeout = limits.header_read_timeout;
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        // Partial heads are buffered up to this; bodies stream through it.
        .max_buf_size((limits.max_header_bytes + 16 * 1024).max(64 * 1024));
    let connections = TaskTracker::new();
    let mut refused: u64 = 0;
    let mut refused_per_address: u64 = 0;
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
            metrics.refused(Refusal::GlobalCap);
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
        // After the global slot, so every counted socket holds one (the table's bound).
        let Some((address_slot, address_bodies)) = per_address.admit(peer.ip()) else {
            metrics.refused(Refusal::PerAddressCap);
            refused_per_address += 1;
            if refused_per_address.is_power_of_two() {
                tracing::warn!(
                    %peer,
                    refused = refused_per_address,
                    max_connections_per_ip = limits.max_connections_per_ip,
                    "connection refused: the client's address is at its connection cap"
                );
            }
            drop(stream);
            continue;
        };
        metrics.connections_accepted_total.inc();
        // Every write is already whole (a response, or a WebSocket connection's queued frames
        // flushed together): Nagle's algorithm would only hold the next one back until the
        // client acknowledges the last, which its delayed ACK can take a while to do.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "could not set TCP_NODELAY");
        }
        let counted = Counted {
            stream,
            _slot: slot,
            _address_slot: address_slot,
        };
        let router = router.clone();
        let body_budget = BodyBudget {
            node: Arc::clone(&body_budget),
            address: address_bodies,
        };
        let over_budget = Arc::clone(&over_budget);
        let detach = Arc::new(Detach::default());
        let parking = Arc::clone(&detach);
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            // Only a GET over HTTP/1.1 or HTTP/1.0 may be served detached (see `detached`).
            let framing = match request.version() {
                Version::HTTP_11 => Some(detached::Framing::Chunked),
                Version::HTTP_10 => Some(detached::Framing::UntilClose),
                _ => None,
            };
            let detachable = framing
                .filter(|_| request.method() == Method::GET)
                .map(|framing| (Arc::clone(&parking), framing));
            // Only a request with a body to read gets a timer, a share of the budget, and the
            // flag that says why reading it failed.
            let failed =
                (!request.body().is_end_stream()).then(|| Arc::new(BodyFailure::default()));
            let request = request.map(|body| match &failed {
                Some(flag) => Body::new(TimedBody::new(
                    body,
                    body_timeout,
                    body_budget.clone(),
                    Arc::clone(flag),
                )),
                None => Body::new(body),
            });
            // A router clone is a reference count; each request gets its own.
            let response = router.clone().call(request);
            // Only a request with a body can be refused for want of budget.
            let over_budget = failed.as_ref().map(|_| Arc::clone(&over_budget));
            async move {
                let response = response.await;
                let failure = failed.as_ref().map_or(BodyFailure::NONE, |f| f.get());
                match (failure, detachable, response) {
                    (BodyFailure::TIMED_OUT, _, _) => {
                        tracing::debug!(%peer, "the request body timed out: answered 408");
                        Ok(body_timeout_response(body_timeout))
                    }
                    (BodyFailure::OVER_BUDGET, _, _) => {
                        // Once per power of two, so the flood this guards against does not
                        // flood the log too.
                        let refused = over_budget
                            .as_ref()
                            .map_or(1, |count| count.fetch_add(1, Ordering::Relaxed) + 1);
                        if refused.is_power_of_two() {
                            tracing::warn!(%peer, refused, "request bodies refused: the server is reading as many bytes of bodies as listener.max_body_bytes_reading allows; answered 503");
                        }
                        Ok(body_budget_response())
                    }
                    (BodyFailure::ADDRESS_OVER_BUDGET, _, _) => {
                        tracing::debug!(%peer, "a request body refused: its address is reading as many bytes of bodies as listener.max_body_bytes_reading_per_ip allows; answered 429");
                        Ok(address_body_budget_response())
                    }
                    (_, Some((detach, framing)), Ok(mut response))
                        if response.extensions().get::<Endless>().is_some() =>
                    {
                        // hyper never gets it: the connection's task takes the socket and
                        // serves it, and drops this future with hyper's connection.
                        response.extensions_mut().insert(framing);
                        detach.park(response);
                        std::future::pending().await
                    }
                    (_, _, response) => response,
                }
            }
        });
        let http = http.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        let tasks = connections.clone();
        connections.spawn(async move {
            let io = match tls {
                None => Io::Plain(counted),
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(handshake_timeout, acceptor.accept(counted));
                    let handshake = tokio::select! {
                        handshake = handshake => handshake,
                        // Nothing was asked yet: nothing to finish.
                        () = shutdown.cancelled() => return,
                    };
                    match handshake {
                        Ok(Ok(stream)) => Io::Tls(Box::new(stream)),
                        // Scanners, plain HTTP sent to the TLS port, clients that distrust
                        // the certificate: theirs to report, debug here.
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            let io = Watched {
                io,
                detach: Arc::clone(&detach),
                stall: WriteStall::new(write_timeout),
            };
            let mut connection = http
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            let driven = tokio::select! {
                driven = drive(&mut connection, &detach) => driven,
                () = shutdown.cancelled() => {
                    // Finish the request in flight (if any), then close; within the drain
                    // timeout, as hyper has no write timeout of its own.
                    Pin::new(&mut connection).graceful_shutdown();
                    match tokio::time::timeout(drain_timeout, drive(&mut connection, &detach)).await {
                        Ok(driven) => driven,
                        Err(_) => {
                            tracing::debug!(%peer, "dropping a connection whose response did not finish within the shutdown grace");
                            return;
                        }
                    }
                }
            };
            let response = match driven {
                Driven::Ended(Ok(())) => return,
                Driven::Ended(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                    return;
                }
                Driven::Detached(response) => response,
            };
            // Not upgraded (a parked response is no upgrade), so the parts are there; the
            // bytes read past the request are a pipelined request the response declines.
            let Some(parts) = connection.into_parts() else {
                return;
            };
            let Watched { io, .. } = parts.io.into_inner();
            // On a task of its own: this one is laid out for hyper's connection (and a TLS
            // handshake), several times what the stream needs, for the stream's whole life.
            tasks.spawn(detached::serve(io, response, shutdown));
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// How a connection's HTTP service ended: hyper finished (or failed), or a response was parked
/// to be served detached and hyper has nothing left to flush.
enum Driven {
    Ended(hyper::Result<()>),
    Detached(Response),
}

/// Drives hyper's connection until it ends or can hand the socket over (see `detached`).
/// The parked response is looked for after every poll of the connection: it is parked from
/// within that poll (hyper runs the service there), and hyper's pending flush wakes it.
async fn drive<C>(connection: &mut C, detach: &Detach) -> Driven
where
    C: Future<Output = hyper::Result<()>> + Unpin,
{
    std::future::poll_fn(|cx| {
        if let Poll::Ready(ended) = Pin::new(&mut *connection).poll(cx) {
            return Poll::Ready(Driven::Ended(ended));
        }
        match detach.take_when_flushed() {
            Some(response) => Poll::Ready(Driven::Detached(response)),
            None => Poll::Pending,
        }
    })
    .await
}

/// `router`'s `/health/live` and `/health/ready` alone, for the plain-HTTP health listener
/// (`tls.health_listen`): load balancers probe it without TLS, and it answers nothing else
/// (404), so it is no way around TLS for the APIs. The same handlers answer as on the main
/// listener.
pub fn health_only(router: Router) -> Router {
    async fn forward(State(router): State<Router>, request: axum::extract::Request) -> Response {
        match router.clone().call(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }
    Router::new()
        .route("/health/live", get(forward))
        .route("/health/ready", get(forward))
        .with_state(router)
}

/// The answer to a request whose body did not arrive in time, whatever the handler made of the
/// failed read (axum's extractors would say 400): 408 in the APIs' error shape, and the
/// connection closed (the rest of the body is never read).
fn body_timeout_response(timeout: Duration) -> Response {
    body_failure_response(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        &format!(
            "the request body did not arrive within {} s",
            timeout.as_secs_f64()
        ),
    )
}

/// Reading a request body was refused for want of budget: 503 in the APIs' error shape, retry
/// in a second, and the connection closed (the rest of the body is never read).
fn body_budget_response() -> Response {
    retry_in_a_second(body_failure_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "busy",
        "the server is reading as many request bodies as it may at once; retry shortly",
    ))
}

/// Reading a request body was refused because its client's address holds its whole share of
/// the budget: 429 in the APIs' error shape, retry in a second, and the connection closed.
fn address_body_budget_response() -> Response {
    retry_in_a_second(body_failure_response(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "this client address is sending as many request bodies at once as it may; retry once they are sent",
    ))
}

/// `response` with `Retry-After: 1`: a budget frees as the bodies holding it are read.
fn retry_in_a_second(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// `{"code", "detail"}` with `status`, and the connection closed.
fn body_failure_response(status: StatusCode, code: &str, detail: &str) -> Response {
    let body = serde_json::json!({"code": code, "detail": detail}).to_string();
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Data chunks shorter than this are copied out of hyper's read buffer (see [`TimedBody`]).
const COPY_CHUNKS_BELOW: usize = 8 * 1024;

/// Copied chunks are handed on together once they hold this much (or the body ends).
const COPIED_CHUNK: usize = 16 * 1024;

/// Why reading a request body failed, set by [`TimedBody`] for the service to answer.
#[derive(Default)]
struct BodyFailure(AtomicU8);

impl BodyFailure {
    const NONE: u8 = 0;
    /// 408: it did not arrive within the body read timeout.
    const TIMED_OUT: u8 = 1;
    /// 503: the server is reading all the bodies it may at once.
    const OVER_BUDGET: u8 = 2;
    /// 429: the client's address holds its whole share of that budget.
    const ADDRESS_OVER_BUDGET: u8 = 3;

    fn set(&self, why: u8) {
        self.0.store(why, Ordering::Release);
    }

    fn get(&self) -> u8 {
        self.0.load(Ordering::Acquire)
    }
}

/// A request body whose reading fails once `timeout` has passed since the first read, unless it
/// has ended by then. The timer exists only between the first read and the end of the body.
///
/// It also owns what it hands on. hyper gives each read's bytes as a slice of its read buffer,
/// and while a slice is held (an extractor collects the whole body before the handler runs)
/// the next read cannot reuse that buffer and allocates a fresh one of at least 8 KiB: a body
/// trickled a byte per read would hold 8 KiB per byte, about 240 MiB over a body timeout of
/// 30 s for 30,000 bytes sent. So a short chunk is copied into a buffer of the body's own and
/// its slice dropped at once; what is held is then the body's own length (chunks of at least
/// [`COPY_CHUNKS_BELOW`] are handed on as they are: at most twice their length). A whole body
/// that comes in one read, nearly every one, is handed on as it is.
///
/// And it reads within a budget shared by every connection (`listener.max_body_bytes_reading`):
/// each data frame takes its length from it until the body is dropped (once its extractor has
/// collected it), and a frame the budget cannot cover fails the body (503), so slow senders
/// cannot make the server hold more than that in bodies they have not finished sending. The
/// frame takes its length from its client address's share too
/// (`listener.max_body_bytes_reading_per_ip`, 429 beyond), so that one address sending slow
/// bodies cannot hold the whole budget and have everyone else's refused.
struct TimedBody<B> {
    inner: B,
    timeout: Duration,
    deadline: Option<Pin<Box<Sleep>>>,
    /// The body ended (or failed): no timer any more.
    done: bool,
    /// Set when the deadline passed (408) or the budget ran out (503), for the service.
    failure: Arc<BodyFailure>,
    /// The shared budget of bytes being read, and this body's share of it so far.
    budget: BodyBudget,
    reading: Option<OwnedSemaphorePermit>,
    /// Bytes this body holds of its address's share, given back when it is dropped.
    address_reading: usize,
    /// Short chunks copied and not yet handed on.
    held: BytesMut,
    /// A frame that came after held data (trailers), handed on after it.
    after_held: Option<Frame<Bytes>>,
    /// The inner body ended with data still held: that data was the last frame.
    ended: bool,
}

impl<B> TimedBody<B> {
    fn new(inner: B, timeout: Duration, budget: BodyBudget, failure: Arc<BodyFailure>) -> Self {
        Self {
            inner,
            timeout,
            deadline: None,
            done: false,
            failure,
            budget,
            reading: None,
            address_reading: 0,
            held: BytesMut::new(),
            after_held: None,
            ended: false,
        }
    }

    fn finish(&mut self) {
        self.done = true;
        self.deadline = None;
    }

    /// Takes `bytes` more of the budget for this body, or fails it.
    fn take_budget(&mut self, bytes: usize) -> Result<(), BoxError> {
        let Ok(permits) = u32::try_from(bytes) else {
            return Err(self.over_budget(BodyFailure::OVER_BUDGET));
        };
        // The address's share first: a client over its own share is told so (429), not that
        // the server is busy.
        if let Some(address) = &self.budget.address {
            if !address.take(bytes) {
                return Err(self.over_budget(BodyFailure::ADDRESS_OVER_BUDGET));
            }
            self.address_reading += bytes;
        }
        match Arc::clone(&self.budget.node).try_acquire_many_owned(permits) {
            Ok(permit) => {
                match &mut self.reading {
                    Some(reading) => reading.merge(permit),
                    None => self.reading = Some(permit),
                }
                Ok(())
            }
            Err(_) => Err(self.over_budget(BodyFailure::OVER_BUDGET)),
        }
    }

    /// Fails the body for want of budget (`why`: the node's or the address's), giving back
    /// its address's share at once: its connection is closing.
    fn over_budget(&mut self, why: u8) -> BoxError {
        self.finish();
        self.failure.set(why);
        self.give_back_address_share();
        BodyOverBudget.into()
    }

    /// What is held, as one frame.
    fn take_held(&mut self) -> Frame<Bytes> {
        Frame::data(self.held.split().freeze())
    }

    fn give_back_address_share(&mut self) {
        if let Some(address) = &self.budget.address {
            address.give_back(std::mem::take(&mut self.address_reading));
        }
    }
}

impl<B> Drop for TimedBody<B> {
    fn drop(&mut self) {
        self.give_back_address_share();
    }
}

/// The budgets a request body reads within: the node's, and its client address's share
/// (`None` for an address not held to one).
#[derive(Clone)]
struct BodyBudget {
    node: Arc<Semaphore>,
    address: Option<Arc<AddressBodies>>,
}

/// Bytes of request bodies one client address is reading, against its share.
struct AddressBodies {
    max: usize,
    reading: AtomicUsize,
}

impl AddressBodies {
    /// Takes `bytes` of the share, or nothing if they do not fit.
    fn take(&self, bytes: usize) -> bool {
        self.reading
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |reading| {
                reading
                    .checked_add(bytes)
                    .filter(|&after| after <= self.max)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: usize) {
        if bytes > 0 {
            self.reading.fetch_sub(bytes, Ordering::AcqRel);
        }
    }
}

/// Reading a request body failed: it did not arrive within the body read timeout.
#[derive(Debug)]
struct BodyTimedOut(Duration);

impl fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the request body did not arrive within {} s",
            self.0.as_secs_f64()
        )
    }
}

impl StdError for BodyTimedOut {}

/// Reading a request body failed: the server reads all the bodies it may at once.
#[derive(Debug)]
struct BodyOverBudget;

impl fmt::Display for BodyOverBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the server is reading as many request bodies as it may at once")
    }
}

impl StdError for BodyOverBudget {}

impl<B> HttpBody for TimedBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match this.failure.get() {
            BodyFailure::TIMED_OUT => {
                return Poll::Ready(Some(Err(BodyTimedOut(this.timeout).into())));
            }
            BodyFailure::OVER_BUDGET | BodyFailure::ADDRESS_OVER_BUDGET => {
                return Poll::Ready(Some(Err(BodyOverBudget.into())));
            }
            _ => {}
        }
        if let Some(frame) = this.after_held.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        loop {
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(None) => {
                    this.finish();
                    this.ended = true;
                    if this.held.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(this.take_held())));
                }
                Poll::Ready(Some(Err(e))) => {
                    this.finish();
                    return Poll::Ready(Some(Err(e.into())));
                }
                // The timer starts the first time the body keeps the reader waiting: a body
                // that came with its headers (nearly every one) never costs a timer.
                Poll::Pending => {
                    if !this.done {
                        let timeout = this.timeout;
                        let deadline = this
                            .deadline
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                        if deadline.as_mut().poll(cx).is_ready() {
                            this.deadline = None;
                            this.failure.set(BodyFailure::TIMED_OUT);
                            return Poll::Ready(Some(Err(BodyTimedOut(timeout).into())));
                        }
                    }
                    return Poll::Pending;
                }
            };
            let end = this.inner.is_end_stream();
            if end {
                this.finish();
            }
            let data = match frame.into_data() {
                Ok(data) => {
                    if let Err(refused) = this.take_budget(data.len()) {
                        return Poll::Ready(Some(Err(refused)));
                    }
                    data
                }
                // Trailers: after whatever is held.
                Err(frame) if this.held.is_empty() => return Poll::Ready(Some(Ok(frame))),
                Err(frame) => {
                    this.after_held = Some(frame);
                    return Poll::Ready(Some(Ok(this.take_held())));
                }
            };
            if this.held.is_empty() && (end || data.len() >= COPY_CHUNKS_BELOW) {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            // Copied, and hyper's buffer let go of.
            this.held.extend_from_slice(&data);
            drop(data);
            if end || this.held.len() >= COPIED_CHUNK {
                this.ended = end;
                return Poll::Ready(Some(Ok(this.take_held())));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_empty()
            && self.after_held.is_none()
            && (self.ended || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let held = u64::try_from(self.held.len()).unwrap_or(u64::MAX);
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(held));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(held));
        }
        hint
    }
}

/// Open sockets and request bodies being read, per client address; see the module
/// documentation.
struct PerAddress {
    /// Sockets one address may hold (0: no limit).
    max: usize,
    /// Bytes of bodies one address may be reading (0: no share of its own).
    max_body_bytes: usize,
    trusted_proxies: Vec<IpNet>,
    open: Mutex<HashMap<IpAddr, AddressUse>>,
}

/// What one address holds: its sockets, and the bodies they are reading (`None` without a
/// share of the body budget).
struct AddressUse {
    sockets: usize,
    bodies: Option<Arc<AddressBodies>>,
}

impl PerAddress {
    fn new(max: usize, max_body_bytes: usize, trusted_proxies: Vec<IpNet>) -> Self {
        Self {
            max,
            max_body_bytes,
            trusted_proxies,
            open: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, AddressUse>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a socket from `peer`, or `None` if its address holds `max` already; with the
    /// socket's place, its address's share of the body budget (`None` for an address held to
    /// none), for the connection's request bodies. A body outliving every socket of its address
    /// keeps the share it took: the entry goes, its counter with the last holder.
    fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<(AddressSlot, Option<Arc<AddressBodies>>)> {
        let peer = peer.to_canonical();
        let untracked = self.max == 0 && self.max_body_bytes == 0;
        if untracked || self.trusted_proxies.iter().any(|net| net.contains(&peer)) {
            return Some((AddressSlot { held: None }, None));
        }
        let key = herald_channels::limits::address_key(peer);
        let mut open = self.lock();
        let used = open.entry(key).or_insert_with(|| AddressUse {
            sockets: 0,
            bodies: (self.max_body_bytes > 0).then(|| {
                Arc::new(AddressBodies {
                    max: self.max_body_bytes,
                    reading: AtomicUsize::new(0),
                })
            }),
        });
        if self.max > 0 && used.sockets >= self.max {
            return None;
        }
        used.sockets += 1;
        let slot = AddressSlot {
            held: Some((Arc::clone(self), key)),
        };
        Some((slot, used.bodies.clone()))
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.lock().len()
    }
}

/// One socket's place in its address's count, released when dropped.
struct AddressSlot {
    held: Option<(Arc<PerAddress>, IpAddr)>,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let Some((per_address, key)) = self.held.take() else {
            return;
        };
        let mut open = per_address.lock();
        if let Some(used) = open.get_mut(&key) {
            used.sockets = used.sockets.saturating_sub(1);
            if used.sockets == 0 {
                open.remove(&key);
            }
        }
    }
}

/// A connection's byte stream: the counted socket itself, or TLS over it.
enum Io {
    Plain(Counted),
    /// Boxed: a TLS session's buffers would make every plain connection as large.
    Tls(Box<TlsStream<Counted>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connection's stream as hyper sees it: tells its [`Detach`] whether hyper has bytes
/// still to flush, so the socket is never taken from hyper with some of them (see `detached`),
/// and fails a write that makes no progress for the write timeout ([`WriteStall`]).
struct Watched {
    io: Io,
    detach: Arc<Detach>,
    stall: WriteStall,
}

/// A deadline on writes that make no progress. hyper has no write timeout, and the header
/// timer runs only while a request head is read: a client that sends requests (pipelined, or
/// over a WebSocket) and reads none of the answers would otherwise hold its connection, its
/// slots and the kernel's buffers until shutdown. The timer starts when a write or flush
/// cannot proceed and stops at the next that does; its allocation is made only for a
/// connection whose writes ever wait.
struct WriteStall {
    timeout: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    waiting: bool,
}

impl WriteStall {
    fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            timer: None,
            waiting: false,
        }
    }

    /// Passes `result` on, but past the deadline of a wait it is part of, a `TimedOut` error.
    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if result.is_ready() {
            self.waiting = false;
            return result;
        }
        // The clock is read once per wait, not at every poll of it.
        if !self.waiting {
            let deadline = tokio::time::Instant::now() + self.timeout;
            match &mut self.timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.waiting = true;
        }
        let Some(timer) = self.timer.as_mut() else {
            return result;
        };
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client read nothing for {:?} (listener.write_timeout_secs)",
                    self.timeout
                ),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        self.detach.wrote(&written);
        self.stall.check(cx, written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.detach.wrote(&written);
        self.stall.check(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.io).poll_flush(cx);
        self.detach.flushed(&flushed);
        self.stall.check(cx, flushed)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A socket that holds one of the listener's connection slots, and its place in its address's
/// count, for as long as it lives, through an upgrade to WebSocket too.
struct Counted {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    _address_slot: AddressSlot,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::{collections::VecDeque, convert::Infallible};

    /// A body that gives its frames one per poll, with a wait (`None`) where the test says.
    struct Trickle(VecDeque<Option<Frame<Bytes>>>);

    impl HttpBody for Trickle {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            match self.get_mut().0.pop_front() {
                Some(Some(frame)) => Poll::Ready(Some(Ok(frame))),
                Some(None) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                None => Poll::Ready(None),
            }
        }

        /// As hyper's body with a known length: ended once its last frame is taken.
        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    /// A one-byte chunk that counts itself out when the last reference to it goes, as hyper's
    /// read buffer is freed once no slice of it is held.
    fn byte(live: &Arc<std::sync::atomic::AtomicUsize>) -> Bytes {
        struct Counted(Arc<std::sync::atomic::AtomicUsize>);
        impl AsRef<[u8]> for Counted {
            fn as_ref(&self) -> &[u8] {
                b"x"
            }
        }
        impl Drop for Counted {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        live.fetch_add(1, Ordering::SeqCst);
        Bytes::from_owner(Counted(Arc::clone(live)))
    }

    async fn read_all(body: &mut TimedBody<Trickle>) -> Vec<Frame<Bytes>> {
        let mut frames = Vec::new();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
        {
            frames.push(frame.expect("no error"));
        }
        frames
    }

    #[tokio::test]
    async fn a_trickled_body_holds_its_own_length_not_the_reads_it_came_in() {
        let live = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        // 40,000 one-byte reads, each after a wait, then a trailer.
        let mut chunks = VecDeque::new();
        for _ in 0..40_000 {
            chunks.push_back(None);
            chunks.push_back(Some(Frame::data(byte(&live))));
        }
        let mut trailers = axum::http::HeaderMap::new();
        trailers.insert("x-end", HeaderValue::from_static("1"));
        chunks.push_back(Some(Frame::trailers(trailers)));
        let (mut body, _) = timed(Trickle(chunks), Duration::from_secs(30), 1 << 20);
        let frames = read_all(&mut body).await;
        // Every read's bytes were let go of as they came: the frames handed on own copies.
        assert_eq!(
            live.load(Ordering::SeqCst),
            0,
            "no read's buffer is still held"
        );
        let (data, rest): (Vec<_>, Vec<_>) = frames.into_iter().partition(Frame::is_data);
        let data: Vec<Bytes> = data
            .into_iter()
            .map(|f| f.into_data().expect("data"))
            .collect();
        assert_eq!(data.iter().map(Bytes::len).sum::<usize>(), 40_000);
        assert!(data.iter().all(|d| d.iter().all(|b| *b == b'x')));
        assert_eq!(
            data.len(),
            3,
            "handed on in chunks of 16 KiB, then the rest"
        );
        assert_eq!(data[0].len(), COPIED_CHUNK);
        assert_eq!(rest.len(), 1, "the trailers, after the data");
        assert!(rest[0].is_trailers());
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn a_body_in_one_read_and_large_reads_are_handed_on_as_they_are() {
        let whole = Bytes::from_static(b"{\"a\":1}");
        let (mut body, _) = timed(
            Trickle(VecDeque::from([Some(Frame::data(whole.clone()))])),
            Duration::from_secs(30),
            1 << 20,
        );
        let frames = read_all(&mut body).await;
        assert_eq!(frames.len(), 1);
        let data = frames.into_iter().next().and_then(|f| f.into_data().ok());
        assert_eq!(data.map(|d| d.as_ptr()), Some(whole.as_ptr()), "not copied");

        let large = Bytes::from(vec![b'y'; COPY_CHUNKS_BELOW]);
        let small = Bytes::from_static(b"zz");
        let (mut body, _) = timed(
            Trickle(VecDeque::from([
                Some(Frame::data(large.clone())),
                None,
                Some(Frame::data(small)),
            ])),
            Duration::from_secs(30),
            1 << 20,
        );
        let data: Vec<Bytes> = read_all(&mut body)
            .await
            .into_iter()
            .filter_map(|f| f.into_data().ok())
            .collect();
        assert_eq!(data.len(), 2);
        assert_eq!(
            data[0].as_ptr(),
            large.as_ptr(),
            "a large read is not copied"
        );
        assert_eq!(&data[1][..], b"zz", "the short last read");
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn sockets_are_counted_per_address_and_forgotten_at_zero() {
        let per_address = Arc::new(PerAddress::new(
            2,
            0,
            vec!["10.0.0.0/8".parse().expect("net")],
        ));
        let a = per_address.admit(ip("192.0.2.1")).expect("first");
        let b = per_address.admit(ip("192.0.2.1")).expect("second");
        assert!(per_address.admit(ip("192.0.2.1")).is_none(), "third");
        // IPv4-mapped IPv6 is the same address.
        assert!(per_address.admit(ip("::ffff:192.0.2.1")).is_none());
        let other = per_address.admit(ip("192.0.2.2")).expect("another address");
        assert_eq!(per_address.tracked(), 2);
        drop(a);
        let c = per_address
            .admit(ip("192.0.2.1"))
            .expect("a place was freed");
        drop((b, c, other));
        assert_eq!(
            per_address.tracked(),
            0,
            "entries go when their count is zero"
        );

        // IPv6 counts per /64.
        let _v6 = per_address.admit(ip("2001:db8:1:2::1")).expect("first");
        let _v6b = per_address
            .admit(ip("2001:db8:1:2:ffff::9"))
            .expect("second");
        assert!(
            per_address.admit(ip("2001:db8:1:2::77")).is_none(),
            "same /64"
        );
        let _next = per_address.admit(ip("2001:db8:1:3::1")).expect("next /64");

        // Trusted proxies are not counted, nor is anything when the limit is 0.
        let proxied: Vec<_> = (0..5)
            .map(|_| per_address.admit(ip("10.1.2.3")).expect("a trusted proxy"))
            .collect();
        assert_eq!(proxied.len(), 5);
        let unlimited = Arc::new(PerAddress::new(0, 0, Vec::new()));
        let many: Vec<_> = (0..5)
            .map(|_| unlimited.admit(ip("192.0.2.1")).expect("no limit"))
            .collect();
        assert_eq!((many.len(), unlimited.tracked()), (5, 0));
    }

    /// A body that never sends anything.
    struct Silent;

    impl HttpBody for Silent {
        type Data = Bytes;
        type Error = io::Error;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
            Poll::Pending
        }
    }

    /// A body with `timeout` and a budget of `budget` bytes, and its failure flag.
    fn timed<B>(inner: B, timeout: Duration, budget: usize) -> (TimedBody<B>, Arc<BodyFailure>) {
        let failure = Arc::new(BodyFailure::default());
        let body = TimedBody::new(
            inner,
            timeout,
            BodyBudget {
                node: Arc::new(Semaphore::new(budget)),
                address: None,
            },
            Arc::clone(&failure),
        );
        (body, failure)
    }

    /// Bodies being read share one budget: a frame it cannot cover fails its body (flagged
    /// for a 503), and a body dropped once collected gives its share back.
    #[tokio::test]
    async fn bodies_being_read_share_one_budget() {
        let budget = Arc::new(Semaphore::new(10 * 1024));
        let body = |chunks: Vec<Option<Frame<Bytes>>>| {
            let failure = Arc::new(BodyFailure::default());
            let body = TimedBody::new(
                Trickle(VecDeque::from(chunks)),
                Duration::from_secs(30),
                BodyBudget {
                    node: Arc::clone(&budget),
                    address: None,
                },
                Arc::clone(&failure),
            );
            (body, failure)
        };
        let chunk = |n: usize| Some(Frame::data(Bytes::from(vec![b'a'; n])));
        // The first takes 8 KiB and is not yet whole.
        let (mut first, first_failure) = body(vec![chunk(8 * 1024), None, chunk(8 * 1024)]);
        let frame = next_frame(&mut first)
            .await
            .expect("a frame")
            .expect("data");
        assert_eq!(frame.into_data().expect("data").len(), 8 * 1024);
        assert_eq!(budget.available_permits(), 2 * 1024);
        // The second cannot have 4 KiB more.
        let (mut second, second_failure) = body(vec![chunk(4 * 1024)]);
        let refused = next_frame(&mut second)
            .await
            .expect("a frame")
            .expect_err("over the budget");
        assert!(refused.is::<BodyOverBudget>(), "{refused}");
        assert_eq!(second_failure.get(), BodyFailure::OVER_BUDGET);
        assert_eq!(first_failure.get(), BodyFailure::NONE);
        // Once the first is dropped, its share is free again.
        drop(first);
        assert_eq!(budget.available_permits(), 10 * 1024);
        let (mut third, _) = body(vec![chunk(4 * 1024)]);
        assert!(next_frame(&mut third).await.expect("a frame").is_ok());
    }

    /// One address holds at most its share of the body budget: a frame beyond it fails its
    /// body (flagged for a 429) while another address's body still reads; the share comes
    /// back when the body is dropped, and a body that failed gives its share back at once.
    /// Trusted proxies are held to no share.
    #[tokio::test]
    async fn one_address_reads_at_most_its_share_of_the_body_budget() {
        let per_address = Arc::new(PerAddress::new(
            0,
            10 * 1024,
            vec!["10.0.0.0/8".parse().expect("net")],
        ));
        let node = Arc::new(Semaphore::new(1024 * 1024));
        type Admitted = (AddressSlot, Option<Arc<AddressBodies>>);
        let body = |(_, share): &Admitted, chunks: Vec<Option<Frame<Bytes>>>| {
            let failure = Arc::new(BodyFailure::default());
            let body = TimedBody::new(
                Trickle(VecDeque::from(chunks)),
                Duration::from_secs(30),
                BodyBudget {
                    node: Arc::clone(&node),
                    address: share.clone(),
                },
                Arc::clone(&failure),
            );
            (body, failure)
        };
        let chunk = |n: usize| Some(Frame::data(Bytes::from(vec![b'a'; n])));
        let one = per_address.admit(ip("192.0.2.1")).expect("admitted");
        let same = per_address.admit(ip("192.0.2.1")).expect("admitted");
        let other = per_address.admit(ip("192.0.2.2")).expect("admitted");
        let proxy = per_address.admit(ip("10.0.0.1")).expect("admitted");

        let (mut first, _) = body(&one, vec![chunk(8 * 1024), None, chunk(1024)]);
        assert!(next_frame(&mut first).await.expect("a frame").is_ok());
        // The same address, on another socket, cannot have 4 KiB more...
        let (mut second, second_failure) = body(&same, vec![chunk(4 * 1024)]);
        let refused = next_frame(&mut second)
            .await
            .expect("a frame")
            .expect_err("over the address's share");
        assert!(refused.is::<BodyOverBudget>(), "{refused}");
        assert_eq!(second_failure.get(), BodyFailure::ADDRESS_OVER_BUDGET);
        assert_eq!(
            node.available_permits(),
            1024 * 1024 - 8 * 1024,
            "a refused frame takes nothing of the node's budget"
        );
        // ...while another address, and a trusted proxy beyond any share, still read.
        let (mut others, _) = body(&other, vec![chunk(8 * 1024)]);
        assert!(next_frame(&mut others).await.expect("a frame").is_ok());
        let (mut proxied, _) = body(&proxy, vec![chunk(64 * 1024)]);
        assert!(next_frame(&mut proxied).await.expect("a frame").is_ok());
        // Dropped, the first body gives the address its share back.
        drop(first);
        let (mut third, third_failure) = body(&same, vec![chunk(9 * 1024)]);
        assert!(next_frame(&mut third).await.expect("a frame").is_ok());
        assert_eq!(third_failure.get(), BodyFailure::NONE);
        // A body refused after taking part of the share gives that part back at once.
        let (mut greedy, greedy_failure) = body(&one, vec![chunk(1024), None, chunk(1024)]);
        let refused = next_frame(&mut greedy)
            .await
            .expect("a frame")
            .expect_err("its second KiB is over the share");
        assert!(refused.is::<BodyOverBudget>(), "{refused}");
        assert_eq!(greedy_failure.get(), BodyFailure::ADDRESS_OVER_BUDGET);
        let reading = || {
            one.1
                .as_ref()
                .expect("a share")
                .reading
                .load(Ordering::Acquire)
        };
        assert_eq!(reading(), 9 * 1024, "the third body's alone");
        drop(third);
        assert_eq!(reading(), 0);
        drop(greedy);
        assert_eq!(reading(), 0);
        assert!(proxy.1.is_none(), "a trusted proxy holds no share");
    }

    async fn next_frame<B: HttpBody + Unpin>(
        body: &mut B,
    ) -> Option<Result<Frame<B::Data>, B::Error>> {
        std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_does_not_arrive_in_time_fails_and_is_flagged() {
        let (mut body, flag) = timed(Silent, Duration::from_secs(30), 1024);
        assert!(body.deadline.is_none(), "no timer before the first read");
        let started = tokio::time::Instant::now();
        let error = next_frame(&mut body)
            .await
            .expect("a frame")
            .expect_err("timed out");
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert!(error.is::<BodyTimedOut>(), "{error}");
        assert_eq!(flag.get(), BodyFailure::TIMED_OUT);
        assert!(next_frame(&mut body).await.expect("a frame").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn bodies_that_are_empty_or_complete_hold_no_timer() {
        let (mut empty, _) = timed(Body::empty(), Duration::from_secs(1), 1024);
        assert!(next_frame(&mut empty).await.is_none());
        assert!(
            empty.deadline.is_none(),
            "an empty body never starts a timer"
        );

        let (mut full, flag) = timed(Body::from("{\"a\":1}"), Duration::from_secs(1), 1024);
        let frame = next_frame(&mut full).await.expect("a frame").expect("data");
        assert_eq!(frame.into_data().expect("data"), Bytes::from("{\"a\":1}"));
        assert!(
            full.deadline.is_none(),
            "the timer goes with the body's end"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(next_frame(&mut full).await.is_none());
        assert_eq!(flag.get(), BodyFailure::NONE);
    }
}
