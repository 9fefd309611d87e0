//! `GET /api/v1/app/{app_id}/tail`: the app's publications as they are committed, as
//! Server-Sent Events. `herald listen` prints (or forwards) them; the console's live tail
//! shows them.
//!
//! Each event is `event: publication` with JSON data: `source` (`api`, `pusher`, `ingest`,
//! `client`), `event` (the event type or Pusher event name), `channels`, `messageId` and
//! `eventId` (of the webhook message it became, if any), `data` (a message's JSON payload, an
//! event's JSON data, or its text as a string) and `timestamp`. Data over 64 KiB is left out
//! (`data` absent, `dataOmittedBytes` its length): the tail keeps what slow watchers have not
//! read in memory, and the message log has every message's payload. Filters: `event_types` and
//! `channels` (lists; an event passes if it has one of each list given).
//!
//! It is a window onto this node, not a queue: it starts now (no history), shows what this
//! node publishes (in a cluster, each node's own producers), and a watcher too slow to keep
//! up gets `event: lagged` with `{"skipped": n}` instead of slowing the publishers. The
//! message log (`GET .../msg`) is the durable record.
//!
//! The stream lives only as long as its token: the token is checked again every
//! [`RECHECK_TOKEN`], and a token revoked or expired meanwhile ends the stream, as does the
//! app's deletion.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Extension,
    extract::{ConnectInfo, Path, State},
    http::{Extensions, HeaderMap, HeaderValue},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use herald_channels::{TailData, TailEvent, tail::Watcher};
use herald_core::AppId;
use serde::Serialize;
use serde_json::{json, value::RawValue};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::{
    ApiState,
    auth::Caller,
    error::{ApiError, ApiResult},
    extract::QueryParams,
};

/// How often a tail checks that its token still holds (an in-memory check for a token the node
/// caches, which a revocation clears).
pub const RECHECK_TOKEN: Duration = Duration::from_secs(5);

/// How many tails one node serves at once: each wakes for every publication of every app.
pub const MAX_TAILS: usize = 64;

/// How many of them one app's callers may hold, so one app cannot take them all.
pub const MAX_TAILS_PER_APP: usize = 8;

/// The tails a node serves, in all and per app.
#[derive(Default)]
pub struct Tails {
    open: Mutex<(usize, HashMap<AppId, usize>)>,
}

/// A served tail's place, given back when its stream ends.
struct TailSlot {
    tails: Arc<Tails>,
    app_id: AppId,
}

impl Tails {
    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, HashMap<AppId, usize>)> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for one more tail of `app_id`, or 503 `too_many_tails` saying which bound.
    fn admit(self: &Arc<Self>, app_id: &AppId) -> ApiResult<TailSlot> {
        let mut open = self.lock();
        let refused = |detail: String| {
            ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "too_many_tails",
                detail,
            )
        };
        if open.0 >= MAX_TAILS {
            return Err(refused(format!(
                "this node already serves {MAX_TAILS} live tails; close one or try another node"
            )));
        }
        let of_app = open.1.entry(app_id.clone()).or_insert(0);
        if *of_app >= MAX_TAILS_PER_APP {
            return Err(refused(format!(
                "this app already has {MAX_TAILS_PER_APP} live tails on this node; close one"
            )));
        }
        *of_app += 1;
        open.0 += 1;
        Ok(TailSlot {
            tails: Arc::clone(self),
            app_id: app_id.clone(),
        })
    }
}

impl Drop for TailSlot {
    fn drop(&mut self) {
        let mut open = self.tails.lock();
        open.0 = open.0.saturating_sub(1);
        if let Some(of_app) = open.1.get_mut(&self.app_id) {
            *of_app = of_app.saturating_sub(1);
            if *of_app == 0 {
                open.1.remove(&self.app_id);
            }
        }
    }
}

/// What a watcher asked to see.
struct Filter {
    event_types: Option<Vec<String>>,
    channels: Option<Vec<String>>,
}

impl Filter {
    fn passes(&self, event: &TailEvent) -> bool {
        self.event_types
            .as_ref()
            .is_none_or(|types| types.contains(&event.event))
            && self
                .channels
                .as_ref()
                .is_none_or(|wanted| event.channels.iter().any(|c| wanted.contains(c)))
    }
}

