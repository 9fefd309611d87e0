//! `/api/v1/app/{app}/ingest/source`: where third parties post webhooks to, how Herald
//! verifies them and how it re-publishes them; and the requests each source received.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderName, StatusCode},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use chrono::{DateTime, Utc};
use herald_core::{
    EndpointSecret,
    ingest::{self, HmacScheme, SourceKind, template},
    model::{IngestEvent, IngestSource},
    pusher, validate,
};
use serde::{Deserialize, Serialize};

use super::wire::HmacSchemeWire;

use crate::{
    ApiState,
    auth::Caller,
    error::{ApiError, ApiResult, Validator},
    extract::{QueryParams, SvixJson},
    pagination::{self, ListResponse},
};

const MAX_SECRETS: usize = 5;
const MAX_TEMPLATES: usize = 5;
const MAX_TOLERANCE_SECS: i64 = 24 * 3600;

/// A new source. Unknown fields are refused: a misspelt setting silently left out would
/// change what is verified.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceIn {
    /// stripe, github, shopify, slack, standard-webhooks or hmac-sha256.
    kind: String,
    /// 1 to 5 signing secrets (more than one during a rotation); standard-webhooks takes
    /// `whsec_` secrets.
    secrets: Vec<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    uid: Option<String>,
    /// Required for hmac-sha256 sources, refused for the others.
    #[serde(default)]
    hmac: Option<HmacSchemeWire>,
    /// How old a signed timestamp may be: 1 to 86400 seconds.
    #[serde(default)]
    tolerance_secs: Option<i64>,
    /// Templates for the event type, tried in order (the kind's defaults when absent).
    #[serde(default)]
    event_type: Option<Vec<String>>,
    /// Templates for the channels the event is published to.
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    default_channel: Option<String>,
    /// Let templates read headers (`{header:...}`), which the provider's signature does not
    /// cover (see `check_templates`).
    #[serde(default)]
    trust_unsigned_headers: bool,
}

/// The fields to change; those left out stay as they are (the kind cannot change). Unknown
/// fields are refused: a misspelt `secrets` would leave the old secrets verifying.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourcePatch {
    #[serde(default)]
    secrets: Option<Vec<String>>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default, deserialize_with = "super::double_option")]
    uid: Option<Option<String>>,
    #[serde(default)]
    hmac: Option<HmacSchemeWire>,
    #[serde(default)]
    tolerance_secs: Option<i64>,
    #[serde(default)]
    event_type: Option<Vec<String>>,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default, deserialize_with = "super::double_option")]
    default_channel: Option<Option<String>>,
    #[serde(default)]
    trust_unsigned_headers: Option<bool>,
}

/// A source as the API shows it. Secrets are write-only: only their number is shown.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceOut {
    id: String,
    uid: Option<String>,
    name: String,
    /// stripe, github, shopify, slack, standard-webhooks or hmac-sha256.
    kind: &'static str,
    /// Where the provider posts: `POST {this}` on Herald's listener.
    ingest_path: String,
    secret_count: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    hmac: Option<HmacSchemeWire>,
    tolerance_secs: i64,
    /// The templates in use (the kind's defaults unless set).
    event_type: Vec<String>,
    channels: Vec<String>,
    default_channel: Option<String>,
    trust_unsigned_headers: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<IngestSource> for SourceOut {
    fn from(s: IngestSource) -> Self {
        let event_type = if s.event_type.is_empty() {
            s.kind
                .default_event_type(s.trust_unsigned_headers)
                .iter()
                .map(|t| (*t).to_owned())
                .collect()
        } else {
            s.event_type
        };
        Self {
            ingest_path: format!("/ingest/{}", s.id),
            id: s.id.into_string(),
            uid: s.uid,
            name: s.name,
            kind: s.kind.as_str(),
            secret_count: s.secrets.len(),
            hmac: s.hmac.map(HmacSchemeWire::from),
            tolerance_secs: s.tolerance_secs,
            event_type,
            channels: s.channels,
            default_channel: s.default_channel,
            trust_unsigned_headers: s.trust_unsigned_headers,
            created_at: s.created_at,
            updated_at: s.updated_at,
        }
    }
}

/// A received request: what it became, and (for one event) the raw headers and body.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngestEventOut {
    id: String,
    source_id: String,
    delivery_id: String,
    event_type: String,
    channels: Vec<String>,
    msg_id: String,
    received_at: DateTime<Utc>,
    /// The headers as received, in order: `[name, value]` pairs (one event only).
    #[serde(skip_serializing_if = "Option::is_none")]
    headers: Option<Vec<(String, String)>>,
    /// The body as text, when it is UTF-8 (one event only).
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<String>,
    /// The body, base64 (one event only).
    #[serde(skip_serializing_if = "Option::is_none")]
    body_base64: Option<String>,
}

