//! `/openapi.json`: the HTTP API as OpenAPI 3.1, built by utoipa from the handlers' own
//! annotations (`#[utoipa::path]` beside each handler) and the wire types' `ToSchema`
//! derives, so the document changes when the code does. `/docs` is a reference page that
//! renders it (a console file, `reference.html`).
//!
//! Each resource module keeps a `Docs` (`#[derive(OpenApi)]` naming its handlers); [`document`]
//! merges them and adds what every route shares: the security schemes and the error answers.
//! A test holds the document to the route table: every route served is described, at the
//! same method and path, and nothing else is.

use axum::{
    Json,
    http::HeaderMap,
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::{
    Modify, OpenApi, PartialSchema, ToSchema,
    openapi::{
        self, ContentBuilder, RefOr, ResponseBuilder,
        security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
        },
    },
};

use crate::{
    error::ValidationItem,
    routes::{Access, RouteTable},
};

/// `{"code", "detail"}`: every error of the management API but validation.
#[derive(Serialize, ToSchema)]
pub struct HttpError {
    /// Machine-readable (`not_found`, `authentication_failed`, ...).
    pub code: String,
    /// What was wrong, in words.
    pub detail: String,
}

/// 422: `{"detail": [{"loc", "msg", "type"}]}`, one item per field that was wrong.
#[derive(Serialize, ToSchema)]
pub struct ValidationError {
    pub detail: Vec<ValidationItem>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Herald",
        description = "Herald's HTTP API: the webhook management API (Svix's shape, under \
            /api/v1), the Pusher Channels HTTP API (/apps), webhooks in (/ingest), Server-Sent \
            Events, health and metrics. The WebSocket faces (Pusher protocol v7 at /app/{key}, \
            Socket.IO at /socket.io/) are described in the README.",
        license(name = "MIT OR Apache-2.0"),
    ),
    modifiers(&Shared),
    tags(
        (name = "Application", description = "Apps: the tenants that own endpoints and messages."),
        (name = "Event Type", description = "The catalogue of event types."),
        (name = "Endpoint", description = "Where an app's webhooks go."),
        (name = "Message", description = "Events published to an app's endpoints and channels."),
        (name = "Message Attempt", description = "Each delivery attempt and its answer."),
        (name = "Ingest", description = "Webhooks in: sources, what they received."),
        (name = "Channels", description = "Live channels, presence members, the live tail."),
        (name = "Authentication", description = "API tokens and app portal links."),
        (name = "Pusher", description = "The Pusher Channels HTTP API, signed the Pusher way."),
        (name = "Health", description = "Health checks, metrics and this document."),
    )
)]
struct Base;

/// The whole document.
pub fn document() -> openapi::OpenApi {
    let mut doc = Base::openapi();
    for part in [
        crate::v1::docs(),
        crate::pusher_api::Docs::openapi(),
        crate::ingest::Docs::openapi(),
        crate::sse::Docs::openapi(),
        crate::health::Docs::openapi(),
        Docs::openapi(),
    ] {
        doc.merge(part);
    }
    // After the merge: the shared answers go on every operation.
    Shared.modify(&mut doc);
    doc
}

pub(crate) fn routes() -> RouteTable {
    RouteTable::new()
        .get("/openapi.json", Access::Public, json)
        .get("/docs", Access::Public, reference)
}

#[derive(OpenApi)]
#[openapi(paths(json, reference))]
struct Docs;

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "Health",
    security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json"))
)]
async fn json() -> Response {
    // Built per request: a few hundred microseconds, and only for someone reading the docs.
    Json(document()).into_response()
}

/// The API reference page, which renders `/openapi.json` in the browser.
#[utoipa::path(
    get,
    path = "/docs",
    tag = "Health",
    security(()),
    responses((status = 200, description = "An HTML page", content_type = "text/html"))
)]
async fn reference(headers: HeaderMap) -> Response {
    crate::console::page("reference.html", &headers)
}

/// The security schemes, and the answers every management route may give.
struct Shared;

