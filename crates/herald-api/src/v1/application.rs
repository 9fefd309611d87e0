//! `/api/v1/app`: applications, the tenants that own endpoints and messages.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
    response::Response,
};
use chrono::{DateTime, Utc};
use herald_core::{
    history::{self, HistoryRule},
    model::{App, Metadata, PusherCredentials},
    socketio, validate,
};
use serde::{Deserialize, Serialize};

use crate::{
    ApiState,
    auth::Caller,
    error::{ApiError, ApiResult, Validator},
    extract::{QueryParams, SvixJson},
    idempotency::SecretFields,
    pagination::{self, ListResponse},
};

/// This module's part of `/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(list, create, get, upsert, patch, delete, rotate_pusher_secret))]
pub(crate) struct Docs;

/// Svix's `ApplicationIn` plus `history`; any other field is a 422 naming it.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApplicationIn {
    pub name: String,
    #[serde(default)]
    pub uid: Option<String>,
    #[serde(default)]
    pub throttle_rate: Option<u16>,
    #[serde(default)]
    pub metadata: Option<Metadata>,
    /// Svix's deprecated name for `throttleRate` (older SDKs know only this one); as Svix,
    /// `throttleRate` wins when both are given.
    #[serde(default)]
    #[schema(deprecated)]
    pub rate_limit: Option<u16>,
    /// Herald's extension: which channels keep history (`None`: the server's defaults). An
    /// update that leaves it out keeps it, as Svix SDKs do not know the field.
    #[serde(default)]
    pub history: Option<Vec<super::wire::HistoryRuleWire>>,
    /// Herald's extension: how Socket.IO clients may use the app (see the README). Kept by an
    /// update that leaves it out, like `history`.
    #[serde(default)]
    pub socketio: Option<super::wire::SocketIoWire>,
    /// Herald's extension: `{"payloadDays": n}`, how long the app's message payloads are kept
    /// (see the README's "Retention"). Kept by an update that leaves it out, like `history`.
    #[serde(default)]
    pub retention: Option<super::wire::RetentionWire>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApplicationPatch {
    #[serde(default)]
    name: Option<String>,
    #[serde(default, deserialize_with = "super::double_option")]
    uid: Option<Option<String>>,
    #[serde(default, deserialize_with = "super::double_option")]
    throttle_rate: Option<Option<u16>>,
    /// Svix's deprecated name for `throttleRate`; `throttleRate` wins when both are given.
    #[serde(default, deserialize_with = "super::double_option")]
    #[schema(deprecated)]
    rate_limit: Option<Option<u16>>,
    #[serde(default)]
    metadata: Option<Metadata>,
    #[serde(default, deserialize_with = "super::double_option")]
    history: Option<Option<Vec<super::wire::HistoryRuleWire>>>,
    #[serde(default, deserialize_with = "super::double_option")]
    socketio: Option<Option<super::wire::SocketIoWire>>,
    #[serde(default, deserialize_with = "super::double_option")]
    retention: Option<Option<super::wire::RetentionWire>>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApplicationOut {
    id: String,
    uid: Option<String>,
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    throttle_rate: Option<i64>,
    /// The same as `throttleRate`, under the name older Svix SDKs read.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(deprecated)]
    rate_limit: Option<i64>,
    metadata: Metadata,
    /// Credentials for Pusher-protocol clients and server SDKs (ignored by the Svix SDKs).
    pusher: PusherOut,
    #[serde(skip_serializing_if = "Option::is_none")]
    history: Option<Vec<super::wire::HistoryRuleWire>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    socketio: Option<super::wire::SocketIoWire>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retention: Option<super::wire::RetentionWire>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
struct PusherOut {
    /// A string, as the Pusher SDKs take it.
    app_id: String,
    key: String,
    /// Left out of an Idempotency-Key replay of the create's answer, and of what an app portal
    /// link's token reads (the app's customers must not sign as its backend).
    #[schema(required = false)]
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    /// Until when the secret the last rotation replaced is still accepted, if it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    previous_secret_valid_until: Option<DateTime<Utc>>,
}

impl ApplicationOut {
    /// The app as `scope` may read it: an app portal link's token gets no Pusher secret.
    fn shown_to(app: App, scope: &herald_store::TokenScope) -> Self {
        let mut out = Self::from(app);
        if matches!(scope, herald_store::TokenScope::Portal(_)) {
            out.pusher.secret = None;
        }
        out
    }
}

impl From<App> for ApplicationOut {
    fn from(app: App) -> Self {
        Self {
            id: app.id.into_string(),
            uid: app.uid,
            name: app.name,
            throttle_rate: app.throttle_rate,
            rate_limit: app.throttle_rate,
            metadata: app.metadata,
            pusher: PusherOut {
                app_id: app.pusher.app_id.to_string(),
                previous_secret_valid_until: app
                    .pusher
                    .previous
                    .as_ref()
                    .map(|retired| retired.until)
                    .filter(|until| *until > Utc::now()),
                key: app.pusher.key,
                secret: Some(app.pusher.secret),
            },
            history: app.history.map(super::wire::history_out),
            socketio: app.socketio.map(Into::into),
            retention: super::wire::RetentionWire::from_days(app.payload_retention_days),
            created_at: app.created_at,
            updated_at: app.updated_at,
        }
    }
}

fn validate_in(input: &ApplicationIn) -> ApiResult<()> {
    let mut v = Validator::default();
    v.check(
        &["body", "name"],
        if input.name.trim().is_empty() {
            Err("name must not be empty")
        } else {
            Ok(())
        },
    );
    if let Some(uid) = &input.uid {
        v.check(&["body", "uid"], validate::uid(uid));
    }
    check_history(&mut v, input.history.as_deref());
    check_socketio(&mut v, input.socketio.as_ref());
    if let Some(days) = input.retention.as_ref().and_then(|r| r.payload_days) {
        v.check(
            &["body", "retention", "payloadDays"],
            if (1..=super::wire::MAX_RETENTION_DAYS).contains(&days) {
                Ok(())
            } else {
                Err(format!(
                    "payloadDays must be 1 to {}, or null for the server's default",
                    super::wire::MAX_RETENTION_DAYS
                ))
            },
        );
    }
    v.finish()
}

fn check_socketio(v: &mut Validator, settings: Option<&super::wire::SocketIoWire>) {
    let Some(settings) = settings else { return };
    if let Err((field, message)) = socketio::validate_settings(&settings.clone().into()) {
        v.check(&["body", "socketio", field.as_str()], Err(message));
    }
}

fn check_history(v: &mut Validator, rules: Option<&[super::wire::HistoryRuleWire]>) {
    let Some(rules) = rules else { return };
    if rules.len() > 20 {
        v.check(&["body", "history"], Err("at most 20 history rules"));
    }
    for rule in rules {
        v.check(
            &["body", "history"],
            history::validate_rule(&HistoryRule::from(rule)),
        );
    }
}

/// Creates the app described by `input`; shared with message creation's `application` field.
pub(crate) async fn create_app(state: &ApiState, input: ApplicationIn) -> ApiResult<App> {
    validate_in(&input)?;
    let now = crate::now();
    let mut app = App {
        id: herald_core::AppId::new(now),
        uid: input.uid,
        name: input.name,
        throttle_rate: input.throttle_rate.or(input.rate_limit).map(i64::from),
        metadata: input.metadata.unwrap_or_default(),
        pusher: PusherCredentials::generate(),
        history: input.history.map(super::wire::history_in),
        socketio: input.socketio.map(Into::into),
        payload_retention_days: input.retention.as_ref().and_then(|r| r.payload_days()),
        created_at: now,
        updated_at: now,
    };
    // A random Pusher app id can collide with an existing one (1 in 9 million per app); try a
    // few fresh ones before reporting the conflict, which then is about the uid.
    for _ in 0..3 {
        match state.store.create_app(&app).await {
            Err(herald_store::StoreError::Conflict(_))
                if app.uid.is_none()
                    || state
                        .store
                        .get_app(app.uid.as_deref().unwrap_or_default())
                        .await?
                        .is_none() =>
            {
                app.pusher = PusherCredentials::generate();
            }
            other => {
                other?;
                return Ok(saved(state, app));
            }
        }
    }
    state.store.create_app(&app).await?;
    Ok(saved(state, app))
}

/// An app the store now has, told to whoever listens ([`ApiState::app_listener`]).
fn saved(state: &ApiState, app: App) -> App {
    if let Some(listener) = &state.app_listener {
        listener.saved(&app);
    }
    app
}

/// The apps the token may see (an app's token: its own).
#[utoipa::path(get, path = "/api/v1/app", tag = "Application", params(crate::pagination::ListParams,
        ("order" = Option<String>, Query, description = "`ascending` (the default) or `descending`")),
    responses((status = 200, body = ListResponse<ApplicationOut>)))]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    query: QueryParams,
) -> ApiResult<Json<ListResponse<ApplicationOut>>> {
    let page = pagination::page(&query, pagination::descending(&query, false)?)?;
    let apps = match caller.scope.app() {
        None => state.store.list_apps(&page).await?,
        Some(id) => state.store.get_app(id).await?.into_iter().collect(),
    };
    Ok(Json(pagination::list(
        apps,
        &page,
        |a| a.id.to_string(),
        |app| ApplicationOut::shown_to(app, &caller.scope),
    )))
}