impl IngestEventOut {
    fn new(event: IngestEvent, raw: bool) -> Self {
        let (headers, body, body_base64) = if raw {
            (
                Some(event.headers),
                std::str::from_utf8(&event.body).ok().map(str::to_owned),
                Some(STANDARD.encode(&event.body)),
            )
        } else {
            (None, None, None)
        };
        Self {
            id: event.id.into_string(),
            source_id: event.source_id.into_string(),
            delivery_id: event.delivery_id,
            event_type: event.event_type,
            channels: event.channels,
            msg_id: event.msg_id.into_string(),
            received_at: event.received_at,
            headers,
            body,
            body_base64,
        }
    }
}

fn check_secrets(v: &mut Validator, kind: SourceKind, secrets: &[String]) {
    if secrets.is_empty() || secrets.len() > MAX_SECRETS {
        v.check(
            &["body", "secrets"],
            Err(format!(
                "1 to {MAX_SECRETS} secrets (more than one during a rotation)"
            )),
        );
    }
    for secret in secrets {
        let result = if secret.is_empty() || secret.len() > 512 {
            Err("a secret must be 1 to 512 characters".to_owned())
        } else if kind == SourceKind::StandardWebhooks {
            EndpointSecret::parse(secret)
                .map(|_| ())
                .map_err(|e| e.to_string())
        } else {
            Ok(())
        };
        v.check(&["body", "secrets"], result);
    }
}

/// `trust` is whether the source (as it will be) trusts unsigned headers: `idHeader` needs it.
fn check_hmac(v: &mut Validator, kind: SourceKind, hmac: Option<&HmacScheme>, trust: bool) {
    match (kind, hmac) {
        (SourceKind::HmacSha256, None) => v.check(
            &["body", "hmac"],
            Err("hmac-sha256 sources need hmac: {header, encoding}"),
        ),
        (SourceKind::HmacSha256, Some(h)) => {
            for name in std::iter::once(&h.header).chain(h.id_header.as_ref()) {
                v.check(
                    &["body", "hmac"],
                    HeaderName::from_bytes(name.as_bytes())
                        .map(|_| ())
                        .map_err(|_| format!("{name:?} is not a valid header name")),
                );
            }
            if h.id_header.is_some() && !trust {
                v.check(
                    &["body", "hmac", "idHeader"],
                    Err("idHeader names a header the signature does not cover; set trustUnsignedHeaders to true to deduplicate on it"),
                );
            }
        }
        (_, Some(_)) => v.check(
            &["body", "hmac"],
            Err("hmac is only for hmac-sha256 sources"),
        ),
        (_, None) => {}
    }
}

/// Templates are checked for syntax, and `{header:...}` is allowed only on a source that trusts
/// unsigned headers: no provider signs its headers (Standard Webhooks' id and timestamp
/// aside), so a header-derived event type or channel could be changed by whoever relays a
/// captured request.
fn check_templates(v: &mut Validator, field: &str, templates: &[String], trust_headers: bool) {
    if templates.len() > MAX_TEMPLATES {
        v.check(
            &["body", field],
            Err(format!("at most {MAX_TEMPLATES} templates")),
        );
    }
    for t in templates {
        v.check(&["body", field], template::validate(t));
        if !trust_headers && template::reads_headers(t) {
            v.check(
                &["body", field],
                Err(format!(
                    "{t:?} reads a header, which the provider's signature does not cover; set trustUnsignedHeaders to true to allow it"
                )),
            );
        }
    }
}

fn check_common(
    v: &mut Validator,
    tolerance: Option<i64>,
    default_channel: Option<&str>,
    uid: Option<&str>,
) {
    if let Some(t) = tolerance
        && !(1..=MAX_TOLERANCE_SECS).contains(&t)
    {
        v.check(
            &["body", "toleranceSecs"],
            Err(format!("must be 1 to {MAX_TOLERANCE_SECS} seconds")),
        );
    }
    if let Some(channel) = default_channel {
        v.check(
            &["body", "defaultChannel"],
            pusher::validate_channel_name(channel),
        );
    }
    if let Some(uid) = uid {
        v.check(&["body", "uid"], validate::uid(uid));
    }
}

