//! The resources Herald keeps. Plain data: wire formats live in `herald-api`, rows in
//! `herald-store`, so neither leaks into the other.

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::id::{AppId, AttemptId, EndpointId, IngestEventId, MessageId, SourceId};

pub type Metadata = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq)]
pub struct App {
    pub id: AppId,
    pub uid: Option<String>,
    pub name: String,
    pub throttle_rate: Option<i64>,
    pub metadata: Metadata,
    /// How Pusher-protocol clients and server SDKs address this app.
    pub pusher: PusherCredentials,
    /// Which channels keep history; `None` uses the server's defaults.
    pub history: Option<Vec<crate::history::HistoryRule>>,
    /// How Socket.IO clients may use the app; `None`: no browser origin, no relayed events.
    pub socketio: Option<crate::socketio::SocketIoSettings>,
    /// Days a message's payload is kept unless the message says otherwise; `None` uses the
    /// server's `retention.payload_days`.
    pub payload_retention_days: Option<u32>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `Debug` shows the key but never the secrets (see [`Redacted`]).
#[derive(Clone, PartialEq, Eq)]
pub struct PusherCredentials {
    /// Numeric, as the Pusher SDKs expect (`/apps/{app_id}/events`).
    pub app_id: i64,
    /// Public: clients connect to `/app/{key}`.
    pub key: String,
    /// Signs channel auths, HTTP API requests and channel webhooks.
    pub secret: String,
    /// The secret this one replaced, still accepted until its time: a rotation's grace.
    pub previous: Option<RetiredSecret>,
}

/// A rotated-out secret and when it stops verifying. `Debug` shows only the time.
#[derive(Clone, PartialEq, Eq)]
pub struct RetiredSecret {
    pub secret: String,
    pub until: DateTime<Utc>,
}

/// Stands in for a secret in `Debug` output, so that logging a value that holds one (an app,
/// an endpoint, a source, a delivery job) never writes the secret.
pub struct Redacted;

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Debug for PusherCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PusherCredentials")
            .field("app_id", &self.app_id)
            .field("key", &self.key)
            .field("secret", &Redacted)
            .field("previous", &self.previous)
            .finish()
    }
}

impl std::fmt::Debug for RetiredSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetiredSecret")
            .field("secret", &Redacted)
            .field("until", &self.until)
            .finish()
    }
}

impl PusherCredentials {
    /// Fresh credentials in Pusher's formats: a 7-digit id and 20-hex-digit key and secret.
    pub fn generate() -> Self {
        use rand::{Rng, RngCore};
        let mut rng = rand::rng();
        let mut hex20 = || {
            let mut bytes = [0u8; 10];
            rng.fill_bytes(&mut bytes);
            hex::encode(bytes)
        };
        let (key, secret) = (hex20(), hex20());
        Self {
            app_id: rand::rng().random_range(1_000_000..10_000_000),
            key,
            secret,
            previous: None,
        }
    }

    /// A fresh 20-hex-digit secret, Pusher's format.
    pub fn generate_secret() -> String {
        Self::generate().secret
    }

    /// These credentials after a rotation to `secret`: the current secret keeps verifying
    /// until `previous_until` when there is one (a grace), and is dropped at once otherwise.
    pub fn rotated(self, secret: String, previous_until: Option<DateTime<Utc>>) -> Self {
        Self {
            previous: previous_until.map(|until| RetiredSecret {
                secret: self.secret,
                until,
            }),
            secret,
            ..self
        }
    }

