//! Endpoints' `throttleRate` turns on PostgreSQL, kept for the whole cluster: see
//! [`MessageStore::reserve_turn`](crate::MessageStore::reserve_turn).
//!
//! Table `endpoint_paces` (migration 0015): endpoint_id TEXT PK (endpoints, cascade), due
//! BIGINT (nanoseconds, the cluster's time): the endpoint's theoretical arrival time. A
//! reservation is one statement: the row's lock orders the nodes' reservations, and a refused
//! one (its turn past `latest`) changes nothing.

use chrono::{DateTime, Utc};
use herald_core::EndpointId;
use sqlx::{PgPool, Row};

use crate::{Result, StoreError, Turn};

/// `$1` endpoint, `$2` now, `$3` the interval between turns, `$4` the burst's tolerance (how
/// far ahead of its theoretical time a turn may go), `$5` the latest start: all nanoseconds.
/// Returns `reserved`, the new `due`, or NULL when the turn would come after `$5`, and `kept`,
/// the `due` as the statement found it (NULL for a new row, or one committed since the
/// statement began). A new row's turn is now (the caller checks that now is not past `$5`); a
/// row whose `due` is past starts a burst, as a new one.
///
/// The commit does not wait for its WAL to reach the disk (`synchronous_commit` off for this
/// statement's own transaction, set from within it so it costs no round trip): every paced
/// attempt reserves a turn, and the row's lock is held until the commit, so a synchronous one
/// would hold an endpoint's rate to one turn per WAL flush cluster-wide. A crash of the
/// database can lose the last moments' reservations; the turns are then handed out again,
/// which can send a few deliveries early once, never any twice.
const RESERVE_TURN: &str = "
    WITH settings AS MATERIALIZED (
        SELECT set_config('synchronous_commit', 'off', true) AS synchronous_commit
    ), reserved AS (
        INSERT INTO endpoint_paces AS p (endpoint_id, due)
        SELECT $1, $2 + $3 FROM settings
        ON CONFLICT (endpoint_id) DO UPDATE SET due = GREATEST(p.due, $2) + $3
            WHERE GREATEST(p.due, $2) - $4 <= $5
        RETURNING due
    )
    SELECT (SELECT due FROM reserved) AS reserved,
           (SELECT due FROM endpoint_paces WHERE endpoint_id = $1) AS kept";

pub(super) async fn reserve_turn(
    pool: &PgPool,
    endpoint: &EndpointId,
    rate: u16,
    now: DateTime<Utc>,
    latest: DateTime<Utc>,
) -> Result<Turn> {
    let nanos = |at: DateTime<Utc>| {
        at.timestamp_nanos_opt()
            .ok_or_else(|| StoreError::Corrupt(format!("{at} is beyond the paces' range")))
    };
    if latest < now {
        return Ok(Turn::TooLate { due: None });
    }
    let rate = i64::from(rate.max(1));
    // Rounded up: a turn a nanosecond late rather than a rate a little over the limit.
    let interval = (1_000_000_000 + rate - 1) / rate;
    let tolerance = interval * (rate - 1);
    let now_ns = nanos(now)?;
    let row = sqlx::query(RESERVE_TURN)
        .bind(endpoint.as_str())
        .bind(now_ns)
        .bind(interval)
        .bind(tolerance)
        .bind(nanos(latest)?)
        .fetch_one(pool)
        .await?;
    let time = |ns: i64| DateTime::from_timestamp_nanos(ns);
    let Some(due) = row.try_get::<Option<i64>, _>("reserved")? else {
        let kept: Option<i64> = row.try_get("kept")?;
        return Ok(Turn::TooLate {
            due: kept.map(time),
        });
    };
    // The reservation's theoretical time is the new `due` less one interval; it may go a
    // burst's tolerance ahead of it, but not before now.
    Ok(Turn::At {
        at: time((due - interval - tolerance).max(now_ns)),
        due: time(due),
    })
}