fn new_source(app_id: &herald_core::AppId, input: SourceIn) -> ApiResult<IngestSource> {
    let mut v = Validator::default();
    let kind = SourceKind::parse(&input.kind);
    if kind.is_none() {
        let kinds: Vec<&str> = SourceKind::ALL.iter().map(|k| k.as_str()).collect();
        v.check(
            &["body", "kind"],
            Err(format!(
                "unknown kind {:?}: use one of {}",
                input.kind,
                kinds.join(", ")
            )),
        );
    }
    let trust = input.trust_unsigned_headers;
    let hmac = input.hmac.map(HmacScheme::from);
    // A kind's own checks only for a known kind: an unknown one is the one error to report.
    if let Some(kind) = kind {
        check_secrets(&mut v, kind, &input.secrets);
        check_hmac(&mut v, kind, hmac.as_ref(), trust);
    }
    let kind = kind.unwrap_or(SourceKind::HmacSha256);
    check_templates(
        &mut v,
        "eventType",
        input.event_type.as_deref().unwrap_or_default(),
        trust,
    );
    check_templates(
        &mut v,
        "channels",
        input.channels.as_deref().unwrap_or_default(),
        trust,
    );
    check_common(
        &mut v,
        input.tolerance_secs,
        input.default_channel.as_deref(),
        input.uid.as_deref(),
    );
    v.finish()?;
    let now = crate::now();
    Ok(IngestSource {
        id: herald_core::SourceId::new(now),
        app_id: app_id.to_owned(),
        uid: input.uid,
        name: input.name.unwrap_or_default(),
        kind,
        secrets: input.secrets,
        hmac,
        tolerance_secs: input
            .tolerance_secs
            .unwrap_or(ingest::DEFAULT_TOLERANCE_SECS),
        event_type: input.event_type.unwrap_or_default(),
        channels: input.channels.unwrap_or_default(),
        default_channel: input.default_channel,
        trust_unsigned_headers: input.trust_unsigned_headers,
        created_at: now,
        updated_at: now,
    })
}

async fn find(
    state: &ApiState,
    caller: &Caller,
    app_id: &str,
    source_id: &str,
) -> ApiResult<IngestSource> {
    let app = caller.app(state, app_id).await?;
    state
        .store
        .get_source(&app.id, source_id)
        .await?
        .ok_or_else(|| ApiError::not_found("source"))
}

/// The app's ingest sources, oldest first.
#[utoipa::path(get, path = "/api/v1/app/{app_id}/ingest/source", tag = "Ingest",
    params(("app_id" = String, Path, description = "The app's id or uid"), crate::pagination::ListParams,
        ("order" = Option<String>, Query, description = "`descending` for newest first")),
    responses((status = 200, body = ListResponse<SourceOut>)))]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(app_id): Path<String>,
    query: QueryParams,
) -> ApiResult<Json<ListResponse<SourceOut>>> {
    let app = caller.app(&state, &app_id).await?;
    let page = pagination::page(&query, pagination::descending(&query, false)?)?;
    let rows = state.store.list_sources(&app.id, &page).await?;
    Ok(Json(pagination::list(
        rows,
        &page,
        |s| s.id.to_string(),
        SourceOut::from,
    )))
}

/// Creates a source: third parties then post to its `ingestPath`.
#[utoipa::path(post, path = "/api/v1/app/{app_id}/ingest/source", tag = "Ingest", params(("app_id" = String, Path, description = "The app's id or uid")), request_body = SourceIn,
    responses((status = 201, body = SourceOut)))]
pub async fn create(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(app_id): Path<String>,
    SvixJson(input): SvixJson<SourceIn>,
) -> ApiResult<(StatusCode, Json<SourceOut>)> {
    let app = caller.app(&state, &app_id).await?;
    let source = new_source(&app.id, input)?;
    state.store.create_source(&source).await?;
    Ok((StatusCode::CREATED, Json(source.into())))
}

/// One source.
#[utoipa::path(get, path = "/api/v1/app/{app_id}/ingest/source/{source_id}", tag = "Ingest", params(("app_id" = String, Path, description = "The app's id or uid"), ("source_id" = String, Path, description = "The source's id or uid")),
    responses((status = 200, body = SourceOut)))]
pub async fn get(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, source_id)): Path<(String, String)>,
) -> ApiResult<Json<SourceOut>> {
    Ok(Json(
        find(&state, &caller, &app_id, &source_id).await?.into(),
    ))
}

/// Changes the fields given.
#[utoipa::path(patch, path = "/api/v1/app/{app_id}/ingest/source/{source_id}", tag = "Ingest", params(("app_id" = String, Path, description = "The app's id or uid"), ("source_id" = String, Path, description = "The source's id or uid")), request_body = SourcePatch,
    responses((status = 200, body = SourceOut)))]
