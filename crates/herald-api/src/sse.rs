//! `GET /apps/{app_id}/sse?channels=a,b`: a channel's events as Server-Sent Events, the simple
//! choice where data flows one way (notifications, tickers, AI answers token by token).
//!
//! Each `data:` is the event's Pusher frame (`{"event","channel","data"[,"epoch","offset"]}`),
//! so one parser serves both transports. On history channels every event's `id:` is the
//! stream's position in all of its history channels (`channel:epoch:offset|...`); a client that
//! reconnects sends it back as `Last-Event-ID` (browsers do so by themselves) and gets what it
//! missed, in order, before live events, exactly as a WebSocket resubscription does. The first
//! event (`herald:subscription_succeeded`) reports each channel's history status, and its `id:`
//! is the position the stream starts from (the newest offset, or the one resumed from), so a
//! client that drops before any channel event still resumes without a gap.
//!
//! Channels are named by `channels=a,b`, or by one `channel=` each for names holding a comma
//! ([`StreamQuery`]). Public channels need no credentials; private ones need `token` (see
//! `herald_core::pusher::sse_token`); presence channels need a WebSocket. Responses are
//! unbuffered (`X-Accel-Buffering: no`), keep-alive comments flow while idle, and any origin
//! may read the stream (no cookies are involved).
//!
//! A stream is a long-lived connection like a WebSocket, counted against the same limits per
//! client address (`herald_channels::limits`): beyond them, 429 with `Retry-After`. Its replay is
//! charged to the address's replay budget.
//!
//! The response is marked [`Endless`]: Herald's listener writes it on the raw socket instead of
//! keeping hyper's connection (and its 16 KiB of buffers) alive under every idle stream.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use axum::{
    Extension,
    extract::{ConnectInfo, Path, RawQuery, State},
    http::{HeaderMap, HeaderValue, StatusCode, header::RETRY_AFTER},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use herald_channels::{
    Outgoing,
    history::Resume,
    hub::{AppHub, Frames, Outbox},
    limits::{ClientLimiter, ClientPermit},
};
use herald_core::{
    history::Recovery,
    pusher::{self, ChannelKind},
};
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::{ApiState, pusher_api::PusherError};

const MAX_CHANNELS: usize = 10;

/// A channel's events as Server-Sent Events (`text/event-stream`), resumable with
/// `Last-Event-ID` on history channels.
#[utoipa::path(get, path = "/apps/{app_id}/sse",
    operation_id = "sse", tag = "Channels", security(()),
    params(("app_id" = String, Path, description = "The app's Pusher app id"),
        ("channels" = Option<String>, Query, description = "Up to 10 channels, comma-separated"),
        ("channel" = Option<Vec<String>>, Query, description = "Instead of channels: one channel per parameter, repeated (for names holding a comma)"),
        ("token" = Option<String>, Query, description = "For private channels: a token signed with the app's Pusher secret"),
        ("retry" = Option<u64>, Query, description = "The reconnection delay to suggest, in milliseconds"),
        ("lastEventId" = Option<String>, Query, description = "Where to resume, as Last-Event-ID")),
    responses((status = 200, description = "The stream", content_type = "text/event-stream"),
        (status = 400, description = "A channel is malformed or needs a WebSocket", content_type = "text/plain", body = String),
        (status = 401, description = "A private channel's token is missing or wrong", content_type = "text/plain", body = String),
        (status = 404, description = "No such app", content_type = "text/plain", body = String),
        (status = 429, description = "Over the address's stream limits, or it failed authentication too often: see Retry-After", content_type = "text/plain", body = String),
        (status = 503, description = "The app is over its connection quota, or the store did not answer: retry", content_type = "text/plain", body = String)))]
