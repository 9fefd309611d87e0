//! `POST /ingest/{source_id}`: webhooks in.
//!
//! The request is authenticated by its provider's signature, checked on the raw bytes before
//! anything parses them. A verified request is kept (headers and body) together with the
//! message it becomes, in one commit, and only then answered 200; a provider's retry of the
//! same delivery id is answered 200 too, but not published again. The message then takes the
//! same path as any other: webhook endpoints by filter, WebSocket subscribers by channel.

use std::sync::Arc;

use std::net::SocketAddr;

use axum::{
    Extension, Json,
    body::Bytes,
    extract::{ConnectInfo, Path, State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use herald_channels::Publish;
use herald_core::{
    id,
    ingest::{self, Request, SourceKind, template},
    model::{App, IngestEvent, IngestSource, Message},
};
use herald_metrics::IngestOutcome;
use herald_store::IngestRecorded;
use serde::Serialize;
use serde_json::Value;

use crate::{
    ApiState,
    error::{ApiError, ApiResult},
    ingest_log::IngestRequest,
    rate::Limited,
};

/// Bodies up to this size are verified on the request's own task; larger ones on the blocking
/// pool.
const VERIFY_INLINE_MAX_BYTES: usize = 64 * 1024;

/// How many recorded deliveries [`RecentDeliveries`] remembers, and for how long (at most:
/// never longer than the store keeps delivery ids, `retention.ingest_days` of at least 3
/// retention days).
const RECENT_CAPACITY: usize = 8192;
const RECENT_FOR: std::time::Duration = std::time::Duration::from_secs(3600);
const INGEST_DAYS_AT_LEAST: u32 = 3;

/// The deliveries this node recorded lately, by (source, delivery id), with their answers. A
/// provider's retry, or a replay of a captured request (GitHub, Shopify and `hmac-sha256`
/// sign no time, so one verifies for ever), is answered from here as the duplicate it is
/// without spending the source's budget, which is for new deliveries: replays of a genuine
/// request cannot get the provider's new ones refused. Bounded ([`RECENT_CAPACITY`], least
/// recently used out first) and short-lived ([`RECENT_FOR`], far less than the store keeps
/// delivery ids, 3 days at least), so an answer from here is one the store would give. Filled
/// only once the store has answered (the delivery durable).
#[derive(Default)]
pub struct RecentDeliveries(std::sync::Mutex<Option<Recent>>);

/// (source id, delivery id) → when it was recorded, and its answer as a duplicate.
type Recent = hashlink::LruCache<(String, String), (std::time::Instant, IngestOut)>;

impl RecentDeliveries {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Recent>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The answer to `delivery_id` from `source_id`, if this node recorded it in the last
    /// `fresh_for`.
    fn get(
        &self,
        source_id: &str,
        delivery_id: &str,
        fresh_for: std::time::Duration,
    ) -> Option<IngestOut> {
        let mut recent = self.lock();
        let recent = recent.as_mut()?;
        let key = (source_id.to_owned(), delivery_id.to_owned());
        match recent.get(&key) {
            Some((at, answer)) if at.elapsed() < fresh_for => Some(answer.clone()),
            Some(_) => {
                recent.remove(&key);
                None
            }
            None => None,
        }
    }

    fn insert(&self, source_id: &str, delivery_id: &str, answer: IngestOut) {
        self.lock()
            .get_or_insert_with(|| hashlink::LruCache::new(RECENT_CAPACITY))
            .insert(
                (source_id.to_owned(), delivery_id.to_owned()),
                (std::time::Instant::now(), answer),
            );
    }
}

#[derive(Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngestOut {
    id: String,
    msg_id: String,
    event_type: String,
    channels: Vec<String>,
    /// The provider sent this delivery before; it was acknowledged, not published again.
    duplicate: bool,
}

/// A webhook from a provider (Stripe, GitHub, Shopify, Slack, Standard Webhooks), verified
/// on the raw bytes with the source's secrets, then kept and published once.
#[utoipa::path(post, path = "/ingest/{source_id}", tag = "Ingest", security(()),
    params(("source_id" = String, Path, description = "The source's id (its ingestPath)")),
    request_body(content = Object, description = "The provider's payload, as it sent it", content_type = "application/json"),
    responses((status = 200, description = "Verified: published, or a repeat acknowledged (`duplicate`), or Slack's URL check answered", body = IngestAnswer),
        (status = 400, description = "The body could not be read", body = crate::openapi::HttpError),
        (status = 401, description = "The signature does not verify", body = crate::openapi::HttpError),
        (status = 404, description = "No such source", body = crate::openapi::HttpError),
        (status = 413, description = "The body is too large", body = crate::openapi::HttpError),
        (status = 429, description = "Over the address's or source's rate: see Retry-After", body = crate::openapi::HttpError),
        (status = 503, description = "The store is unavailable: the provider retries", body = crate::openapi::HttpError)))]
