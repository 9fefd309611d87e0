//! The Pusher Channels HTTP API (`/apps/{app_id}/...`), so the Pusher server SDKs work
//! unchanged: trigger events, query channels and presence users, terminate a user's
//! connections. Requests are signed the Pusher way (see `herald_core::pusher::verify_request`);
//! errors are plain text with the status the Pusher API uses.

use std::sync::Arc;

use std::collections::BTreeMap;

use axum::{
    Json,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderValue, Method, StatusCode, Uri, header::RETRY_AFTER},
    response::{IntoResponse, Response},
};
use herald_core::{
    model::App,
    pusher::{self, ChannelKind},
};
use serde::Deserialize;
use serde_json::{Value, json};

use herald_channels::{Publish, hub::ChannelInfo};

use crate::{
    ApiState,
    auth::ClientAddress,
    routes::{Access, RouteTable},
};

/// Pusher's limits: event data up to 10 KB, 100 channels per event, 10 events per batch.
const MAX_DATA_BYTES: usize = 10 * 1024;
const MAX_CHANNELS: usize = crate::rate::LARGEST_PUBLISH as usize;
const MAX_BATCH: usize = 10;
const MAX_EVENT_NAME: usize = 200;

/// Every route is signed the Pusher way with the credentials of the app in the path.
pub(crate) fn routes() -> RouteTable {
    use Access::PusherSignature as Signed;
    RouteTable::new()
        .post("/apps/{app_id}/events", Signed, trigger)
        .post("/apps/{app_id}/batch_events", Signed, trigger_batch)
        .get("/apps/{app_id}/channels", Signed, channels)
        .get("/apps/{app_id}/channels/{channel}", Signed, channel)
        .get("/apps/{app_id}/channels/{channel}/users", Signed, users)
        .get("/apps/{app_id}/channels/{channel}/history", Signed, history)
        .delete(
            "/apps/{app_id}/channels/{channel}/history",
            Signed,
            reset_history,
        )
        .post(
            "/apps/{app_id}/users/{user_id}/terminate_connections",
            Signed,
            terminate,
        )
}

/// A plain-text error, as the Pusher HTTP API answers, with `Retry-After` on a 429.
pub struct PusherError {
    status: StatusCode,
    message: String,
    /// Seconds until a refused request may be sent again.
    retry_after: Option<u64>,
}

impl PusherError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
        }
    }
}

impl IntoResponse for PusherError {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.message).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// Spends `events` of the app's publish budget, or refuses the request with 429 before
/// anything is published (a batch is accepted whole or not at all).
fn charge(state: &ApiState, app: &App, events: usize) -> Result<(), PusherError> {
    state
        .publish_limits
        .check_app(app.id.as_str(), events)
        .map_err(|limited| crate::ApiError::from(limited).into())
}

impl From<crate::ApiError> for PusherError {
    fn from(e: crate::ApiError) -> Self {
        match e {
            crate::ApiError::Standard { status, detail, .. } => Self::new(status, detail),
            crate::ApiError::RateLimited {
                detail,
                retry_after_secs,
            } => Self {
                retry_after: Some(retry_after_secs),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, detail)
            },
            crate::ApiError::Validation(items) => Self::new(
                StatusCode::BAD_REQUEST,
                items
                    .into_iter()
                    .map(|i| i.msg)
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
        }
    }
}

impl From<herald_channels::PublishError> for PusherError {
    fn from(e: herald_channels::PublishError) -> Self {
        crate::ApiError::from(e).into()
    }
}

