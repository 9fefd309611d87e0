//! Wire types shared by several resources, for domain values that herald-core keeps free of
//! serde: each converts explicitly to and from its domain type, and, being Herald's own input
//! shapes, refuses unknown fields (a 422 that names the field).

use herald_core::{
    history::HistoryRule,
    ingest::{Encoding, HmacScheme},
    socketio::{EventRule, Relay, SocketIoSettings},
};
use serde::{Deserialize, Serialize};

/// A channel history rule: `{pattern, maxEvents, maxAgeSecs}`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HistoryRuleWire {
    pattern: String,
    max_events: u32,
    max_age_secs: u64,
}

impl From<&HistoryRuleWire> for HistoryRule {
    fn from(rule: &HistoryRuleWire) -> Self {
        Self {
            pattern: rule.pattern.clone(),
            max_events: rule.max_events,
            max_age_secs: rule.max_age_secs,
        }
    }
}

impl From<HistoryRule> for HistoryRuleWire {
    fn from(rule: HistoryRule) -> Self {
        Self {
            pattern: rule.pattern,
            max_events: rule.max_events,
            max_age_secs: rule.max_age_secs,
        }
    }
}

/// Rules as received, as domain values.
pub fn history_in(rules: Vec<HistoryRuleWire>) -> Vec<HistoryRule> {
    rules.iter().map(HistoryRule::from).collect()
}

/// Domain rules as the API shows them.
pub fn history_out(rules: Vec<HistoryRule>) -> Vec<HistoryRuleWire> {
    rules.into_iter().map(HistoryRuleWire::from).collect()
}

/// Herald's extension on apps: `{"payloadDays": n}`, how long the payloads of the app's
/// messages are kept (`null` or absent: the server's `retention.payload_days`). Read as `i64`
/// so that a negative or huge value is a 422 naming the field rather than a parse error.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetentionWire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_days: Option<i64>,
}

/// The most days a payload retention may name (about a hundred years).
pub const MAX_RETENTION_DAYS: i64 = 36_500;

impl RetentionWire {
    /// `None` when it sets nothing (the server's defaults apply).
    pub fn payload_days(&self) -> Option<u32> {
        self.payload_days.and_then(|days| u32::try_from(days).ok())
    }

    pub fn from_days(days: Option<u32>) -> Option<Self> {
        days.map(|days| Self {
            payload_days: Some(i64::from(days)),
        })
    }
}

/// An app's Socket.IO settings: `{allowedOrigins, namespaceChannel, events}`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SocketIoWire {
    #[serde(default)]
    allowed_origins: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    namespace_channel: Option<String>,
    #[serde(default)]
    events: Vec<EventRuleWire>,
}

/// `{event, relay, webhook}`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventRuleWire {
    event: String,
    relay: RelayWire,
    #[serde(default)]
    webhook: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
enum RelayWire {
    Everyone,
    Others,
    Rooms,
    None,
    Refuse,
}

impl From<SocketIoWire> for SocketIoSettings {
    fn from(s: SocketIoWire) -> Self {
        Self {
            allowed_origins: s.allowed_origins,
            namespace_channel: s.namespace_channel,
            events: s
                .events
                .into_iter()
                .map(|rule| EventRule {
                    event: rule.event,
                    relay: match rule.relay {
                        RelayWire::Everyone => Relay::Everyone,
                        RelayWire::Others => Relay::Others,
                        RelayWire::Rooms => Relay::Rooms,
                        RelayWire::None => Relay::None,
                        RelayWire::Refuse => Relay::Refuse,
                    },
                    webhook: rule.webhook,
                })
                .collect(),
        }
    }
}

impl From<SocketIoSettings> for SocketIoWire {
    fn from(s: SocketIoSettings) -> Self {
        Self {
            allowed_origins: s.allowed_origins,
            namespace_channel: s.namespace_channel,
            events: s
                .events
                .into_iter()
                .map(|rule| EventRuleWire {
                    event: rule.event,
                    relay: match rule.relay {
                        Relay::Everyone => RelayWire::Everyone,
                        Relay::Others => RelayWire::Others,
                        Relay::Rooms => RelayWire::Rooms,
                        Relay::None => RelayWire::None,
                        Relay::Refuse => RelayWire::Refuse,
                    },
                    webhook: rule.webhook,
                })
                .collect(),
        }
    }
}

/// An `hmac-sha256` source's settings: `{header, encoding, prefix, idHeader}`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HmacSchemeWire {
    header: String,
    encoding: EncodingWire,
    #[serde(default)]
    prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id_header: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
enum EncodingWire {
    Hex,
    Base64,
}

impl From<HmacSchemeWire> for HmacScheme {
    fn from(h: HmacSchemeWire) -> Self {
        Self {
            header: h.header,
            encoding: match h.encoding {
                EncodingWire::Hex => Encoding::Hex,
                EncodingWire::Base64 => Encoding::Base64,
            },
            prefix: h.prefix,
            id_header: h.id_header,
        }
    }
}

impl From<HmacScheme> for HmacSchemeWire {
    fn from(h: HmacScheme) -> Self {
        Self {
            header: h.header,
            encoding: match h.encoding {
                Encoding::Hex => EncodingWire::Hex,
                Encoding::Base64 => EncodingWire::Base64,
            },
            prefix: h.prefix,
            id_header: h.id_header,
        }
    }
}
