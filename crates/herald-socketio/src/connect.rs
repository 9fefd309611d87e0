//! Admitting a socket to its namespace (an app), and CORS for the polling transport.
//!
//! The namespace CONNECT is where Herald knows the app, so every check happens there, in
//! order, and a refusal is a `connect_error` whose `message` says what was wrong:
//! 1. the key's form (`/{uid or id}`: no app can have another): "unknown app";
//! 2. the client address's limits (shared with WebSockets and SSE);
//! 3. the app: "unknown app";
//! 4. a browser's `Origin` against the app's `allowedOrigins`;
//! 5. the handshake's `auth` (`token`, `positions`; any other field is refused);
//! 6. the app's connection quota.
//!
//! The HTTP requests of the polling transport carry no app, so `/socket.io/` answers CORS for
//! any origin, without credentials (Herald sets no cookies and reads none): a page from an
//! origin the app does not allow can open an Engine.IO session, which carries nothing, but its
//! namespace CONNECT is refused.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    sync::{Arc, Mutex},
};

use axum::{
    body::Body,
    extract::{ConnectInfo, Request, State},
    http::{HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::Response,
};
use herald_channels::{history::Resume, hub::AppHub, limits::ClientPermit};
use herald_core::{model::App, pusher};
use serde::Deserialize;
use socketioxide::{
    SocketIo,
    extract::{SocketRef, TryData},
    handler::ConnectHandler,
};

use crate::{Face, session, token};

/// What the connect middleware admitted, handed to the connect handler (taken once).
#[derive(Clone)]
pub(crate) struct Admitted(pub(crate) Arc<Mutex<Option<Admission>>>);

pub(crate) struct Admission {
    pub app: App,
    pub grant: Option<token::Grant>,
    pub positions: HashMap<String, Resume>,
    pub permit: ClientPermit,
    pub slot: ConnectionSlot,
    pub listening: session::Listening,
}

/// The socket's place in its app's connection count, given back when dropped.
pub(crate) struct ConnectionSlot(pub Arc<AppHub>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.disconnect(herald_channels::Transport::SocketIo);
    }
}

/// The handshake's `auth`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Auth {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    positions: HashMap<String, PositionWire>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PositionWire {
    epoch: String,
    offset: u64,
}

/// The longest epoch a position may name: Herald's are 16 hex digits; a longer one can match
/// no channel's.
const MAX_EPOCH_CHARS: usize = 64;

/// The handshake's positions are kept until their rooms are joined, for the socket's life: no
/// more of them than it may join rooms, each a room it could join and an epoch Herald could
/// have given.
fn check_positions(
    positions: &HashMap<String, PositionWire>,
    max_rooms: usize,
) -> Result<(), String> {
    if positions.len() > max_rooms {
        return Err(format!(
            "invalid auth: `positions` names {} rooms; a socket joins at most {max_rooms}",
            positions.len()
        ));
    }
    for (room, position) in positions {
        if let Err(rule) = herald_core::validate::channel(room) {
            return Err(format!(
                "invalid auth: `positions` names a room that is not a valid name: {rule}"
            ));
        }
        if position.epoch.chars().count() > MAX_EPOCH_CHARS {
            return Err(format!(
                "invalid auth: the epoch of room `{room}` in `positions` is longer than {MAX_EPOCH_CHARS} characters"
            ));
        }
    }
    Ok(())
}

/// Registers the connect handler: for every app (`/{app}`, a dynamic namespace, created at
/// its first CONNECT) or, given `path`, for one app's key (see [`Face::open_app`] for why).
pub(crate) fn register(io: &SocketIo, face: &Arc<Face>, path: Option<String>) {
    let admit_face = Arc::clone(face);
    let connect_face = Arc::clone(face);
    let admit = move |socket: SocketRef, TryData(auth): TryData<Auth>| {
        let face = Arc::clone(&admit_face);
        async move { admit(&face, &socket, auth.map_err(|e| e.to_string())).await }
    };
    let connected = move |socket: SocketRef| {
        let face = Arc::clone(&connect_face);
        async move { session::start(face, socket) }
    };
    match path {
        Some(path) => io.ns(path, connected.with(admit)),
        // `{*app}` would also take `/a/b`; one segment is an app's uid or id.
        None => {
            if let Err(e) = io.dyn_ns("/{app}", connected.with(admit)) {
                tracing::error!(error = %e, "registering the Socket.IO namespaces failed");
            }
        }
    }
}

