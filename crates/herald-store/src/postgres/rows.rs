//! Conversions between PostgreSQL rows and domain values, mirroring `sqlite/rows.rs`.
//!
//! The schema keeps SQLite's representations where they matter to conversion: times are BIGINT
//! milliseconds, lists and maps are JSON text in the same shapes (the JSON row types and the
//! helpers that write them are shared with the SQLite store), ids are text parsed into their
//! typed ids (a missing prefix is [`StoreError::Corrupt`]). What differs is the column types
//! PostgreSQL decodes strictly: flags are BOOLEAN, status and trigger codes INTEGER (`i32`),
//! blobs BYTEA.
//!
//! Some helpers serve the sub-traits filled in by the next steps (endpoints, messages,
//! attempts) and are unused until then; the ingest and history readers are in use.

use std::collections::BTreeMap;

use herald_core::{
    history::{HistoryEntry, HistoryRule},
    ingest::{HmacScheme, SourceKind},
    model::{
        App, Attempt, DeliveryStatus, Endpoint, EndpointFormat, EventType, IngestEvent,
        IngestSource, Message, Metadata, PusherCredentials, RetiredSecret, TriggerType,
    },
};
use sqlx::{Row, postgres::PgRow};

pub(crate) use crate::sqlite::rows::{
    StoredId, conflict_as, from_json, history_rules_json, millis, opt_from_json, opt_json,
    parse_id, time, to_json,
};
// JSON column writers shared with SQLite (a source's hmac, an endpoint's retired secrets), so
// both backends store the same shapes.
pub(crate) use crate::sqlite::rows::{hmac_json, previous_secrets_json};
use crate::{
    Result, StoreError,
    sqlite::rows::{HistoryRuleRow, HmacRow},
};

/// Reads the id column `column` of `row` as a typed id.
pub(crate) fn id<T: StoredId>(row: &PgRow, column: &str) -> Result<T> {
    parse_id(column, row.try_get(column)?)
}

/// A time column that may be NULL.
#[allow(dead_code)] // used by the endpoint and delivery steps
pub(crate) fn opt_time(row: &PgRow, column: &str) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
    row.try_get::<Option<i64>, _>(column)?.map(time).transpose()
}

