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
        let mut q: QueryBuilder<Postgres> = QueryBuilder::new(
            "DELETE FROM channel_occupancy WHERE (app_id, channel, user_id) IN (VALUES ",
        );
        let mut values = q.separated(", ");
        for ((app_id, channel, user_id), _) in chunk {
            values.push("(");
            values.push_bind_unseparated(*app_id);
            values.push_unseparated(", ");
            values.push_bind_unseparated(*channel);
            values.push_unseparated(", ");
            values.push_bind_unseparated(*user_id);
            values.push_unseparated(")");
        }
        q.push(")");
        q.build().execute(&mut *conn).await?;
    }
    Ok(())
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
        .map(|row| {
            let user_id: String = row.try_get("user_id")?;
            Ok(Occupant {
                app_id: rows::id(row, "app_id")?,
                channel: row.try_get("channel")?,
                user_id: (!user_id.is_empty()).then_some(user_id),
            })
        })
        .collect()
    }
}