async fn admit(
    face: &Arc<Face>,
    socket: &SocketRef,
    auth: Result<Auth, String>,
) -> Result<(), String> {
    let namespace = socket.ns().to_owned();
    let key = namespace.trim_start_matches('/');
    // socketioxide made the namespace when the CONNECT matched `/{app}`, before this runs, and
    // keeps it after a refusal: every refusal that may not name an app drops it again, or
    // made-up names, many to a session, would each keep one for good.
    if !herald_core::validate::could_be_app_key(key) {
        // No app can have it: dropped without a lookup.
        if let Some(io) = face.io.get() {
            face.forget_if_empty(io, &namespace);
        }
        let shown: String = key.chars().take(64).collect();
        return Err(format!(
            "unknown app `{shown}`: the namespace is an app's uid or id, 1 to 256 letters, digits, '-', '_' or '.'"
        ));
    }
    // The address's limits first: a refused client costs no lookup (but its namespace does).
    let parts = socket.req_parts();
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| *peer);
    // The first namespace of a session `front` charged is not charged again: a reconnect
    // costs the address one connection, as a WebSocket's does, not two. (A refusal here is a
    // `connect_error`, after which socket.io-client does not reconnect by itself.)
    let charged = parts
        .extensions
        .get::<SessionCharged>()
        .is_some_and(|charged| charged.0.swap(false, Ordering::AcqRel));
    let permit = match face.config.clients.admit_request_charging(
        peer,
        &parts.headers,
        "Socket.IO connection",
        !charged,
    ) {
        Ok(permit) => permit,
        Err(refusal) => {
            forget_namespace_unless_an_app(face, key);
            return Err(refusal.message());
        }
    };
    let app = match face.apps.find(key).await {
        Ok(Some(app)) => app,
        Ok(None) => {
            forget_namespace_unless_an_app(face, key);
            return Err(format!(
                "unknown app `{key}`: the namespace is an app's uid or id"
            ));
        }
        Err(e) => {
            forget_namespace_unless_an_app(face, key);
            return Err(e.to_string());
        }
    };
    let settings = app.socketio.clone().unwrap_or_default();
    if let Some(origin) = parts.headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default();
        if !settings.allows_origin(origin) {
            return Err(format!(
                "origin {origin} is not allowed for app `{key}` (its socketio.allowedOrigins)"
            ));
        }
    }
    let auth = auth.map_err(|e| format!("invalid auth: {e}"))?;
    check_positions(&auth.positions, face.config.max_rooms_per_socket)?;
    let grant = match &auth.token {
        None => None,
        Some(token) => Some(verify_token(&app, token)?),
    };
    let hub = face.hub.app(&app.id);
    if hub.is_removed() {
        // Deleted after it was looked up: as the WebSocket face, not admitted to join rooms
        // its socket would be disconnected from at once.
        forget_namespace_unless_an_app(face, key);
        return Err(format!("app `{key}` was deleted"));
    }
    if !hub.connect(
        face.config.max_connections_per_app,
        herald_channels::Transport::SocketIo,
    ) {
        return Err(format!(
            "app `{key}` is over its connection quota ({})",
            face.config.max_connections_per_app
        ));
    }
    let admission = Admission {
        slot: ConnectionSlot(hub),
        listening: session::listen(
            socket,
            face.config.inbound_queue,
            usize::try_from(face.config.max_payload_bytes).unwrap_or(usize::MAX),
        ),
        app,
        grant,
        positions: auth
            .positions
            .into_iter()
            .map(|(room, p)| {
                (
                    room,
                    Resume {
                        epoch: p.epoch,
                        offset: p.offset,
                    },
                )
            })
            .collect(),
        permit,
    };
    socket
        .extensions
        .insert(Admitted(Arc::new(Mutex::new(Some(admission)))));
    Ok(())
}

/// A dynamic namespace stays once matched: after a CONNECT refused before the app was found
/// (the address's limits, the store), or because `key` names no app (or a deleted one), drop
/// it, so made-up names cost nothing; but never one with sockets (an app whose uid just
/// changed keeps its clients), nor one an app has the key of (its namespace may be the one
/// `Face::open_app` just opened, or hold a socket still connecting). If the lookup fails, it
/// stays: one per key, until a later refusal of that key drops it.
///
/// The lookups are bounded ([`MAX_FORGET_LOOKUPS`] at once, one per key): a client over its
/// limits, sending CONNECTs to made-up keys as fast as it can upload, must not turn each into
/// a task and a query. Beyond the bound a namespace stays until a later refusal of its key.
fn forget_namespace_unless_an_app(face: &Arc<Face>, key: &str) {
    let Some(io) = face.io.get() else {
        return;
    };
    let Ok(permit) = Arc::clone(&face.forget_lookups).try_acquire_owned() else {
        tracing::debug!(
            key,
            "too many namespace lookups under way; the namespace stays for now"
        );
        return;
    };
    if !face.forgetting(key, true) {
        return;
    }
    let (io, face, key) = (io.clone(), Arc::clone(face), key.to_owned());
    tokio::spawn(async move {
        if matches!(face.apps.find(&key).await, Ok(None)) {
            face.forget_if_empty(&io, &format!("/{key}"));
        }
        face.forgetting(&key, false);
        drop(permit);
    });
}

