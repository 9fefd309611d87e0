//! The CLI's client of Herald's HTTP API: a bearer token, JSON in and out, the server's error
//! told in words, and 429s waited out as the server asks.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use url::Url;

/// How many times a request refused with 429 is tried again, after the `Retry-After` it gets.
const RATE_LIMITED_RETRIES: u32 = 8;

/// The server's refusal of a stream: its status and what it said, in words.
#[derive(Debug, thiserror::Error)]
#[error("{text}")]
pub struct StreamRefused {
    pub status: StatusCode,
    text: String,
}

impl StreamRefused {
    /// Whether asking again cannot help: the token is refused or the app is gone.
    pub fn is_final(&self) -> bool {
        matches!(
            self.status,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND
        )
    }
}

#[derive(Debug, Clone)]
pub struct Api {
    base: Url,
    token: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(server: &str, token: &str) -> anyhow::Result<Self> {
        let base = Url::parse(server).map_err(|e| {
            anyhow::anyhow!(
                "--server {server:?} is not a URL ({e}); for example http://127.0.0.1:6001"
            )
        })?;
        if !matches!(base.scheme(), "http" | "https") {
            anyhow::bail!("--server {server:?} must be an http:// or https:// URL");
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("herald-cli/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            base,
            token: token.to_owned(),
            http,
        })
    }

    pub fn base(&self) -> &Url {
        &self.base
    }

    /// `path` (with its query) under the server's URL, keeping the URL's own path (Herald behind a proxy at
    /// `https://tools.example.com/herald`): joined as is, `/api/v1/...` would replace it and
    /// send the token to whatever serves the host's root.
    pub fn url(&self, path: &str) -> anyhow::Result<Url> {
        under(&self.base, path).map_err(|e| anyhow::anyhow!("bad API path {path:?}: {e}"))
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(Method::GET, path, None).await
    }

    /// A GET's 2xx answer as its bytes, for JSON to be read without re-encoding it.
    pub async fn get_bytes(&self, path: &str) -> anyhow::Result<bytes::Bytes> {
        self.call_bytes(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(Method::POST, path, Some(body.to_string())).await
    }

    /// A POST of JSON already written out (its bytes sent as they are).
    pub async fn post_text(&self, path: &str, json: String) -> anyhow::Result<Value> {
        self.call(Method::POST, path, Some(json)).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(Method::PATCH, path, Some(body.to_string())).await
    }

    /// One API call; a 2xx answer's JSON (`null` for an empty body), else the server's error
    /// in words.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> anyhow::Result<Value> {
        let bytes = self.call_bytes(method, path, body).await?;
        Ok(json_or_text(&bytes))
    }

    /// [`Self::call`]'s answer as its bytes.
    async fn call_bytes(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> anyhow::Result<bytes::Bytes> {
        let url = self.url(path)?;
        let mut tries = 0;
        loop {
            let mut request = self
                .http
                .request(method.clone(), url.clone())
                .bearer_auth(&self.token)
                .timeout(Duration::from_secs(30));
            if let Some(body) = &body {
                request = request
                    .header("content-type", "application/json")
                    .body(body.clone());
            }
            let response = request
                .send()
                .await
                .map_err(|e| self.unanswered(&method, e))?;
            let status = response.status();
            if status == StatusCode::TOO_MANY_REQUESTS && tries < RATE_LIMITED_RETRIES {
                tries += 1;
                tokio::time::sleep(retry_after(&response)).await;
                continue;
            }
            let bytes = response
                .bytes()
                .await
                .map_err(|e| self.unanswered(&method, e))?;
            if status.is_success() {
                return Ok(bytes);
            }
            anyhow::bail!("{}", refusal(&method, path, status, &json_or_text(&bytes)));
        }
    }

    /// A GET whose body is read as it comes (the live tail).
    pub async fn open_stream(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let response = self
            .http
            .get(self.url(path)?)
            .bearer_auth(&self.token)
            .header("accept", "text/event-stream")
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let value: Value = response.json().await.unwrap_or(Value::Null);
        Err(StreamRefused {
            status,
            text: refusal(&Method::GET, path, status, &value),
        }
        .into())
    }

    /// Every item of a Svix list, page after page (following `iterator`).
    pub async fn list_all(&self, path: &str) -> anyhow::Result<Vec<Value>> {
        self.list_while(path, |_| true).await
    }

    /// The items of a Svix list, page after page (following `iterator`), up to the first that
    /// `keep` refuses: for a list read newest first, everything since a time.
    pub async fn list_while(
        &self,
        path: &str,
        keep: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Vec<Value>> {
        let mut items = Vec::new();
        let mut iterator: Option<String> = None;
        let separator = if path.contains('?') { '&' } else { '?' };
        loop {
            let page_path = match &iterator {
                Some(it) => format!("{path}{separator}limit=250&iterator={}", super::encode(it)),
                None => format!("{path}{separator}limit=250"),
            };
            let page = self.get(&page_path).await?;
            for item in page
                .get("data")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if !keep(item) {
                    return Ok(items);
                }
                items.push(item.clone());
            }
            let done = page.get("done").and_then(Value::as_bool).unwrap_or(true);
            iterator = page
                .get("iterator")
                .and_then(Value::as_str)
                .map(str::to_owned);
            if done || iterator.is_none() {
                return Ok(items);
            }
        }
    }

    /// A request that got no whole answer. One that could not connect was never sent; any
    /// other (a timeout, an answer cut off) may have been applied, which a user about to run
    /// a POST again (a second message) must be told rather than "is it running?".
    fn unanswered(&self, method: &Method, error: reqwest::Error) -> anyhow::Error {
        if error.is_connect() || error.is_builder() || *method == Method::GET {
            return self.unreachable(error);
        }
        anyhow::anyhow!(
            "Herald at {} took the {method} but no whole answer came back ({}): it may have been applied; check before running it again",
            self.base,
            super::error_chain(&error)
        )
    }

    fn unreachable(&self, error: reqwest::Error) -> anyhow::Error {
        anyhow::anyhow!(
            "cannot reach Herald at {} ({}); is it running? (`herald serve`, or pass --server)",
            self.base,
            super::error_chain(&error)
        )
    }
}

/// How long a 429 asks to wait (at least 50 ms, at most 10 s).
fn retry_after(response: &reqwest::Response) -> Duration {
    let seconds = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<f64>().ok())
        // `NaN` and infinities parse too; the clamp would keep NaN, which no Duration holds.
        .filter(|seconds| seconds.is_finite())
        .unwrap_or(1.0);
    Duration::from_secs_f64(seconds.clamp(0.05, 10.0))
}

