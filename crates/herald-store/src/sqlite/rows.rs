//! Conversions between SQLite rows and domain values: the JSON column shapes and helpers both
//! backends use, and (through `sql::row_readers!`) the row readers.

use chrono::{DateTime, Utc};
use herald_core::{
    AppId, AttemptId, EndpointId, IngestEventId, MessageId, SourceId, TokenId,
    history::HistoryRule,
    ingest::{Encoding, HmacScheme},
    model::{DeliveryStatus, Endpoint},
    socketio::{EventRule, Relay, SocketIoSettings},
};
use serde::{Deserialize, Serialize};
use sqlx::{Row, sqlite::SqliteRow};

use crate::{Result, StoreError};

pub(crate) fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(crate) fn time(ms: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| StoreError::Corrupt(format!("timestamp {ms} out of range")))
}

pub(crate) fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    // Serializing maps and vectors of strings cannot fail.
    serde_json::to_string(value).unwrap_or_else(|_| unreachable!("string collections serialize"))
}

pub(crate) fn opt_json<T: serde::Serialize>(value: &Option<T>) -> Option<String> {
    value.as_ref().map(|v| to_json(v))
}

pub(crate) fn from_json<T: serde::de::DeserializeOwned>(column: &str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{column}: {e}")))
}

pub(crate) fn opt_from_json<T: serde::de::DeserializeOwned>(
    column: &str,
    text: Option<String>,
) -> Result<Option<T>> {
    text.map(|t| from_json(column, &t)).transpose()
}

/// `apps.history_rules`: a JSON array of `{pattern, maxEvents, maxAgeSecs}`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct HistoryRuleRow {
    pattern: String,
    max_events: u32,
    max_age_secs: u64,
}

impl From<HistoryRuleRow> for HistoryRule {
    fn from(r: HistoryRuleRow) -> Self {
        Self {
            pattern: r.pattern,
            max_events: r.max_events,
            max_age_secs: r.max_age_secs,
        }
    }
}

/// An app's history rules as the `history_rules` column holds them.
pub(crate) fn history_rules_json(rules: Option<&[HistoryRule]>) -> Option<String> {
    rules.map(|rules| {
        let rows: Vec<HistoryRuleRow> = rules
            .iter()
            .map(|r| HistoryRuleRow {
                pattern: r.pattern.clone(),
                max_events: r.max_events,
                max_age_secs: r.max_age_secs,
            })
            .collect();
        to_json(&rows)
    })
}

/// `apps.socketio`: `{allowedOrigins, namespaceChannel, events: [{event, relay, webhook}]}`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SocketIoRow {
    allowed_origins: Vec<String>,
    namespace_channel: Option<String>,
    events: Vec<SocketIoRuleRow>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct SocketIoRuleRow {
    event: String,
    relay: String,
    webhook: bool,
}

impl TryFrom<SocketIoRow> for SocketIoSettings {
    type Error = StoreError;

