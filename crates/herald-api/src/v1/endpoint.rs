//! `/api/v1/app/{app}/endpoint`: where an app's webhooks go, with filters, headers and secrets.

use std::sync::Arc;

use std::collections::BTreeMap;

use super::next_version;
use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Duration, Utc};
use herald_core::{
    EndpointSecret,
    model::{App, Endpoint, EndpointFormat, Metadata},
    validate,
};
use serde::{Deserialize, Serialize};

use crate::{
    ApiState,
    auth::Caller,
    error::{ApiError, ApiResult, Validator},
    extract::{OptionalSvixJson, QueryParams, SvixJson},
    idempotency::SecretFields,
    pagination::{self, ListResponse},
};

/// How long a rotated-out secret keeps signing by default, so receivers can switch without
/// dropping a delivery; `gracePeriodSeconds` may choose up to a week.
const ROTATION_GRACE_SECS: i64 = 24 * 3600;
const MAX_ROTATION_GRACE_SECS: i64 = 7 * 24 * 3600;
/// Earlier secrets that may still sign an endpoint's deliveries at once (each adds a
/// signature to every delivery's `webhook-signature` header).
const MAX_PREVIOUS_SECRETS: usize = 5;
const MAX_CHANNELS: usize = 10;
/// Headers Herald sets itself; an endpoint may not override them.
const RESERVED_HEADERS: &[&str] = &[
    herald_core::signing::headers::WEBHOOK_ID,
    herald_core::signing::headers::WEBHOOK_TIMESTAMP,
    herald_core::signing::headers::WEBHOOK_SIGNATURE,
    herald_core::signing::headers::PUSHER_KEY,
    herald_core::signing::headers::PUSHER_SIGNATURE,
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
    "connection",
];

/// Svix's `EndpointIn` (also `EndpointUpdate` and `EndpointUpsertIn`, its subsets) plus
/// `format`; any other field is a 422 naming it.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointIn {
    url: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    throttle_rate: Option<u16>,
    #[serde(default)]
    disabled: Option<bool>,
    /// Herald's extension: `standard-webhooks` (default) or `pusher` (channel webhooks).
    /// Absent on an update means unchanged, so Svix SDKs that do not know it keep it.
    #[serde(default)]
    format: Option<String>,
    /// `filterTypes` is the field's name in older Svix SDKs.
    #[serde(default, alias = "filterTypes")]
    event_types: Option<Vec<String>>,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    metadata: Option<Metadata>,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
    /// Svix's deprecated name for `throttleRate` (older SDKs know only this one); as Svix,
    /// `throttleRate` wins when both are given.
    #[serde(default)]
    #[schema(deprecated)]
    rate_limit: Option<u16>,
    /// Svix's endpoint version; accepted and ignored (see the README).
    #[serde(default, rename = "version")]
    #[schema(deprecated)]
    _version: Option<i64>,
}

/// Svix's `EndpointPatch` plus `format`: only the fields given change. `null` clears `uid`,
/// `throttleRate`, `eventTypes` and `channels`; on the other fields it changes nothing.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointPatch {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default, deserialize_with = "super::double_option")]
    uid: Option<Option<String>>,
    #[serde(default, deserialize_with = "super::double_option")]
    throttle_rate: Option<Option<u16>>,
    /// Svix's deprecated name for `throttleRate`; `throttleRate` wins when both are given.
    #[serde(default, deserialize_with = "super::double_option")]
    #[schema(deprecated)]
    rate_limit: Option<Option<u16>>,
    #[serde(default)]
    disabled: Option<bool>,
    /// `standard-webhooks` or `pusher`.
    #[serde(default)]
    format: Option<String>,
    /// `filterTypes` is the field's name in older Svix SDKs.
    #[serde(
        default,
        alias = "filterTypes",
        deserialize_with = "super::double_option"
    )]
    event_types: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "super::double_option")]
    channels: Option<Option<Vec<String>>>,
    #[serde(default)]
    metadata: Option<Metadata>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointOut {
    id: String,
    uid: Option<String>,
    url: String,
    description: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    throttle_rate: Option<i64>,
    /// The same as `throttleRate`, under the name older Svix SDKs read.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(deprecated)]
    rate_limit: Option<i64>,
    disabled: bool,
    /// `standard-webhooks` or `pusher`.
    #[schema(value_type = String, example = "standard-webhooks")]
    format: &'static str,
    event_types: Option<Vec<String>>,
    /// Older Svix SDKs read the event-type filter under this name.
    filter_types: Option<Vec<String>>,
    channels: Option<Vec<String>>,
    metadata: Metadata,
    /// Always 1; kept because older SDKs require the field.
    version: u32,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<Endpoint> for EndpointOut {
    fn from(ep: Endpoint) -> Self {
        Self {
            id: ep.id.into_string(),
            uid: ep.uid,
            url: ep.url,
            description: ep.description,
            throttle_rate: ep.throttle_rate,
            rate_limit: ep.throttle_rate,
            disabled: ep.disabled,
            format: ep.format.as_str(),
            filter_types: ep.event_types.clone(),
            event_types: ep.event_types,
            channels: ep.channels,
            metadata: ep.metadata,
            version: 1,
            created_at: ep.created_at,
            updated_at: ep.updated_at,
        }
    }
}

fn check_url(v: &mut Validator, url: &str) {
    let result = match url::Url::parse(url) {
        Ok(u) if !matches!(u.scheme(), "http" | "https") => Err(format!(
            "URL scheme must be http or https, not {}",
            u.scheme()
        )),
        Ok(u) if u.host().is_none() => Err("URL must have a host".to_owned()),
        // The HTTP client would send them as an `Authorization` header, yet a URL is shown
        // back to every token that reads the endpoint (an app portal's too), logged with
        // its attempts and stored in clear: credentials go in `headers`, which are kept
        // encrypted and never shown.
        Ok(u) if !u.username().is_empty() || u.password().is_some() => Err(
            "URL must not hold credentials (user:password@): put them in the endpoint's headers (Authorization), which are kept encrypted and never shown back"
                .to_owned(),
        ),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("not a valid URL: {e}")),
    };
    v.check(&["body", "url"], result);
}