pub async fn receive(
    State(state): State<Arc<ApiState>>,
    Path(source_id): Path<String>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // Anyone may call this route: its rates come first, the address's before any lookup.
    let client = state
        .sse
        .clients
        .client_address(peer.map(|Extension(ConnectInfo(p))| p), &headers);
    let api = &state.metrics.api;
    if let Err(limited) = state.ingest_limits.check_client(client) {
        api.ingest(IngestOutcome::RateLimited);
        return limited.into_response();
    }
    // The source first: only a source that exists has a log, so made-up ids (with bodies
    // that cannot be read, or while the store fails) can neither fill it nor evict the logs
    // of real sources.
    let found = match id::has_prefix(&source_id, id::SOURCE) {
        true => state.store.find_source(&source_id).await,
        false => Ok(None),
    };
    let source = match found {
        Ok(Some(source)) => source,
        Ok(None) => {
            api.ingest(IngestOutcome::Rejected);
            return ApiError::not_found("source").into_response();
        }
        Err(e) => {
            api.ingest(IngestOutcome::Failed);
            return ApiError::from(e).into_response();
        }
    };
    let (outcome, status, detail, response) =
        match receive_from(&state, source, &headers, body).await {
            Ok(Answer::Limited(limited)) => (
                IngestOutcome::RateLimited,
                StatusCode::TOO_MANY_REQUESTS,
                "over the source's rate of verified deliveries: verified, not stored".to_owned(),
                limited.into_response(),
            ),
            Ok(Answer::Ok(status, answer, outcome)) => {
                let detail = match (outcome, answer["msgId"].as_str()) {
                    (IngestOutcome::Challenge, _) => "answered the provider's URL check".to_owned(),
                    (IngestOutcome::Duplicate, Some(msg)) => {
                        format!("a delivery sent before, acknowledged: already published as {msg}")
                    }
                    (_, Some(msg)) => format!("verified and published as {msg}"),
                    (_, None) => "verified".to_owned(),
                };
                (
                    outcome,
                    status,
                    detail,
                    (status, Json(answer)).into_response(),
                )
            }
            Err(e) => {
                let outcome = if e.code() == INVALID_SIGNATURE {
                    IngestOutcome::InvalidSignature
                } else if e.status() == StatusCode::TOO_MANY_REQUESTS {
                    IngestOutcome::RateLimited
                } else if e.status().is_server_error() {
                    IngestOutcome::Failed
                } else {
                    IngestOutcome::Rejected
                };
                (outcome, e.status(), e.detail(), e.into_response())
            }
        };
    api.ingest(outcome);
    if status == StatusCode::NOT_FOUND {
        // The source was deleted meanwhile: its log went with it, and is not begun again.
        return response;
    }
    state.ingest_log.record(
        &source_id,
        IngestRequest {
            received_at: crate::now(),
            outcome,
            status,
            detail,
        },
    );
    response
}

/// The error code of a request whose signature did not verify.
const INVALID_SIGNATURE: &str = "invalid_signature";

enum Answer {
    /// Answered, and what the request came to.
    Ok(StatusCode, Value, IngestOutcome),
    /// Over the source's rate: verified, but nothing was stored.
    Limited(Limited),
}

