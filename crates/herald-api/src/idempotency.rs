//! `Idempotency-Key` on POST: the first successful (2xx) response is stored and replayed
//! verbatim for the same key, caller and path for 24 hours. Only authenticated callers' answers
//! are kept: the token is checked before anything is stored, keys are at most 255 bytes, kept
//! bodies at most 2 MiB, and the table at most [`MAX_KEPT`] rows and [`MAX_KEPT_BYTES`]. A repeat that arrives while the
//! first is still running gets 409, as Stripe does, on whichever node it arrives: the request
//! claims its key in the store (for at most [`CLAIM_FOR`]) and the response, when saved,
//! completes the claim; one not kept (a server error, too large, the client gone) releases
//! it. The Svix SDKs send a key with every POST and reuse it when they retry, so a retried
//! create never creates twice. A refusal (4xx) is not kept: nothing was written, and its
//! retry runs again. A kept answer never holds a secret ([`SecretFields`]).

use std::{mem, sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes, to_bytes},
    extract::{Request, State},
    http::{HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use herald_core::token;
use herald_store::{IdempotencyClaim, Store};
use tokio_util::task::TaskTracker;

use crate::{ApiState, auth, error::ApiError};

pub const KEEP_FOR: Duration = Duration::from_secs(24 * 3600);

/// Put in a response's extensions by a handler whose answer carries a secret (a new API token,
/// a Pusher secret): the copy kept for replay leaves these fields out (JSON pointers to object
/// members), so no secret sits in the idempotency table. A replay shows the rest; the secret
/// was shown once (a token) or is read again where the API allows (an app's Pusher secret).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SecretFields(pub &'static [&'static str]);

impl SecretFields {
    /// `response` marked so.
    pub(crate) fn mark(self, response: impl IntoResponse) -> Response {
        let mut response = response.into_response();
        response.extensions_mut().insert(self);
        response
    }

    /// `body` without the fields; `None` if it is not a JSON object.
    fn strip(self, body: &[u8]) -> Option<Vec<u8>> {
        let mut value: serde_json::Value = serde_json::from_slice(body).ok()?;
        for pointer in self.0 {
            let (parent, field) = pointer.rsplit_once('/')?;
            if let Some(object) = value.pointer_mut(parent).and_then(|v| v.as_object_mut()) {
                object.remove(field);
            }
        }
        serde_json::to_vec(&value).ok()
    }
}
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
/// How long a request holds its key in the store. A claim normally ends with its request
/// (saved or released); this bounds the 409s a node that died mid-request leaves behind.
/// Handlers answer in far less (the slowest waits for one commit), and it must stay so: a
/// request outliving its claim lets a repeat run it again.
const CLAIM_FOR: Duration = Duration::from_secs(60);

/// A key claimed in the store while its request runs. Unless the response was saved or the
/// claim released, dropping it (the handler's future was dropped: the client went away)
/// releases the claim on a task of its own, since `Drop` cannot await.
struct Claim {
    store: Arc<dyn Store>,
    scope: String,
    key: String,
    /// When the claim ends: it names this request's claim, so a release frees only that.
    until: chrono::DateTime<chrono::Utc>,
    held: bool,
}

impl Claim {
    /// The response was saved, which completed the claim in the store.
    fn complete(mut self) {
        self.held = false;
    }

    /// The request ended without a response worth keeping: the next one with the key runs.
    async fn release(mut self) {
        self.held = false;
        release(self.store.as_ref(), &self.scope, &self.key, self.until).await;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        // Without a runtime (it is shutting down) the claim is left to expire after
        // CLAIM_FOR. The task is one store call, so it needs no place in a shutdown tree.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = Arc::clone(&self.store);
        let (scope, key, until) = (
            mem::take(&mut self.scope),
            mem::take(&mut self.key),
            self.until,
        );
        runtime.spawn(async move { release(store.as_ref(), &scope, &key, until).await });
    }
}

async fn release(store: &dyn Store, scope: &str, key: &str, until: chrono::DateTime<chrono::Utc>) {
    if let Err(e) = store.release_idempotency_key(scope, key, until).await {
        // Only a repeat is affected: it gets 409 until the claim expires.
        tracing::warn!(error = %e, "could not release an Idempotency-Key claim");
    }
}

pub async fn replay(
    State(state): State<Arc<ApiState>>,
    mut request: Request,
    next: Next,
) -> Response {
    if request.method() != Method::POST {
        return next.run(request).await;
    }
    let key = match request.headers().get("idempotency-key") {
        None => return next.run(request).await,
        // Present but unusable: refused, never run unprotected (its retry would run twice).
        Some(value) => match value.to_str() {
            Ok(key) if !key.is_empty() => key.to_owned(),
            Ok(_) => return invalid_key("Idempotency-Key is empty").into_response(),
            Err(_) => {
                return invalid_key(
                    "Idempotency-Key must be visible ASCII characters (letters, digits, punctuation)",
                )
                .into_response();
            }
        },
    };
    if key.len() > MAX_KEY_LEN {
        return invalid_key(&format!(
            "Idempotency-Key is {} bytes; at most {MAX_KEY_LEN} are accepted",
            key.len()
        ))
        .into_response();
    }
    // Authenticate before anything is read or stored, so only callers with a valid token can
    // put rows in the table; the handler reuses the result instead of checking again.
    match auth::authenticate(request.headers(), request.extensions(), &state).await {
        Ok(scope) => {
            request.extensions_mut().insert(scope);
        }
        Err(refused) => return refused.into_response(),
    }
    let Some(auth) = header_str(&request, header::AUTHORIZATION.as_str()) else {
        return next.run(request).await;
    };
    // The caller's part of the scope: its token's digest, except for the admin token, which
    // the operator chooses (16 characters will do) and whose unsalted digest stored here would
    // let anyone with the database guess it offline. API tokens are 256 random bits, whose
    // digests the token table keeps anyway.
    let digest = token::hash(auth::bearer_token(&auth).unwrap_or(&auth));
    let caller = match &state.admin_token_hash {
        Some(admin) if token::equal(admin, &digest) => "admin".to_owned(),
        _ => token::hex(&digest),
    };
    let scope = format!("{caller}:{}", request.uri().path());
    // Claims are compared across nodes: in the cluster's time (the store's clock).
    let now = state.store.clock().now();
    let claim_until = now + chrono::Duration::from_std(CLAIM_FOR).unwrap_or_default();
    // One store call decides: replay a kept response, refuse a repeat of a running request
    // (on any node sharing the store), or run this one under a claim.
    match state
        .store
        .claim_idempotency_key(&scope, &key, now, claim_until)
        .await
    {
        Ok(IdempotencyClaim::Claimed) => {}
        Ok(IdempotencyClaim::Done { status, body }) => return stored_response(status, body),
        Ok(IdempotencyClaim::InProgress) => {
            return ApiError::conflict("a request with this Idempotency-Key is still in progress")
                .into_response();
        }
        Err(e) => return ApiError::from(e).into_response(),
    }
    let claim = Claim {
        store: Arc::clone(&state.store),
        scope,
        key,
        until: claim_until,
        held: true,
    };
    run_detached(&state.detached, claim, next.run(request)).await
}

/// [`run_claimed`] on a task of its own: a client that goes away drops the caller's future,
/// but a request whose write went in must still keep its answer for the retry, or the retry
/// would run again (a second message). The task is in `tasks`, which the shutdown waits for
/// before it closes the store (otherwise the answer could not be kept, and the key would stay
/// claimed for the claim's minute).
async fn run_detached(
    tasks: &TaskTracker,
    claim: Claim,
    handled: impl std::future::Future<Output = Response> + Send + 'static,
) -> Response {
    // In the request's span, so what it logs still carries its request id.
    let handled = tracing::Instrument::in_current_span(run_claimed(claim, handled));
    match tasks.spawn(handled).await {
        Ok(response) => response,
        Err(e) => ApiError::internal(e).into_response(),
    }
}

/// Runs a request that holds its key's claim, and keeps its answer for replays (a success)
/// or releases the claim (anything else).
async fn run_claimed(
    claim: Claim,
    handled: impl std::future::Future<Output = Response> + Send,
) -> Response {
    let response = handled.await;
    // Only a success is kept. A refusal changed nothing (Herald validates, authorizes and
    // checks limits before it writes), so its retry may as well run again, as Stripe does for
    // a request that failed validation; a server error or a 429 asks for that retry. Keeping
    // refusals would let a token fill the table with answers from routes it may not use.
    if !response.status().is_success() {
        claim.release().await;
        return response;
    }
    let (parts, body) = response.into_parts();
    // Handlers answer from memory, so reading the whole body costs nothing extra; only the
    // stored copy is limited.
    let bytes = match to_bytes(body, usize::MAX).await {
        Ok(bytes) => bytes,
        Err(e) => {
            claim.release().await;
            return ApiError::internal(e).into_response();
        }
    };
    let kept = match parts.extensions.get::<SecretFields>() {
        Some(fields) => fields.strip(&bytes).map(Bytes::from),
        None => Some(bytes.clone()),
    };
    let Some(kept) = kept else {
        // A marked answer that is not JSON: keep nothing rather than a secret.
        claim.release().await;
        return Response::from_parts(parts, Body::from(bytes));
    };
    if kept.len() > MAX_STORED_BODY {
        tracing::debug!(
            bytes = kept.len(),
            "response too large to keep for Idempotency-Key replay"
        );
        claim.release().await;
    } else {
        match claim
            .store
            .save_idempotent_response(
                &claim.scope,
                &claim.key,
                parts.status.as_u16(),
                &kept,
                claim.store.clock().now(),
            )
            .await
        {
            Ok(()) => claim.complete(),
            Err(e) => {
                // The request itself succeeded; only a future replay is lost.
                tracing::warn!(error = %e, "could not store idempotent response");
                claim.release().await;
            }
        }
    }
    Response::from_parts(parts, Body::from(bytes))
}

fn invalid_key(detail: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_idempotency_key", detail)
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
    let cutoff = store.clock().now() - chrono::Duration::from_std(KEEP_FOR).unwrap_or_default();
    match store
        .purge_idempotency(cutoff, MAX_KEPT, MAX_KEPT_BYTES)
        .await
    {
        Ok(n) if n > 0 => tracing::debug!(purged = n, "expired idempotency keys removed"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "purging idempotency keys failed"),
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use herald_store::sqlite::SqliteStore;

    use super::*;

    /// A store in a fresh directory, and a claim held there on the key `scope`/`key`.
    async fn claimed() -> (std::path::PathBuf, Arc<dyn Store>, Claim) {
        let dir = std::env::temp_dir().join(format!(
            "herald-idempotency-{}-{}",
            std::process::id(),
            Utc::now().timestamp_nanos_opt().unwrap_or_default()
        ));
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir).await.expect("open"));
        let now = Utc::now();
        let until = now + chrono::Duration::from_std(CLAIM_FOR).expect("a duration");
        assert_eq!(
            store
                .claim_idempotency_key("scope", "key", now, until)
                .await
                .expect("claim"),
            IdempotencyClaim::Claimed
        );
        let held = Claim {
            store: Arc::clone(&store),
            scope: "scope".into(),
            key: "key".into(),
            until,
            held: true,
        };
        (dir, store, held)
    }

    /// What a request with the key finds once the claim held is no longer in progress.
    /// Given 20 s, as the integration suite's patience: a busy machine's SQLite write can take
    /// a while, and the release or save is awaited, not timed.
    async fn once_settled(store: &dyn Store) -> IdempotencyClaim {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut outcome = claim_again(store).await.expect("claim");
        while outcome == IdempotencyClaim::InProgress && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
            outcome = claim_again(store).await.expect("claim");
        }
        outcome
    }

    /// What a request with the key `scope`/`key` finds now.
    async fn claim_again(store: &dyn Store) -> herald_store::Result<IdempotencyClaim> {
        let now = Utc::now();
        let until = now + chrono::Duration::from_std(CLAIM_FOR).expect("a duration");
        store
            .claim_idempotency_key("scope", "key", now, until)
            .await
    }

    /// A request whose future is dropped (its client went away) leaves no claim behind: the
    /// next request with the key runs instead of getting 409 until the claim expires.
    #[tokio::test]
    async fn a_dropped_request_releases_its_claim() {
        let (dir, store, held) = claimed().await;
        assert_eq!(
            claim_again(store.as_ref()).await.expect("claim"),
            IdempotencyClaim::InProgress
        );
        drop(held);
        // The release runs on a task of its own.
        let outcome = once_settled(store.as_ref()).await;
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(outcome, IdempotencyClaim::Claimed);
    }

    /// A client that goes away while its request runs drops the middleware's future, but the
    /// request goes on to its end and its answer is kept: the retry is a replay, not a second
    /// run (a second message). The shutdown's wait for the detached tasks covers it, so the
    /// answer is kept before the store closes.
    #[tokio::test]
    async fn a_request_whose_client_went_away_keeps_its_answer() {
        let (dir, store, held) = claimed().await;
        let (written, write) = (
            Arc::new(tokio::sync::Notify::new()),
            Arc::new(tokio::sync::Notify::new()),
        );
        let handler = {
            let (written, write) = (Arc::clone(&written), Arc::clone(&write));
            async move {
                // The handler's write goes in, then its answer takes a while.
                written.notify_one();
                write.notified().await;
                (StatusCode::CREATED, "{\"id\":\"msg_1\"}").into_response()
            }
        };
        let tasks = TaskTracker::new();
        let request = tokio::spawn({
            let tasks = tasks.clone();
            async move { run_detached(&tasks, held, handler).await }
        });
        written.notified().await;
        request.abort();
        assert!(request.await.is_err(), "the client's side was dropped");
        assert_eq!(tasks.len(), 1, "the request still runs, tracked");
        write.notify_one();
        // As the shutdown does before it closes the store.
        tasks.close();
        tasks.wait().await;

        let outcome = claim_again(store.as_ref()).await.expect("claim");
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            outcome,
            IdempotencyClaim::Done {
                status: 201,
                body: b"{\"id\":\"msg_1\"}".to_vec()
            }
        );
    }
}