impl From<herald_channels::presence::PresenceError> for PusherError {
    fn from(e: herald_channels::presence::PresenceError) -> Self {
        tracing::error!(error = %e, "reading presence failed");
        PusherError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

impl From<herald_store::StoreError> for PusherError {
    fn from(e: herald_store::StoreError) -> Self {
        crate::ApiError::from(e).into()
    }
}

/// The request's query parameters, decoded.
fn query_pairs(uri: &Uri) -> impl Iterator<Item = (String, String)> + '_ {
    uri.query()
        .into_iter()
        .flat_map(|q| url::form_urlencoded::parse(q.as_bytes()).into_owned())
}

/// The request's query parameters by name. `info` given more than once is one list
/// (`info=a&info=b` is `info=a,b`, as a query encoder may write an array); any other name given
/// twice is refused rather than one of its values silently winning.
fn query_map(uri: &Uri) -> Result<BTreeMap<String, String>, PusherError> {
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in query_pairs(uri) {
        match map.get_mut(&name) {
            Some(listed) if name == "info" => {
                listed.push(',');
                listed.push_str(&value);
            }
            Some(_) => return Err(bad(format!("{name} is given more than once; give it once"))),
            None => {
                map.insert(name, value);
            }
        }
    }
    Ok(map)
}

fn keeps_no_history(channel: &str) -> PusherError {
    PusherError::new(
        StatusCode::NOT_FOUND,
        format!("{channel} keeps no history (no history rule of the app matches it)"),
    )
}

fn bad(message: impl Into<String>) -> PusherError {
    PusherError::new(StatusCode::BAD_REQUEST, message.into())
}

/// The app with this numeric (Pusher) id; 404 if there is none.
pub(crate) async fn find_app(state: &ApiState, app_id: &str) -> Result<App, PusherError> {
    let unknown = || PusherError::new(StatusCode::NOT_FOUND, format!("unknown app {app_id}"));
    let numeric: i64 = app_id.parse().map_err(|_| unknown())?;
    state
        .store
        .get_app_by_pusher_id(numeric)
        .await?
        .ok_or_else(unknown)
}

/// Finds the app by its numeric id for a request from `client`: an app this node holds in
/// memory costs nothing to find, any other is looked up, which a suspect address pays for
/// first, and an unknown app counts against the address. A request that will prove it knows
/// the app's secret (`checks_secret`) is refused (429) while the address has failed too often,
/// even for a cached app; one that proves nothing (a public SSE stream) is not, as long as no
/// lookup is needed. The [`crate::rate::Attempt`] is for counting the secret's check if it
/// fails.
pub(crate) async fn find_app_counted(
    state: &ApiState,
    client: Option<std::net::IpAddr>,
    app_id: &str,
    checks_secret: bool,
) -> Result<(App, crate::rate::Attempt), PusherError> {
    let cached = app_id
        .parse()
        .ok()
        .and_then(|numeric| state.store.cached_app_by_pusher_id(numeric));
    let attempt = match &cached {
        Some(_) if !checks_secret => Ok(crate::rate::Attempt::FREE),
        Some(_) => state.auth_failures.refusing(client),
        None => state.auth_failures.begin(client),
    }
    .map_err(crate::ApiError::from)?;
    let app = match cached {
        Some(app) => app,
        None => find_app(state, app_id).await.inspect_err(|refused| {
            if refused.status == StatusCode::NOT_FOUND {
                state.auth_failures.failed(client, attempt);
            }
        })?,
    };
    Ok((app, attempt))
}

/// Finds the app by its numeric id and checks the request's signature against its secret.
/// A client address that has failed too often is refused (429) before the app is looked up,
/// and one that failed lately pays first for a lookup no cache answers; an unknown app, key or
/// a wrong signature counts against its address ([`crate::rate::AuthFailureLimiter`]).
async fn authenticate(
    state: &ApiState,
    client: Option<std::net::IpAddr>,
    app_id: &str,
    method: &Method,
    uri: &Uri,
    body: &[u8],
) -> Result<App, PusherError> {
    let (app, attempt) = find_app_counted(state, client, app_id, true).await?;
    let params: Vec<(String, String)> = query_pairs(uri).collect();
    let now = chrono::Utc::now();
    let verify = |path: &str| {
        pusher::with_any_secret(&app.pusher, now, |secret| {
            pusher::verify_request(
                &app.pusher.key,
                secret,
                method.as_str(),
                path,
                &params,
                body,
                now.timestamp(),
            )
        })
    };
    // The SDKs sign the path as they were given it, and their HTTP clients may then encode
    // it (Python's requests and PHP's Guzzle send `auth0|123` as `auth0%7C123`): the path as
    // received, then decoded.
    verify(uri.path())
        .or_else(
            |refusal| match percent_encoding::percent_decode_str(uri.path()).decode_utf8() {
                Ok(decoded) if decoded != uri.path() => verify(&decoded).map_err(|_| refusal),
                _ => Err(refusal),
            },
        )
        .map_err(|e| {
            // Only what could be a guess counts: a wrong key or signature. A body whose hash
            // does not match was signed with the secret (its hash is checked after the
            // signature), and an expired or malformed request tried no secret: a backend
            // with a skewed clock is not taken for someone guessing (as on SSE).
            if matches!(
                e,
                pusher::RequestAuthError::BadSignature | pusher::RequestAuthError::UnknownKey
            ) {
                state.auth_failures.failed(client, attempt);
            }
            PusherError::new(
                StatusCode::UNAUTHORIZED,
                format!("authentication failed: {e}"),
            )
        })?;
    Ok(app)
}

/// An event to trigger, Pusher's shape: `channel` or `channels`, `data` a string. Any other
/// field is refused (400), as a misspelt `socket_id` would otherwise silently send the event
/// back to its sender.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct TriggerIn {
    name: String,
    data: String,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    socket_id: Option<String>,
    #[serde(default)]
    info: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct BatchIn {
    batch: Vec<TriggerIn>,
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, PusherError> {
    serde_json::from_slice(body).map_err(|e| bad(format!("invalid JSON body: {e}")))
}

/// The `info` attributes a trigger may ask for.
const INFO_ATTRIBUTES: [&str; 2] = ["subscription_count", "user_count"];

/// How an event names its channels: a trigger takes `channel` or `channels`, a batch event
/// one `channel` (Pusher's batch shape, whose answer has one set of attributes per event).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Channels {
    OneOrMany,
    One,
}

/// Validates one event and returns its channels. Everything a trigger can refuse is checked
/// here, before anything is charged or published: a refused trigger publishes nothing.
fn check_event(event: &TriggerIn, shape: Channels) -> Result<Vec<String>, PusherError> {
    // In characters, as the SDKs count them.
    if event.name.is_empty() || event.name.chars().count() > MAX_EVENT_NAME {
        return Err(bad(format!(
            "event name must be 1 to {MAX_EVENT_NAME} characters"
        )));
    }
    // The stores keep text without NUL (PostgreSQL's text refuses it): refused here, on
    // either store, rather than failing as a 500 when a history channel keeps the event.
    if event.name.contains('\0') || event.data.contains('\0') {
        return Err(bad("event name and data may not contain NUL (\\u0000)"));
    }
    if event.data.len() > MAX_DATA_BYTES {
        return Err(PusherError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "event data is {} bytes; the limit is {MAX_DATA_BYTES}",
                event.data.len()
            ),
        ));
    }
    let channels = match (&event.channels, &event.channel) {
        (Some(_), None) if shape == Channels::One => {
            return Err(bad("a batch event names one channel, as `channel`"));
        }
        (Some(list), None) => list.clone(),
        (None, Some(one)) => vec![one.clone()],
        _ => return Err(bad("give either channels or channel")),
    };
    if channels.is_empty() || channels.len() > MAX_CHANNELS {
        return Err(bad(format!("an event needs 1 to {MAX_CHANNELS} channels")));
    }
    for channel in &channels {
        pusher::validate_channel_name(channel).map_err(|e| bad(format!("{channel}: {e}")))?;
    }
    if let Some(socket_id) = &event.socket_id
        && !pusher::is_socket_id(socket_id)
    {
        return Err(bad(format!("invalid socket_id {socket_id:?}")));
    }
    check_info(event.info.as_deref(), &channels)?;
    Ok(channels)
}