async fn receive_from(
    state: &ApiState,
    source: IngestSource,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Answer> {
    let body = body.map_err(|e| {
        let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            "payload_too_large"
        } else {
            "invalid_body"
        };
        ApiError::new(
            e.status(),
            code,
            format!("the request body could not be read: {}", e.body_text()),
        )
    })?;
    let now = crate::now();
    let verified = if body.len() <= VERIFY_INLINE_MAX_BYTES {
        read(&source, headers, &body, now.timestamp())?
    } else {
        // Hashing a large body takes milliseconds: keep it off the async workers, so one
        // sender's large requests cannot stall every other connection.
        let slot = state
            .large_verifications
            .acquire(source.id.as_str())
            .await?;
        let (source, headers, body) = (source.clone(), headers.clone(), body.clone());
        // The slot goes with the hashing: a request whose client hangs up meanwhile does not
        // give it back before the blocking task is done.
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            read(&source, &headers, &body, now.timestamp())
        })
        .await
        .map_err(ApiError::internal)??
    };
    let (delivery_id, event_type, channels, payload) = match verified {
        Read::Event {
            delivery_id,
            event_type,
            channels,
            payload,
        } => (delivery_id, event_type, channels, payload),
        Read::Challenge(answer) => {
            return Ok(Answer::Ok(StatusCode::OK, answer, IngestOutcome::Challenge));
        }
    };
    // A delivery recorded lately is answered as the duplicate it is, spending nothing.
    // Never longer than the store keeps delivery ids (a retention day is shorter in tests).
    let fresh_for = RECENT_FOR.min(state.retention_day * INGEST_DAYS_AT_LEAST);
    if let Some(earlier) = state
        .recent_deliveries
        .get(source.id.as_str(), &delivery_id, fresh_for)
    {
        tracing::info!(source = %source.id, %delivery_id,
            "duplicate delivery acknowledged, not published again");
        let answer = serde_json::to_value(earlier).map_err(ApiError::internal)?;
        return Ok(Answer::Ok(StatusCode::OK, answer, IngestOutcome::Duplicate));
    }
    // Only new deliveries that verified spend the source's budget: requests with a wrong
    // signature, however many, cannot get the provider's own deliveries refused. What they
    // cost (a hash of a bounded body) is bounded per client address, before any of this.
    if let Err(limited) = state.ingest_limits.check_source(source.id.as_str()) {
        return Ok(Answer::Limited(limited));
    }

    let app = state
        .store
        .get_app(&source.app_id)
        .await?
        .ok_or_else(|| ApiError::not_found("application"))?;
    let message = message_for(&app.id, &event_type, &channels, &body, payload);
    let recent_key = delivery_id.clone();
    let event = IngestEvent {
        id: herald_core::IngestEventId::new(now),
        source_id: source.id.clone(),
        app_id: app.id.clone(),
        delivery_id,
        headers: crate::v1::header_list(headers),
        body: body.clone(),
        event_type,
        channels,
        msg_id: message.id.clone(),
        received_at: now,
    };
    let out = |event: &IngestEvent, duplicate: bool| IngestOut {
        id: event.id.to_string(),
        msg_id: event.msg_id.to_string(),
        event_type: event.event_type.clone(),
        channels: event.channels.clone(),
        duplicate,
    };
    let first = out(&event, false);
    let published = state
        .publisher
        .publish(&app, Publish::ingest(event, message))
        .await
        .map_err(|e| match e {
            // Deleted since it was found: as the sender's retry will be told.
            herald_channels::PublishError::Store(herald_store::StoreError::NotFound) => {
                ApiError::not_found("source")
            }
            e => e.into(),
        })?;
    let (answer, outcome) = match published.ingest {
        Some(IngestRecorded::Duplicate(earlier)) => {
            tracing::info!(source = %source.id, delivery_id = %earlier.delivery_id,
                "duplicate delivery acknowledged, not published again");
            (out(&earlier, true), IngestOutcome::Duplicate)
        }
        _ => (first, IngestOutcome::Accepted),
    };
    state.recent_deliveries.insert(
        source.id.as_str(),
        &recent_key,
        IngestOut {
            duplicate: true,
            ..answer.clone()
        },
    );
    let answer = serde_json::to_value(answer).map_err(ApiError::internal)?;
    Ok(Answer::Ok(StatusCode::OK, answer, outcome))
}

enum Read {
    Event {
        delivery_id: String,
        event_type: String,
        channels: Vec<String>,
        /// The body read once, for the templates and the message.
        payload: Parsed,
    },
    /// Slack's handshake when the URL is registered: echo the challenge, publish nothing.
    Challenge(Value),
}