fn check_filters(
    v: &mut Validator,
    event_types: Option<&Vec<String>>,
    channels: Option<&Vec<String>>,
) {
    for name in event_types.into_iter().flatten() {
        v.check(&["body", "eventTypes"], validate::event_type_name(name));
    }
    if let Some(channels) = channels {
        if channels.len() > MAX_CHANNELS {
            v.check(
                &["body", "channels"],
                Err(format!("at most {MAX_CHANNELS} channels")),
            );
        }
        for channel in channels {
            v.check(&["body", "channels"], validate::channel(channel));
        }
    }
}

fn check_format(v: &mut Validator, format: Option<&str>) -> EndpointFormat {
    let Some(text) = format else {
        return EndpointFormat::default();
    };
    let parsed = EndpointFormat::parse(text);
    v.check(
        &["body", "format"],
        parsed.map(|_| ()).ok_or_else(|| {
            format!("unknown format {text:?}: use \"standard-webhooks\" or \"pusher\"")
        }),
    );
    parsed.unwrap_or_default()
}

fn check_headers(v: &mut Validator, headers: &BTreeMap<String, String>) {
    let mut seen = std::collections::HashSet::new();
    for (name, value) in headers {
        let result = if !seen.insert(name.to_ascii_lowercase()) {
            // Header names are case-insensitive: two spellings of one would both be sent.
            Err(format!("{name} is given twice (header names ignore case)"))
        } else if HeaderName::from_bytes(name.as_bytes()).is_err() {
            Err(format!("{name:?} is not a valid header name"))
        } else if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            Err(format!("{name} is set by Herald and cannot be overridden"))
        } else if HeaderValue::from_str(value).is_err() {
            Err(format!("the value of {name} is not a valid header value"))
        } else {
            Ok(())
        };
        v.check(&["body", "headers"], result);
    }
}

/// An empty filter list means "no filter", as a missing one does.
fn non_empty(list: Option<Vec<String>>) -> Option<Vec<String>> {
    list.filter(|l| !l.is_empty())
}

/// Checks the input; returns the format it asks for, if it names one.
fn validate_in(input: &EndpointIn) -> ApiResult<Option<EndpointFormat>> {
    let mut v = Validator::default();
    check_url(&mut v, &input.url);
    let format = check_format(&mut v, input.format.as_deref());
    if let Some(uid) = &input.uid {
        v.check(&["body", "uid"], validate::uid(uid));
    }
    check_filters(&mut v, input.event_types.as_ref(), input.channels.as_ref());
    if let Some(secret) = &input.secret {
        v.check(
            &["body", "secret"],
            EndpointSecret::parse(secret)
                .map(|_| ())
                .map_err(|e| e.to_string()),
        );
    }
    if let Some(headers) = &input.headers {
        check_headers(&mut v, headers);
    }
    v.finish()?;
    Ok(input.format.is_some().then_some(format))
}

