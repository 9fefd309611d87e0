//! The HTTP client for webhook attempts, with SSRF protection.
//!
//! Every host name goes through [`PolicyResolver`], which resolves it and drops addresses the
//! [`AddressPolicy`] refuses; the connection is made to exactly the addresses it returns, so a
//! name cannot resolve to a public address for the check and a private one for the connection.
//! IP-literal URLs never reach a resolver, so they are checked before the request. Redirects
//! are not followed (a 3xx is a failed attempt, per Standard Webhooks) and no proxy is used.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use herald_core::{AddressPolicy, BlockedAddress};
use reqwest::{
    StatusCode,
    dns::{Addrs, Name, Resolve, Resolving},
    header::HeaderMap,
};
use url::{Host, Url};

use crate::DeliveryConfig;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("refused: {0}")]
    Blocked(#[from] BlockedAddress),
    #[error("refused: {0}")]
    BadUrl(String),
    #[error("request timed out after {0:?}")]
    TimedOut(Duration),
    #[error("could not resolve host: {0}")]
    Dns(String),
    #[error("request failed: {0}")]
    Request(String),
    /// Nothing was sent, for a passing reason of this server's: the store unreachable for the
    /// request's credentials, or a connection not opened for want of this server's own
    /// resources. The endpoint had no part in it and is not charged for it.
    #[error("not sent: {0}")]
    NotSent(String),
    /// Nothing was sent, for a lasting reason: the request cannot be built (its app is gone,
    /// or its stored Pusher secret cannot be read). A failed attempt like any other, so the
    /// delivery's schedule ends rather than waiting on something that will not change.
    #[error("not sent: {0}")]
    Unbuildable(String),
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: StatusCode,
    pub retry_after: Option<Duration>,
    /// The body, cut at the configured limit.
    pub body: Bytes,
}

#[derive(Clone)]
pub struct WebhookClient {
    http: reqwest::Client,
    addresses: AddressPolicy,
    timeout: Duration,
    max_response_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot build the webhook HTTP client: {0}")]
pub struct ClientBuildError(#[from] reqwest::Error);

impl WebhookClient {
    pub fn new(config: &DeliveryConfig) -> Result<Self, ClientBuildError> {
        // reqwest is built without a bundled crypto provider; ring is the one the rest of the
        // dependency tree already compiles. Installing twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .dns_resolver(Arc::new(PolicyResolver {
                addresses: config.addresses.clone(),
            }))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(config.request_timeout)
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .user_agent(concat!("Herald/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            addresses: config.addresses.clone(),
            timeout: config.request_timeout,
            max_response_bytes: config.max_response_bytes,
        })
    }

    pub async fn post(
        &self,
        url: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response, SendError> {
        let url = Url::parse(url).map_err(|e| SendError::BadUrl(format!("invalid URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(SendError::BadUrl(format!(
                "scheme {} is not http or https",
                url.scheme()
            )));
        }
        match url.host() {
            Some(Host::Ipv4(ip)) => self.addresses.check(ip.into())?,
            Some(Host::Ipv6(ip)) => self.addresses.check(ip.into())?,
            Some(Host::Domain(_)) => {}
            None => return Err(SendError::BadUrl("URL has no host".into())),
        }
        let mut response = self
            .http
            .post(url)
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let mut body = Vec::new();
        while body.len() < self.max_response_bytes {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) => break,
                // The status already decides the outcome; a broken body only shortens the log.
                Err(_) => break,
            }
        }
        body.truncate(self.max_response_bytes);
        Ok(Response {
            status,
            retry_after,
            body: body.into(),
        })
    }

    fn classify(&self, error: reqwest::Error) -> SendError {
        if let Some(blocked) = find_cause::<BlockedAddress>(&error) {
            return SendError::Blocked(blocked.clone());
        }
        // Before the look-up's own failure: resolving a name needs descriptors too. Only while
        // connecting: a request that failed later may have reached the endpoint.
        if error.is_connect()
            && let Some(what) = shortage(&error)
        {
            return SendError::NotSent(format!(
                "this server is out of {what}: {}",
                error_chain(&error)
            ));
        }
        if let Some(dns) = find_cause::<DnsError>(&error) {
            return SendError::Dns(dns.to_string());
        }
        if error.is_timeout() {
            return SendError::TimedOut(self.timeout);
        }
        SendError::Request(error_chain(&error))
    }
}

/// What this server ran out of, if that is why `error` happened: a connection it could not
/// open for want of its own file descriptors, socket buffers or memory, which says nothing of
/// the endpoint. (Not EADDRNOTAVAIL: besides a node out of local ports, it is what every
/// connection to an IPv6-only endpoint gets on a node without IPv6, which never passes.)
fn shortage(error: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let io = find_cause::<std::io::Error>(error)?;
    if io.kind() == std::io::ErrorKind::OutOfMemory {
        return Some("memory");
    }
    // EMFILE and ENFILE have no stable ErrorKind.
    #[cfg(target_os = "linux")]
    match io.raw_os_error() {
        Some(23 | 24) => return Some("file descriptors"),
        Some(105) => return Some("socket buffers"),
        _ => {}
    }
    None
}

