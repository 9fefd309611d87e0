//! Endpoints' `throttleRate` turns on PostgreSQL, kept for the whole cluster: see
//! [`MessageStore::reserve_turn`](crate::MessageStore::reserve_turn).
//!
//! Table `endpoint_paces` (migration 0015): endpoint_id TEXT PK (endpoints, cascade), due
//! BIGINT (microseconds, the cluster's time): the endpoint's theoretical arrival time. A
//! reservation is one statement: the row's lock orders the nodes' reservations, and a refused
//! one (its turn past `latest`) changes nothing.

use chrono::{DateTime, Utc};
use herald_core::EndpointId;
use sqlx::{PgPool, Row};

use crate::{Result, StoreError, Turn};

/// `$1` endpoint, `$2` now, `$3` the interval between turns, `$4` the burst's tolerance (how
/// far ahead of its theoretical time a turn may go), `$5` the latest start: all microseconds.
/// Returns the new `due`, or no row when the turn would come after `$5`. A new row's turn is
/// now (the caller checks that now is not past `$5`); a row whose `due` is past starts a
/// burst, as a new one.
const RESERVE_TURN: &str = "
    INSERT INTO endpoint_paces AS p (endpoint_id, due) VALUES ($1, $2 + $3)
    ON CONFLICT (endpoint_id) DO UPDATE SET due = GREATEST(p.due, $2) + $3
        WHERE GREATEST(p.due, $2) - $4 <= $5
    RETURNING due";

pub(super) async fn reserve_turn(
    pool: &PgPool,
    endpoint: &EndpointId,
    rate: u16,
    now: DateTime<Utc>,
    latest: DateTime<Utc>,
) -> Result<Turn> {
    if latest < now {
        return Ok(Turn::TooLate);
    }
    let rate = i64::from(rate.max(1));
    let interval = 1_000_000 / rate;
    let tolerance = interval * (rate - 1);
    let now_us = now.timestamp_micros();
    let row = sqlx::query(RESERVE_TURN)
        .bind(endpoint.as_str())
        .bind(now_us)
        .bind(interval)
        .bind(tolerance)
        .bind(latest.timestamp_micros())
        .fetch_optional(pool)
        .await?;
    let Some(row) = row else {
        return Ok(Turn::TooLate);
    };
    let due: i64 = row.try_get("due")?;
    // The reservation's theoretical time is the new `due` less one interval; it may go a
    // burst's tolerance ahead of it, but not before now.
    let at = (due - interval - tolerance).max(now_us);
    DateTime::from_timestamp_micros(at)
        .map(Turn::At)
        .ok_or_else(|| StoreError::Corrupt(format!("endpoint {endpoint}'s pace is out of range")))
}
