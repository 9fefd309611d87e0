//! Conversions between SQLite rows and domain values.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use herald_core::{
    AppId, AttemptId, EndpointId, IngestEventId, MessageId, SourceId,
    history::HistoryRule,
    ingest::{Encoding, HmacScheme, SourceKind},
    model::{
        App, Attempt, DeliveryStatus, Endpoint, EndpointFormat, EventType, IngestEvent,
        IngestSource, Message, Metadata, PusherCredentials, TriggerType,
    },
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
    IngestEventId
);

/// Parses a stored id; an id without its type's prefix means the data is corrupt.
pub(crate) fn parse_id<T: StoredId>(column: &str, text: String) -> Result<T> {
    T::parse_column(text).map_err(|e| StoreError::Corrupt(format!("{column}: {e}")))
}

/// Reads the id column `column` of `row` as a typed id.
pub(crate) fn id<T: StoredId>(row: &SqliteRow, column: &str) -> Result<T> {
    parse_id(column, row.try_get(column)?)
}

pub(crate) fn app(row: &SqliteRow) -> Result<App> {
    Ok(App {
        id: id(row, "id")?,
        uid: row.try_get("uid")?,
        name: row.try_get("name")?,
        throttle_rate: row.try_get("throttle_rate")?,
        metadata: from_json::<Metadata>("metadata", row.try_get("metadata")?)?,
        pusher: PusherCredentials {
            app_id: row.try_get("pusher_app_id")?,
            key: row.try_get("pusher_key")?,
            secret: row.try_get("pusher_secret")?,
            previous: match (
                row.try_get::<Option<String>, _>("pusher_previous_secret")?,
                row.try_get::<Option<i64>, _>("pusher_previous_secret_until")?,
            ) {
                (Some(secret), Some(until)) => Some(herald_core::model::RetiredSecret {
                    secret,
                    until: time(until)?,
                }),
                _ => None,
            },
        },
        history: opt_from_json::<Vec<HistoryRuleRow>>(
            "history_rules",
            row.try_get("history_rules")?,
        )?
        .map(|rules| rules.into_iter().map(HistoryRule::from).collect()),
        created_at: time(row.try_get("created_at")?)?,
        updated_at: time(row.try_get("updated_at")?)?,
    })
}

pub(crate) fn event_type(row: &SqliteRow) -> Result<EventType> {
    Ok(EventType {
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        archived: row.try_get("archived")?,
        deprecated: row.try_get("deprecated")?,
        schemas: row.try_get("schemas")?,
        group_name: row.try_get("group_name")?,
        feature_flags: opt_from_json("feature_flags", row.try_get("feature_flags")?)?,
        created_at: time(row.try_get("created_at")?)?,
        updated_at: time(row.try_get("updated_at")?)?,
    })
}

/// Reads endpoint columns; `prefix` is how the query aliased them (`""` or `"e_"`).
pub(crate) fn endpoint(row: &SqliteRow, prefix: &str) -> Result<Endpoint> {
    let col = |name: &str| format!("{prefix}{name}");
    let previous: Vec<(String, i64)> = from_json(
        "previous_secrets",
        row.try_get(col("previous_secrets").as_str())?,
    )?;
    Ok(Endpoint {
        id: id(row, col("id").as_str())?,
        app_id: id(row, col("app_id").as_str())?,
        uid: row.try_get(col("uid").as_str())?,
        url: row.try_get(col("url").as_str())?,
        description: row.try_get(col("description").as_str())?,
        throttle_rate: row.try_get(col("throttle_rate").as_str())?,
        disabled: row.try_get(col("disabled").as_str())?,
        format: {
            let text: String = row.try_get(col("format").as_str())?;
            EndpointFormat::parse(&text)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown endpoint format {text:?}")))?
        },
        event_types: opt_from_json("event_types", row.try_get(col("event_types").as_str())?)?,
        channels: opt_from_json("channels", row.try_get(col("channels").as_str())?)?,
        metadata: from_json::<Metadata>("metadata", row.try_get(col("metadata").as_str())?)?,
        headers: from_json::<BTreeMap<String, String>>(
            "headers",
            row.try_get(col("headers").as_str())?,
        )?,
        secret: row.try_get(col("secret").as_str())?,
        previous_secrets: previous
            .into_iter()
            .map(|(secret, expires)| Ok((secret, time(expires)?)))
            .collect::<Result<_>>()?,
        failing_since: row
            .try_get::<Option<i64>, _>(col("failing_since").as_str())?
            .map(time)
            .transpose()?,
        created_at: time(row.try_get(col("created_at").as_str())?)?,
        updated_at: time(row.try_get(col("updated_at").as_str())?)?,
    })
}