/// Refuses an `info` list naming an unknown attribute, or `user_count` for a channel that is
/// not a presence channel.
fn check_info(info: Option<&str>, channels: &[String]) -> Result<(), PusherError> {
    for attribute in info_attributes(info) {
        if !INFO_ATTRIBUTES.contains(&attribute) {
            return Err(bad(format!(
                "unknown info attribute {attribute:?}; known: {}",
                INFO_ATTRIBUTES.join(", ")
            )));
        }
        if attribute == "user_count"
            && let Some(channel) = channels
                .iter()
                .find(|c| ChannelKind::of(c) != ChannelKind::Presence)
        {
            return Err(bad(format!(
                "user_count is only available for presence channels, and {channel} is not one"
            )));
        }
    }
    Ok(())
}

/// The attributes an `info` list names (comma-separated, blanks ignored).
fn info_attributes(info: Option<&str>) -> impl Iterator<Item = &str> {
    info.unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
}

/// The `info` attributes asked for, for each channel.
async fn channel_attributes(
    state: &ApiState,
    app: &App,
    channels: &[String],
    info: Option<&str>,
) -> Result<Option<Value>, PusherError> {
    if info_attributes(info).next().is_none() {
        return Ok(None);
    }
    let mut out = serde_json::Map::new();
    for channel in channels {
        let current = state
            .presence
            .channel_info(&app.id, channel)
            .await?
            .unwrap_or_default();
        out.insert(channel.clone(), Value::Object(attributes(&current, info)));
    }
    Ok(Some(Value::Object(out)))
}