    fn try_from(row: SocketIoRow) -> Result<Self> {
        let events = row
            .events
            .into_iter()
            .map(|rule| {
                Ok(EventRule {
                    relay: Relay::parse(&rule.relay).ok_or_else(|| {
                        StoreError::Corrupt(format!("socketio: unknown relay `{}`", rule.relay))
                    })?,
                    event: rule.event,
                    webhook: rule.webhook,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            allowed_origins: row.allowed_origins,
            namespace_channel: row.namespace_channel,
            events,
        })
    }
}

/// An app's Socket.IO settings as the `socketio` column holds them.
pub(crate) fn socketio_json(settings: Option<&SocketIoSettings>) -> Option<String> {
    settings.map(|s| {
        to_json(&SocketIoRow {
            allowed_origins: s.allowed_origins.clone(),
            namespace_channel: s.namespace_channel.clone(),
            events: s
                .events
                .iter()
                .map(|rule| SocketIoRuleRow {
                    event: rule.event.clone(),
                    relay: rule.relay.as_str().to_owned(),
                    webhook: rule.webhook,
                })
                .collect(),
        })
    })
}

/// `ingest_sources.hmac`: `{header, encoding, prefix, idHeader}`. Rows written before the
/// id header was renamed on the wire hold `id_header` (possibly `null`); both are read.
#[derive(Serialize, Deserialize)]
pub(crate) struct HmacRow {
    header: String,
    encoding: EncodingRow,
    #[serde(default)]
    prefix: String,
    #[serde(
        default,
        rename = "idHeader",
        alias = "id_header",
        skip_serializing_if = "Option::is_none"
    )]
    id_header: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum EncodingRow {
    Hex,
    Base64,
}

impl From<HmacRow> for HmacScheme {
    fn from(h: HmacRow) -> Self {
        Self {
            header: h.header,
            encoding: match h.encoding {
                EncodingRow::Hex => Encoding::Hex,
                EncodingRow::Base64 => Encoding::Base64,
            },
            prefix: h.prefix,
            id_header: h.id_header,
        }
    }
}

/// A source's hmac settings as the `hmac` column holds them.
pub(crate) fn hmac_json(hmac: Option<&HmacScheme>) -> Option<String> {
    hmac.map(|h| {
        to_json(&HmacRow {
            header: h.header.clone(),
            encoding: match h.encoding {
                Encoding::Hex => EncodingRow::Hex,
                Encoding::Base64 => EncodingRow::Base64,
            },
            prefix: h.prefix.clone(),
            id_header: h.id_header.clone(),
        })
    })
}

/// A typed id read from an id column: [`StoredId::parse_column`].
pub(crate) trait StoredId: Sized {
    fn parse_column(text: String) -> std::result::Result<Self, herald_core::IdError>;
}

macro_rules! stored_ids {
    ($($ty:ty),*) => {
        $(impl StoredId for $ty {
            fn parse_column(text: String) -> std::result::Result<Self, herald_core::IdError> {
                <$ty>::parse(text)
            }
        })*
    };
}

stored_ids!(
    AppId,
    EndpointId,
    MessageId,
    AttemptId,
    SourceId,
    IngestEventId,
    TokenId
);

/// Parses a stored id; an id without its type's prefix means the data is corrupt.
pub(crate) fn parse_id<T: StoredId>(column: &str, text: String) -> Result<T> {
    T::parse_column(text).map_err(|e| StoreError::Corrupt(format!("{column}: {e}")))
}

pub(crate) fn previous_secrets_json(endpoint: &Endpoint) -> String {
    let list: Vec<(&str, i64)> = endpoint
        .previous_secrets
        .iter()
        .map(|(s, t)| (s.as_str(), millis(*t)))
        .collect();
    to_json(&list)
}

pub(crate) fn status(code: i64) -> Result<DeliveryStatus> {
    DeliveryStatus::from_code(code).ok_or_else(|| StoreError::Corrupt(format!("status {code}")))
}

crate::sql::row_readers!(SqliteRow, i64);

/// Maps a unique-constraint violation to `Conflict` with `what`.
pub(crate) fn conflict_as(what: &str) -> impl FnOnce(sqlx::Error) -> StoreError + '_ {
    move |e| match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            StoreError::Conflict(what.to_owned())
        }
        _ => StoreError::Database(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_rows_read_both_stored_forms_and_write_the_current_one() {
        let current = r#"{"header":"X-Sig","encoding":"hex","prefix":"","idHeader":"X-Id"}"#;
        let old = r#"{"header":"X-Sig","encoding":"hex","prefix":"","id_header":"X-Id"}"#;
        let old_unset = r#"{"header":"X-Sig","encoding":"base64","prefix":"p=","id_header":null}"#;
        let read = |text: &str| HmacScheme::from(from_json::<HmacRow>("hmac", text).expect(text));
        assert_eq!(read(current), read(old));
        assert_eq!(read(old).id_header.as_deref(), Some("X-Id"));
        let unset = read(old_unset);
        assert_eq!((unset.encoding, unset.id_header), (Encoding::Base64, None));
        assert_eq!(hmac_json(Some(&read(old))).as_deref(), Some(current));
        assert_eq!(
            hmac_json(Some(&read(old_unset))).as_deref(),
            Some(r#"{"header":"X-Sig","encoding":"base64","prefix":"p="}"#)
        );
    }

    #[test]
    fn history_rules_are_stored_as_the_api_showed_them() {
        let stored = r#"[{"pattern":"chat-*","maxEvents":500,"maxAgeSecs":86400}]"#;
        let rules: Vec<HistoryRule> = from_json::<Vec<HistoryRuleRow>>("history_rules", stored)
            .expect("read")
            .into_iter()
            .map(HistoryRule::from)
            .collect();
        assert_eq!(rules[0].max_age_secs, 86_400);
        assert_eq!(history_rules_json(Some(&rules)).as_deref(), Some(stored));
    }
}