/// The app's publications as they are committed, as Server-Sent Events.
///
/// Each `event: publication` carries JSON: `source` (`api`, `pusher`, `ingest`, `client`),
/// `event`, `channels`, `messageId` and `eventId` (of the webhook message it became, or
/// `null`), `data` (the JSON payload, or the text as a string) and `timestamp`. A watcher too
/// slow to keep up gets `event: lagged` with `{"skipped": n}`. It starts now (no history)
/// and shows this node's publications; at most 64 tails per node, 8 of them one app's (then
/// 503).
#[utoipa::path(get, path = "/api/v1/app/{app_id}/tail", tag = "Channels", operation_id = "tail",
    params(("app_id" = String, Path, description = "The app's id or uid"),
        ("event_types" = Option<Vec<String>>, Query, description = "Only these event types (repeated or comma-separated)"),
        ("channels" = Option<Vec<String>>, Query, description = "Only publications to one of these channels (repeated or comma-separated)")),
    responses((status = 200, description = "The stream, until the client or the server closes it", content_type = "text/event-stream")))]
pub async fn stream(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(app_id): Path<String>,
    query: QueryParams,
    headers: HeaderMap,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
) -> ApiResult<Response> {
    let app = caller.app(&state, &app_id).await?;
    let filter = Filter {
        event_types: query.list("event_types"),
        channels: query.list("channels"),
    };
    let slot = state.tails.admit(&app.id)?;
    // What the token is checked again with: its header, and the peer for the auth limiter.
    let mut credentials = Extensions::new();
    if let Some(Extension(peer)) = peer {
        credentials.insert(peer);
    }
    let mut recheck = tokio::time::interval(RECHECK_TOKEN);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    recheck.reset();
    let watching = Watching {
        events: state.publisher.tail().watch(),
        app_id: app.id,
        filter,
        shutdown: state.shutdown.clone(),
        token: Recheck {
            headers,
            extensions: credentials,
            every: recheck,
            state: Arc::clone(&state),
        },
        _slot: slot,
    };
    let stream = futures_util::stream::unfold(watching, |mut w| async move {
        let event = w.next().await?;
        Some((Ok::<Event, Infallible>(event), w))
    });
    let mut response = Sse::new(stream)
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(15))
                .text("keep-alive"),
        )
        .into_response();
    // A proxy that buffers responses (nginx by default) would hold the keep-alives back, and
    // `herald listen` takes 45 s of silence for a lost stream.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// One watcher's side of the tail.
struct Watching {
    events: Watcher,
    app_id: AppId,
    filter: Filter,
    shutdown: CancellationToken,
    token: Recheck,
    _slot: TailSlot,
}

/// The tail's token, checked again on a timer.
struct Recheck {
    headers: HeaderMap,
    extensions: Extensions,
    every: tokio::time::Interval,
    state: Arc<ApiState>,
}

impl Recheck {
    /// Whether the token no longer authenticates: the stream ends. Any refusal ends it (401
    /// for a token revoked or expired, and 429 too: an address could otherwise fail on
    /// purpose until its checks are refused unread, and keep a revoked token's stream), except
    /// a store that could not answer (503), which says nothing about the token.
    async fn revoked(&self) -> bool {
        matches!(
            crate::auth::authenticate(&self.headers, &self.extensions, &self.state).await,
            Err(refused) if refused.status() != axum::http::StatusCode::SERVICE_UNAVAILABLE
        )
    }
}

impl Watching {
    /// Whether the app was deleted: its tail ends, as an app token's does when the deletion
    /// takes the token with it (an admin token's tail of a deleted app otherwise held one of
    /// the node's tails, silent, until its client left). A store that could not answer says
    /// nothing about it. The store's app cache is exact, so this is a lookup, not a query.
    async fn app_deleted(&self) -> bool {
        matches!(
            self.token.state.store.get_app(self.app_id.as_str()).await,
            Ok(None)
        )
    }