/// Verifies the request on its raw bytes, then reads what it is: its delivery id, event
/// type and channels.
fn read(source: &IngestSource, headers: &HeaderMap, body: &[u8], now_unix: i64) -> ApiResult<Read> {
    let lookup = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let request = Request {
        header: &lookup,
        body,
    };
    ingest::verify(
        source.kind,
        source.hmac.as_ref(),
        &source.secrets,
        &request,
        now_unix,
        source.tolerance_secs,
    )
    .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, INVALID_SIGNATURE, e.to_string()))?;

    // Verified: now the body may be parsed.
    let parsed = Parsed::of(lookup("content-type"), body);
    let payload = parsed.value();
    if source.kind == SourceKind::Slack
        && let Some(p) = payload
        && p["type"] == "url_verification"
    {
        return Ok(Read::Challenge(
            serde_json::json!({"challenge": p["challenge"]}),
        ));
    }
    // Templates see unsigned headers only where the source opted in.
    let trusted = source.trust_unsigned_headers;
    let template_headers = |name: &str| if trusted { lookup(name) } else { None };
    let default_event_type = source
        .kind
        .default_event_type(source.trust_unsigned_headers);
    let event_type = if source.event_type.is_empty() {
        template::event_type(default_event_type, payload, &template_headers)
    } else {
        template::event_type(&source.event_type, payload, &template_headers)
    }
    .unwrap_or_else(|| source.kind.as_str().to_owned());
    let channels = template::channels(
        &source.channels,
        source.default_channel.as_deref(),
        payload,
        &template_headers,
    );
    let delivery_id = ingest::delivery_id(
        source.kind,
        &request,
        payload,
        trusted.then(|| ingest::Trusted {
            event_type: &event_type,
            id_header: source.hmac.as_ref().and_then(|h| h.id_header.as_deref()),
        }),
    );
    Ok(Read::Event {
        delivery_id,
        event_type,
        channels,
        payload: parsed,
    })
}

/// A received body, read once after it verified.
pub(crate) enum Parsed {
    /// JSON (as most providers send).
    Json(Value),
    /// A form (`application/x-www-form-urlencoded`): GitHub's default content type, and Slack's
    /// for interactivity and slash commands. Its `payload` field when that is the only one and
    /// holds a JSON object (GitHub, Slack's interactivity); otherwise an object of its fields
    /// (a field given more than once: an array of its values, in order).
    Form(Value),
    /// Neither.
    Opaque,
}

impl Parsed {
    pub(crate) fn of(content_type: Option<&str>, body: &[u8]) -> Self {
        let essence = content_type
            .and_then(|t| t.split(';').next())
            .map(str::trim);
        if essence.is_some_and(|e| e.eq_ignore_ascii_case("application/x-www-form-urlencoded")) {
            // A JSON object sent under the form type (`curl -d` without a content type, PHP's
            // curl with a string body) is JSON: no form field starts with `{`.
            if let Ok(json @ Value::Object(_)) = serde_json::from_slice::<Value>(body) {
                return Self::Json(json);
            }
            return Self::Form(form_payload(body));
        }
        match serde_json::from_slice(body) {
            Ok(value) => Self::Json(value),
            Err(_) => Self::Opaque,
        }
    }

    /// What templates read: the JSON, or the form's payload.
    pub(crate) fn value(&self) -> Option<&Value> {
        match self {
            Self::Json(value) | Self::Form(value) => Some(value),
            Self::Opaque => None,
        }
    }
}

fn form_payload(body: &[u8]) -> Value {
    let fields: Vec<(String, String)> = url::form_urlencoded::parse(body).into_owned().collect();
    if let [(name, value)] = fields.as_slice()
        && name == "payload"
        && let Ok(json @ Value::Object(_)) = serde_json::from_str::<Value>(value)
    {
        return json;
    }
    let mut object = serde_json::Map::new();
    for (name, value) in fields {
        match object.get_mut(&name) {
            Some(Value::Array(values)) => values.push(Value::String(value)),
            Some(first) => {
                let first = first.take();
                object.insert(name, Value::Array(vec![first, Value::String(value)]));
            }
            None => {
                object.insert(name, Value::String(value));
            }
        }
    }
    Value::Object(object)
}

/// The message a received body becomes: the body itself as the payload when it is a JSON
/// object; a form's payload ([`Parsed::Form`]) as JSON; otherwise `{"data": <the JSON value,
/// or the body as text>}`. `parsed` is the body as read once.
pub(crate) fn message_for(
    app_id: &herald_core::AppId,
    event_type: &str,
    channels: &[String],
    body: &Bytes,
    parsed: Parsed,
) -> Message {
    let payload = match parsed {
        // The bytes as received (a clone of `Bytes` shares them), not a re-serialization.
        Parsed::Json(Value::Object(_)) => body.clone(),
        Parsed::Json(other) => Bytes::from(serde_json::json!({ "data": other }).to_string()),
        Parsed::Form(payload) => Bytes::from(payload.to_string()),
        Parsed::Opaque => {
            Bytes::from(serde_json::json!({ "data": String::from_utf8_lossy(body) }).to_string())
        }
    };
    let now = crate::now();
    Message {
        id: herald_core::MessageId::new(now),
        app_id: app_id.to_owned(),
        event_id: None,
        event_type: event_type.to_owned(),
        channels: (!channels.is_empty()).then(|| channels.to_vec()),
        tags: None,
        payload,
        created_at: now,
        payload_expires_at: None,
    }
}