fn new_endpoint(app: &App, input: EndpointIn) -> ApiResult<Endpoint> {
    let format = validate_in(&input)?.unwrap_or_default();
    let now = crate::now();
    let secret = match input.secret {
        Some(s) => s,
        None => EndpointSecret::generate().serialize(),
    };
    Ok(Endpoint {
        id: herald_core::EndpointId::new(now),
        app_id: app.id.clone(),
        uid: input.uid,
        url: input.url,
        description: input.description.unwrap_or_default(),
        throttle_rate: input.throttle_rate.or(input.rate_limit).map(i64::from),
        disabled: input.disabled.unwrap_or(false),
        format,
        event_types: non_empty(input.event_types),
        channels: non_empty(input.channels),
        metadata: input.metadata.unwrap_or_default(),
        headers: input.headers.unwrap_or_default(),
        secret,
        previous_secrets: Vec::new(),
        failing_since: None,
        created_at: now,
        updated_at: now,
    })
}

async fn find(
    state: &ApiState,
    caller: &Caller,
    app_id: &str,
    endpoint_id: &str,
) -> ApiResult<Endpoint> {
    let app = caller.app(state, app_id).await?;
    caller.endpoint(state, &app, endpoint_id).await
}

/// Refuses an endpoint beyond the app's [`ApiState::max_endpoints_per_app`]. Read from the
/// node's cache of the app's endpoints, so two creates at once may both pass at the limit.
async fn check_room_for_endpoint(state: &ApiState, app: &App) -> ApiResult<()> {
    let limit = state.max_endpoints_per_app;
    if limit > 0 && state.store.app_endpoints(&app.id).await?.len() >= limit {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "limit_reached",
            format!(
                "the app has {limit} endpoints, as many as one app may have (api.max_endpoints_per_app); delete one first"
            ),
        ));
    }
    Ok(())
}

/// A portal link may not make an endpoint of the `pusher` format, which receives the app's
/// channel webhooks signed with its Pusher secret ([`Caller::sees_endpoint`]).
fn check_format_allowed(caller: &Caller, format: Option<EndpointFormat>) -> ApiResult<()> {
    if caller.is_portal() && format == Some(EndpointFormat::Pusher) {
        return Err(ApiError::forbidden(
            "an app portal link cannot manage pusher-format endpoints: they receive the app's channel webhooks, signed with its Pusher secret, which are its backend's",
        ));
    }
    Ok(())
}

/// The app's endpoints, newest first unless `order=ascending` (Svix's default order).
#[utoipa::path(get, path = "/api/v1/app/{app_id}/endpoint", tag = "Endpoint",
    params(("app_id" = String, Path, description = "The app's id or uid"),
        ("order" = Option<String>, Query, description = "`ascending` for oldest first; newest first (`descending`) otherwise, as Svix's server"),
        crate::pagination::ListParams),
    responses((status = 200, body = ListResponse<EndpointOut>)))]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(app_id): Path<String>,
    query: QueryParams,
) -> ApiResult<Json<ListResponse<EndpointOut>>> {
    let app = caller.app(&state, &app_id).await?;
    let page = pagination::page(&query, pagination::descending(&query, true)?)?;
    let rows = state.store.list_endpoints(&app.id, &page).await?;
    // Paged over every endpoint, then thinned: a page a portal link reads may come out short
    // of `limit` but is never the end unless `done` says so.
    let mut list = pagination::list(rows, &page, |e| e.id.to_string(), |e| e);
    list.data.retain(|e| caller.sees_endpoint(e));
    Ok(Json(list.map(EndpointOut::from)))
}

/// Creates an endpoint; a signing secret is generated unless `secret` is given.
#[utoipa::path(post, path = "/api/v1/app/{app_id}/endpoint", tag = "Endpoint",
    params(("app_id" = String, Path, description = "The app's id or uid")), request_body = EndpointIn,
    responses((status = 201, body = EndpointOut)))]
pub async fn create(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(app_id): Path<String>,
    SvixJson(input): SvixJson<EndpointIn>,
) -> ApiResult<(StatusCode, Json<EndpointOut>)> {
    let app = caller.app(&state, &app_id).await?;
    let endpoint = new_endpoint(&app, input)?;
    check_format_allowed(&caller, Some(endpoint.format))?;
    check_room_for_endpoint(&state, &app).await?;
    state.store.create_endpoint(&endpoint).await?;
    Ok((StatusCode::CREATED, Json(endpoint.into())))
}

/// One endpoint.
#[utoipa::path(get, path = "/api/v1/app/{app_id}/endpoint/{endpoint_id}", tag = "Endpoint",
    params(("app_id" = String, Path, description = "The app's id or uid"),
        ("endpoint_id" = String, Path, description = "The endpoint's id or uid")),
    responses((status = 200, body = EndpointOut)))]
pub async fn get(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, endpoint_id)): Path<(String, String)>,
) -> ApiResult<Json<EndpointOut>> {
    Ok(Json(
        find(&state, &caller, &app_id, &endpoint_id).await?.into(),
    ))
}