pub async fn patch(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, source_id)): Path<(String, String)>,
    SvixJson(patch): SvixJson<SourcePatch>,
) -> ApiResult<Json<SourceOut>> {
    let mut source = find(&state, &caller, &app_id, &source_id).await?;
    let read_at = source.updated_at;
    let mut v = Validator::default();
    if let Some(secrets) = &patch.secrets {
        check_secrets(&mut v, source.kind, secrets);
    }
    let hmac = patch.hmac.map(HmacScheme::from);
    // Checked against the source as it will be: new settings, or new trust, or both.
    let trust = patch
        .trust_unsigned_headers
        .unwrap_or(source.trust_unsigned_headers);
    if hmac.is_some() || patch.trust_unsigned_headers.is_some() {
        check_hmac(
            &mut v,
            source.kind,
            hmac.as_ref().or(source.hmac.as_ref()),
            trust,
        );
    }
    let event_type = patch.event_type.as_ref().unwrap_or(&source.event_type);
    let channels = patch.channels.as_ref().unwrap_or(&source.channels);
    check_templates(&mut v, "eventType", event_type, trust);
    check_templates(&mut v, "channels", channels, trust);
    check_common(
        &mut v,
        patch.tolerance_secs,
        patch.default_channel.as_ref().and_then(Option::as_deref),
        patch.uid.as_ref().and_then(Option::as_deref),
    );
    v.finish()?;
    if let Some(secrets) = patch.secrets {
        source.secrets = secrets;
    }
    if let Some(name) = patch.name {
        source.name = name;
    }
    if let Some(uid) = patch.uid {
        source.uid = uid;
    }
    if let Some(hmac) = hmac {
        source.hmac = Some(hmac);
    }
    if let Some(t) = patch.tolerance_secs {
        source.tolerance_secs = t;
    }
    if let Some(templates) = patch.event_type {
        source.event_type = templates;
    }
    if let Some(templates) = patch.channels {
        source.channels = templates;
    }
    if let Some(channel) = patch.default_channel {
        source.default_channel = channel;
    }
    if let Some(trust) = patch.trust_unsigned_headers {
        source.trust_unsigned_headers = trust;
    }
    source.updated_at = super::next_version(read_at);
    state.store.update_source(&source, read_at).await?;
    Ok(Json(source.into()))
}

/// Deletes the source.
#[utoipa::path(delete, path = "/api/v1/app/{app_id}/ingest/source/{source_id}", tag = "Ingest", params(("app_id" = String, Path, description = "The app's id or uid"), ("source_id" = String, Path, description = "The source's id or uid")),
    responses((status = 204, description = "Deleted")))]
pub async fn delete(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, source_id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let source = find(&state, &caller, &app_id, &source_id).await?;
    state
        .store
        .delete_source(&source.app_id, &source.id)
        .await?;
    state.ingest_log.forget(source.id.as_str());
    Ok(StatusCode::NO_CONTENT)
}

/// One request the source received (an item of its `request` list).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngestRequestOut {
    received_at: DateTime<Utc>,
    /// accepted, duplicate, challenge, invalid_signature, rejected, rate_limited or failed.
    outcome: &'static str,
    /// The status the sender was answered with.
    status: u16,
    /// Why it was refused, in the words the sender was told; or what it became.
    detail: String,
}

/// The last requests the source received on this node, newest first: why a provider's
/// deliveries fail, without reading logs. One page; nothing older is kept.
// Kept by `crate::ingest_log`.
#[utoipa::path(get, path = "/api/v1/app/{app_id}/ingest/source/{source_id}/request", tag = "Ingest", params(("app_id" = String, Path, description = "The app's id or uid"), ("source_id" = String, Path, description = "The source's id or uid")),
    responses((status = 200, description = "One page, `done` always true", body = ListResponse<IngestRequestOut>)))]
pub async fn requests(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, source_id)): Path<(String, String)>,
) -> ApiResult<Json<ListResponse<IngestRequestOut>>> {
    let source = find(&state, &caller, &app_id, &source_id).await?;
    let data = state
        .ingest_log
        .recent(source.id.as_str())
        .into_iter()
        .map(|r| IngestRequestOut {
            received_at: r.received_at,
            outcome: r.outcome.as_str(),
            status: r.status.as_u16(),
            detail: r.detail,
        })
        .collect();
    Ok(Json(ListResponse {
        data,
        iterator: None,
        prev_iterator: None,
        done: true,
    }))
}

/// The events the source received (without their raw headers and body), newest first.
#[utoipa::path(get, path = "/api/v1/app/{app_id}/ingest/source/{source_id}/event", tag = "Ingest",
    params(("app_id" = String, Path, description = "The app's id or uid"), ("source_id" = String, Path, description = "The source's id or uid"), crate::pagination::ListParams,
        ("order" = Option<String>, Query, description = "`ascending` for oldest first")),
    responses((status = 200, body = ListResponse<IngestEventOut>)))]