impl Modify for Shared {
    fn modify(&self, doc: &mut openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API token: environment-wide, or scoped to one app (another app's \
                         paths answer 404).",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "pusher",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "auth_signature",
                "The Pusher HTTP API's signature: auth_key, auth_timestamp, auth_version and \
                 body_md5 in the query, signed with the app's Pusher secret.",
            ))),
        );
        let error = |description: &str, schema: &str| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(openapi::Ref::from_schema_name(schema)))
                            .build(),
                    )
                    .build(),
            )
        };
        for (path, item) in doc.paths.paths.iter_mut() {
            // How each operation is opened, unless its annotation says (`security(())`).
            let scheme = if path.starts_with("/api/v1/") {
                Some("bearer")
            } else if path.starts_with("/apps/") && !path.ends_with("/sse") {
                Some("pusher")
            } else {
                None
            };
            for operation in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                // Handler names repeat across resources (`list`, `create`): the id is the
                // tag's and the handler's, `application.list`.
                if let (Some(tag), Some(id)) = (
                    operation.tags.as_ref().and_then(|t| t.first()),
                    &operation.operation_id,
                ) && !id.contains('.')
                {
                    let tag = tag.to_lowercase().replace(' ', "_");
                    operation.operation_id = Some(format!("{tag}.{id}"));
                }
                if let (Some(scheme), None) = (scheme, &operation.security) {
                    operation.security =
                        Some(vec![SecurityRequirement::new(scheme, Vec::<String>::new())]);
                }
                if !path.starts_with("/api/v1/") {
                    continue;
                }
                // An operation open to anyone (`security(())`, the health check) has no token
                // to refuse.
                let public = operation.security.as_ref().is_some_and(|requirements| {
                    requirements
                        .iter()
                        .all(|requirement| *requirement == SecurityRequirement::default())
                });
                let responses = &mut operation.responses.responses;
                for (status, description, schema) in [
                    ("400", "The request could not be read", "HttpError"),
                    ("401", "No valid API token", "HttpError"),
                    ("403", "The token may not do this", "HttpError"),
                    ("404", "Not found (or another app's)", "HttpError"),
                    ("409", "Conflicts with what exists", "HttpError"),
                    ("413", "The body is too large", "HttpError"),
                    ("422", "A field is wrong: each is named", "ValidationError"),
                    ("429", "Over a rate limit: see Retry-After", "HttpError"),
                    ("503", "The store is unavailable: retry", "HttpError"),
                ] {
                    if public && matches!(status, "401" | "403") {
                        continue;
                    }
                    responses
                        .entry(status.to_owned())
                        .or_insert_with(|| error(description, schema));
                }
            }
        }
        // The error bodies are named from every operation above.
        let schemas = &mut doc.components.get_or_insert_with(Default::default).schemas;
        for (name, schema) in [
            ("HttpError", HttpError::schema()),
            ("ValidationError", ValidationError::schema()),
            ("ValidationItem", ValidationItem::schema()),
        ] {
            schemas.entry(name.to_owned()).or_insert(schema);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The document describes every route the server serves, at its method and path, and
    /// nothing else (the console's files aside: pages, not API).
    #[test]
    fn the_document_describes_exactly_the_routes_served() {
        let doc = document();
        let mut described: Vec<(String, String)> = Vec::new();
        for (path, item) in &doc.paths.paths {
            for (method, op) in [
                ("GET", &item.get),
                ("POST", &item.post),
                ("PUT", &item.put),
                ("PATCH", &item.patch),
                ("DELETE", &item.delete),
            ] {
                if op.is_some() {
                    described.push((method.to_owned(), path.clone()));
                }
            }
        }
        described.sort();
        let mut served: Vec<(String, String)> = crate::route_list()
            .into_iter()
            .filter(|r| !r.path.starts_with("/console"))
            .map(|r| (r.method.to_string(), r.path.to_owned()))
            .collect();
        served.sort();
        let missing: Vec<_> = served.iter().filter(|r| !described.contains(r)).collect();
        let extra: Vec<_> = described.iter().filter(|r| !served.contains(r)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "served but not described: {missing:?}; described but not served: {extra:?}"
        );
    }

    /// Operation ids are unique (OpenAPI requires it; SDK generators name methods by them).
    #[test]
    fn operation_ids_are_unique() {
        let value = serde_json::to_value(document()).expect("json");
        let mut ids: Vec<String> = value["paths"]
            .as_object()
            .expect("paths")
            .values()
            .flat_map(|item| item.as_object().expect("item").values())
            .filter_map(|op| op["operationId"].as_str().map(str::to_owned))
            .collect();
        ids.sort();
        let repeated: Vec<&String> = ids
            .windows(2)
            .filter(|w| w[0] == w[1])
            .map(|w| &w[0])
            .collect();
        assert!(repeated.is_empty(), "repeated operation ids: {repeated:?}");
    }

    /// Bearer-token routes say so, and the rest say what opens them instead.
    #[test]
    fn each_operation_names_how_it_is_authenticated() {
        let doc = document();
        let value = serde_json::to_value(&doc).expect("json");
        for route in crate::route_list() {
            if route.path.starts_with("/console") {
                continue;
            }
            let method = route.method.as_str().to_lowercase();
            let op = &value["paths"][route.path][&method];
            let security = op["security"].to_string();
            let expected = match route.access {
                Access::AnyToken
                | Access::AppToken
                | Access::AppAdmin
                | Access::EnvironmentToken
                | Access::AppScopedToken => "bearer",
                Access::PusherSignature => "pusher",
                Access::Public | Access::ProviderSignature | Access::ChannelToken => "{}",
            };
            assert!(
                security.contains(expected),
                "{} {}: security {security}, expected {expected}",
                route.method,
                route.path
            );
            // A route open to anyone has no token to refuse: no 401 or 403 is described.
            if route.access == Access::Public {
                for status in ["401", "403"] {
                    assert!(
                        op["responses"][status].is_null(),
                        "{} {}: a public route describes {status}",
                        route.method,
                        route.path
                    );
                }
            }
        }
    }
}