/// Stores a message (a replay) and publishes it the usual way.
pub(crate) async fn publish(state: &ApiState, app: &App, message: Message) -> ApiResult<()> {
    state
        .publisher
        .publish(app, Publish::message(message))
        .await?;
    Ok(())
}

/// This module's part of `/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(receive))]
pub(crate) struct Docs;

/// What a verified request is answered with, for `/openapi.json`.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum IngestAnswer {
    Event(IngestOut),
    /// Slack's `url_verification`: its challenge echoed.
    Challenge {
        challenge: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message `body` becomes, parsed as the ingest route parses it.
    fn message_of(body: &'static [u8], channels: &[String]) -> Message {
        message_typed(None, body, channels)
    }

    fn message_typed(
        content_type: Option<&str>,
        body: &'static [u8],
        channels: &[String],
    ) -> Message {
        let body = Bytes::from_static(body);
        let parsed = Parsed::of(content_type, &body);
        let app = herald_core::AppId::new(crate::now());
        message_for(&app, "bench.event", channels, &body, parsed)
    }

    /// GitHub's default content type and Slack's interactivity send the JSON as a `payload`
    /// form field; Slack's slash commands send plain fields. Templates and the message read
    /// them as JSON.
    #[test]
    fn a_form_body_is_read_as_its_payload_field_or_its_fields() {
        let form = Some("application/x-www-form-urlencoded; charset=utf-8");
        let github = b"payload=%7B%22action%22%3A%22opened%22%2C%22repository%22%3A%7B%22full_name%22%3A%22o%2Fr%22%7D%7D";
        let parsed = Parsed::of(form, github);
        assert_eq!(
            parsed.value(),
            Some(&serde_json::json!({"action": "opened", "repository": {"full_name": "o/r"}}))
        );
        let payload: Value =
            serde_json::from_slice(&message_typed(form, github, &[]).payload).expect("JSON");
        assert_eq!(payload["action"], "opened");

        let slash = b"command=%2Fdeploy&text=api+now&user_id=U1&text=again";
        let payload: Value =
            serde_json::from_slice(&message_typed(form, slash, &[]).payload).expect("JSON");
        assert_eq!(
            payload,
            serde_json::json!({"command": "/deploy", "text": ["api now", "again"], "user_id": "U1"})
        );
        // A `payload` field that is not a JSON object is a field like any other.
        assert_eq!(
            Parsed::of(form, b"payload=plain").value(),
            Some(&serde_json::json!({"payload": "plain"}))
        );
        // A JSON object sent under the form type (`curl -d '{...}'`) is read as JSON, and
        // kept byte for byte.
        let json = br#"{"type": "a+b%20"}"#;
        assert_eq!(message_typed(form, json, &[]).payload, json.as_slice());
        assert_eq!(
            Parsed::of(form, json).value(),
            Some(&serde_json::json!({"type": "a+b%20"}))
        );
    }

    fn payload_of(body: &'static [u8]) -> Value {
        serde_json::from_slice(&message_of(body, &[]).payload).expect("a payload is JSON")
    }

    #[test]
    fn a_json_object_is_the_payload_as_received_and_anything_else_is_wrapped_in_data() {
        // An object is kept byte for byte (its key order and spacing too).
        let body: &[u8] = br#"{"b": 1,  "a": [2]}"#;
        let message = message_of(body, &["orders".to_owned()]);
        assert_eq!(message.payload, body);
        assert_eq!(message.channels, Some(vec!["orders".to_owned()]));

        assert_eq!(payload_of(b"[1,2]"), serde_json::json!({"data": [1, 2]}));
        assert_eq!(payload_of(b"\"text\""), serde_json::json!({"data": "text"}));
        assert_eq!(
            payload_of(b"token=abc&x=1"),
            serde_json::json!({"data": "token=abc&x=1"})
        );
    }
}

/// The blocking pool's slots for verifying large inbound bodies: one per core (at least two).
/// A source may queue (up to [`LARGE_VERIFY_PATIENCE`]) for at most half of them; beyond its
/// half it takes only a slot that is free at once, else 429. So requests to one source's URL
/// (forged ones included: they are hashed before anything can tell them apart) cannot keep
/// other sources' large deliveries waiting, while a source alone may use every slot.
pub struct LargeVerifications {
    slots: Arc<tokio::sync::Semaphore>,
    per_source_max: usize,
    per_source: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

/// How long a large body waits for a slot to be verified in before it is refused (503).
pub const LARGE_VERIFY_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// One source's slot, given back when dropped: held by the blocking task that hashes.
pub struct LargeSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _counted: Counted,
}

