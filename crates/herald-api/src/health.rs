//! Health for load balancers and orchestrators, without credentials and without secrets in
//! the answer:
//! - `GET /health/live`: 204 while the process serves HTTP at all.
//! - `GET /health/ready`: 204 when this node can take traffic (its store answers and, in a
//!   cluster, its broker hears the other nodes); otherwise 503 with `{"ready": false,
//!   "store": ..., "broker": ...}` saying which part is down and why.
//!
//! And for the operator's Prometheus, with an environment-wide token:
//! - `GET /metrics`: every metric this node registered (`herald-metrics`), in the OpenMetrics
//!   text format, with the delivery queue's gauges read from the store at that moment.

use std::sync::Arc;

use axum::{
    Json,
    extract::State,
    http::{HeaderValue, StatusCode, header::CONTENT_TYPE},
    response::{IntoResponse, Response},
};
use serde_json::json;

use crate::ApiState;

/// How long readiness waits for the store: probes have timeouts of their own, and a database
/// that takes longer is as good as down for them.
const PING_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// How long one ping's answer serves `/health/ready`: anyone may call it, and probes call it
/// every few seconds, so a flood of them costs one database round trip a second.
const READY_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// The store's last answer to a readiness ping, and when it came (`None`: ready). Requests
/// take turns: while one pings, the others wait for its answer instead of pinging too.
#[derive(Default)]
pub struct StoreReadiness {
    last: tokio::sync::Mutex<Option<(tokio::time::Instant, Option<String>)>>,
}

impl StoreReadiness {
    /// Why the store is not ready (`None`: it is), from `ping` at most once per [`READY_FOR`].
    async fn check<F, Fut>(&self, ping: F) -> Option<String>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Option<String>>,
    {
        let mut last = self.last.lock().await;
        if let Some((at, answer)) = last.as_ref()
            && at.elapsed() < READY_FOR
        {
            return answer.clone();
        }
        let answer = ping().await;
        *last = Some((tokio::time::Instant::now(), answer.clone()));
        answer
    }
}

/// Why `store` is not ready, from one ping (`None`: it answered).
async fn ping_store(store: &dyn herald_store::Store) -> Option<String> {
    match tokio::time::timeout(PING_PATIENCE, store.ping()).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(if e.is_unavailable() {
            "the database cannot be reached".to_owned()
        } else {
            // The route is public: the error's text (paths, SQL) goes to the log only.
            tracing::error!(error = %e, "the readiness check's store ping failed");
            "the store does not answer (the server's log says why)".to_owned()
        }),
        Err(_) => Some(format!(
            "the database did not answer within {} s",
            PING_PATIENCE.as_secs()
        )),
    }
}

/// Live: the process serves HTTP.
#[utoipa::path(get, path = "/health/live", tag = "Health", security(()),
    responses((status = 204, description = "Serving")))]
pub async fn live() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// Ready: the store answers and, in a cluster, the broker hears the other nodes.
#[utoipa::path(get, path = "/health/ready", tag = "Health", security(()),
    responses((status = 204, description = "Ready"),
        (status = 503, description = "Not ready: which part is down and why", body = NotReady)))]
pub async fn ready(State(state): State<Arc<ApiState>>) -> Response {
    let store = state
        .readiness
        .check(|| ping_store(state.store.as_ref()))
        .await;
    let broker = (!state.publisher.broker_ready())
        .then_some("the broker's link to the other nodes is down; reconnecting");
    if store.is_none() && broker.is_none() {
        return StatusCode::NO_CONTENT.into_response();
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({
            "ready": false,
            "store": store.as_deref().unwrap_or("ok"),
            "broker": broker.unwrap_or("ok"),
        })),
    )
        .into_response()
}

/// What Prometheus is told the body is (`prometheus-client` writes OpenMetrics text).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every metric this node registered, in the OpenMetrics text format.
#[utoipa::path(get, path = "/metrics", tag = "Health",
    security(("bearer" = [])),
    responses((status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text", body = String),
        (status = 401, description = "No valid API token", body = crate::openapi::HttpError),
        (status = 403, description = "An app's token: metrics are the environment's", body = crate::openapi::HttpError),
        (status = 429, description = "The address failed authentication too often: see Retry-After", body = crate::openapi::HttpError),
        (status = 500, description = "The metrics could not be encoded", body = crate::openapi::HttpError)))]
pub async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    let now = state.store.clock().now();
    match tokio::time::timeout(PING_PATIENCE, state.store.due_deliveries(now)).await {
        Ok(Ok(due)) => {
            let queue = &state.metrics.queue;
            queue.due.set(i64::try_from(due.count).unwrap_or(i64::MAX));
            let age = due
                .oldest_due_at
                .and_then(|at| (now - at).to_std().ok())
                .map_or(0.0, |age| age.as_secs_f64());
            queue.oldest_due_age_seconds.set(age);
        }
        // The rest is still worth scraping: the queue's gauges keep their last values, and
        // `/health/ready` is where a store that does not answer shows.
        Ok(Err(e)) => tracing::warn!(error = %e, "metrics: the delivery queue could not be read"),
        Err(_) => tracing::warn!("metrics: the delivery queue did not answer in time"),
    }
    let mut body = String::new();
    if let Err(e) = herald_metrics::prometheus_client::encoding::text::encode(
        &mut body,
        &state.metrics_registry,
    ) {
        return crate::ApiError::internal(e).into_response();
    }
    let mut response = body.into_response();
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
    response
}

/// This module's part of `/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(paths(live, ready, metrics))]
pub(crate) struct Docs;

/// `/health/ready`'s 503: each part `ok` or why it is down.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[allow(dead_code)]
struct NotReady {
    ready: bool,
    store: String,
    broker: String,
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// Readiness asks the store once a second however many probes come, concurrent ones
    /// included, and a failure is reported until a later ping says otherwise.
    #[tokio::test(start_paused = true)]
    async fn the_store_is_pinged_at_most_once_a_second_for_readiness() {
        let readiness = StoreReadiness::default();
        let pings = AtomicU32::new(0);
        let ping = |answer: Option<&'static str>| {
            let pings = &pings;
            move || async move {
                pings.fetch_add(1, Ordering::SeqCst);
                answer.map(str::to_owned)
            }
        };
        let answers =
            futures_util::future::join_all((0..100).map(|_| readiness.check(ping(Some("down")))))
                .await;
        assert!(answers.iter().all(|a| a.as_deref() == Some("down")));
        assert_eq!(
            pings.load(Ordering::SeqCst),
            1,
            "a hundred probes, one ping"
        );
        tokio::time::advance(std::time::Duration::from_millis(500)).await;
        assert_eq!(readiness.check(ping(None)).await.as_deref(), Some("down"));
        assert_eq!(pings.load(Ordering::SeqCst), 1, "within the second");
        tokio::time::advance(READY_FOR).await;
        assert_eq!(readiness.check(ping(None)).await, None, "asked again");
        assert_eq!(pings.load(Ordering::SeqCst), 2);
    }
}