/// `Retry-After` as delay-seconds or an HTTP date.
fn parse_retry_after(value: &str) -> Option<Duration> {
    if let Ok(secs) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

fn find_cause<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// The error and its causes on one line ("error sending request: connection refused").
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(e) = current {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        current = e.source();
    }
    text
}

/// The error of opening a file, if this process cannot open one for want of descriptors
/// (EMFILE, ENFILE): asked after a failed look-up, whose own error cannot say so.
fn out_of_descriptors() -> Option<std::io::Error> {
    #[cfg(unix)]
    if let Err(e) = std::fs::File::open("/dev/null")
        && matches!(e.raw_os_error(), Some(23 | 24))
    {
        return Some(e);
    }
    None
}

#[derive(Debug, thiserror::Error)]
#[error("{host}: {reason}")]
struct DnsError {
    host: String,
    reason: String,
    /// The look-up's own error, kept so that a shortage of this server's (no descriptor for
    /// the resolver) is told apart from a name that does not resolve.
    #[source]
    cause: Option<std::io::Error>,
}

struct PolicyResolver {
    addresses: AddressPolicy,
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let addresses = self.addresses.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| DnsError {
                    host: host.clone(),
                    reason: e.to_string(),
                    // glibc reports a process out of descriptors as a name that does not
                    // exist (it could open neither /etc/hosts nor a socket to the server).
                    cause: Some(out_of_descriptors().unwrap_or(e)),
                })?
                .collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|addr| match addresses.check(addr.ip()) {
                    Ok(()) => true,
                    Err(blocked) => {
                        refused.get_or_insert(blocked);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                return Err(match refused {
                    Some(blocked) => Box::new(blocked) as Box<dyn std::error::Error + Send + Sync>,
                    None => Box::new(DnsError {
                        host,
                        reason: "no addresses".into(),
                        cause: None,
                    }),
                });
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    /// An error as reqwest reports a failed connect: the OS error a few causes down.
    #[derive(Debug, thiserror::Error)]
    #[error("client error (Connect)")]
    struct Connect(#[source] std::io::Error);

    #[test]
    fn shortages_of_this_servers_own_resources_are_told_apart_from_the_endpoints_failures() {
        let shortage_of = |code: i32| shortage(&Connect(std::io::Error::from_raw_os_error(code)));
        #[cfg(target_os = "linux")]
        {
            assert_eq!(shortage_of(24), Some("file descriptors"), "EMFILE");
            assert_eq!(shortage_of(23), Some("file descriptors"), "ENFILE");
            assert_eq!(
                shortage_of(99),
                None,
                "EADDRNOTAVAIL: also an IPv6 endpoint, no IPv6"
            );
            assert_eq!(shortage_of(105), Some("socket buffers"), "ENOBUFS");
            assert_eq!(shortage_of(111), None, "ECONNREFUSED is the endpoint's");
            assert_eq!(shortage_of(113), None, "EHOSTUNREACH is the endpoint's");
        }
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(shortage(&Connect(refused)), None);
        let unknown = DnsError {
            host: "x.invalid".into(),
            reason: "failed to lookup address information".into(),
            cause: Some(std::io::Error::other("Name or service not known")),
        };
        assert_eq!(shortage(&unknown), None, "a name that does not resolve");
        #[cfg(target_os = "linux")]
        {
            let starved = DnsError {
                host: "example.com".into(),
                reason: "Too many open files".into(),
                cause: Some(std::io::Error::from_raw_os_error(24)),
            };
            assert_eq!(
                shortage(&starved),
                Some("file descriptors"),
                "the resolver had no descriptor"
            );
        }
    }

    #[tokio::test]
    async fn literal_private_addresses_are_refused_before_connecting() {
        let client = WebhookClient::new(&DeliveryConfig::default()).expect("client");
        let err = client
            .post("http://127.0.0.1:9/hook", HeaderMap::new(), Bytes::new())
            .await
            .expect_err("loopback refused");
        assert!(matches!(err, SendError::Blocked(_)), "{err}");
        assert!(err.to_string().contains("127.0.0.1 is loopback"), "{err}");
    }

    #[tokio::test]
    async fn names_resolving_to_private_addresses_are_refused() {
        let client = WebhookClient::new(&DeliveryConfig::default()).expect("client");
        let err = client
            .post("http://localhost:9/hook", HeaderMap::new(), Bytes::new())
            .await
            .expect_err("localhost refused");
        assert!(matches!(err, SendError::Blocked(_)), "{err}");
    }
}