/// Replaces the endpoint, or creates it with this uid. Left-out `headers` and `format` are kept.
#[utoipa::path(put, path = "/api/v1/app/{app_id}/endpoint/{endpoint_id}", tag = "Endpoint",
    params(("app_id" = String, Path, description = "The app's id or uid"),
        ("endpoint_id" = String, Path, description = "The endpoint's id or uid")), request_body = EndpointIn,
    responses((status = 200, body = EndpointOut),
        (status = 201, description = "Created with this uid", body = EndpointOut)))]
pub async fn upsert(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, endpoint_id)): Path<(String, String)>,
    SvixJson(input): SvixJson<EndpointIn>,
) -> ApiResult<(StatusCode, Json<EndpointOut>)> {
    let app = caller.app(&state, &app_id).await?;
    let Some(mut endpoint) = state.store.get_endpoint(&app.id, &endpoint_id).await? else {
        let input = EndpointIn {
            uid: input.uid.or(Some(endpoint_id)),
            ..input
        };
        let endpoint = new_endpoint(&app, input)?;
        check_format_allowed(&caller, Some(endpoint.format))?;
        check_room_for_endpoint(&state, &app).await?;
        state.store.create_endpoint(&endpoint).await?;
        return Ok((StatusCode::CREATED, Json(endpoint.into())));
    };
    // One the caller may not see (an app portal link and a pusher-format endpoint) is not there
    // for it, as on GET, PATCH and DELETE: a 403 here would tell it that it exists.
    if !caller.sees_endpoint(&endpoint) {
        return Err(ApiError::not_found("endpoint"));
    }
    check_format_allowed(&caller, Some(endpoint.format))?;
    let read_at = endpoint.updated_at;
    if let Some(format) = validate_in(&input)? {
        check_format_allowed(&caller, Some(format))?;
        endpoint.format = format;
    }
    // An existing endpoint's secret changes only through a rotation, which keeps the old one
    // signing for a grace period; a PUT that names another is refused rather than ignored. The
    // same secret (a PUT of the whole object as read) is accepted.
    if let Some(given) = &input.secret
        && EndpointSecret::parse(given).ok() != EndpointSecret::parse(&endpoint.secret).ok()
    {
        return Err(ApiError::invalid(
            &["body", "secret"],
            "an existing endpoint's secret changes through POST .../secret/rotate, which keeps the old secret signing for a grace period",
        ));
    }
    drop_credentials_on_origin_change(&endpoint.url, &input.url, &mut endpoint.headers);
    endpoint.url = input.url;
    endpoint.description = input.description.unwrap_or_default();
    endpoint.uid = input.uid;
    endpoint.throttle_rate = input.throttle_rate.or(input.rate_limit).map(i64::from);
    endpoint.disabled = input.disabled.unwrap_or(false);
    endpoint.event_types = non_empty(input.event_types);
    endpoint.channels = non_empty(input.channels);
    endpoint.metadata = input.metadata.unwrap_or_default();
    if let Some(headers) = input.headers {
        endpoint.headers = headers;
    }
    endpoint.updated_at = next_version(read_at);
    state.store.update_endpoint(&endpoint, read_at).await?;
    Ok((StatusCode::OK, Json(endpoint.into())))
}

/// Changes the fields given.
#[utoipa::path(patch, path = "/api/v1/app/{app_id}/endpoint/{endpoint_id}", tag = "Endpoint",
    params(("app_id" = String, Path, description = "The app's id or uid"),
        ("endpoint_id" = String, Path, description = "The endpoint's id or uid")), request_body = EndpointPatch,
    responses((status = 200, body = EndpointOut)))]
pub async fn patch(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, endpoint_id)): Path<(String, String)>,
    SvixJson(patch): SvixJson<EndpointPatch>,
) -> ApiResult<Json<EndpointOut>> {
    let mut endpoint = find(&state, &caller, &app_id, &endpoint_id).await?;
    let read_at = endpoint.updated_at;
    let mut v = Validator::default();
    if let Some(url) = &patch.url {
        check_url(&mut v, url);
    }
    if let Some(Some(uid)) = &patch.uid {
        v.check(&["body", "uid"], validate::uid(uid));
    }
    let format = patch
        .format
        .as_deref()
        .map(|f| check_format(&mut v, Some(f)));
    check_filters(
        &mut v,
        patch.event_types.as_ref().and_then(Option::as_ref),
        patch.channels.as_ref().and_then(Option::as_ref),
    );
    v.finish()?;
    check_format_allowed(&caller, format)?;
    if let Some(url) = patch.url {
        drop_credentials_on_origin_change(&endpoint.url, &url, &mut endpoint.headers);
        endpoint.url = url;
    }
    if let Some(format) = format {
        endpoint.format = format;
    }
    if let Some(description) = patch.description {
        endpoint.description = description;
    }
    if let Some(uid) = patch.uid {
        endpoint.uid = uid;
    }
    if let Some(rate) = patch.throttle_rate.or(patch.rate_limit) {
        endpoint.throttle_rate = rate.map(i64::from);
    }
    if let Some(disabled) = patch.disabled {
        if endpoint.disabled && !disabled {
            // Re-enabling starts a fresh failure streak (the store clears it too).
            endpoint.failing_since = None;
        }
        endpoint.disabled = disabled;
    }
    if let Some(types) = patch.event_types {
        endpoint.event_types = non_empty(types);
    }
    if let Some(channels) = patch.channels {
        endpoint.channels = non_empty(channels);
    }
    if let Some(metadata) = patch.metadata {
        endpoint.metadata = metadata;
    }
    endpoint.updated_at = next_version(read_at);
    state.store.update_endpoint(&endpoint, read_at).await?;
    Ok(Json(endpoint.into()))
}