/// The attributes `info` asks for, of a channel as `current` counts it (`check_info` has
/// refused unknown attributes and `user_count` off presence channels).
fn attributes(current: &ChannelInfo, info: Option<&str>) -> serde_json::Map<String, Value> {
    let wants = |attr: &str| info_attributes(info).any(|a| a == attr);
    let mut attrs = serde_json::Map::new();
    if wants("subscription_count") {
        attrs.insert(
            "subscription_count".into(),
            json!(current.subscription_count),
        );
    }
    if wants("user_count") {
        attrs.insert("user_count".into(), json!(current.user_count.unwrap_or(0)));
    }
    attrs
}

async fn publish(
    state: &ApiState,
    app: &App,
    event: &TriggerIn,
    channels: &[String],
) -> Result<Option<String>, PusherError> {
    let publish = Publish::pusher_event(
        &event.name,
        channels,
        &event.data,
        event.socket_id.as_deref(),
    );
    let published = state.publisher.publish(app, publish).await?;
    Ok(published.not_elsewhere)
}

/// Pusher's trigger promises delivery to every subscriber, not only this node's: a caller told
/// may send it again (this node's subscribers would then get it twice).
fn reached_this_node_only(why: &str) -> PusherError {
    PusherError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "the event reached this node's subscribers only: the cluster's other nodes could not be told ({why}); sending it again may deliver it twice here"
        ),
    )
}

/// Triggers an event on up to 100 channels (Pusher's `POST /events`).
#[utoipa::path(post, path = "/apps/{app_id}/events", tag = "Pusher", params(("app_id" = String, Path, description = "The app's Pusher app id")), request_body = TriggerIn,
    responses((status = 200, body = docs::TriggerOut), docs::Refusals))]
