//! `Idempotency-Key` on POST: the first response (if not a server error) is stored and replayed
//! verbatim for the same key, caller and path for 24 hours. Only authenticated callers' answers
//! are kept: the token is checked before anything is stored, keys are at most 255 bytes, kept
//! bodies at most 2 MiB, and the table at most [`MAX_KEPT`] rows and [`MAX_KEPT_BYTES`]. A repeat that arrives while the
//! first is still running gets 409, as Stripe does. The Svix SDKs send a key with every POST
//! and reuse it when they retry, so a retried create never creates twice.

use std::{collections::HashSet, sync::Mutex, time::Duration};

use axum::{
    body::{Body, to_bytes},
    extract::{Request, State},
    http::{HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use chrono::Utc;
use herald_core::token;
use herald_store::Store;

use crate::{ApiState, auth, error::ApiError};

pub const KEEP_FOR: Duration = Duration::from_secs(24 * 3600);
/// Responses larger than this are not kept. A message create echoes its payload (up to
/// `api.max_body_bytes`, 1 MiB by default), and the Svix SDKs retry creates with the same key,
/// so the answer must fit.
const MAX_STORED_BODY: usize = 2 * 1024 * 1024;
/// Longer keys are refused with 400, as Stripe does (keys are UUIDs or similar).
pub const MAX_KEY_LEN: usize = 255;
/// The most responses kept, and the most bytes they may take together; housekeeping forgets
/// the oldest beyond either.
pub const MAX_KEPT: u64 = 100_000;
pub const MAX_KEPT_BYTES: u64 = 256 * 1024 * 1024;

#[derive(Default)]
pub struct InFlight(Mutex<HashSet<String>>);

struct Claim<'a> {
    set: &'a InFlight,
    id: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.set
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl InFlight {
    fn claim(&self, id: String) -> Option<Claim<'_>> {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(id.clone()).then(|| Claim { set: self, id })
    }
}

pub async fn replay(State(state): State<ApiState>, mut request: Request, next: Next) -> Response {
    if request.method() != Method::POST {
        return next.run(request).await;
    }
    let Some(key) = header_str(&request, "idempotency-key") else {
        return next.run(request).await;
    };
    if key.len() > MAX_KEY_LEN {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            format!(
                "Idempotency-Key is {} bytes; at most {MAX_KEY_LEN} are accepted",
                key.len()
            ),
        )
        .into_response();
    }
    // Authenticate before anything is read or stored, so only callers with a valid token can
    // put rows in the table; the handler reuses the result instead of checking again.
    match auth::authenticate(request.headers(), &state).await {
        Ok(scope) => {
            request.extensions_mut().insert(scope);
        }
        Err(refused) => return refused.into_response(),
    }
    let Some(auth) = header_str(&request, header::AUTHORIZATION.as_str()) else {
        return next.run(request).await;
    };
    let scope = format!(
        "{}:{}",
        token::hex(&token::hash(&auth)),
        request.uri().path()
    );
    match state.store.idempotent_response(&scope, &key).await {
        Ok(Some((status, body))) => return stored_response(status, body),
        Ok(None) => {}
        Err(e) => return ApiError::from(e).into_response(),
    }
    let Some(_claim) = state.idempotency.claim(format!("{scope}\n{key}")) else {
        return ApiError::conflict("a request with this Idempotency-Key is still in progress")
            .into_response();
    };
    let response = next.run(request).await;
    if response.status().is_server_error() {
        return response;
    }
    let (parts, body) = response.into_parts();
    // Handlers answer from memory, so reading the whole body costs nothing extra; only the
    // stored copy is limited.
    let bytes = match to_bytes(body, usize::MAX).await {
        Ok(bytes) => bytes,
        Err(e) => return ApiError::internal(e).into_response(),
    };
    if bytes.len() > MAX_STORED_BODY {
        tracing::debug!(
            bytes = bytes.len(),
            "response too large to keep for Idempotency-Key replay"
        );
    } else if let Err(e) = state
        .store
        .save_idempotent_response(&scope, &key, parts.status.as_u16(), &bytes, Utc::now())
        .await
    {
        // The request itself succeeded; only a future replay is lost.
        tracing::warn!(error = %e, "could not store idempotent response");
    }
    Response::from_parts(parts, Body::from(bytes))
}

fn header_str(request: &Request, name: &str) -> Option<String> {
    request
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

fn stored_response(status: u16, body: Vec<u8>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let has_body = !body.is_empty();
    let mut response = (status, body).into_response();
    if has_body {
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    response
}

/// Forget keys older than [`KEEP_FOR`], and the oldest beyond [`MAX_KEPT`]; run periodically.
pub async fn purge_expired(store: &dyn Store) {
    let cutoff = Utc::now() - chrono::Duration::from_std(KEEP_FOR).unwrap_or_default();
    match store
        .purge_idempotency(cutoff, MAX_KEPT, MAX_KEPT_BYTES)
        .await
    {
        Ok(n) if n > 0 => tracing::debug!(purged = n, "expired idempotency keys removed"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "purging idempotency keys failed"),
    }
}