pub(crate) fn app(row: &PgRow) -> Result<App> {
    Ok(App {
        id: id(row, "id")?,
        uid: row.try_get("uid")?,
        name: row.try_get("name")?,
        throttle_rate: row.try_get("throttle_rate")?,
        metadata: from_json::<Metadata>("metadata", &row.try_get::<String, _>("metadata")?)?,
        pusher: PusherCredentials {
            app_id: row.try_get("pusher_app_id")?,
            key: row.try_get("pusher_key")?,
            secret: row.try_get("pusher_secret")?,
            previous: match (
                row.try_get::<Option<String>, _>("pusher_previous_secret")?,
                row.try_get::<Option<i64>, _>("pusher_previous_secret_until")?,
            ) {
                (Some(secret), Some(until)) => Some(RetiredSecret {
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

pub(crate) fn event_type(row: &PgRow) -> Result<EventType> {
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
#[allow(dead_code)] // used by the endpoint and claim steps
pub(crate) fn endpoint(row: &PgRow, prefix: &str) -> Result<Endpoint> {
    let col = |name: &str| format!("{prefix}{name}");
    let text = |name: &str| -> Result<String> { Ok(row.try_get(col(name).as_str())?) };
    let previous: Vec<(String, i64)> = from_json("previous_secrets", &text("previous_secrets")?)?;
    Ok(Endpoint {
        id: id(row, col("id").as_str())?,
        app_id: id(row, col("app_id").as_str())?,
        uid: row.try_get(col("uid").as_str())?,
        url: text("url")?,
        description: text("description")?,
        throttle_rate: row.try_get(col("throttle_rate").as_str())?,
        disabled: row.try_get(col("disabled").as_str())?,
        format: {
            let format = text("format")?;
            EndpointFormat::parse(&format)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown endpoint format {format:?}")))?
        },
        event_types: opt_from_json("event_types", row.try_get(col("event_types").as_str())?)?,
        channels: opt_from_json("channels", row.try_get(col("channels").as_str())?)?,
        metadata: from_json::<Metadata>("metadata", &text("metadata")?)?,
        headers: from_json::<BTreeMap<String, String>>("headers", &text("headers")?)?,
        secret: text("secret")?,
        previous_secrets: previous
            .into_iter()
            .map(|(secret, expires)| Ok((secret, time(expires)?)))
            .collect::<Result<_>>()?,
        failing_since: opt_time(row, col("failing_since").as_str())?,
        created_at: time(row.try_get(col("created_at").as_str())?)?,
        updated_at: time(row.try_get(col("updated_at").as_str())?)?,
    })
}

#[allow(dead_code)] // used by the message step
pub(crate) fn message(row: &PgRow) -> Result<Message> {
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

/// A delivery or attempt status code (INTEGER).
#[allow(dead_code)] // used by the delivery and attempt steps
pub(crate) fn status(code: i32) -> Result<DeliveryStatus> {
    DeliveryStatus::from_code(i64::from(code))
        .ok_or_else(|| StoreError::Corrupt(format!("status {code}")))
}

#[allow(dead_code)] // used by the attempt step
pub(crate) fn attempt(row: &PgRow) -> Result<Attempt> {
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
        trigger_type: TriggerType::from_code(i64::from(row.try_get::<i32, _>("trigger_type")?)),
        created_at: time(row.try_get("created_at")?)?,
    })
}

pub(crate) fn ingest_source(row: &PgRow) -> Result<IngestSource> {
    let kind: String = row.try_get("kind")?;
    Ok(IngestSource {
        id: id(row, "id")?,
        app_id: id(row, "app_id")?,
        uid: row.try_get("uid")?,
        name: row.try_get("name")?,
        kind: SourceKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown source kind {kind:?}")))?,
        secrets: from_json("secrets", &row.try_get::<String, _>("secrets")?)?,
        hmac: opt_from_json::<HmacRow>("hmac", row.try_get("hmac")?)?.map(HmacScheme::from),
        tolerance_secs: row.try_get("tolerance_secs")?,
        event_type: from_json("event_type", &row.try_get::<String, _>("event_type")?)?,
        channels: from_json("channels", &row.try_get::<String, _>("channels")?)?,
        default_channel: row.try_get("default_channel")?,
        trust_unsigned_headers: row.try_get("trust_unsigned_headers")?,
        created_at: time(row.try_get("created_at")?)?,
        updated_at: time(row.try_get("updated_at")?)?,
    })
}

pub(crate) fn ingest_event(row: &PgRow) -> Result<IngestEvent> {
    let body: Vec<u8> = row.try_get("body")?;
    Ok(IngestEvent {
        id: id(row, "id")?,
        source_id: id(row, "source_id")?,
        app_id: id(row, "app_id")?,
        delivery_id: row.try_get("delivery_id")?,
        headers: from_json("headers", &row.try_get::<String, _>("headers")?)?,
        body: body.into(),
        event_type: row.try_get("event_type")?,
        channels: from_json("channels", &row.try_get::<String, _>("channels")?)?,
        msg_id: id(row, "msg_id")?,
        received_at: time(row.try_get("received_at")?)?,
    })
}

/// An offset column (BIGINT, never negative).
pub(crate) fn offset(row: &PgRow, column: &str) -> Result<u64> {
    u64::try_from(row.try_get::<i64, _>(column)?)
        .map_err(|_| StoreError::Corrupt(format!("{column}: negative offset")))
}

pub(crate) fn history_entry(row: &PgRow) -> Result<HistoryEntry> {
    Ok(HistoryEntry {
        app_id: id(row, "app_id")?,
        channel: row.try_get("channel")?,
        epoch: row.try_get("epoch")?,
        offset: offset(row, "seq")?,
        event: row.try_get("event")?,
        data: row.try_get("data")?,
        raw_json: row.try_get("raw_json")?,
        user_id: row.try_get("user_id")?,
        created_at: time(row.try_get("created_at")?)?,
    })
}