async fn trigger(
    State(state): State<Arc<ApiState>>,
    Path(app_id): Path<String>,
    method: Method,
    ClientAddress(client): ClientAddress,
    uri: Uri,
    body: Bytes,
) -> Result<Json<Value>, PusherError> {
    let app = authenticate(&state, client, &app_id, &method, &uri, &body).await?;
    let event: TriggerIn = parse(&body)?;
    let channels = check_event(&event, Channels::OneOrMany)?;
    charge(&state, &app, channels.len())?;
    if let Some(why) = publish(&state, &app, &event, &channels).await? {
        return Err(reached_this_node_only(&why));
    }
    // Published: a failure to read the attributes now must not say otherwise (the SDK would
    // retry, and the event go out twice).
    Ok(Json(
        match attributes_after_publishing(&state, &app, &channels, event.info.as_deref()).await {
            Some(channels) => json!({ "channels": channels }),
            None => json!({}),
        },
    ))
}

/// [`channel_attributes`] once the event is published: a failure is logged, and the
/// attributes left out.
async fn attributes_after_publishing(
    state: &ApiState,
    app: &App,
    channels: &[String],
    info: Option<&str>,
) -> Option<Value> {
    match channel_attributes(state, app, channels, info).await {
        Ok(attributes) => attributes,
        Err(e) => {
            tracing::warn!(app_id = %app.id, error = %e.message, "reading the channels' attributes after publishing failed; the answer leaves them out");
            None
        }
    }
}

/// Triggers up to 10 events, accepted whole or not at all.
#[utoipa::path(post, path = "/apps/{app_id}/batch_events", tag = "Pusher", params(("app_id" = String, Path, description = "The app's Pusher app id")), request_body = BatchIn,
    responses((status = 200, body = docs::BatchOut), docs::Refusals))]
async fn trigger_batch(
    State(state): State<Arc<ApiState>>,
    Path(app_id): Path<String>,
    method: Method,
    ClientAddress(client): ClientAddress,
    uri: Uri,
    body: Bytes,
) -> Result<Json<Value>, PusherError> {
    let app = authenticate(&state, client, &app_id, &method, &uri, &body).await?;
    let batch: BatchIn = parse(&body)?;
    if batch.batch.is_empty() || batch.batch.len() > MAX_BATCH {
        return Err(bad(format!("a batch holds 1 to {MAX_BATCH} events")));
    }
    // Validate everything first: a batch is accepted whole or not at all.
    let checked: Vec<Vec<String>> = batch
        .batch
        .iter()
        .map(|event| check_event(event, Channels::One))
        .collect::<Result<_, _>>()?;
    charge(&state, &app, checked.iter().map(Vec::len).sum())?;
    let mut results = Vec::with_capacity(checked.len());
    for (published, (event, channels)) in batch.batch.iter().zip(&checked).enumerate() {
        // The events before this one went out: say so, since a retry sends them again.
        let sent_before = |e: PusherError, sent: usize| {
            if sent == 0 {
                e
            } else {
                PusherError::new(
                    e.status,
                    format!(
                        "the batch's first {sent} of {} events were published; the rest were not: {}",
                        checked.len(),
                        e.message
                    ),
                )
            }
        };
        match publish(&state, &app, event, channels).await {
            Ok(None) => {}
            // This one went out here too.
            Ok(Some(why)) => return Err(sent_before(reached_this_node_only(&why), published)),
            Err(e) => return Err(sent_before(e, published)),
        }
        // A batch event has one channel; its attributes are reported flat.
        let attributes = attributes_after_publishing(&state, &app, channels, event.info.as_deref())
            .await
            .and_then(|by_channel| by_channel.get(&channels[0]).cloned())
            .unwrap_or_else(|| json!({}));
        results.push(attributes);
    }
    Ok(Json(json!({ "batch": results })))
}

/// Occupied channels, optionally by prefix and with user counts.
#[utoipa::path(get, path = "/apps/{app_id}/channels", tag = "Pusher", params(("app_id" = String, Path, description = "The app's Pusher app id"),
        ("filter_by_prefix" = Option<String>, Query, description = "Only channels starting with this"),
        ("info" = Option<String>, Query, description = "`user_count` (with filter_by_prefix=presence-)")),
    responses((status = 200, body = docs::ChannelsOut), docs::Refusals))]
