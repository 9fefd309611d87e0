//! Request extractors that answer bad input the way Svix does.

use std::collections::HashMap;

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::{StatusCode, request::Parts},
};
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde_path_to_error::{Path, Segment};

use crate::error::{ApiError, ApiResult, ValidationItem};

/// A JSON body. Malformed JSON is a 400 that quotes the parser; JSON of the wrong shape is a 422
/// naming the field by its full path (see [`parse_json`]); an oversized body is a 413. The
/// content type is not insisted on.
pub struct SvixJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for SvixJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(req, state).await?;
        parse_json(&bytes).map(SvixJson)
    }
}

/// An optional JSON body, as [`SvixJson`]: no body (or only whitespace) is `T::default()`, as
/// Svix's SDKs send `{}` and a bare POST asks for the defaults too.
pub struct OptionalSvixJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalSvixJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalSvixJson(T::default()));
        }
        parse_json(&bytes).map(OptionalSvixJson)
    }
}

/// The request's body, within `api.max_body_bytes`; beyond it a 413 in the APIs' error shape
/// (axum's own rejection is plain text).
async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> ApiResult<Bytes> {
    Bytes::from_request(req, state).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "request body is larger than api.max_body_bytes",
            )
        } else {
            ApiError::bad_request("invalid_body", rejection.body_text())
        }
    })
}

/// Parses a JSON body in one pass. A value of the wrong shape is a 422 whose `loc` is the full
/// path to the offending field (`["body", "application", "uid"]`, `["body", "channels", "2"]`),
/// tracked by `serde_path_to_error` as it deserializes: nothing is parsed twice.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    if herald_core::validate::json_holds_escaped_nul(bytes) {
        // The stores keep text without NUL (PostgreSQL's text and JSONB refuse it), so a body
        // that holds one is refused here, on either store, rather than failing as a 500.
        return Err(ApiError::invalid(
            &["body"],
            "strings may not contain NUL (\\u0000)",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| json_error(e.inner(), Some(e.path())))?;
    // Trailing characters: a syntax error, which has no path.
    de.end().map_err(|e| json_error(&e, None))?;
    Ok(value)
}

fn json_error(e: &serde_json::Error, path: Option<&Path>) -> ApiError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Data => {
            let (loc, dotted) = location(path);
            match unknown_field(e) {
                // serde names only the last segment; name the whole path instead.
                Some(field) => ApiError::Validation(vec![ValidationItem {
                    loc,
                    msg: format!(
                        "extra fields not permitted: {}",
                        without_position(e).replacen(
                            &format!("`{field}`"),
                            &format!("`{}`", dotted.as_deref().unwrap_or(&field)),
                            1,
                        )
                    ),
                    kind: "value_error.extra".to_owned(),
                }]),
                None => match missing_field(e) {
                    // serde reports a missing field at its parent: locate the field itself,
                    // as Svix does (`["body", "eventType"]`, `value_error.missing`).
                    Some(field) => {
                        let mut loc = loc;
                        loc.push(field.clone());
                        let dotted = match dotted {
                            Some(parent) => format!("{parent}.{field}"),
                            None => field,
                        };
                        ApiError::Validation(vec![ValidationItem {
                            loc,
                            msg: format!("field required: `{dotted}`"),
                            kind: "value_error.missing".to_owned(),
                        }])
                    }
                    None => ApiError::Validation(vec![ValidationItem {
                        loc,
                        msg: match dotted {
                            Some(dotted) => format!("{dotted}: {e}"),
                            None => e.to_string(),
                        },
                        kind: "value_error".to_owned(),
                    }]),
                },
            }
        }
        Category::Syntax | Category::Eof | Category::Io => ApiError::bad_request(
            "invalid_json",
            format!("request body is not valid JSON: {e}"),
        ),
    }
}

/// The 422 `loc` for a path in the body (`["body", "channels", "2"]`: Svix's `loc` is all
/// strings), and the path as written in messages (`channels[2]`), `None` at the body's root.
/// A segment the tracker could not name (a non-string key) ends the path: what follows it
/// would not locate anything.
fn location(path: Option<&Path>) -> (Vec<String>, Option<String>) {
    let mut loc = vec!["body".to_owned()];
    let mut dotted = String::new();
    for segment in path.into_iter().flatten() {
        match segment {
            Segment::Seq { index } => {
                loc.push(index.to_string());
                dotted.push_str(&format!("[{index}]"));
            }
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !dotted.is_empty() {
                    dotted.push('.');
                }
                dotted.push_str(key);
                loc.push(key.clone());
            }
            Segment::Unknown => break,
        }
    }
    (loc, (!dotted.is_empty()).then_some(dotted))
}