/// Creates an app; `get_if_exists=true` returns the one with the same uid instead.
#[utoipa::path(post, path = "/api/v1/app", tag = "Application", request_body = ApplicationIn,
    params(("get_if_exists" = Option<bool>, Query, description = "Return the app with this uid if it exists")),
    responses((status = 201, body = ApplicationOut), (status = 200, description = "It existed (get_if_exists)", body = ApplicationOut)))]
pub async fn create(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    query: QueryParams,
    SvixJson(input): SvixJson<ApplicationIn>,
) -> ApiResult<Response> {
    caller.require_environment()?;
    // Before the lookup: a uid that is not one (an app's id, say) must not find that app.
    validate_in(&input)?;
    if query.bool("get_if_exists", false)?
        && let Some(uid) = &input.uid
        && let Some(existing) = caller_visible(&state, &caller, uid).await?
    {
        return Ok(KEPT_WITHOUT_SECRET.mark((StatusCode::OK, Json(ApplicationOut::from(existing)))));
    }
    let app = create_app(&state, input).await?;
    Ok(KEPT_WITHOUT_SECRET.mark((StatusCode::CREATED, Json(ApplicationOut::from(app)))))
}

/// A create's answer as kept for an Idempotency-Key replay: without the Pusher secret (read it
/// again with `GET /api/v1/app/{app}`).
const KEPT_WITHOUT_SECRET: SecretFields = SecretFields(&["/pusher/secret"]);