impl LargeVerifications {
    pub fn new(slots: usize) -> Self {
        let slots = slots.max(2);
        Self {
            slots: Arc::new(tokio::sync::Semaphore::new(slots)),
            per_source_max: (slots / 2).max(1),
            per_source: std::sync::Mutex::default(),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, usize>> {
        // A map of counts whose updates cannot panic halfway: recover from poisoning.
        self.per_source.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot to verify one large body of `source` in: beyond the source's share only a free
    /// one (429 if none is), within it the next to free (503 if none does within
    /// [`LARGE_VERIFY_PATIENCE`]).
    pub async fn acquire(self: &Arc<Self>, source: &str) -> ApiResult<LargeSlot> {
        let over_share = {
            let mut held = self.held();
            let count = held.entry(source.to_owned()).or_insert(0);
            *count += 1;
            *count > self.per_source_max
        };
        // Counted from here on: the guard gives the count back whatever happens next.
        let counted = Counted {
            owner: Arc::clone(self),
            source: source.to_owned(),
        };
        let permit = if over_share {
            Arc::clone(&self.slots).try_acquire_owned().map_err(|_| {
                ApiError::RateLimited {
                    detail: format!(
                        "this source has {} large requests being verified already and no slot is free; retry shortly",
                        self.per_source_max
                    ),
                    retry_after_secs: 1,
                }
            })?
        } else {
            match tokio::time::timeout(
                LARGE_VERIFY_PATIENCE,
                Arc::clone(&self.slots).acquire_owned(),
            )
            .await
            {
                Ok(Ok(permit)) => permit,
                Ok(Err(closed)) => return Err(ApiError::internal(closed)),
                Err(_) => {
                    return Err(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "verification_busy",
                        "every slot for verifying large requests stayed busy; retry shortly",
                    ));
                }
            }
        };
        Ok(LargeSlot {
            _permit: permit,
            _counted: counted,
        })
    }

    fn give_back(&self, source: &str) {
        let mut held = self.held();
        if let Some(count) = held.get_mut(source) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(source);
            }
        }
    }
}

/// A source's count of large verifications, given back when dropped (by its slot, or by a
/// wait for a slot that ended early).
struct Counted {
    owner: Arc<LargeVerifications>,
    source: String,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.owner.give_back(&self.source);
    }
}

#[cfg(test)]
mod large_verification_tests {
    use super::*;

    /// A source queues for at most half of the slots; beyond it, it takes a free slot or gets
    /// 429; others still get theirs; a wait ends with 503 after its patience; a slot given
    /// back is taken again.
    #[tokio::test(start_paused = true)]
    async fn one_source_takes_at_most_half_the_large_verification_slots() {
        let slots = Arc::new(LargeVerifications::new(4));
        let first = slots.acquire("src_a").await.expect("a slot");
        let second = slots.acquire("src_a").await.expect("a second slot");
        let third = slots
            .acquire("src_a")
            .await
            .expect("beyond its share, a free slot is taken");
        let _b = slots.acquire("src_b").await.expect("another source's slot");
        let refused = slots
            .acquire("src_a")
            .await
            .err()
            .expect("beyond its share with no slot free");
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        // Every slot is taken: a source within its share waits, then is refused.
        let busy = slots
            .acquire("src_c")
            .await
            .err()
            .expect("no slot freed within the patience");
        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(busy.code(), "verification_busy");
        assert!(
            !slots.held().contains_key("src_c"),
            "a wait that ended gives its count back"
        );
        drop(third);
        let _c = slots.acquire("src_c").await.expect("a freed slot");
        drop((first, second));
        let _a = slots.acquire("src_a").await.expect("src_a has room again");
        assert_eq!(slots.held().get("src_a"), Some(&1));
    }

    /// Two slots at least, so one source's second large delivery is not refused on a small
    /// machine while nothing else is verifying.
    #[tokio::test(start_paused = true)]
    async fn a_one_core_machine_still_has_two_slots() {
        let slots = Arc::new(LargeVerifications::new(1));
        let _first = slots.acquire("src_a").await.expect("a slot");
        let _second = slots.acquire("src_a").await.expect("the free second slot");
    }
}
