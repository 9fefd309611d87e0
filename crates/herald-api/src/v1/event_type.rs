//! `/api/v1/event-type`: the catalogue of event types, environment-wide as in Svix.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
};
use chrono::{DateTime, Utc};
use herald_core::{model::EventType, validate};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{
    ApiState,
    auth::Caller,
    error::{ApiError, ApiResult, Validator},
    extract::{QueryParams, SvixJson},
    pagination::{self, ListResponse},
};

/// Svix's `EventTypeIn`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventTypeIn {
    name: String,
    description: String,
    #[serde(default)]
    archived: Option<bool>,
    #[serde(default)]
    deprecated: Option<bool>,
    /// The payload's JSON Schemas (Svix keys them by version: `{"1": {...}}`): an object, or
    /// `null`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    schemas: Option<Box<RawValue>>,
    #[serde(default)]
    group_name: Option<String>,
    #[serde(default)]
    feature_flags: Option<Vec<String>>,
}

/// Svix's `EventTypeUpdate`: the name is the path's.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventTypeUpdate {
    description: String,
    #[serde(default)]
    archived: Option<bool>,
    #[serde(default)]
    deprecated: Option<bool>,
    /// The payload's JSON Schemas (Svix keys them by version: `{"1": {...}}`): an object, or
    /// `null`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    schemas: Option<Box<RawValue>>,
    #[serde(default)]
    group_name: Option<String>,
    #[serde(default)]
    feature_flags: Option<Vec<String>>,
}

/// Svix's `EventTypePatch`: only the fields given change. `null` clears `schemas`, `groupName`
/// and `featureFlags`; on the other fields it changes nothing.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventTypePatch {
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    archived: Option<bool>,
    #[serde(default)]
    deprecated: Option<bool>,
    /// The payload's JSON Schemas: an object, or `null` to remove them.
    #[serde(default, deserialize_with = "super::double_option")]
    #[schema(value_type = Option<Object>)]
    schemas: Option<Option<Box<RawValue>>>,
    #[serde(default, deserialize_with = "super::double_option")]
    group_name: Option<Option<String>>,
    #[serde(default, deserialize_with = "super::double_option")]
    feature_flags: Option<Option<Vec<String>>>,
    /// Svix's deprecated single `featureFlag`; accepted and ignored (see the README).
    #[serde(default, rename = "featureFlag")]
    #[schema(deprecated)]
    _feature_flag: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventTypeOut {
    name: String,
    description: String,
    archived: bool,
    deprecated: bool,
    /// The payload's JSON Schemas, as given.
    #[schema(value_type = Option<Object>)]
    schemas: Option<Box<RawValue>>,
    group_name: Option<String>,
    feature_flags: Option<Vec<String>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<EventType> for EventTypeOut {
    fn from(et: EventType) -> Self {
        Self {
            schemas: et.schemas.and_then(|s| RawValue::from_string(s).ok()),
            name: et.name,
            description: et.description,
            archived: et.archived,
            deprecated: et.deprecated,
            group_name: et.group_name,
            feature_flags: et.feature_flags,
            created_at: et.created_at,
            updated_at: et.updated_at,
        }
    }
}

fn schemas_text(schemas: Option<Box<RawValue>>) -> ApiResult<Option<String>> {
    match schemas {
        Some(raw) if raw.get().trim_start().starts_with('{') => Ok(Some(raw.get().to_owned())),
        Some(raw) if raw.get() == "null" => Ok(None),
        Some(_) => Err(ApiError::invalid(
            &["body", "schemas"],
            "schemas must be an object",
        )),
        None => Ok(None),
    }
}

async fn find(state: &ApiState, name: &str) -> ApiResult<EventType> {
    state
        .store
        .get_event_type(name)
        .await?
        .ok_or_else(|| ApiError::not_found("event type"))
}

/// The catalogue, in name order (`order=descending`: the other way). `with_content=false` leaves each type's `schemas` out (shown
/// as `null`, as Svix's server shows them); unlike Svix's, which leaves them out unless asked,
/// Herald shows them unless asked not to, so a caller that never sends it loses nothing.
#[utoipa::path(get, path = "/api/v1/event-type", tag = "Event Type",
    params(("include_archived" = Option<bool>, Query, description = "Include archived event types (default false)"),
        ("with_content" = Option<bool>, Query, description = "Include each type's schemas (default true); false shows `schemas: null`"),
        ("order" = Option<String>, Query, description = "`ascending` (the default) or `descending`, by name"),
        crate::pagination::ListParams),
    responses((status = 200, body = ListResponse<EventTypeOut>)))]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    _caller: Caller,
    query: QueryParams,
) -> ApiResult<Json<ListResponse<EventTypeOut>>> {
    let mut page = pagination::page(&query, pagination::descending(&query, false)?)?;
    let include_archived = query.bool("include_archived", false)?;
    let with_content = query.bool("with_content", true)?;
    // Iterators are marked names: an event type may begin with `-`, which a bare iterator
    // would read as a walk back.
    page.iterator = pagination::resumed_name(&page)?.map(str::to_owned);
    let rows = state
        .store
        .list_event_types(&page, include_archived)
        .await?;
    Ok(Json(pagination::list(
        rows,
        &page,
        |e| pagination::name_cursor(&e.name),
        |e| {
            let mut shown = EventTypeOut::from(e);
            if !with_content {
                shown.schemas = None;
            }
            shown
        },
    )))
}