async fn channels(
    State(state): State<Arc<ApiState>>,
    Path(app_id): Path<String>,
    method: Method,
    ClientAddress(client): ClientAddress,
    uri: Uri,
) -> Result<Json<Value>, PusherError> {
    let app = authenticate(&state, client, &app_id, &method, &uri, &[]).await?;
    let query = query_map(&uri)?;
    let prefix = query.get("filter_by_prefix").map_or("", String::as_str);
    let mut user_count = false;
    for attribute in info_attributes(query.get("info").map(String::as_str)) {
        if attribute != "user_count" {
            return Err(bad(format!(
                "unknown info attribute {attribute:?} for the channel list; known: user_count"
            )));
        }
        user_count = true;
    }
    if user_count && !prefix.starts_with("presence-") {
        return Err(bad("info=user_count needs filter_by_prefix=presence-"));
    }
    let list: serde_json::Map<String, Value> = state
        .presence
        .channels(&app.id, prefix)
        .await?
        .into_iter()
        .map(|(name, info)| {
            let attrs = if user_count {
                json!({ "user_count": info.user_count.unwrap_or(0) })
            } else {
                json!({})
            };
            (name, attrs)
        })
        .collect();
    Ok(Json(json!({ "channels": list })))
}

/// One channel's state.
#[utoipa::path(get, path = "/apps/{app_id}/channels/{channel}", tag = "Pusher", params(("app_id" = String, Path, description = "The app's Pusher app id"), ("channel" = String, Path, description = "The channel's name"),
        ("info" = Option<String>, Query, description = "`subscription_count`, `user_count` (presence)")),
    responses((status = 200, body = docs::ChannelOut), docs::Refusals))]
async fn channel(
    State(state): State<Arc<ApiState>>,
    Path((app_id, channel)): Path<(String, String)>,
    method: Method,
    ClientAddress(client): ClientAddress,
    uri: Uri,
) -> Result<Json<Value>, PusherError> {
    let app = authenticate(&state, client, &app_id, &method, &uri, &[]).await?;
    pusher::validate_channel_name(&channel).map_err(bad)?;
    let info = query_map(&uri)?;
    let info = info.get("info").map(String::as_str);
    check_info(info, std::slice::from_ref(&channel))?;
    let current = state
        .presence
        .channel_info(&app.id, &channel)
        .await?
        .unwrap_or_default();
    // One reading for `occupied` and the counts, so they agree.
    let mut out = serde_json::Map::new();
    out.insert("occupied".into(), json!(current.subscription_count > 0));
    out.extend(attributes(&current, info));
    Ok(Json(Value::Object(out)))
}

const MAX_HISTORY_PAGE: u32 = 1000;

/// Herald's extension: a page of a history channel's events, `after` and `before` exclusive
/// offsets, `direction=backward` (newest first, the default) or `forward`, `limit` (100, at
/// most 1000). The answer carries the channel's `epoch` and newest `offset`, so a page can be
/// rendered and then followed live by subscribing with that position.
#[utoipa::path(get, path = "/apps/{app_id}/channels/{channel}/history", tag = "Pusher", params(("app_id" = String, Path, description = "The app's Pusher app id"), ("channel" = String, Path, description = "The channel's name"),
        ("after" = Option<u64>, Query, description = "Only events after this offset"),
        ("before" = Option<u64>, Query, description = "Only events before this offset"),
        ("limit" = Option<u32>, Query, description = "1 to 1000 (100)"),
        ("direction" = Option<String>, Query, description = "`backward` (newest first, the default) or `forward`")),
    responses((status = 200, body = docs::HistoryOut), docs::Refusals))]