/// Deletes the endpoint.
#[utoipa::path(delete, path = "/api/v1/app/{app_id}/endpoint/{endpoint_id}", tag = "Endpoint",
    params(("app_id" = String, Path, description = "The app's id or uid"),
        ("endpoint_id" = String, Path, description = "The endpoint's id or uid")),
    responses((status = 204, description = "Deleted")))]
pub async fn delete(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, endpoint_id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let endpoint = find(&state, &caller, &app_id, &endpoint_id).await?;
    state
        .store
        .delete_endpoint(&endpoint.app_id, &endpoint.id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The endpoint's signing secret (`whsec_...`).
#[derive(Serialize, utoipa::ToSchema)]
pub struct EndpointSecretOut {
    key: String,
}

/// The endpoint's current signing secret.
#[utoipa::path(get, path = "/api/v1/app/{app_id}/endpoint/{endpoint_id}/secret", tag = "Endpoint",
    params(("app_id" = String, Path, description = "The app's id or uid"),
        ("endpoint_id" = String, Path, description = "The endpoint's id or uid")),
    responses((status = 200, body = EndpointSecretOut)))]
pub async fn get_secret(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, endpoint_id)): Path<(String, String)>,
) -> ApiResult<Json<EndpointSecretOut>> {
    let endpoint = find(&state, &caller, &app_id, &endpoint_id).await?;
    Ok(Json(EndpointSecretOut {
        key: endpoint.secret,
    }))
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretRotateIn {
    /// The new secret (`whsec_...`); generated when absent.
    #[serde(default)]
    key: Option<String>,
    /// How long the old secret keeps signing too: 0 to 604800 seconds (a day when absent).
    #[serde(default)]
    grace_period_seconds: Option<i64>,
}

/// A new signing secret; the old one keeps signing too for the grace period.
#[utoipa::path(post, path = "/api/v1/app/{app_id}/endpoint/{endpoint_id}/secret/rotate", tag = "Endpoint",
    params(("app_id" = String, Path, description = "The app's id or uid"),
        ("endpoint_id" = String, Path, description = "The endpoint's id or uid")),
    request_body(content = Option<SecretRotateIn>, description = "Optional: a chosen secret and grace period"),
    responses((status = 200, description = "The new secret", body = EndpointSecretOut)))]
pub async fn rotate_secret(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, endpoint_id)): Path<(String, String)>,
    OptionalSvixJson(input): OptionalSvixJson<SecretRotateIn>,
) -> ApiResult<Response> {
    let grace = input.grace_period_seconds.unwrap_or(ROTATION_GRACE_SECS);
    if !(0..=MAX_ROTATION_GRACE_SECS).contains(&grace) {
        return Err(ApiError::invalid(
            &["body", "gracePeriodSeconds"],
            format!("must be between 0 and {MAX_ROTATION_GRACE_SECS}"),
        ));
    }
    let mut endpoint = find(&state, &caller, &app_id, &endpoint_id).await?;
    let read_at = endpoint.updated_at;
    let new_secret = match input.key {
        Some(key) => {
            EndpointSecret::parse(&key)
                .map_err(|e| ApiError::invalid(&["body", "key"], e.to_string()))?;
            key
        }
        None => EndpointSecret::generate().serialize(),
    };
    // Old secrets expire in the cluster's time, the time deliveries are signed at.
    let cluster_now = state.store.clock().now();
    let old = std::mem::replace(&mut endpoint.secret, new_secret);
    endpoint
        .previous_secrets
        .retain(|(_, expires)| *expires > cluster_now);
    // Every live secret signs every delivery: without a bound, repeated rotations would grow
    // the signature header past what receivers' servers accept.
    if grace > 0 && endpoint.previous_secrets.len() >= MAX_PREVIOUS_SECRETS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "limit_reached",
            format!(
                "the endpoint has {MAX_PREVIOUS_SECRETS} earlier secrets still signing; wait for one to expire, or rotate with gracePeriodSeconds 0"
            ),
        ));
    }
    if grace > 0 {
        endpoint
            .previous_secrets
            .push((old, cluster_now + Duration::seconds(grace)));
    }
    endpoint.updated_at = next_version(read_at);
    state.store.update_endpoint(&endpoint, read_at).await?;
    // The new secret is read again through `GET .../secret`, never from the idempotency table.
    Ok(SecretFields(&["/key"]).mark(Json(EndpointSecretOut {
        key: endpoint.secret,
    })))
}

