//! Health for load balancers and orchestrators, without credentials and without secrets in
//! the answer:
//! - `GET /health/live`: 204 while the process serves HTTP at all.
//! - `GET /health/ready`: 204 when this node can take traffic (its store answers and, in a
//!   cluster, its broker hears the other nodes); otherwise 503 with `{"ready": false,
//!   "store": ..., "broker": ...}` saying which part is down and why.

use axum::{
    Json,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::json;

use crate::ApiState;

/// How long readiness waits for the store: probes have timeouts of their own, and a database
/// that takes longer is as good as down for them.
const PING_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

pub async fn live() -> StatusCode {
    StatusCode::NO_CONTENT
}

pub async fn ready(State(state): State<ApiState>) -> Response {
    let store = match tokio::time::timeout(PING_PATIENCE, state.store.ping()).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(if e.is_unavailable() {
            "the database cannot be reached".to_owned()
        } else {
            format!("the store does not answer: {e}")
        }),
        Err(_) => Some(format!(
            "the database did not answer within {} s",
            PING_PATIENCE.as_secs()
        )),
    };
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
