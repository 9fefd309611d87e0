//! Conversions between PostgreSQL rows and domain values, mirroring `sqlite/rows.rs`.
//!
//! The schema keeps SQLite's representations where they matter to conversion: times are BIGINT
//! milliseconds, lists and maps are JSON text in the same shapes (the JSON row types and the
//! helpers that write them are shared with the SQLite store), ids are text parsed into their
//! typed ids (a missing prefix is [`StoreError::Corrupt`]). What differs is the column types
//! PostgreSQL decodes strictly: flags are BOOLEAN, status and trigger codes INTEGER (`i32`),
//! blobs BYTEA, which the `$code` parameter of the shared readers (`sql::row_readers!`)
//! and [`status`] account for.

use herald_core::model::DeliveryStatus;
use sqlx::{Row, postgres::PgRow};

pub(crate) use crate::sqlite::rows::{
    conflict_as, history_rules_json, millis, opt_json, socketio_json, time, to_json,
};
use crate::{Result, StoreError};

/// A time column that may be NULL.
pub(crate) fn opt_time(row: &PgRow, column: &str) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
    row.try_get::<Option<i64>, _>(column)?.map(time).transpose()
}

/// A delivery or attempt status code (INTEGER).
pub(crate) fn status(code: i32) -> Result<DeliveryStatus> {
    DeliveryStatus::from_code(i64::from(code))
        .ok_or_else(|| StoreError::Corrupt(format!("status {code}")))
}

crate::sql::row_readers!(PgRow, i32);