/// Svix's shape: the headers' values, but for the sensitive ones, which are named only.
#[derive(Serialize, utoipa::ToSchema)]
pub struct EndpointHeadersOut {
    headers: BTreeMap<String, String>,
    sensitive: Vec<String>,
}

/// Svix's `EndpointHeadersIn` (PUT) and `EndpointHeadersPatchIn` (PATCH, which adds
/// `deleteHeaders`).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointHeadersIn {
    headers: BTreeMap<String, String>,
    #[serde(default)]
    delete_headers: Option<Vec<String>>,
}

/// The headers sent with each delivery to the endpoint.
#[utoipa::path(get, path = "/api/v1/app/{app_id}/endpoint/{endpoint_id}/headers", tag = "Endpoint",
    params(("app_id" = String, Path, description = "The app's id or uid"),
        ("endpoint_id" = String, Path, description = "The endpoint's id or uid")),
    responses((status = 200, body = EndpointHeadersOut)))]
pub async fn get_headers(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, endpoint_id)): Path<(String, String)>,
) -> ApiResult<Json<EndpointHeadersOut>> {
    let endpoint = find(&state, &caller, &app_id, &endpoint_id).await?;
    Ok(Json(EndpointHeadersOut::redacted(endpoint.headers)))
}

/// Headers that carry credentials: Svix's five, and the common API-key and cookie headers.
/// Their values are never read back (an app portal link's customer, or anyone holding an
/// app's token, would otherwise read the receiver's credentials), only their names, in
/// `sensitive`. They are sent, but only to the origin they were set for
/// ([`drop_credentials_on_origin_change`]).
const SENSITIVE_HEADERS: [&str; 8] = [
    "authorization",
    "proxy-authorization",
    "x-auth-token",
    "www-authenticate",
    "proxy-authenticate",
    "x-api-key",
    "api-key",
    "cookie",
];

pub(crate) fn is_sensitive(name: &str) -> bool {
    SENSITIVE_HEADERS
        .iter()
        .any(|sensitive| name.eq_ignore_ascii_case(sensitive))
}

/// A URL moved to another origin (scheme, host or port) loses the endpoint's credential
/// headers, as a browser drops `Authorization` on a cross-origin redirect: they were set for
/// the receiver at the old origin, and whoever may change the URL may not read them back, so
/// keeping them would hand them to whatever the new URL names. Both URLs were checked.
fn drop_credentials_on_origin_change(old: &str, new: &str, headers: &mut BTreeMap<String, String>) {
    let origin = |url: &str| url::Url::parse(url).map(|u| u.origin());
    if origin(old) != origin(new) {
        headers.retain(|name, _| !is_sensitive(name));
    }
}

impl EndpointHeadersOut {
    fn redacted(headers: BTreeMap<String, String>) -> Self {
        let (sensitive, headers): (BTreeMap<_, _>, BTreeMap<_, _>) = headers
            .into_iter()
            .partition(|(name, _)| is_sensitive(name));
        Self {
            headers,
            sensitive: sensitive.into_keys().collect(),
        }
    }
}

/// PUT replaces the endpoint's headers.
#[utoipa::path(put, path = "/api/v1/app/{app_id}/endpoint/{endpoint_id}/headers", tag = "Endpoint",
    params(("app_id" = String, Path, description = "The app's id or uid"),
        ("endpoint_id" = String, Path, description = "The endpoint's id or uid")), request_body = EndpointHeadersIn,
    responses((status = 204, description = "Replaced")))]
pub async fn set_headers(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, endpoint_id)): Path<(String, String)>,
    SvixJson(input): SvixJson<EndpointHeadersIn>,
) -> ApiResult<StatusCode> {
    let endpoint = find(&state, &caller, &app_id, &endpoint_id).await?;
    change_headers(&state, endpoint, input, true).await
}

/// PATCH adds or overwrites the given headers and removes `deleteHeaders`.
#[utoipa::path(patch, path = "/api/v1/app/{app_id}/endpoint/{endpoint_id}/headers", tag = "Endpoint",
    params(("app_id" = String, Path, description = "The app's id or uid"),
        ("endpoint_id" = String, Path, description = "The endpoint's id or uid")), request_body = EndpointHeadersIn,
    responses((status = 204, description = "Updated")))]