/// The field a `deny_unknown_fields` type refused, read from serde's message
/// ("unknown field `name`, expected one of ...").
fn unknown_field(e: &serde_json::Error) -> Option<String> {
    let message = e.to_string();
    let rest = message.strip_prefix("unknown field `")?;
    let end = rest.find('`')?;
    Some(rest[..end].to_owned())
}

/// The field a type missed, read from serde's message ("missing field `name`").
fn missing_field(e: &serde_json::Error) -> Option<String> {
    let message = e.to_string();
    let rest = message.strip_prefix("missing field `")?;
    let end = rest.find('`')?;
    Some(rest[..end].to_owned())
}

/// serde's message without its " at line L column C" suffix.
fn without_position(e: &serde_json::Error) -> String {
    let message = e.to_string();
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message,
    }
}

/// Query parameters, with typed getters that report bad values as 422 `["query", name]`.
pub struct QueryParams(HashMap<String, Vec<String>>);

impl<S: Send + Sync> FromRequestParts<S> for QueryParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let mut map: HashMap<String, Vec<String>> = HashMap::new();
        if let Some(query) = parts.uri.query() {
            for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
                let key = k.trim_end_matches("[]").to_owned();
                map.entry(key).or_default().push(v.into_owned());
            }
        }
        Ok(Self(map))
    }
}

impl QueryParams {
    pub fn str(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.first()).map(String::as_str)
    }

    /// A list given as repeated parameters, comma-separated, or both.
    pub fn list(&self, name: &str) -> Option<Vec<String>> {
        let values = self.0.get(name)?;
        Some(
            values
                .iter()
                .flat_map(|v| v.split(','))
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        )
    }

    pub fn bool(&self, name: &str, default: bool) -> ApiResult<bool> {
        match self.str(name) {
            None => Ok(default),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(other) => Err(ApiError::invalid(
                &["query", name],
                format!("expected true or false, got {other:?}"),
            )),
        }
    }

    pub fn int(&self, name: &str) -> ApiResult<Option<i64>> {
        self.str(name)
            .map(|v| {
                v.parse().map_err(|_| {
                    ApiError::invalid(&["query", name], format!("expected an integer, got {v:?}"))
                })
            })
            .transpose()
    }

    pub fn time(&self, name: &str) -> ApiResult<Option<DateTime<Utc>>> {
        self.str(name)
            .map(|v| {
                DateTime::parse_from_rfc3339(v)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|_| {
                        ApiError::invalid(
                            &["query", name],
                            format!("expected an RFC 3339 date-time, got {v:?}"),
                        )
                    })
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A missing field is located at the field, not its parent, as Svix does.
    #[test]
    fn a_missing_field_is_located_at_the_field() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        #[serde(rename_all = "camelCase")]
        struct Inner {
            uid: String,
        }
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        #[serde(rename_all = "camelCase")]
        struct Outer {
            event_type: String,
            application: Option<Inner>,
        }
        let item = |e: ApiError| match e {
            ApiError::Validation(mut items) if items.len() == 1 => items.remove(0),
            other => panic!("expected one validation item, got {other:?}"),
        };
        let top = item(parse_json::<Outer>(br#"{"application": null}"#).expect_err("missing"));
        assert_eq!(top.loc, ["body", "eventType"]);
        assert_eq!(top.kind, "value_error.missing");
        assert_eq!(top.msg, "field required: `eventType`");
        let nested = item(
            parse_json::<Outer>(br#"{"eventType": "a", "application": {}}"#).expect_err("missing"),
        );
        assert_eq!(nested.loc, ["body", "application", "uid"]);
        assert_eq!(nested.msg, "field required: `application.uid`");
    }

    #[test]
    fn a_body_holding_a_nul_escape_is_a_422() {
        let refused =
            parse_json::<serde_json::Value>(br#"{"name":"a\u0000"}"#).expect_err("refused");
        assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    }
}