pub async fn list_events(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, source_id)): Path<(String, String)>,
    query: QueryParams,
) -> ApiResult<Json<ListResponse<IngestEventOut>>> {
    let source = find(&state, &caller, &app_id, &source_id).await?;
    // Newest first, as message lists are.
    let page = pagination::page(&query, pagination::descending(&query, true)?)?;
    let rows = state.store.list_ingest_events(&source.id, &page).await?;
    Ok(Json(pagination::list(
        rows,
        &page,
        |e| e.id.to_string(),
        |e| IngestEventOut::new(e, false),
    )))
}

async fn find_event(
    state: &ApiState,
    caller: &Caller,
    app_id: &str,
    source_id: &str,
    event_id: &str,
) -> ApiResult<(IngestSource, IngestEvent)> {
    let source = find(state, caller, app_id, source_id).await?;
    let event = state
        .store
        .get_ingest_event(&source.id, event_id)
        .await?
        .ok_or_else(|| ApiError::not_found("ingest event"))?;
    Ok((source, event))
}

/// One received event, with its raw headers and body.
#[utoipa::path(get, path = "/api/v1/app/{app_id}/ingest/source/{source_id}/event/{event_id}", tag = "Ingest", params(("app_id" = String, Path, description = "The app's id or uid"), ("source_id" = String, Path, description = "The source's id or uid"), ("event_id" = String, Path, description = "The received event's id")),
    responses((status = 200, body = IngestEventOut)))]
pub async fn get_event(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, source_id, event_id)): Path<(String, String, String)>,
) -> ApiResult<Json<IngestEventOut>> {
    let (_, event) = find_event(&state, &caller, &app_id, &source_id, &event_id).await?;
    Ok(Json(IngestEventOut::new(event, true)))
}

/// The message a replay published.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplayOut {
    msg_id: String,
    event_type: String,
    channels: Vec<String>,
}

/// Publishes a received request again, as a new message (the original was verified when it
/// arrived): to the endpoints and channels that want it now.
#[utoipa::path(post, path = "/api/v1/app/{app_id}/ingest/source/{source_id}/event/{event_id}/replay", tag = "Ingest", params(("app_id" = String, Path, description = "The app's id or uid"), ("source_id" = String, Path, description = "The source's id or uid"), ("event_id" = String, Path, description = "The received event's id")),
    responses((status = 201, body = ReplayOut)))]
pub async fn replay(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, source_id, event_id)): Path<(String, String, String)>,
) -> ApiResult<(StatusCode, Json<ReplayOut>)> {
    let (source, event) = find_event(&state, &caller, &app_id, &source_id, &event_id).await?;
    let app = caller.app(&state, &app_id).await?;
    let content_type = event
        .headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        .map(|(_, value)| value.as_str());
    let parsed = crate::ingest::Parsed::of(content_type, &event.body);
    let message = crate::ingest::message_for(
        &app.id,
        &event.event_type,
        &event.channels,
        &event.body,
        parsed,
    );
    let msg_id = message.id.clone();
    crate::ingest::publish(&state, &app, message).await?;
    tracing::info!(source = %source.id, event = %event.id, %msg_id, "ingest event replayed");
    Ok((
        StatusCode::CREATED,
        Json(ReplayOut {
            msg_id: msg_id.into_string(),
            event_type: event.event_type,
            channels: event.channels,
        }),
    ))
}

/// What a received request's credential header keeps instead of its value.
pub(crate) const CREDENTIAL_NOT_KEPT: &str = "(a credential: not kept)";

/// Keeps the headers as received, in order (values that are not text become lossy text),
/// except the values of credential headers (`Authorization`, `Cookie`, API keys: the
/// endpoints' sensitive list), which a sender or a proxy in front may add: the received
/// request is stored in clear and read back by anyone with the app's token. Their names stay;
/// no provider signs with them, and a replay republishes the stored event, not the request.
pub(crate) fn header_list(headers: &axum::http::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            let value = if super::endpoint::is_sensitive(name.as_str()) {
                CREDENTIAL_NOT_KEPT.to_owned()
            } else {
                String::from_utf8_lossy(value.as_bytes()).into_owned()
            };
            (name.as_str().to_owned(), value)
        })
        .collect()
}

/// This module's part of `/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    list,
    create,
    get,
    patch,
    delete,
    list_events,
    get_event,
    requests,
    replay
))]
pub(crate) struct Docs;