pub async fn patch_headers(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, endpoint_id)): Path<(String, String)>,
    SvixJson(input): SvixJson<EndpointHeadersIn>,
) -> ApiResult<StatusCode> {
    let endpoint = find(&state, &caller, &app_id, &endpoint_id).await?;
    change_headers(&state, endpoint, input, false).await
}

async fn change_headers(
    state: &ApiState,
    mut endpoint: Endpoint,
    input: EndpointHeadersIn,
    replace: bool,
) -> ApiResult<StatusCode> {
    let read_at = endpoint.updated_at;
    let mut v = Validator::default();
    check_headers(&mut v, &input.headers);
    v.finish()?;
    if replace {
        endpoint.headers.clear();
    }
    // Header names ignore case: a delete, or a new value, replaces the header however it was
    // spelt when stored.
    for name in input
        .delete_headers
        .unwrap_or_default()
        .iter()
        .chain(input.headers.keys())
    {
        endpoint
            .headers
            .retain(|stored, _| !stored.eq_ignore_ascii_case(name));
    }
    endpoint.headers.extend(input.headers);
    endpoint.updated_at = next_version(read_at);
    state.store.update_endpoint(&endpoint, read_at).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Which messages to recover: those created in `[since, until)`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecoverIn {
    since: DateTime<Utc>,
    #[serde(default)]
    until: Option<DateTime<Utc>>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecoverOut {
    id: String,
    /// Always `finished`: the failed deliveries are queued when the call returns.
    #[schema(value_type = String, example = "finished")]
    status: &'static str,
    #[schema(value_type = String, example = "endpoint.recover")]
    task: &'static str,
    updated_at: DateTime<Utc>,
}

/// Re-queues every failed delivery to the endpoint of messages created in `[since, until)`.
/// The queueing is one statement, so the task is already finished when the call returns.
#[utoipa::path(post, path = "/api/v1/app/{app_id}/endpoint/{endpoint_id}/recover", tag = "Endpoint",
    params(("app_id" = String, Path, description = "The app's id or uid"),
        ("endpoint_id" = String, Path, description = "The endpoint's id or uid")), request_body = RecoverIn,
    responses((status = 202, description = "The failed deliveries are queued again", body = RecoverOut)))]
pub async fn recover(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, endpoint_id)): Path<(String, String)>,
    SvixJson(input): SvixJson<RecoverIn>,
) -> ApiResult<(StatusCode, Json<RecoverOut>)> {
    let endpoint = find(&state, &caller, &app_id, &endpoint_id).await?;
    if endpoint.disabled {
        // What it queued would be failed again by the next claim, the task saying `finished`.
        return Err(ApiError::bad_request(
            "endpoint_disabled",
            "the endpoint is disabled; enable it before recovering",
        ));
    }
    // Message ids carry their node's creation time: the window is read on this node's clock;
    // the requeued deliveries fall due on the cluster's (the store's clock, as claims read).
    let now = crate::now();
    let until = input.until.unwrap_or(now + Duration::seconds(1));
    if until <= input.since {
        return Err(ApiError::invalid(
            &["body", "until"],
            "until must be after since",
        ));
    }
    let queued = state
        .store
        .enqueue_failed(&endpoint.id, input.since, until, state.store.clock().now())
        .await?;
    tracing::info!(endpoint_id = %endpoint.id, queued, "recovering failed messages");
    state.dispatcher.wake();
    Ok((
        StatusCode::ACCEPTED,
        Json(RecoverOut {
            id: herald_core::TaskId::new(now).into_string(),
            status: "finished",
            task: "endpoint.recover",
            updated_at: now,
        }),
    ))
}

/// How many of the endpoint's deliveries are in each state.
#[derive(Serialize, utoipa::ToSchema)]
pub struct EndpointStatsOut {
    success: i64,
    pending: i64,
    sending: i64,
    fail: i64,
    /// Always 0: Herald does not cancel deliveries.
    canceled: i64,
}

/// Counts of the endpoint's deliveries by state: every one, or those of the messages created
/// within `since` and `until`.
#[utoipa::path(get, path = "/api/v1/app/{app_id}/endpoint/{endpoint_id}/stats", tag = "Endpoint",
    params(("app_id" = String, Path, description = "The app's id or uid"),
        ("endpoint_id" = String, Path, description = "The endpoint's id or uid"),
        ("since" = Option<DateTime<Utc>>, Query, description = "Only deliveries of messages created at or after this time (RFC 3339)"),
        ("until" = Option<DateTime<Utc>>, Query, description = "Only deliveries of messages created before this time (RFC 3339)")),
    responses((status = 200, body = EndpointStatsOut)))]