pub(crate) fn previous_secrets_json(endpoint: &Endpoint) -> String {
    let list: Vec<(&str, i64)> = endpoint
        .previous_secrets
        .iter()
        .map(|(s, t)| (s.as_str(), millis(*t)))
        .collect();
    to_json(&list)
}

pub(crate) fn message(row: &SqliteRow) -> Result<Message> {
    let payload: Vec<u8> = row.try_get("payload")?;
    Ok(Message {
        id: id(row, "id")?,
        app_id: id(row, "app_id")?,
        event_id: row.try_get("event_id")?,
        event_type: row.try_get("event_type")?,
        channels: opt_from_json("channels", row.try_get("channels")?)?,
        tags: opt_from_json("tags", row.try_get("tags")?)?,
        payload: payload.into(),
        created_at: time(row.try_get("created_at")?)?,
    })
}

pub(crate) fn status(code: i64) -> Result<DeliveryStatus> {
    DeliveryStatus::from_code(code).ok_or_else(|| StoreError::Corrupt(format!("status {code}")))
}

pub(crate) fn attempt(row: &SqliteRow) -> Result<Attempt> {
    Ok(Attempt {
        id: id(row, "id")?,
        msg_id: id(row, "msg_id")?,
        endpoint_id: id(row, "endpoint_id")?,
        app_id: id(row, "app_id")?,
        url: row.try_get("url")?,
        status: status(row.try_get("status")?)?,
        response_status_code: row.try_get("response_status_code")?,
        response: row.try_get("response")?,
        response_duration_ms: row.try_get("response_duration_ms")?,
        trigger_type: TriggerType::from_code(row.try_get("trigger_type")?),
        created_at: time(row.try_get("created_at")?)?,
    })
}

/// Maps a unique-constraint violation to `Conflict` with `what`.
pub(crate) fn conflict_as(what: &str) -> impl FnOnce(sqlx::Error) -> StoreError + '_ {
    move |e| match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            StoreError::Conflict(what.to_owned())
        }
        _ => StoreError::Database(e),
    }
}

pub(crate) fn ingest_source(row: &SqliteRow) -> Result<IngestSource> {
    let kind: String = row.try_get("kind")?;
    Ok(IngestSource {
        id: id(row, "id")?,
        app_id: id(row, "app_id")?,
        uid: row.try_get("uid")?,
        name: row.try_get("name")?,
        kind: SourceKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown source kind {kind:?}")))?,
        secrets: from_json("secrets", row.try_get("secrets")?)?,
        hmac: opt_from_json::<HmacRow>("hmac", row.try_get("hmac")?)?.map(HmacScheme::from),
        tolerance_secs: row.try_get("tolerance_secs")?,
        event_type: from_json("event_type", row.try_get("event_type")?)?,
        channels: from_json("channels", row.try_get("channels")?)?,
        default_channel: row.try_get("default_channel")?,
        trust_unsigned_headers: row.try_get("trust_unsigned_headers")?,
        created_at: time(row.try_get("created_at")?)?,
        updated_at: time(row.try_get("updated_at")?)?,
    })
}

pub(crate) fn ingest_event(row: &SqliteRow) -> Result<IngestEvent> {
    let body: Vec<u8> = row.try_get("body")?;
    Ok(IngestEvent {
        id: id(row, "id")?,
        source_id: id(row, "source_id")?,
        app_id: id(row, "app_id")?,
        delivery_id: row.try_get("delivery_id")?,
        headers: from_json("headers", row.try_get("headers")?)?,
        body: body.into(),
        event_type: row.try_get("event_type")?,
        channels: from_json("channels", row.try_get("channels")?)?,
        msg_id: id(row, "msg_id")?,
        received_at: time(row.try_get("received_at")?)?,
    })
}

pub(crate) fn history_entry(row: &SqliteRow) -> Result<herald_core::history::HistoryEntry> {
    Ok(herald_core::history::HistoryEntry {
        app_id: id(row, "app_id")?,
        channel: row.try_get("channel")?,
        epoch: row.try_get("epoch")?,
        offset: u64::try_from(row.try_get::<i64, _>("seq")?)
            .map_err(|_| StoreError::Corrupt("history offset".into()))?,
        event: row.try_get("event")?,
        data: row.try_get("data")?,
        raw_json: row.try_get("raw_json")?,
        user_id: row.try_get("user_id")?,
        created_at: time(row.try_get("created_at")?)?,
    })
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