/// How many namespace lookups after refused CONNECTs may run at once (see
/// [`forget_namespace_unless_an_app`]).
pub(crate) const MAX_FORGET_LOOKUPS: usize = 32;

/// Checks a token against the app's Pusher secret (and a rotated-out one in its grace).
pub(crate) fn verify_token(app: &App, token: &str) -> Result<token::Grant, String> {
    let now = chrono::Utc::now();
    let grant = std::cell::RefCell::new(None);
    pusher::with_any_secret(&app.pusher, now, |secret| {
        token::verify(token, secret, now.timestamp()).map(|g| *grant.borrow_mut() = Some(g))
    })
    .map_err(|e| format!("invalid token: {e}"))?;
    grant.into_inner().ok_or_else(|| "invalid token".to_owned())
}

/// A new Engine.IO session's request was charged to its address's connection rate; its first
/// namespace connection is not charged again (see `admit`). socketioxide keeps the request's
/// extensions with the session.
#[derive(Clone)]
struct SessionCharged(Arc<AtomicBool>);

/// In front of `/socket.io/`: CORS for any origin, without credentials (see the module doc),
/// and a new Engine.IO session (a request without `sid`) charged to its address's connection
/// rate, so one client cannot open sessions without bound (429 beyond).
pub(crate) async fn front(
    State(face): State<Arc<Face>>,
    mut request: Request,
    next: Next,
) -> Response {
    if !request.uri().path().starts_with(crate::PATH) {
        return next.run(request).await;
    }
    let new_session = request.method() != Method::OPTIONS
        && !request
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .any(|pair| pair.starts_with("sid="));
    if new_session {
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(peer)| *peer);
        // The permit only measures the rate: the session is counted as a connection once it
        // joins a namespace.
        if let Err(refusal) =
            face.config
                .clients
                .admit_request(peer, request.headers(), "Socket.IO session")
        {
            let mut response = Response::new(Body::from(refusal.message()));
            *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(refusal.retry_after_secs()),
            );
            allow_origin(
                response.headers_mut(),
                request.headers().get(header::ORIGIN).cloned(),
            );
            return response;
        }
        request
            .extensions_mut()
            .insert(SessionCharged(Arc::new(AtomicBool::new(true))));
    }
    let origin = request.headers().get(header::ORIGIN).cloned();
    if request.method() == Method::OPTIONS {
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::NO_CONTENT;
        let headers = response.headers_mut();
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("content-type"),
        );
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        allow_origin(headers, origin);
        return response;
    }
    let mut response = next.run(request).await;
    allow_origin(response.headers_mut(), origin);
    response
}

fn allow_origin(headers: &mut axum::http::HeaderMap, origin: Option<HeaderValue>) {
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        origin.unwrap_or(HeaderValue::from_static("*")),
    );
    headers.insert(header::VARY, HeaderValue::from_static("origin"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn positions<'a>(
        rooms: impl IntoIterator<Item = (String, &'a str)>,
    ) -> HashMap<String, PositionWire> {
        rooms
            .into_iter()
            .map(|(room, epoch)| {
                let epoch = epoch.to_owned();
                (room, PositionWire { epoch, offset: 1 })
            })
            .collect()
    }

    #[test]
    fn handshake_positions_are_bounded_by_the_rooms_a_socket_may_join() {
        let rooms = |n: usize| (0..n).map(|i| (format!("history-{i}"), "0123456789abcdef"));
        assert!(check_positions(&positions(rooms(3)), 3).is_ok());
        let refused = check_positions(&positions(rooms(4)), 3).expect_err("one too many");
        assert!(
            refused.contains("names 4 rooms; a socket joins at most 3"),
            "{refused}"
        );

        let long_name = "x".repeat(herald_core::validate::MAX_CHANNEL_NAME + 1);
        let refused = check_positions(&positions([(long_name, "e")]), 3).expect_err("name");
        assert!(refused.contains("not a valid name"), "{refused}");

        let long_epoch = "e".repeat(MAX_EPOCH_CHARS + 1);
        let refused = check_positions(
            &positions([("history-a".to_owned(), long_epoch.as_str())]),
            3,
        )
        .expect_err("epoch");
        assert!(refused.contains("longer than 64 characters"), "{refused}");
    }
}