    /// The secrets that verify what backends and clients sign at `now`: the current one, then
    /// the one it replaced while its grace lasts. (Herald signs with the current one only.)
    pub fn verifying_secrets(&self, now: DateTime<Utc>) -> impl Iterator<Item = &str> {
        std::iter::once(self.secret.as_str()).chain(
            self.previous
                .as_ref()
                .filter(|retired| retired.until > now)
                .map(|retired| retired.secret.as_str()),
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventType {
    pub name: String,
    pub description: String,
    pub archived: bool,
    pub deprecated: bool,
    /// JSON text of the schemas object, kept as given.
    pub schemas: Option<String>,
    pub group_name: Option<String>,
    pub feature_flags: Option<Vec<String>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `Debug` shows everything but the secrets (see [`Redacted`]).
#[derive(Clone, PartialEq)]
pub struct Endpoint {
    pub id: EndpointId,
    pub app_id: AppId,
    pub uid: Option<String>,
    pub url: String,
    pub description: String,
    pub throttle_rate: Option<i64>,
    pub disabled: bool,
    /// What the endpoint receives and how requests to it are signed.
    pub format: EndpointFormat,
    pub event_types: Option<Vec<String>>,
    pub channels: Option<Vec<String>>,
    pub metadata: Metadata,
    pub headers: BTreeMap<String, String>,
    /// The current secret, `whsec_...`.
    pub secret: String,
    /// Rotated-out secrets that still sign until their expiry.
    pub previous_secrets: Vec<(String, DateTime<Utc>)>,
    /// Start of the current run of failures; `None` after a success.
    pub failing_since: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let previous: Vec<(Redacted, DateTime<Utc>)> = self
            .previous_secrets
            .iter()
            .map(|(_, expires)| (Redacted, *expires))
            .collect();
        f.debug_struct("Endpoint")
            .field("id", &self.id)
            .field("app_id", &self.app_id)
            .field("uid", &self.uid)
            .field("url", &self.url)
            .field("description", &self.description)
            .field("throttle_rate", &self.throttle_rate)
            .field("disabled", &self.disabled)
            .field("format", &self.format)
            .field("event_types", &self.event_types)
            .field("channels", &self.channels)
            .field("metadata", &self.metadata)
            // Headers may carry credentials of the receiver's: names only.
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("secret", &Redacted)
            .field("previous_secrets", &previous)
            .field("failing_since", &self.failing_since)
            .field("created_at", &self.created_at)
            .field("updated_at", &self.updated_at)
            .finish()
    }
}

impl Endpoint {
    /// Its event-type and channel lists, borrowed.
    pub fn filter(&self) -> crate::EndpointFilter<'_> {
        crate::EndpointFilter {
            event_types: self.event_types.as_deref(),
            channels: self.channels.as_deref(),
        }
    }

    /// Whether a delivery of this format, type and channels should go here.
    pub fn wants(
        &self,
        format: EndpointFormat,
        event_type: &str,
        channels: Option<&[String]>,
    ) -> bool {
        !self.disabled && self.format == format && self.filter().matches(event_type, channels)
    }
}

/// Two kinds of endpoint share the delivery engine (durable queue, retries, attempt log).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum EndpointFormat {
    /// The app's messages, signed with the endpoint's secret by the Standard Webhooks scheme.
    #[default]
    StandardWebhooks,
    /// Pusher channel webhooks (`channel_occupied`, `member_added`, `client_event`, ...) in
    /// Pusher's `{time_ms, events}` body, signed with the app's Pusher key and secret.
    Pusher,
}

impl EndpointFormat {
    pub const ALL: [Self; 2] = [Self::StandardWebhooks, Self::Pusher];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::StandardWebhooks => "standard-webhooks",
            Self::Pusher => "pusher",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == text)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub id: MessageId,
    pub app_id: AppId,
    pub event_id: Option<String>,
    pub event_type: String,
    pub channels: Option<Vec<String>>,
    pub tags: Option<Vec<String>>,
    /// The payload exactly as the producer sent it: stored and forwarded byte for byte.
    pub payload: Bytes,
    pub created_at: DateTime<Utc>,
    /// When the payload is expunged (replaced by [`EXPIRED_PAYLOAD`]); `None`: kept as long
    /// as the message (the publisher stamps every message it stores with the app's or the
    /// server's retention). Cleared once expunged.
    pub payload_expires_at: Option<DateTime<Utc>>,
}