/// The app with this id or uid if it exists and the caller may see it.
async fn caller_visible(state: &ApiState, caller: &Caller, uid: &str) -> ApiResult<Option<App>> {
    match caller.app(state, uid).await {
        Ok(app) => Ok(Some(app)),
        Err(ApiError::Standard {
            status: StatusCode::NOT_FOUND,
            ..
        }) => Ok(None),
        Err(e) => Err(e),
    }
}

#[utoipa::path(get, path = "/api/v1/app/{app_id}", tag = "Application", params(("app_id" = String, Path, description = "The app's id or uid")),
    responses((status = 200, body = ApplicationOut)))]
pub async fn get(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(app_id): Path<String>,
) -> ApiResult<Json<ApplicationOut>> {
    let app = caller.app(&state, &app_id).await?;
    Ok(Json(ApplicationOut::shown_to(app, &caller.scope)))
}

/// Updates the app, or creates it with this uid.
#[utoipa::path(put, path = "/api/v1/app/{app_id}", tag = "Application", params(("app_id" = String, Path, description = "The app's id or uid")), request_body = ApplicationIn,
    responses((status = 200, body = ApplicationOut), (status = 201, description = "Created with this uid", body = ApplicationOut)))]
pub async fn upsert(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(app_id): Path<String>,
    SvixJson(input): SvixJson<ApplicationIn>,
) -> ApiResult<(StatusCode, Json<ApplicationOut>)> {
    match caller.app(&state, &app_id).await {
        Ok(mut app) => {
            validate_in(&input)?;
            app.name = input.name;
            app.uid = input.uid;
            app.throttle_rate = input.throttle_rate.or(input.rate_limit).map(i64::from);
            app.metadata = input.metadata.unwrap_or_default();
            if input.history.is_some() {
                app.history = input.history.map(super::wire::history_in);
            }
            if input.socketio.is_some() {
                app.socketio = input.socketio.map(Into::into);
            }
            if let Some(retention) = &input.retention {
                app.payload_retention_days = retention.payload_days();
            }
            let read_at = app.updated_at;
            app.updated_at = super::next_version(read_at);
            state.store.update_app(&app, read_at).await?;
            Ok((StatusCode::OK, Json(saved(&state, app).into())))
        }
        Err(ApiError::Standard {
            status: StatusCode::NOT_FOUND,
            ..
        }) => {
            caller.require_environment()?;
            let input = ApplicationIn {
                uid: input.uid.or(Some(app_id)),
                ..input
            };
            let app = create_app(&state, input).await?;
            Ok((StatusCode::CREATED, Json(app.into())))
        }
        Err(e) => Err(e),
    }
}

#[utoipa::path(patch, path = "/api/v1/app/{app_id}", tag = "Application", params(("app_id" = String, Path, description = "The app's id or uid")), request_body = ApplicationPatch,
    responses((status = 200, body = ApplicationOut)))]