async fn history(
    State(state): State<Arc<ApiState>>,
    Path((app_id, channel)): Path<(String, String)>,
    method: Method,
    ClientAddress(client): ClientAddress,
    uri: Uri,
) -> Result<Json<Value>, PusherError> {
    let app = authenticate(&state, client, &app_id, &method, &uri, &[]).await?;
    pusher::validate_channel_name(&channel).map_err(bad)?;
    let query = query_map(&uri)?;
    let offset = |name: &str| -> Result<Option<u64>, PusherError> {
        query
            .get(name)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| bad(format!("{name} must be an offset (a whole number)")))
            })
            .transpose()
    };
    let (after, before) = (offset("after")?, offset("before")?);
    let limit = match query.get("limit") {
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=MAX_HISTORY_PAGE).contains(l))
            .ok_or_else(|| bad(format!("limit must be 1 to {MAX_HISTORY_PAGE}")))?,
        None => 100,
    };
    let newest_first = match query.get("direction").map(String::as_str) {
        None | Some("backward") => true,
        Some("forward") => false,
        Some(other) => {
            return Err(bad(format!(
                "direction must be forward or backward, not {other:?}"
            )));
        }
    };
    let page = state
        .publisher
        .history()
        .page(&app, &channel, after, before, limit, newest_first)
        .await?
        .ok_or_else(|| keeps_no_history(&channel))?;
    let events: Vec<Value> = page
        .entries
        .iter()
        .map(|e| {
            json!({"offset": e.offset, "event": e.event, "data": e.data,
                   "time_ms": e.created_at.timestamp_millis()})
        })
        .collect();
    let (epoch, newest) = match &page.position {
        Some(p) => (Some(p.epoch.clone()), p.next_offset - 1),
        None => (None, 0),
    };
    Ok(Json(
        json!({"channel": channel, "epoch": epoch, "offset": newest, "events": events}),
    ))
}

/// Herald's extension: drops a history channel's events and starts a new epoch; clients
/// resuming with the old one are told `epoch_changed`.
#[utoipa::path(delete, path = "/apps/{app_id}/channels/{channel}/history", tag = "Pusher", params(("app_id" = String, Path, description = "The app's Pusher app id"), ("channel" = String, Path, description = "The channel's name")),
    responses((status = 200, body = docs::PositionOut), docs::Refusals))]
async fn reset_history(
    State(state): State<Arc<ApiState>>,
    Path((app_id, channel)): Path<(String, String)>,
    method: Method,
    ClientAddress(client): ClientAddress,
    uri: Uri,
) -> Result<Json<Value>, PusherError> {
    let app = authenticate(&state, client, &app_id, &method, &uri, &[]).await?;
    pusher::validate_channel_name(&channel).map_err(bad)?;
    let position = state
        .publisher
        .history()
        .reset(&app, &channel)
        .await?
        .ok_or_else(|| keeps_no_history(&channel))?;
    Ok(Json(
        json!({"channel": channel, "epoch": position.epoch, "offset": position.next_offset - 1}),
    ))
}

/// A presence channel's users.
#[utoipa::path(get, path = "/apps/{app_id}/channels/{channel}/users", tag = "Pusher", params(("app_id" = String, Path, description = "The app's Pusher app id"), ("channel" = String, Path, description = "The channel's name")),
    responses((status = 200, body = docs::UsersOut), docs::Refusals))]
async fn users(
    State(state): State<Arc<ApiState>>,
    Path((app_id, channel)): Path<(String, String)>,
    method: Method,
    ClientAddress(client): ClientAddress,
    uri: Uri,
) -> Result<Json<Value>, PusherError> {
    let app = authenticate(&state, client, &app_id, &method, &uri, &[]).await?;
    pusher::validate_channel_name(&channel).map_err(bad)?;
    if ChannelKind::of(&channel) != ChannelKind::Presence {
        return Err(bad("users are only listed for presence channels"));
    }
    let users: Vec<Value> = state
        .presence
        .users(&app.id, &channel)
        .await?
        .into_iter()
        .map(|id| json!({ "id": id }))
        .collect();
    Ok(Json(json!({ "users": users })))
}

