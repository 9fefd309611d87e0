//! [`ChannelWebhookStore`] on PostgreSQL: channel webhook messages and the occupancy they
//! report, committed together in one transaction.
//!
//! Schema (migrations/postgres/0001_init.sql):
//! - `channel_occupancy`: (app_id, channel, user_id) PK, all TEXT; user_id '' is the channel
//!   itself (`Occupant::user_id` None), otherwise a presence member. Only each occupant's last
//!   change in a record counts (as SQLite's `apply_occupancy`): entered, `INSERT ... ON
//!   CONFLICT DO NOTHING`; left, DELETE. Rows are written in sorted key order, so two nodes'
//!   records touching the same occupants lock them in the same order.
//! - `messages` and `deliveries` for the webhook messages, through `messages::insert_message`,
//!   which also notifies `messages::DELIVERIES_CHANNEL` in the same transaction for each
//!   message with targets (PostgreSQL sends it once, on commit), so idle nodes' dispatchers
//!   wake for the deliveries it queued.

use std::collections::BTreeMap;

use herald_core::EndpointId;
use herald_core::model::Message;
use sqlx::{PgConnection, Postgres, QueryBuilder, Row};

use super::{PostgresStore, rows};
use crate::{ChannelWebhookStore, OccupancyChange, Occupant, Result};

/// Occupancy rows per statement (3 parameters each, far under PostgreSQL's 65535).
const ROWS_PER_STATEMENT: usize = 1000;

/// Applies occupancy changes in the order given: only each occupant's last change matters
/// (entered: a row; left: none), so they become one insert and one delete (per chunk).
async fn apply_occupancy(conn: &mut PgConnection, changes: &[OccupancyChange]) -> Result<()> {
    let mut last: BTreeMap<(&str, &str, &str), bool> = BTreeMap::new();
    for change in changes {
        let (who, entered) = match change {
            OccupancyChange::Entered(who) => (who, true),
            OccupancyChange::Left(who) => (who, false),
        };
        let key = (
            who.app_id.as_str(),
            who.channel.as_str(),
            who.user_id.as_deref().unwrap_or(""),
        );
        last.insert(key, entered);
    }
    let (entered, left): (Vec<_>, Vec<_>) = last.into_iter().partition(|(_, entered)| *entered);
    for chunk in entered.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Postgres> =
            QueryBuilder::new("INSERT INTO channel_occupancy (app_id, channel, user_id) ");
        q.push_values(chunk, |mut row, ((app_id, channel, user_id), _)| {
            row.push_bind(*app_id)
                .push_bind(*channel)
                .push_bind(*user_id);
        });
        q.push(" ON CONFLICT (app_id, channel, user_id) DO NOTHING");
        q.build().execute(&mut *conn).await?;
    }
    for chunk in left.chunks(ROWS_PER_STATEMENT) {
        let keys: Vec<OccupantKey<'_>> = chunk.iter().map(|(key, _)| *key).collect();
        delete_rows(&keys).build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// An occupant's row key: (app_id, channel, user_id, '' for the channel itself).
type OccupantKey<'a> = (&'a str, &'a str, &'a str);

/// `DELETE` of these rows (at most [`ROWS_PER_STATEMENT`]), to run as is or with `RETURNING`
/// pushed after it.
fn delete_rows(keys: &[OccupantKey<'_>]) -> QueryBuilder<Postgres> {
    let mut q: QueryBuilder<Postgres> = QueryBuilder::new(
        "DELETE FROM channel_occupancy WHERE (app_id, channel, user_id) IN (VALUES ",
    );
    let mut values = q.separated(", ");
    for (app_id, channel, user_id) in keys {
        values.push("(");
        values.push_bind_unseparated(*app_id);
        values.push_unseparated(", ");
        values.push_bind_unseparated(*channel);
        values.push_unseparated(", ");
        values.push_bind_unseparated(*user_id);
        values.push_unseparated(")");
    }
    q.push(")");
    q
}

#[async_trait::async_trait]
impl ChannelWebhookStore for PostgresStore {
    async fn record_channel_events(
        &self,
        messages: Vec<(Message, Vec<EndpointId>)>,
        changes: Vec<OccupancyChange>,
    ) -> Result<()> {
        if messages.is_empty() && changes.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        let mut queued = false;
        for (message, targets) in &messages {
            queued |= super::messages::insert_message(&mut tx, message, targets).await?;
        }
        if !changes.is_empty() {
            apply_occupancy(&mut tx, &changes).await?;
        }
        tx.commit().await?;
        if queued {
            self.due.committed();
        }
        Ok(())
    }

    async fn occupants(&self) -> Result<Vec<Occupant>> {
        sqlx::query(
            "SELECT app_id, channel, user_id FROM channel_occupancy
             ORDER BY app_id, channel, user_id",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(occupant)
        .collect()
    }

    async fn release_occupants(&self, occupants: &[Occupant]) -> Result<Vec<Occupant>> {
        // In key order, as `apply_occupancy` locks rows, so two nodes' statements cannot
        // deadlock; a row another statement deleted first is simply not returned.
        let mut keys: Vec<OccupantKey<'_>> = occupants
            .iter()
            .map(|o| {
                (
                    o.app_id.as_str(),
                    o.channel.as_str(),
                    o.user_id.as_deref().unwrap_or(""),
                )
            })
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let mut released = Vec::new();
        for chunk in keys.chunks(ROWS_PER_STATEMENT) {
            let mut q = delete_rows(chunk);
            q.push(" RETURNING app_id, channel, user_id");
            for row in q.build().fetch_all(&self.pool).await? {
                released.push(occupant(&row)?);
            }
        }
        Ok(released)
    }
}

fn occupant(row: &sqlx::postgres::PgRow) -> Result<Occupant> {
    let user_id: String = row.try_get("user_id")?;
    Ok(Occupant {
        app_id: rows::id(row, "app_id")?,
        channel: row.try_get("channel")?,
        user_id: (!user_id.is_empty()).then_some(user_id),
    })
}