/// Adds an event type to the catalogue. A name archived before is brought back with the new
/// fields (201), as Svix's server does; a name in the catalogue is a 409 `event_type_exists`.
#[utoipa::path(post, path = "/api/v1/event-type", tag = "Event Type", request_body = EventTypeIn,
    responses((status = 201, body = EventTypeOut)))]
pub async fn create(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    SvixJson(input): SvixJson<EventTypeIn>,
) -> ApiResult<(StatusCode, Json<EventTypeOut>)> {
    caller.require_environment()?;
    let mut v = Validator::default();
    v.check(&["body", "name"], validate::event_type_name(&input.name));
    v.finish()?;
    let now = crate::now();
    let et = EventType {
        name: input.name,
        description: input.description,
        archived: input.archived.unwrap_or(false),
        deprecated: input.deprecated.unwrap_or(false),
        schemas: schemas_text(input.schemas)?,
        group_name: input.group_name,
        feature_flags: input.feature_flags,
        created_at: now,
        updated_at: now,
    };
    match state.store.create_event_type(&et).await {
        Ok(()) => Ok((StatusCode::CREATED, Json(et.into()))),
        Err(herald_store::StoreError::Conflict(_)) => {
            match state.store.get_event_type(&et.name).await? {
                Some(archived) if archived.archived => {
                    let et = EventType {
                        created_at: archived.created_at,
                        ..et
                    };
                    state.store.update_event_type(&et).await?;
                    Ok((StatusCode::CREATED, Json(et.into())))
                }
                _ => Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "event_type_exists",
                    format!("an event type named {} already exists", et.name),
                )),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// One event type, archived or not.
#[utoipa::path(get, path = "/api/v1/event-type/{name}", tag = "Event Type", params(("name" = String, Path, description = "The event type's name")),
    responses((status = 200, body = EventTypeOut)))]
pub async fn get(
    State(state): State<Arc<ApiState>>,
    _caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<EventTypeOut>> {
    Ok(Json(find(&state, &name).await?.into()))
}

/// Replaces the event type, or creates it with this name.
#[utoipa::path(put, path = "/api/v1/event-type/{name}", tag = "Event Type", params(("name" = String, Path, description = "The event type's name")),
    request_body = EventTypeUpdate,
    responses((status = 200, body = EventTypeOut),
        (status = 201, description = "Created with this name", body = EventTypeOut)))]
pub async fn upsert(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
    SvixJson(input): SvixJson<EventTypeUpdate>,
) -> ApiResult<(StatusCode, Json<EventTypeOut>)> {
    caller.require_environment()?;
    let now = crate::now();
    let existing = state.store.get_event_type(&name).await?;
    let created = existing.is_none();
    if created {
        let mut v = Validator::default();
        v.check(&["path", "name"], validate::event_type_name(&name));
        v.finish()?;
    }
    let et = EventType {
        name,
        description: input.description,
        archived: input.archived.unwrap_or(false),
        deprecated: input.deprecated.unwrap_or(false),
        schemas: schemas_text(input.schemas)?,
        group_name: input.group_name,
        feature_flags: input.feature_flags,
        created_at: existing.map_or(now, |e| e.created_at),
        updated_at: now,
    };
    if created {
        state.store.create_event_type(&et).await?;
        Ok((StatusCode::CREATED, Json(et.into())))
    } else {
        state.store.update_event_type(&et).await?;
        Ok((StatusCode::OK, Json(et.into())))
    }
}

/// Changes the fields given.
#[utoipa::path(patch, path = "/api/v1/event-type/{name}", tag = "Event Type", params(("name" = String, Path, description = "The event type's name")),
    request_body = EventTypePatch,
    responses((status = 200, body = EventTypeOut)))]
pub async fn patch(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
    SvixJson(patch): SvixJson<EventTypePatch>,
) -> ApiResult<Json<EventTypeOut>> {
    caller.require_environment()?;
    let mut et = find(&state, &name).await?;
    if let Some(description) = patch.description {
        et.description = description;
    }
    if let Some(archived) = patch.archived {
        et.archived = archived;
    }
    if let Some(deprecated) = patch.deprecated {
        et.deprecated = deprecated;
    }
    if let Some(schemas) = patch.schemas {
        et.schemas = schemas_text(schemas)?;
    }
    if let Some(group) = patch.group_name {
        et.group_name = group;
    }
    if let Some(flags) = patch.feature_flags {
        et.feature_flags = flags;
    }
    et.updated_at = crate::now();
    state.store.update_event_type(&et).await?;
    Ok(Json(et.into()))
}

/// Svix archives on delete: the type stays known to old messages but leaves the catalogue.
/// Svix's `expunge=true` (delete for good) is not supported: asked for, it is a 422 rather
/// than an archive the caller did not ask for.
#[utoipa::path(delete, path = "/api/v1/event-type/{name}", tag = "Event Type", params(("name" = String, Path, description = "The event type's name"),
        ("expunge" = Option<bool>, Query, description = "Not supported: true is a 422 (the type is archived, never deleted)")),
    responses((status = 204, description = "Archived")))]
pub async fn archive(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
    query: QueryParams,
) -> ApiResult<StatusCode> {
    caller.require_environment()?;
    if query.bool("expunge", false)? {
        return Err(ApiError::invalid(
            &["query", "expunge"],
            "expunge is not supported: DELETE archives the event type, which stays known to the messages of that type",
        ));
    }
    let mut et = find(&state, &name).await?;
    et.archived = true;
    et.updated_at = crate::now();
    state.store.update_event_type(&et).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// This module's part of `/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(list, create, get, upsert, patch, archive))]
pub(crate) struct Docs;