pub async fn stream(
    State(state): State<Arc<ApiState>>,
    Path(app_id): Path<String>,
    RawQuery(raw_query): RawQuery,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
) -> Result<Response, PusherError> {
    let fail = |status: StatusCode, message: String| PusherError::new(status, message);
    // The address's limits come first: a refused client costs no lookup.
    let peer = peer.map(|Extension(ConnectInfo(p))| p);
    let permit = match state
        .sse
        .clients
        .admit_request(peer, &headers, "SSE stream")
    {
        Ok(permit) => permit,
        Err(refusal) => {
            let mut response =
                fail(StatusCode::TOO_MANY_REQUESTS, refusal.message()).into_response();
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(refusal.retry_after_secs()));
            return Ok(response);
        }
    };

    let query = StreamQuery::parse(raw_query.as_deref().unwrap_or_default())
        .map_err(|e| fail(StatusCode::BAD_REQUEST, e))?;
    let mut channels: Vec<String> = Vec::new();
    for channel in query.channels() {
        pusher::validate_channel_name(channel).map_err(|e| fail(StatusCode::BAD_REQUEST, e))?;
        let needs_websocket = match ChannelKind::of(channel) {
            ChannelKind::Presence => Some("presence channels need a WebSocket connection"),
            ChannelKind::User => Some("a user's channel needs a signed-in WebSocket connection"),
            _ => None,
        };
        if let Some(why) = needs_websocket {
            return Err(fail(StatusCode::BAD_REQUEST, format!("{channel}: {why}")));
        }
        if !channels.iter().any(|c| c == channel) {
            channels.push(channel.to_owned());
        }
        if channels.len() > MAX_CHANNELS {
            // Refused as soon as it is too many: thousands of names in one query must not
            // cost a comparison of each with every other.
            break;
        }
    }
    if channels.is_empty() || channels.len() > MAX_CHANNELS {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            format!(
                "channels must name 1 to {MAX_CHANNELS} channels, comma-separated (or one per channel= parameter)"
            ),
        ));
    }
    // An unknown app or a wrong token counts against the address, as on the Pusher HTTP API.
    let private = channels
        .iter()
        .any(|c| ChannelKind::of(c) != ChannelKind::Public);
    let client = state.sse.clients.client_address(peer, &headers);
    let (app, attempt) =
        crate::pusher_api::find_app_counted(&state, client, &app_id, private).await?;
    if private {
        let token = query.token.as_deref().ok_or_else(|| {
            fail(
                StatusCode::UNAUTHORIZED,
                "private channels need a token (see the README: SSE)".into(),
            )
        })?;
        let now = chrono::Utc::now();
        pusher::with_any_secret(&app.pusher, now, |secret| {
            pusher::verify_sse_token(secret, &query.signed_list(), token, now.timestamp())
        })
        .map_err(|e| {
            // Only a token the secret did not sign is a guess: an expired one is a page left
            // open past its token (EventSource reconnects with the URL it was given), which
            // must not get the address refused.
            if matches!(
                e,
                pusher::SseTokenError::BadSignature | pusher::SseTokenError::Malformed
            ) {
                state.auth_failures.failed(client, attempt);
            }
            fail(StatusCode::UNAUTHORIZED, e.to_string())
        })?;
    }
    let retry = match &query.retry {
        Some(ms) => Some(
            ms.parse::<u64>()
                .ok()
                .filter(|ms| (100..=60_000).contains(ms))
                .map(Duration::from_millis)
                .ok_or_else(|| {
                    fail(
                        StatusCode::BAD_REQUEST,
                        "retry must be 100 to 60000 ms".into(),
                    )
                })?,
        ),
        None => None,
    };
    // The header (an EventSource reconnecting) before the query (a first connection resuming
    // from a position the page kept); an empty header is none.
    let header = match headers.get("last-event-id").map(HeaderValue::to_str) {
        None | Some(Ok("")) => None,
        Some(Ok(id)) => Some(id),
        Some(Err(_)) => {
            return Err(fail(
                StatusCode::BAD_REQUEST,
                "Last-Event-ID holds bytes that are not visible ASCII, so it is not a stream position: channel:epoch:offset, joined by |, as the stream's ids are".into(),
            ));
        }
    };
    let last_event_id = header
        .or(query.last_event_id.as_deref())
        .unwrap_or_default();
    let resumes = parse_positions(last_event_id).ok_or_else(|| {
        fail(
            StatusCode::BAD_REQUEST,
            format!(
                "Last-Event-ID {last_event_id:?} is not a stream position: channel:epoch:offset, joined by |, as the stream's ids are"
            ),
        )
    })?;

    let hub = state.hub.app(&app.id);
    let config = &state.sse;
    if !hub.connect(
        config.max_connections_per_app,
        herald_channels::Transport::Sse,
    ) {
        return Err(fail(
            StatusCode::SERVICE_UNAVAILABLE,
            "the app is over its connection quota".into(),
        ));
    }
    let (outbox, frames, overflowed) = Outbox::new(config.outbox_frames);
    let mut subscription = Subscription {
        hub: Arc::clone(&hub),
        id: format!("sse.{}", rand::rng().random::<u64>()),
        channels: Vec::new(),
    };
    let mut positions: BTreeMap<String, (String, u64)> = BTreeMap::new();
    let mut statuses = serde_json::Map::new();
    let history = state.publisher.history();
    // Every channel's replay is queued before the stream is read: together they take at most
    // three quarters of the outbox (the rest is for what is published meanwhile). A channel
    // whose replay would not fit even alone is answered `too_many_missed`, as if over
    // `max_replay`; one that would fit alone, but not beside the replays queued before it, is
    // asked for again, as the replay budget's refusal is: the next stream has the room.
    let whole_room = (config.outbox_frames - config.outbox_frames / 4) as u64;
    let mut replay_room = whole_room;
    let mut ask_again = false;
    // The largest backlog first: each stream then clears the largest, so a channel asked for
    // again is not pushed out for ever by channels named before it that miss a little more
    // during each reconnect.
    let mut backlogs = Vec::with_capacity(channels.len());
    for channel in &channels {
        let backlog = match (
            history.retention(&app, channel),
            resumes.get(channel.as_str()),
        ) {
            (Some(_), Some(resume)) => history.backlog(&app, channel, resume).await?,
            _ => 0,
        };
        backlogs.push(backlog);
    }
    let mut order: Vec<usize> = (0..channels.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(backlogs[i]));
    for channel in order.into_iter().map(|i| &channels[i]) {
        let Some(retention) = history.retention(&app, channel) else {
            subscription.add(channel, &outbox, false);
            continue;
        };
        // Subscribe with broadcasts held, read what was missed, merge (see
        // `herald_channels::history`).
        subscription.add(channel, &outbox, true);
        let resume = resumes.get(channel.as_str());
        let mut joined = history
            .recover_at_most(&app, channel, retention, resume, &permit, replay_room)
            .await?;
        if joined
            .missed_beyond_room
            .is_some_and(|missed| missed <= whole_room)
        {
            joined.recovery = None;
            joined.rate_limited = true;
        }
        replay_room = replay_room.saturating_sub(joined.replay.len() as u64);
        let start = match (&joined.recovery, resume) {
            (Some(Recovery::Complete { .. }), Some(resume)) => resume.offset,
            // The replay budget refused it for now: a reconnect asks for it again.
            (_, Some(resume)) if joined.rate_limited => resume.offset,
            _ => joined.offset,
        };
        positions.insert(channel.clone(), (joined.epoch.clone(), start));
        statuses.insert(channel.clone(), joined.status());
        if joined.rate_limited && resume.is_some() {
            // Not followed by this stream: a live event would move its id past what it still
            // has to get. The stream ends once what it queued is sent, and the browser asks
            // again (after its retry delay) from the position kept.
            subscription.remove(channel);
            ask_again = true;
            continue;
        }
        hub.go_live_in_order(
            channel,
            &subscription.id,
            joined.offset,
            |_| {},
            joined.replay,
            |after, before| history.between(&app.id, channel, after, before),
        )
        .await?;
    }

    let mut first = Event::default().data(
        serde_json::json!({
            "event": "herald:subscription_succeeded",
            "data": serde_json::Value::Object(statuses),
        })
        .to_string(),
    );
    if let Some(retry) = retry {
        first = first.retry(retry);
    }
    // Where the stream starts (before any replay): an EventSource that drops before the first
    // channel event reconnects with this as its Last-Event-ID and misses nothing.
    if !positions.is_empty() {
        first = first.id(position_id(&positions));
    }
    let endless = Endless {
        too_slow: overflowed.clone(),
    };
    let state = StreamState {
        first: Some(first),
        frames,
        overflowed,
        shutdown: state.shutdown.clone(),
        positions,
        ends_when_drained: ask_again,
        _subscription: subscription,
        _permit: permit,
    };
    let events = futures_util::stream::unfold(state, |mut st| async move {
        if let Some(first) = st.first.take() {
            return Some((Ok::<Event, Infallible>(first), st));
        }
        if st.ends_when_drained {
            // Ends at an overflow (or a shutdown) as a following stream does: the frames after
            // a dropped one would move the client's id past it.
            if st.overflowed.is_cancelled() || st.shutdown.is_cancelled() {
                return None;
            }
            let frame = st.frames.try_recv().ok()?;
            let event = st.event(&frame);
            return Some((Ok(event), st));
        }
        let frame = tokio::select! {
            frame = st.frames.recv() => frame?,
            // Too slow: end the stream; the client resumes from its last id.
            () = st.overflowed.cancelled() => return None,
            () = st.shutdown.cancelled() => return None,
            // The app was deleted.
            () = st._subscription.hub.removed() => return None,
        };
        let event = st.event(&frame);
        Some((Ok(event), st))
    });
    let mut response = Sse::new(events)
        .keep_alive(
            KeepAlive::new()
                .interval(config.keepalive)
                .text("keep-alive"),
        )
        .into_response();
    let headers = response.headers_mut();
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    headers.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    response.extensions_mut().insert(endless);
    Ok(response)
}