pub async fn stats(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, endpoint_id)): Path<(String, String)>,
    query: QueryParams,
) -> ApiResult<Json<EndpointStatsOut>> {
    let window = herald_store::StatsWindow {
        since: query.time("since")?,
        until: query.time("until")?,
    };
    if let (Some(since), Some(until)) = (window.since, window.until)
        && since > until
    {
        return Err(ApiError::bad_request(
            "invalid_range",
            "'since' must not be after 'until'",
        ));
    }
    let endpoint = find(&state, &caller, &app_id, &endpoint_id).await?;
    let stats = state.store.endpoint_stats(&endpoint.id, &window).await?;
    Ok(Json(EndpointStatsOut {
        success: stats.success,
        pending: stats.pending,
        sending: stats.sending,
        fail: stats.fail,
        canceled: 0,
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventExampleIn {
    /// The event type whose example to send: an example of its schema (`schemas["1"]
    /// .examples`), or `svix.ping` for `{"success": true}`.
    event_type: String,
    /// Which of the schema's examples, from 0 (the first, when left out).
    #[serde(default)]
    example_index: Option<usize>,
}

/// The event type Svix's "send example" sends without a schema: a ping.
const PING_EVENT_TYPE: &str = "svix.ping";

/// Svix's `endpoint.sendExample`: a message with the event type's example payload, sent to
/// this endpoint only (if its filters want the type), to test it. The message is stored and
/// logged as any other; the answer is it without its payload, as Svix's.
#[utoipa::path(post, path = "/api/v1/app/{app_id}/endpoint/{endpoint_id}/send-example", tag = "Endpoint",
    params(("app_id" = String, Path, description = "The app's id or uid"),
        ("endpoint_id" = String, Path, description = "The endpoint's id or uid")),
    request_body = EventExampleIn,
    responses((status = 200, body = crate::v1::message::MessageOut)))]
pub async fn send_example(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path((app_id, endpoint_id)): Path<(String, String)>,
    SvixJson(input): SvixJson<EventExampleIn>,
) -> ApiResult<Response> {
    let app = caller.app(&state, &app_id).await?;
    let endpoint = caller.endpoint(&state, &app, &endpoint_id).await?;
    let payload = if input.event_type == PING_EVENT_TYPE {
        r#"{"success":true}"#.to_owned()
    } else {
        let event_type = match state.store.get_event_type(&input.event_type).await? {
            Some(found)
                if !found.archived && caller.hidden_event_type() != Some(found.name.as_str()) =>
            {
                found
            }
            _ => return Err(ApiError::not_found("event type")),
        };
        let index = input.example_index.unwrap_or(0);
        example_payload(event_type.schemas.as_deref(), index).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_scheme",
                format!(
                    "Unable to generate example message from event-type schema: {} has no JSON object at schemas[\"1\"].examples[{index}]",
                    event_type.name
                ),
            )
        })?
    };
    if let Err(limited) = state.publish_limits.check_app(app.id.as_str(), 1) {
        return Ok(limited.into_response());
    }
    let now = crate::now();
    let message = herald_core::model::Message {
        id: herald_core::MessageId::new(now),
        app_id: app.id.clone(),
        event_id: None,
        event_type: input.event_type,
        channels: None,
        tags: None,
        payload: bytes::Bytes::from(payload),
        created_at: now,
        payload_expires_at: None,
    };
    state
        .publisher
        .publish(
            &app,
            herald_channels::Publish::example(message.clone(), endpoint.id),
        )
        .await?;
    Ok(Json(crate::v1::message::MessageOut::new(message, false)).into_response())
}

/// Example `index` of an event type's version-1 schema, as JSON text, if it is an object
/// (Herald's payloads are JSON objects).
fn example_payload(schemas: Option<&str>, index: usize) -> Option<String> {
    let schemas: serde_json::Value = serde_json::from_str(schemas?).ok()?;
    let example = schemas.get("1")?.get("examples")?.get(index)?;
    example.is_object().then(|| example.to_string())
}

/// This module's part of `/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    list,
    create,
    get,
    upsert,
    patch,
    delete,
    send_example,
    get_secret,
    rotate_secret,
    get_headers,
    set_headers,
    patch_headers,
    recover,
    stats
))]
pub(crate) struct Docs;

#[cfg(test)]
mod tests {
    use super::*;

    /// A change always moves the row past the version it read, even when that version is in
    /// this node's future (a lagging clock, or the same millisecond), so the compare-and-set
    /// that follows it refuses whatever read the same version.
    #[test]
    fn a_change_moves_the_row_past_the_version_it_read() {
        let ahead = crate::now() + Duration::seconds(5);
        assert_eq!(next_version(ahead), ahead + Duration::milliseconds(1));
        let behind = crate::now() - Duration::hours(1);
        let next = next_version(behind);
        assert!(
            next > behind + Duration::minutes(59),
            "{next} after {behind}"
        );
    }
}
