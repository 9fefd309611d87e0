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
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
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

/// A rotated-out secret and when it stops verifying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetiredSecret {
    pub secret: String,
    pub until: DateTime<Utc>,
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

#[derive(Debug, Clone, PartialEq)]
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

impl Endpoint {
    pub fn filter(&self) -> crate::EndpointFilter {
        crate::EndpointFilter {
            event_types: self.event_types.clone(),
            channels: self.channels.clone(),
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
}

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
#[derive(Debug, Clone, PartialEq)]
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