    /// The next event for this watcher; `None` ends the stream (shutdown).
    async fn next(&mut self) -> Option<Event> {
        loop {
            let next = tokio::select! {
                next = self.events.events.recv() => next,
                () = self.shutdown.cancelled() => return None,
                _ = self.token.every.tick() => {
                    // Run to its end, not raced against the next event: a busy tail would
                    // otherwise drop every check that has to ask the store.
                    if self.token.revoked().await || self.app_deleted().await {
                        return None;
                    }
                    continue;
                }
            };
            match next {
                Ok(event) if event.app_id == self.app_id && self.filter.passes(&event) => {
                    return Some(publication(&event));
                }
                Ok(_) => {}
                Err(RecvError::Lagged(skipped)) => {
                    return Some(
                        Event::default()
                            .event("lagged")
                            .data(json!({ "skipped": skipped }).to_string()),
                    );
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

/// One publication as a watcher reads it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PublicationOut<'a> {
    source: &'static str,
    event: &'a str,
    channels: &'a [String],
    message_id: Option<String>,
    event_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Data<'a>>,
    /// The data's length when it is too large for the tail and left out.
    #[serde(skip_serializing_if = "Option::is_none")]
    data_omitted_bytes: Option<usize>,
    timestamp: String,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Data<'a> {
    Json(&'a RawValue),
    Text(&'a str),
}

/// The SSE event of one publication.
fn publication(event: &TailEvent) -> Event {
    // JSON data goes out as its own bytes (a payload's key order and spacing kept), so what
    // `herald listen --forward-to` sends is what the producer sent.
    let (data, data_omitted_bytes) = match &event.data {
        TailData::Kept(data) => {
            let text = data.as_str();
            let data = match serde_json::from_str::<&RawValue>(text) {
                Ok(raw) if event.json => Data::Json(raw),
                _ => Data::Text(text),
            };
            (Some(data), None)
        }
        TailData::LeftOut { bytes } => (None, Some(*bytes)),
    };
    let body = PublicationOut {
        source: event.source.as_str(),
        event: &event.event,
        channels: &event.channels,
        message_id: event.message_id.as_ref().map(ToString::to_string),
        event_id: event.event_id.as_deref(),
        data,
        data_omitted_bytes,
        timestamp: event
            .at
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    };
    let body = serde_json::to_string(&body).unwrap_or_else(|_| "{}".to_owned());
    let mut out = Event::default().event("publication").data(body);
    if let Some(id) = &event.message_id {
        out = out.id(id);
    }
    out
}

/// This module's part of `/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(stream))]
pub(crate) struct Docs;

#[cfg(test)]
mod tail_slot_tests {
    use super::*;

    fn app(n: usize) -> AppId {
        AppId::parse(format!("app_{n}")).expect("valid")
    }

    /// One app holds at most `MAX_TAILS_PER_APP` of a node's tails, so its callers cannot take
    /// all `MAX_TAILS`; a closed tail gives its place back.
    #[test]
    fn an_app_holds_a_share_of_the_nodes_tails() {
        let tails = Arc::new(Tails::default());
        let mut held: Vec<TailSlot> = (0..MAX_TAILS_PER_APP)
            .map(|_| tails.admit(&app(0)).expect("within the app's share"))
            .collect();
        let refused = tails.admit(&app(0)).err().expect("over the app's share");
        assert_eq!(refused.code(), "too_many_tails");
        assert!(
            refused.detail().contains("this app already has 8"),
            "{refused:?}"
        );
        held.pop();
        held.push(tails.admit(&app(0)).expect("a place was given back"));
        // Other apps fill the node up to its bound.
        for n in 1.. {
            match tails.admit(&app(n % 100 + 1)) {
                Ok(slot) => held.push(slot),
                Err(refused) => {
                    assert!(
                        refused.detail().contains("node already serves 64"),
                        "{refused:?}"
                    );
                    break;
                }
            }
        }
        assert_eq!(held.len(), MAX_TAILS);
        drop(held);
        assert_eq!(tails.lock().0, 0);
        assert!(tails.lock().1.is_empty(), "an app's count goes at zero");
    }
}