/// What an expunged payload becomes, as Svix shows one whose content is gone.
pub const EXPIRED_PAYLOAD: &str = r#"{"expired":true}"#;

/// Svix's `MessageStatus`, used for deliveries and attempts alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryStatus {
    Success = 0,
    Pending = 1,
    Fail = 2,
    Sending = 3,
}

impl DeliveryStatus {
    pub fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            0 => Self::Success,
            1 => Self::Pending,
            2 => Self::Fail,
            3 => Self::Sending,
            _ => return None,
        })
    }

    pub fn text(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Pending => "pending",
            Self::Fail => "fail",
            Self::Sending => "sending",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerType {
    Scheduled = 0,
    Manual = 1,
}

impl TriggerType {
    pub fn from_code(code: i64) -> Self {
        if code == 1 {
            Self::Manual
        } else {
            Self::Scheduled
        }
    }
}

/// One HTTP request made to an endpoint, successful or not.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub id: AttemptId,
    pub msg_id: MessageId,
    pub endpoint_id: EndpointId,
    pub app_id: AppId,
    pub url: String,
    pub status: DeliveryStatus,
    /// HTTP status, or 0 when no response came (refused, timed out, blocked address).
    pub response_status_code: i32,
    /// Response body (truncated) or why no response came.
    pub response: String,
    pub response_duration_ms: i64,
    pub trigger_type: TriggerType,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointStats {
    pub success: i64,
    pub pending: i64,
    pub sending: i64,
    pub fail: i64,
}

/// Where a third party posts its webhooks: how to verify them and how to re-publish them.
/// `Debug` shows how many secrets it has, never them.
#[derive(Clone, PartialEq)]
pub struct IngestSource {
    pub id: SourceId,
    pub app_id: AppId,
    pub uid: Option<String>,
    pub name: String,
    pub kind: crate::ingest::SourceKind,
    /// Every secret that verifies; more than one during a rotation.
    pub secrets: Vec<String>,
    /// The `hmac-sha256` kind's header and encoding.
    pub hmac: Option<crate::ingest::HmacScheme>,
    /// How far a signed timestamp may be from now.
    pub tolerance_secs: i64,
    /// Templates for the event type, tried in order; empty means the kind's default.
    pub event_type: Vec<String>,
    /// Templates for the channels; those that render to valid channel names are used.
    pub channels: Vec<String>,
    /// The channel when no template renders.
    pub default_channel: Option<String>,
    /// Whether templates may read headers the signature does not cover (`{header:...}`, and
    /// the GitHub and Shopify defaults that read `X-GitHub-Event` / `X-Shopify-Topic`).
    pub trust_unsigned_headers: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl std::fmt::Debug for IngestSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestSource")
            .field("id", &self.id)
            .field("app_id", &self.app_id)
            .field("uid", &self.uid)
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field(
                "secrets",
                &self.secrets.iter().map(|_| Redacted).collect::<Vec<_>>(),
            )
            .field("hmac", &self.hmac)
            .field("tolerance_secs", &self.tolerance_secs)
            .field("event_type", &self.event_type)
            .field("channels", &self.channels)
            .field("default_channel", &self.default_channel)
            .field("trust_unsigned_headers", &self.trust_unsigned_headers)
            .field("created_at", &self.created_at)
            .field("updated_at", &self.updated_at)
            .finish()
    }
}

/// A verified request from a source, kept as received, and the message it became.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestEvent {
    pub id: IngestEventId,
    pub source_id: SourceId,
    pub app_id: AppId,
    /// The deduplication key: the provider's delivery id where its signature covers it (the
    /// same across its retries), otherwise `sha256:<hex>` of the signed body.
    pub delivery_id: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub event_type: String,
    pub channels: Vec<String>,
    pub msg_id: MessageId,
    pub received_at: DateTime<Utc>,
}

