//! Request ids: every HTTP request gets one (the caller's `x-request-id`, or a new `req_...`),
//! sent back in the response's `x-request-id` and carried by the `request` span that every
//! log line written while serving it is in, so one request's lines can be found together
//! (`HERALD_LOG_FORMAT=json` puts it in each line's `span`).

use axum::{
    Router,
    extract::Request,
    http::{HeaderName, HeaderValue},
};
use tower::ServiceBuilder;
use tower_http::{
    request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer},
    trace::{DefaultOnResponse, TraceLayer},
};
use tracing::{Level, Span};

/// The header a request id travels in, both ways.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A caller's id longer than this is replaced: ids are for finding log lines, not for
/// smuggling data into them.
const MAX_CALLER_ID: usize = 128;

/// `router` with request ids and the per-request span (see the module's doc).
pub fn with_request_ids(router: Router) -> Router {
    router.layer(
        ServiceBuilder::new()
            .map_request(drop_unusable_id)
            .layer(SetRequestIdLayer::new(REQUEST_ID, NewRequestId))
            .layer(
                TraceLayer::new_for_http()
                    .make_span_with(request_span)
                    // One line per response at debug (`HERALD_LOG=tower_http=debug`); failures
                    // are already answered and logged where they happen.
                    .on_request(())
                    .on_response(DefaultOnResponse::new().level(Level::DEBUG))
                    .on_failure(()),
            )
            .layer(PropagateRequestIdLayer::new(REQUEST_ID)),
    )
}

/// A new id, `req_` and a KSUID like Herald's other ids (sortable by time).
#[derive(Debug, Clone, Copy)]
struct NewRequestId;

impl MakeRequestId for NewRequestId {
    fn make_request_id<B>(&mut self, _request: &Request<B>) -> Option<RequestId> {
        let id = herald_core::id::new_id("req_", chrono::Utc::now());
        HeaderValue::from_str(&id).ok().map(RequestId::new)
    }
}

/// A caller's id that is not short visible ASCII is dropped, so a new one is made.
fn drop_unusable_id(mut request: Request) -> Request {
    let usable = request.headers().get(&REQUEST_ID).is_none_or(|id| {
        id.len() <= MAX_CALLER_ID
            && !id.is_empty()
            && id.as_bytes().iter().all(|b| b.is_ascii_graphic())
    });
    if !usable {
        request.headers_mut().remove(&REQUEST_ID);
    }
    request
}

fn request_span(request: &Request) -> Span {
    let id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|id| id.to_str().ok())
        .unwrap_or("");
    tracing::info_span!(
        "request",
        request_id = id,
        method = %request.method(),
        path = request.uri().path(),
    )
}

#[cfg(test)]
mod tests {
    use axum::{body::Body, routing::get};
    use tower::ServiceExt;

    use super::*;

    async fn answer(id: Option<&str>) -> String {
        let router = with_request_ids(Router::new().route("/", get(|| async { "ok" })));
        let mut request = Request::builder().uri("/");
        if let Some(id) = id {
            request = request.header("x-request-id", id);
        }
        let response = router
            .oneshot(request.body(Body::empty()).expect("request"))
            .await
            .expect("response");
        response
            .headers()
            .get("x-request-id")
            .expect("an id in every response")
            .to_str()
            .expect("ascii")
            .to_owned()
    }

    #[tokio::test]
    async fn a_callers_id_is_kept_and_a_missing_or_unusable_one_is_made() {
        assert_eq!(answer(Some("trace-42")).await, "trace-42");
        let made = answer(None).await;
        assert!(made.starts_with("req_") && made.len() > 20, "{made}");
        assert_ne!(made, answer(None).await, "each request its own id");
        let long = "x".repeat(MAX_CALLER_ID + 1);
        assert!(answer(Some(&long)).await.starts_with("req_"));
        assert!(answer(Some("two words")).await.starts_with("req_"));
    }
}