/// Marks a response whose body does not end by itself (an SSE stream): a listener that can
/// serve it on the raw connection, off its HTTP machinery and that machinery's buffers, should
/// (see `herald::listener`). The response is the same either way; without such a listener
/// (tests calling the router directly) the HTTP server serves it as any other.
#[derive(Debug, Clone)]
pub struct Endless {
    /// Cancelled when the stream's outbox overflows: its client is too slow. A writer blocked
    /// on a client that stopped reading never polls the body again, so the body cannot end
    /// the stream itself; the writer gives up on this (its subscription and slots go with it).
    pub too_slow: CancellationToken,
}

/// Settings for SSE streams.
#[derive(Debug, Clone)]
pub struct SseConfig {
    pub keepalive: Duration,
    pub outbox_frames: usize,
    pub max_connections_per_app: u32,
    /// Connections and replayed history per client address: the same `ClientLimiter` the
    /// WebSocket face holds, so sockets and streams count against the same limits.
    pub clients: Arc<ClientLimiter>,
}

impl Default for SseConfig {
    fn default() -> Self {
        Self {
            keepalive: Duration::from_secs(15),
            outbox_frames: 1024,
            max_connections_per_app: 10_000,
            clients: Arc::default(),
        }
    }
}

/// `a:epoch:5|b:epoch:9` (channel names cannot contain `:` or `|`): an event id.
fn position_id(positions: &BTreeMap<String, (String, u64)>) -> String {
    positions
        .iter()
        .map(|(channel, (epoch, offset))| format!("{channel}:{epoch}:{offset}"))
        .collect::<Vec<_>>()
        .join("|")
}