#[cfg(test)]
mod debug_tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_a_secret() {
        let now = Utc::now();
        let mut pusher = PusherCredentials::generate();
        pusher.previous = Some(RetiredSecret {
            secret: "retired-pusher-secret".into(),
            until: now,
        });
        let app = App {
            id: AppId::new(now),
            uid: None,
            name: "a".into(),
            throttle_rate: None,
            metadata: Metadata::new(),
            pusher: pusher.clone(),
            history: None,
            socketio: None,
            payload_retention_days: None,
            created_at: now,
            updated_at: now,
        };
        let endpoint = Endpoint {
            id: EndpointId::new(now),
            app_id: app.id.clone(),
            uid: None,
            url: "https://example.com".into(),
            description: String::new(),
            throttle_rate: None,
            disabled: false,
            format: EndpointFormat::StandardWebhooks,
            event_types: None,
            channels: None,
            metadata: Metadata::new(),
            headers: [(
                "authorization".to_owned(),
                "Bearer receiver-token".to_owned(),
            )]
            .into_iter()
            .collect(),
            secret: "whsec_current-endpoint-secret".into(),
            previous_secrets: vec![("whsec_old-endpoint-secret".into(), now)],
            failing_since: None,
            created_at: now,
            updated_at: now,
        };
        let source = IngestSource {
            id: SourceId::new(now),
            app_id: app.id.clone(),
            uid: None,
            name: "s".into(),
            kind: crate::ingest::SourceKind::Stripe,
            secrets: vec!["whsec_source-secret".into()],
            hmac: None,
            tolerance_secs: 300,
            event_type: vec![],
            channels: vec![],
            default_channel: None,
            trust_unsigned_headers: false,
            created_at: now,
            updated_at: now,
        };
        let debug = format!("{app:?} {endpoint:?} {source:?}");
        for secret in [
            pusher.secret.as_str(),
            "retired-pusher-secret",
            "current-endpoint-secret",
            "old-endpoint-secret",
            "receiver-token",
            "source-secret",
        ] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        assert!(
            debug.contains(&pusher.key) && debug.contains("<redacted>"),
            "{debug}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(event_types: Option<&[&str]>, channels: Option<&[&str]>) -> Endpoint {
        let list = |names: &[&str]| names.iter().map(|n| n.to_string()).collect();
        let now = Utc::now();
        Endpoint {
            id: EndpointId::new(now),
            app_id: AppId::new(now),
            uid: None,
            url: "https://example.com/hook".into(),
            description: String::new(),
            throttle_rate: None,
            disabled: false,
            format: EndpointFormat::StandardWebhooks,
            event_types: event_types.map(list),
            channels: channels.map(list),
            metadata: Metadata::default(),
            headers: BTreeMap::new(),
            secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
            previous_secrets: vec![],
            failing_since: None,
            created_at: now,
            updated_at: now,
        }
    }

    #[test]
    fn an_endpoint_wants_what_its_lists_format_and_state_allow() {
        let standard = EndpointFormat::StandardWebhooks;
        let paid = ["orders".to_string()];
        let filtered = endpoint(Some(&["invoice.paid"]), Some(&["orders"]));
        assert!(filtered.wants(standard, "invoice.paid", Some(&paid)));
        assert!(
            !filtered.wants(standard, "invoice.created", Some(&paid)),
            "other type"
        );
        assert!(
            !filtered.wants(standard, "invoice.paid", None),
            "no channel"
        );
        assert!(!filtered.wants(EndpointFormat::Pusher, "invoice.paid", Some(&paid)));

        let open = endpoint(None, Some(&[]));
        assert!(
            open.wants(standard, "anything", None),
            "no lists, no restriction"
        );
        let disabled = Endpoint {
            disabled: true,
            ..open
        };
        assert!(!disabled.wants(standard, "anything", None));
    }
}
