//! API errors in Svix's shapes: `{"code", "detail"}` for most, and 422
//! `{"detail": [{"loc", "msg", "type"}]}` for validation, so the Svix SDKs raise their usual
//! exceptions with a message that says what was wrong.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use herald_store::StoreError;
use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ValidationItem {
    pub loc: Vec<String>,
    pub msg: String,
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug)]
pub enum ApiError {
    Standard {
        status: StatusCode,
        code: &'static str,
        detail: String,
    },
    Validation(Vec<ValidationItem>),
    /// 429 `rate_limited` with `Retry-After` (whole seconds, at least 1).
    RateLimited {
        detail: String,
        retry_after_secs: u64,
    },
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self::Standard {
            status,
            code,
            detail: detail.into(),
        }
    }

    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Standard { status, .. } => *status,
            Self::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// Its machine-readable code (`validation` for a validation error, which has none on the
    /// wire).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Standard { code, .. } => code,
            Self::Validation(_) => "validation",
            Self::RateLimited { .. } => "rate_limited",
        }
    }

    /// What was wrong, in the words the caller is told.
    pub fn detail(&self) -> String {
        match self {
            Self::Standard { detail, .. } | Self::RateLimited { detail, .. } => detail.clone(),
            Self::Validation(items) => items
                .iter()
                .map(|i| i.msg.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        }
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication_failed", detail)
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "insufficient_access", detail)
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", detail)
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }

    /// One 422 item at `loc` (e.g. `["body", "url"]`).
    pub fn invalid(loc: &[&str], msg: impl Into<String>) -> Self {
        Self::Validation(vec![ValidationItem {
            loc: loc.iter().map(|s| s.to_string()).collect(),
            msg: msg.into(),
            kind: "value_error".into(),
        }])
    }

    pub fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(error = %error, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal server error",
        )
    }
}

impl From<herald_channels::PublishError> for ApiError {
    fn from(e: herald_channels::PublishError) -> Self {
        match e {
            herald_channels::PublishError::Store(e) => e.into(),
            interrupted @ herald_channels::PublishError::Interrupted => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                format!("{interrupted}; retry (an Idempotency-Key makes the retry safe)"),
            ),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict(detail) => Self::conflict(detail),
            StoreError::NotFound => Self::not_found("entity"),
            unavailable if unavailable.is_unavailable() => {
                tracing::warn!(error = %unavailable, "the store is unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the store (database) cannot be reached; nothing was stored, try again",
                )
            }
            other => Self::internal(other),
        }
    }
}

/// Collects validation problems so one response reports all of them.
#[derive(Default)]
pub struct Validator {
    items: Vec<ValidationItem>,
}

impl Validator {
    pub fn check(&mut self, loc: &[&str], result: Result<(), impl Into<String>>) {
        if let Err(msg) = result {
            self.items.push(ValidationItem {
                loc: loc.iter().map(|s| s.to_string()).collect(),
                msg: msg.into(),
                kind: "value_error".into(),
            });
        }
    }

    pub fn finish(self) -> ApiResult<()> {
        if self.items.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Validation(self.items))
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Standard<'a> {
            code: &'a str,
            detail: &'a str,
        }
        #[derive(Serialize)]
        struct Validation<'a> {
            detail: &'a [ValidationItem],
        }
        match &self {
            Self::Standard {
                status,
                code,
                detail,
            } => (*status, Json(Standard { code, detail })).into_response(),
            Self::Validation(items) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(Validation { detail: items }),
            )
                .into_response(),
            Self::RateLimited {
                detail,
                retry_after_secs,
            } => (
                StatusCode::TOO_MANY_REQUESTS,
                [(
                    axum::http::header::RETRY_AFTER,
                    axum::http::HeaderValue::from(*retry_after_secs),
                )],
                Json(Standard {
                    code: "rate_limited",
                    detail,
                }),
            )
                .into_response(),
        }
    }
}