pub async fn patch(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(app_id): Path<String>,
    SvixJson(patch): SvixJson<ApplicationPatch>,
) -> ApiResult<Json<ApplicationOut>> {
    let mut app = caller.app(&state, &app_id).await?;
    let read_at = app.updated_at;
    if let Some(name) = patch.name {
        app.name = name;
    }
    if let Some(uid) = patch.uid {
        app.uid = uid;
    }
    if let Some(rate) = patch.throttle_rate.or(patch.rate_limit) {
        app.throttle_rate = rate.map(i64::from);
    }
    if let Some(metadata) = patch.metadata {
        app.metadata = metadata;
    }
    if let Some(history) = patch.history {
        app.history = history.map(super::wire::history_in);
    }
    if let Some(socketio) = patch.socketio {
        app.socketio = socketio.map(Into::into);
    }
    let retention = match patch.retention {
        Some(retention) => retention,
        None => super::wire::RetentionWire::from_days(app.payload_retention_days),
    };
    validate_in(&ApplicationIn {
        name: app.name.clone(),
        uid: app.uid.clone(),
        throttle_rate: None,
        metadata: None,
        rate_limit: None,
        history: app.history.clone().map(super::wire::history_out),
        socketio: app.socketio.clone().map(Into::into),
        retention: retention.clone(),
    })?;
    app.payload_retention_days = retention.and_then(|r| r.payload_days());
    app.updated_at = super::next_version(read_at);
    state.store.update_app(&app, read_at).await?;
    Ok(Json(saved(&state, app).into()))
}

/// Deletes the app with everything it owns; its connections close.
#[utoipa::path(delete, path = "/api/v1/app/{app_id}", tag = "Application", params(("app_id" = String, Path, description = "The app's id or uid")),
    responses((status = 204, description = "Deleted")))]
pub async fn delete(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(app_id): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require_environment()?;
    let app = caller.app(&state, &app_id).await?;
    state.store.delete_app(&app.id).await?;
    // After the store: a connection that arrives later finds no app (4001) or a closed hub,
    // on every node.
    state.publisher.remove_app(&app.id).await;
    if let Some(listener) = &state.app_listener {
        listener.deleted(&app);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// How long a rotated-out Pusher secret keeps verifying by default, so backends that sign
/// HTTP API requests, channel auths and SSE tokens can switch without refusals;
/// `gracePeriodSeconds` may choose up to a week.
const PUSHER_ROTATION_GRACE_SECS: i64 = 24 * 3600;
const MAX_PUSHER_ROTATION_GRACE_SECS: i64 = 7 * 24 * 3600;

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PusherSecretRotateIn {
    /// The new secret; generated when absent.
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    grace_period_seconds: Option<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PusherSecretOut {
    secret: String,
    previous_secret_valid_until: Option<DateTime<Utc>>,
}

/// `POST /api/v1/app/{app_id}/pusher/secret/rotate`: a new Pusher secret. Herald signs with it
/// at once (channel webhooks); the old one keeps verifying for the grace period.
#[utoipa::path(post, path = "/api/v1/app/{app_id}/pusher/secret/rotate", tag = "Application", params(("app_id" = String, Path, description = "The app's id or uid")),
    request_body(content = Option<PusherSecretRotateIn>, description = "Optional: a chosen secret and grace period"),
    responses((status = 200, body = PusherSecretOut)))]
pub async fn rotate_pusher_secret(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(app_id): Path<String>,
    crate::extract::OptionalSvixJson(input): crate::extract::OptionalSvixJson<PusherSecretRotateIn>,
) -> ApiResult<Response> {
    let grace = input
        .grace_period_seconds
        .unwrap_or(PUSHER_ROTATION_GRACE_SECS);
    if !(0..=MAX_PUSHER_ROTATION_GRACE_SECS).contains(&grace) {
        return Err(ApiError::invalid(
            &["body", "gracePeriodSeconds"],
            format!("must be between 0 and {MAX_PUSHER_ROTATION_GRACE_SECS}"),
        ));
    }
    if let Some(secret) = &input.secret
        && !(16..=128).contains(&secret.len())
    {
        return Err(ApiError::invalid(
            &["body", "secret"],
            "must be 16 to 128 characters".to_owned(),
        ));
    }
    let app = caller.app(&state, &app_id).await?;
    let secret = input
        .secret
        .unwrap_or_else(PusherCredentials::generate_secret);
    let previous_until = (grace > 0).then(|| crate::now() + chrono::Duration::seconds(grace));
    // The store retires the secret stored when it writes, not the one in `app` (read through
    // the node cache, perhaps before another rotation).
    let credentials = state
        .store
        .rotate_pusher_secret(&app.id, &secret, previous_until)
        .await?;
    // A replay (Idempotency-Key) says when the old secret stops, not the new one.
    Ok(SecretFields(&["/secret"]).mark(Json(PusherSecretOut {
        previous_secret_valid_until: credentials.previous.map(|retired| retired.until),
        secret: credentials.secret,
    })))
}