/// A refused call in words: the status, the server's code and detail, and what to try.
fn refusal(method: &Method, path: &str, status: StatusCode, body: &Value) -> String {
    let code = body.get("code").and_then(Value::as_str).unwrap_or("");
    let detail = match body.get("detail") {
        Some(Value::String(detail)) => detail.clone(),
        Some(other) => other.to_string(),
        None if body.is_string() => body.as_str().unwrap_or("").to_owned(),
        None => String::new(),
    };
    let hint = match status {
        StatusCode::UNAUTHORIZED => " (check the token: --token or HERALD_TOKEN)",
        StatusCode::FORBIDDEN => " (this needs an environment-wide token, not an app's)",
        _ => "",
    };
    let path = path.split('?').next().unwrap_or(path);
    let mut text = format!("{method} {path}: {status}");
    if !code.is_empty() {
        text.push_str(&format!(" {code}"));
    }
    if !detail.is_empty() {
        text.push_str(&format!(": {detail}"));
    }
    text.push_str(hint);
    text
}

/// An answer's JSON (`null` for an empty body), or its text as a JSON string.
fn json_or_text(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
    }
}

/// `path` (absolute or not) under `base`'s own path.
pub fn under(base: &Url, path: &str) -> Result<Url, url::ParseError> {
    let mut base = base.clone();
    if !base.path().ends_with('/') {
        base.set_path(&format!("{}/", base.path()));
    }
    base.join(path.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_call_the_status_and_the_servers_words() {
        let body = serde_json::json!({"code": "not_found", "detail": "application not found"});
        assert_eq!(
            refusal(
                &Method::GET,
                "/api/v1/app/x?limit=1",
                StatusCode::NOT_FOUND,
                &body
            ),
            "GET /api/v1/app/x: 404 Not Found not_found: application not found"
        );
        let text = refusal(
            &Method::GET,
            "/api/v1/app",
            StatusCode::UNAUTHORIZED,
            &Value::Null,
        );
        assert!(text.contains("--token or HERALD_TOKEN"), "{text}");
    }

    /// A server behind a proxy under a path keeps it: the token goes to Herald, not to
    /// whatever serves the host's root.
    #[test]
    fn paths_are_under_the_servers_own_path() {
        for (server, expected) in [
            ("http://h:6001", "http://h:6001/api/v1/app?limit=1"),
            (
                "https://tools.example.com/herald",
                "https://tools.example.com/herald/api/v1/app?limit=1",
            ),
            (
                "https://tools.example.com/herald/",
                "https://tools.example.com/herald/api/v1/app?limit=1",
            ),
        ] {
            let base = Url::parse(server).expect("valid");
            assert_eq!(
                under(&base, "/api/v1/app?limit=1")
                    .expect("joined")
                    .as_str(),
                expected,
                "{server}"
            );
        }
    }
}