/// Closes every connection of a signed-in user (close code 4009).
#[utoipa::path(post, path = "/apps/{app_id}/users/{user_id}/terminate_connections", tag = "Pusher",
    params(("app_id" = String, Path, description = "The app's Pusher app id"), ("user_id" = String, Path, description = "The user's id")),
    responses((status = 200, body = docs::EmptyOut), docs::Refusals))]
async fn terminate(
    State(state): State<Arc<ApiState>>,
    Path((app_id, user_id)): Path<(String, String)>,
    method: Method,
    ClientAddress(client): ClientAddress,
    uri: Uri,
    body: Bytes,
) -> Result<Json<Value>, PusherError> {
    let app = authenticate(&state, client, &app_id, &method, &uri, &body).await?;
    let closed = state.presence.terminate_user(&app.id, &user_id).await?;
    tracing::info!(user_id, closed, "terminating a user's connections");
    Ok(Json(json!({})))
}

/// This module's part of `/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    trigger,
    trigger_batch,
    channels,
    channel,
    history,
    reset_history,
    users,
    terminate
))]
pub(crate) struct Docs;

/// The answers' shapes, for `/openapi.json` only: the handlers build them with `json!`, as
/// the Pusher API's loose shapes are easier to read that way.
#[allow(dead_code)]
mod docs {
    use std::collections::BTreeMap;

    use utoipa::ToSchema;

    /// The attributes `info` asked for.
    #[derive(ToSchema)]
    pub struct Attributes {
        subscription_count: Option<u64>,
        user_count: Option<u64>,
    }

    #[derive(ToSchema)]
    pub struct TriggerOut {
        /// With `info`: each channel's attributes.
        channels: Option<BTreeMap<String, Attributes>>,
    }

    #[derive(ToSchema)]
    pub struct BatchOut {
        batch: Vec<Attributes>,
    }

    #[derive(ToSchema)]
    pub struct ChannelsOut {
        channels: BTreeMap<String, Attributes>,
    }

    #[derive(ToSchema)]
    pub struct ChannelOut {
        occupied: bool,
        subscription_count: Option<u64>,
        user_count: Option<u64>,
    }

    #[derive(ToSchema)]
    pub struct User {
        id: String,
    }

    #[derive(ToSchema)]
    pub struct UsersOut {
        users: Vec<User>,
    }

    #[derive(ToSchema)]
    pub struct HistoryEvent {
        offset: u64,
        event: String,
        data: String,
        time_ms: i64,
    }

    #[derive(ToSchema)]
    pub struct HistoryOut {
        channel: String,
        epoch: Option<String>,
        /// The newest offset (0 for an empty channel).
        offset: u64,
        events: Vec<HistoryEvent>,
    }

    #[derive(ToSchema)]
    pub struct PositionOut {
        channel: String,
        epoch: String,
        offset: u64,
    }

    /// `{}`.
    #[derive(ToSchema)]
    pub struct EmptyOut {}

    /// How every route refuses: plain text saying what was wrong, with the Pusher API's status.
    #[derive(utoipa::IntoResponses)]
    pub enum Refusals {
        #[response(
            status = 400,
            description = "The request is malformed",
            content_type = "text/plain"
        )]
        Malformed(String),
        #[response(
            status = 401,
            description = "The signature is missing, wrong or stale, or the key is not this app's",
            content_type = "text/plain"
        )]
        Unsigned(String),
        #[response(status = 404, description = "No such app", content_type = "text/plain")]
        NoApp(String),
        #[response(
            status = 413,
            description = "The event data is over 10 KB",
            content_type = "text/plain"
        )]
        TooLarge(String),
        #[response(
            status = 429,
            description = "Over the app's publish rate, or the client address failed authentication too often: see Retry-After",
            content_type = "text/plain"
        )]
        Limited(String),
        #[response(
            status = 503,
            description = "The store, broker or presence could not be reached: retry",
            content_type = "text/plain"
        )]
        Unavailable(String),
    }
}