/// The stream's query parameters. Channels come either as `channels=a,b` (comma-separated, as
/// most clients will write them) or as one `channel=` per channel, so that a channel whose name
/// holds a comma (Pusher's rules allow one) can be streamed too. A parameter given twice is
/// refused rather than one value silently winning; parameters Herald does not read (a cache
/// buster, say) are left alone, as browsers and EventSource polyfills add them.
#[derive(Debug, Default, PartialEq)]
struct StreamQuery {
    /// `channels=`, as sent (decoded).
    listed: Option<String>,
    /// Each `channel=`, in order.
    each: Vec<String>,
    token: Option<String>,
    retry: Option<String>,
    last_event_id: Option<String>,
}

impl StreamQuery {
    fn parse(raw: &str) -> Result<Self, String> {
        let mut query = Self::default();
        for (key, value) in url::form_urlencoded::parse(raw.as_bytes()) {
            let slot = match key.as_ref() {
                "channel" => {
                    query.each.push(value.into_owned());
                    continue;
                }
                "channels" => &mut query.listed,
                "token" => &mut query.token,
                "retry" => &mut query.retry,
                "lastEventId" => &mut query.last_event_id,
                _ => continue,
            };
            if slot.replace(value.into_owned()).is_some() {
                return Err(format!("{key} is given more than once"));
            }
        }
        if query.listed.is_some() && !query.each.is_empty() {
            return Err("name the channels with channels= or with channel=, not both".into());
        }
        Ok(query)
    }

    /// The channels asked for, in order (duplicates included; empty names skipped).
    fn channels(&self) -> impl Iterator<Item = &str> {
        let listed = self.listed.as_deref().unwrap_or_default().split(',');
        let each = self.each.iter().map(String::as_str);
        listed.chain(each).filter(|c| !c.is_empty())
    }

    /// What a private stream's token signs: the `channels` value as sent, or the `channel`
    /// values each followed by a newline. No channel name holds a newline (the names are
    /// checked before the token), so a token minted for the one channel `a,b` cannot pass for
    /// one for the two channels `a` and `b`.
    fn signed_list(&self) -> String {
        match &self.listed {
            Some(listed) => listed.clone(),
            None => self.each.iter().map(|name| format!("{name}\n")).collect(),
        }
    }
}

