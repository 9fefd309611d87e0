//! A message bus the operator already runs (Redis pub/sub, NATS core subjects) carrying
//! publications between nodes when PostgreSQL's LISTEN/NOTIFY is not enough.
//!
//! A bus is a transport and nothing more: every node sends to one topic and hears every
//! node's messages (its own too), each sender's in the order it sent them. What the messages
//! mean (publications, their order per channel, catching up after a lost link) is the
//! broker's (`postgres::PostgresBroker` with a bus, see [`crate::postgres`]).

use std::sync::Arc;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

/// Why a bus could not take messages.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The engine cannot be reached (refused, lost, timed out).
    #[error("{engine} is unavailable: {reason}")]
    Unavailable {
        engine: &'static str,
        reason: String,
    },
    /// A message the engine refuses by its size.
    #[error("{engine} takes messages up to {limit} bytes; this one has {size}")]
    TooLarge {
        engine: &'static str,
        size: usize,
        limit: usize,
    },
    /// The URL names no engine this bus can use.
    #[error("broker URL: {0}")]
    Url(String),
}

/// What a node does with what it hears (the broker implements it).
#[async_trait::async_trait]
pub trait Hearing: Send + Sync + 'static {
    /// One message from the bus, as sent.
    async fn message(&self, payload: Bytes);

    /// The link was lost and is back (subscribed again): what was sent meanwhile was not heard.
    async fn resumed(&self);
}

/// A transport to every node (see the module doc). Subscribed when made, so a node hears the
/// others before it serves; [`Bus::run`] then hands what it hears on.
#[async_trait::async_trait]
pub trait Bus: Send + Sync + 'static {
    /// The engine's name, for logs and errors ("Redis", "NATS").
    fn engine(&self) -> &'static str;

    /// Sends `messages` to every node (this one too), in this order.
    async fn send(&self, messages: Vec<Bytes>) -> Result<(), BusError>;

    /// The largest message the engine takes.
    fn max_message_bytes(&self) -> usize;

    /// Whether this node hears the bus now (`/health/ready`).
    fn is_connected(&self) -> bool;

    /// Hears the bus until `shutdown`, handing each message to `hearing`; re-subscribes after
    /// a lost link (with backoff) and then calls [`Hearing::resumed`].
    async fn run(self: Arc<Self>, hearing: Arc<dyn Hearing>, shutdown: CancellationToken);
}

/// Connects to the bus `url` names (`redis://`, `nats://`; `rediss://` reaches redis-rs, which
/// refuses it: its TLS is not built in), subscribed to
/// `topic`.
pub async fn connect(url: &str, topic: &str) -> Result<Arc<dyn Bus>, BusError> {
    let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
    match scheme {
        "redis" | "rediss" | "redis+unix" => {
            Ok(crate::redis_bus::RedisBus::connect(url, topic).await? as Arc<dyn Bus>)
        }
        "nats" | "tls" => Ok(crate::nats_bus::NatsBus::connect(url, topic).await? as Arc<dyn Bus>),
        _ => Err(BusError::Url(format!(
            "{} names no broker Herald knows (use redis://HOST:PORT or nats://HOST:PORT)",
            redacted(url)
        ))),
    }
}

/// `url` without its credentials, for logs and errors: `scheme://host:port/...` (each of a
/// comma-separated list of servers). A Redis URL names one server and its password may hold
/// `,`, so everything up to its last `@` goes; a NATS list is split on `,` (which its client
/// does too, so no NATS password holds one).
pub fn redacted(url: &str) -> String {
    let url = url.trim();
    if url.starts_with("redis") {
        return match url.split_once("://") {
            Some((scheme, rest)) => {
                let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
                format!("{scheme}://{host}")
            }
            None => "(not a URL)".to_owned(),
        };
    }
    url.split(',')
        .map(|one| match one.trim().split_once("://") {
            Some((scheme, rest)) => {
                let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
                format!("{scheme}://{host}")
            }
            None => "(not a URL)".to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_logged_without_credentials() {
        assert_eq!(
            redacted("redis://:secret@127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(redacted("nats://user:pass@host:4222"), "nats://host:4222");
        assert_eq!(redacted("nats://host:4222"), "nats://host:4222");
        assert_eq!(
            redacted("nats://a:pw@h1:4222, nats://b:pw2@h2:4222"),
            "nats://h1:4222,nats://h2:4222"
        );
        assert_eq!(redacted("secret"), "(not a URL)");
        // Redis allows `,` in a password: none of it shows.
        assert_eq!(
            redacted("redis://:pa,ss@127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(redacted("rediss://:a,b,c@h:6379/0"), "rediss://h:6379/0");
    }

    #[tokio::test]
    async fn an_unknown_scheme_is_refused_with_what_to_use() {
        let Err(e) = connect("kafka://user:pw@host:9092", "t").await else {
            panic!("refused")
        };
        let message = e.to_string();
        assert!(message.contains("redis://"), "{message}");
        assert!(!message.contains("pw"), "{message}");
    }
}