/// The positions of a [`position_id`] (none for an empty id); `None` if any part is not one,
/// since a resume silently dropped would be a fresh start the client does not know of.
fn parse_positions(id: &str) -> Option<HashMap<&str, Resume>> {
    if id.is_empty() {
        return Some(HashMap::new());
    }
    id.split('|')
        .map(|part| {
            let mut fields = part.splitn(3, ':');
            let (channel, epoch, offset) = (fields.next()?, fields.next()?, fields.next()?);
            if channel.is_empty() || epoch.is_empty() {
                return None;
            }
            Some((
                channel,
                Resume {
                    epoch: epoch.to_owned(),
                    offset: offset.parse().ok()?,
                },
            ))
        })
        .collect()
}

/// Leaves the channels and frees the connection slot when the stream is dropped.
struct Subscription {
    hub: Arc<AppHub>,
    id: String,
    channels: Vec<String>,
}

impl Subscription {
    /// Subscribes; `joining` holds broadcasts until `go_live` (history channels).
    fn add(&mut self, channel: &str, outbox: &Outbox, joining: bool) {
        // No presence data, so this cannot fail.
        let added = if joining {
            self.hub
                .subscribe_joining(channel, &self.id, outbox, None, usize::MAX)
        } else {
            self.hub
                .subscribe(channel, &self.id, outbox, None, usize::MAX)
        };
        if added.is_ok() {
            self.channels.push(channel.to_owned());
        }
    }

    /// Unsubscribes from one channel (what was held for it goes too).
    fn remove(&mut self, channel: &str) {
        self.channels.retain(|c| c != channel);
        self.hub.unsubscribe(channel, &self.id);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        for channel in &self.channels {
            self.hub.unsubscribe(channel, &self.id);
        }
        self.hub.disconnect(herald_channels::Transport::Sse);
    }
}

struct StreamState {
    first: Option<Event>,
    frames: Frames,
    overflowed: CancellationToken,
    shutdown: CancellationToken,
    positions: BTreeMap<String, (String, u64)>,
    /// A channel's replay was refused for now: the stream ends once what was queued before it
    /// started is sent, so the browser reconnects and asks again.
    ends_when_drained: bool,
    _subscription: Subscription,
    /// The stream's place in its address's counts, released when the stream ends.
    _permit: ClientPermit,
}

impl StreamState {
    /// The item as an SSE event: its Pusher frame as `data` (encoded once per publication,
    /// shared with every WebSocket and stream that gets it) and, once any history channel has
    /// a position, the stream's positions as its `id`. Nothing is parsed.
    fn event(&mut self, item: &Outgoing) -> Event {
        if let Outgoing::Publication(publication) = item
            && let Some(position) = &publication.position
        {
            match self.positions.get_mut(&publication.channel) {
                Some(kept) => *kept = (position.epoch.clone(), position.offset),
                None => {
                    self.positions.insert(
                        publication.channel.clone(),
                        (position.epoch.clone(), position.offset),
                    );
                }
            }
        }
        let event = Event::default().data(item.pusher_frame().as_str());
        if self.positions.is_empty() {
            return event;
        }
        event.id(position_id(&self.positions))
    }
}

/// This module's part of `/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(stream))]
pub(crate) struct Docs;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_come_comma_separated_or_one_per_parameter() {
        let listed = StreamQuery::parse("channels=a%2Cb,c&retry=500").expect("valid");
        assert_eq!(listed.channels().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(listed.signed_list(), "a,b,c");
        assert_eq!(listed.retry.as_deref(), Some("500"));

        let each = StreamQuery::parse("channel=orders%2C2024&channel=c&_=17").expect("valid");
        assert_eq!(each.channels().collect::<Vec<_>>(), ["orders,2024", "c"]);
        assert_eq!(each.signed_list(), "orders,2024\nc\n");
        let one_channel = StreamQuery::parse("channel=a%2Cb").expect("valid");
        let two_channels = StreamQuery::parse("channels=a,b").expect("valid");
        assert_ne!(
            one_channel.signed_list(),
            two_channels.signed_list(),
            "the one channel a,b signs differently from the channels a and b"
        );
    }

    #[test]
    fn a_parameter_given_twice_or_both_channel_forms_are_refused() {
        for (query, says) in [
            ("channels=a&channels=b", "channels is given more than once"),
            (
                "channels=a&token=1&token=2",
                "token is given more than once",
            ),
            (
                "lastEventId=a&lastEventId=b",
                "lastEventId is given more than once",
            ),
            ("channels=a&channel=b", "not both"),
        ] {
            let refused = StreamQuery::parse(query).expect_err(query);
            assert!(refused.contains(says), "{query}: {refused}");
        }
    }
}
