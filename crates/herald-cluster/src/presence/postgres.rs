//! The presence record on PostgreSQL (migration `0004_presence`): rows per node, each change
//! one transaction under an advisory lock on its key, notices by `pg_notify` in the same
//! transaction (heard by every node's LISTEN session, see [`crate::postgres`]).
//!
//! Tables: `cluster_nodes` (node, heartbeat), `cluster_presence_members` (a row per app,
//! channel, user and node that holds the user) and `cluster_channel_occupancy` (a row per
//! app, channel and node with subscribers there, and their count). Locks: (app, channel, user)
//! for members, (app, channel) for occupancy, so every node's change of one key takes turns and
//! "is another node's row there?" is answered with the key held.

use std::collections::HashSet;

use chrono::Utc;
use herald_channels::presence::RemoteMember;
use sqlx::{PgPool, Postgres, Transaction};

use super::{
    ClusterPresenceError, Held, Notice, NoticeKind, Orphans, PRESENCE_CHANNEL, PresenceRecord,
};

/// A notification payload must be shorter than 8,000 bytes; larger `user_info` is read from
/// the member's row instead.
const MAX_NOTICE_BYTES: usize = 7_900;

/// The presence record in the PostgreSQL store's database (see the module doc).
pub struct PostgresRecord {
    pool: PgPool,
}

impl PostgresRecord {
    /// `pool` is the PostgreSQL store's (same database and schema).
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

/// The payload of `notice`: whole if it fits a notification, else without `user_info`
/// (read from the member's row by whoever hears it).
fn encode(mut notice: Notice) -> Result<String, ClusterPresenceError> {
    let whole = notice.to_json()?;
    if whole.len() <= MAX_NOTICE_BYTES {
        return Ok(whole);
    }
    notice.info = None;
    notice.info_by_reference = true;
    notice.to_json()
}

fn member_key(app: &str, channel: &str, user_id: &str) -> String {
    format!("member\u{1f}{app}\u{1f}{channel}\u{1f}{user_id}")
}

fn occupancy_key(app: &str, channel: &str) -> String {
    format!("occupancy\u{1f}{app}\u{1f}{channel}")
}

/// Takes the transaction-scoped lock of `key`: every node's change of one key takes turns.
async fn lock(tx: &mut Transaction<'_, Postgres>, key: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(key)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn notify(
    tx: &mut Transaction<'_, Postgres>,
    notice: Notice,
) -> Result<(), ClusterPresenceError> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(PRESENCE_CHANNEL)
        .bind(encode(notice)?)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn member_elsewhere(
    tx: &mut Transaction<'_, Postgres>,
    app: &str,
    channel: &str,
    user_id: &str,
    node: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM cluster_presence_members
         WHERE app_id = $1 AND channel = $2 AND user_id = $3 AND node_id <> $4)",
    )
    .bind(app)
    .bind(channel)
    .bind(user_id)
    .bind(node)
    .fetch_one(&mut **tx)
    .await
}

#[async_trait::async_trait]
impl PresenceRecord for PostgresRecord {
    async fn register(&self, node: &str, beat: i64) -> Result<(), ClusterPresenceError> {
        sqlx::query(
            "INSERT INTO cluster_nodes (node_id, started_at, heartbeat_at) VALUES ($1, $2, $2)
             ON CONFLICT (node_id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at",
        )
        .bind(node)
        .bind(beat)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn heartbeat(&self, node: &str, beat: i64) -> Result<bool, ClusterPresenceError> {
        let renewed = sqlx::query("UPDATE cluster_nodes SET heartbeat_at = $2 WHERE node_id = $1")
            .bind(node)
            .bind(beat)
            .execute(&self.pool)
            .await?;
        Ok(renewed.rows_affected() > 0)
    }

    async fn join(
        &self,
        node: &str,
        app: &str,
        channel: &str,
        user_id: &str,
        info: Option<&str>,
        except: Option<&str>,
    ) -> Result<bool, ClusterPresenceError> {
        let mut tx = self.pool.begin().await?;
        lock(&mut tx, &member_key(app, channel, user_id)).await?;
        let elsewhere = member_elsewhere(&mut tx, app, channel, user_id, node).await?;
        // A row of this node already there (a change applied twice) reports nothing.
        let inserted = sqlx::query(
            "INSERT INTO cluster_presence_members
                 (app_id, channel, user_id, node_id, user_info, joined_at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (app_id, channel, user_id, node_id) DO NOTHING",
        )
        .bind(app)
        .bind(channel)
        .bind(user_id)
        .bind(node)
        .bind(info)
        .bind(Utc::now().timestamp_millis())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        let cluster = inserted && !elsewhere;
        if cluster {
            let notice = Notice::member(NoticeKind::Added, node, app, channel, user_id)
                .with_info(info, except);
            notify(&mut tx, notice).await?;
        }
        tx.commit().await?;
        Ok(cluster)
    }

    async fn leave(
        &self,
        node: &str,
        deciding: &str,
        app: &str,
        channel: &str,
        user_id: &str,
    ) -> Result<bool, ClusterPresenceError> {
        let mut tx = self.pool.begin().await?;
        lock(&mut tx, &member_key(app, channel, user_id)).await?;
        let removed: Option<i32> = sqlx::query_scalar(
            "DELETE FROM cluster_presence_members
             WHERE app_id = $1 AND channel = $2 AND user_id = $3 AND node_id = $4
             RETURNING 1",
        )
        .bind(app)
        .bind(channel)
        .bind(user_id)
        .bind(node)
        .fetch_optional(&mut *tx)
        .await?;
        let last =
            removed.is_some() && !member_elsewhere(&mut tx, app, channel, user_id, node).await?;
        if last {
            let notice = Notice::member(NoticeKind::Removed, deciding, app, channel, user_id);
            notify(&mut tx, notice).await?;
        }
        tx.commit().await?;
        Ok(last)
    }

    async fn occupy(
        &self,
        node: &str,
        app: &str,
        channel: &str,
        subscriptions: i64,
    ) -> Result<bool, ClusterPresenceError> {
        let mut tx = self.pool.begin().await?;
        lock(&mut tx, &occupancy_key(app, channel)).await?;
        let elsewhere: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM cluster_channel_occupancy
             WHERE app_id = $1 AND channel = $2 AND node_id <> $3)",
        )
        .bind(app)
        .bind(channel)
        .bind(node)
        .fetch_one(&mut *tx)
        .await?;
        // `xmax = 0` only for a row this statement inserted: one already there (a change
        // applied twice) reports nothing.
        let inserted: bool = sqlx::query_scalar(
            "INSERT INTO cluster_channel_occupancy (app_id, channel, node_id, subscriptions)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (app_id, channel, node_id)
             DO UPDATE SET subscriptions = EXCLUDED.subscriptions
             RETURNING (xmax = 0)",
        )
        .bind(app)
        .bind(channel)
        .bind(node)
        .bind(subscriptions)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(inserted && !elsewhere)
    }

    async fn vacate(
        &self,
        node: &str,
        app: &str,
        channel: &str,
    ) -> Result<bool, ClusterPresenceError> {
        let mut tx = self.pool.begin().await?;
        lock(&mut tx, &occupancy_key(app, channel)).await?;
        let removed: Option<i32> = sqlx::query_scalar(
            "DELETE FROM cluster_channel_occupancy
             WHERE app_id = $1 AND channel = $2 AND node_id = $3 RETURNING 1",
        )
        .bind(app)
        .bind(channel)
        .bind(node)
        .fetch_optional(&mut *tx)
        .await?;
        let elsewhere: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM cluster_channel_occupancy WHERE app_id = $1 AND channel = $2)",
        )
        .bind(app)
        .bind(channel)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(removed.is_some() && !elsewhere)
    }

    async fn write_counts(
        &self,
        node: &str,
        counts: &[(String, String, i64)],
    ) -> Result<(), ClusterPresenceError> {
        let apps: Vec<&str> = counts.iter().map(|(a, _, _)| a.as_str()).collect();
        let channels: Vec<&str> = counts.iter().map(|(_, c, _)| c.as_str()).collect();
        let numbers: Vec<i64> = counts.iter().map(|(_, _, n)| *n).collect();
        sqlx::query(
            "UPDATE cluster_channel_occupancy o SET subscriptions = u.n
             FROM unnest($1::text[], $2::text[], $3::bigint[]) AS u(a, c, n)
             WHERE o.app_id = u.a AND o.channel = u.c AND o.node_id = $4",
        )
        .bind(&apps)
        .bind(&channels)
        .bind(&numbers)
        .bind(node)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn held_by(&self, node: &str) -> Result<Held, ClusterPresenceError> {
        let members: HashSet<(String, String, String)> = sqlx::query_as(
            "SELECT app_id, channel, user_id FROM cluster_presence_members WHERE node_id = $1",
        )
        .bind(node)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .collect();
        let channels: HashSet<(String, String)> = sqlx::query_as(
            "SELECT app_id, channel FROM cluster_channel_occupancy WHERE node_id = $1",
        )
        .bind(node)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .collect();
        Ok(Held { members, channels })
    }

    async fn stale_nodes(
        &self,
        cutoff_millis: i64,
    ) -> Result<Vec<(String, i64)>, ClusterPresenceError> {
        Ok(sqlx::query_as(
            "SELECT node_id, heartbeat_at FROM cluster_nodes WHERE heartbeat_at < $1",
        )
        .bind(cutoff_millis)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn expire_nodes(&self, cutoff_millis: i64) -> Result<Vec<String>, ClusterPresenceError> {
        Ok(sqlx::query_scalar(
            "DELETE FROM cluster_nodes WHERE heartbeat_at < $1 RETURNING node_id",
        )
        .bind(cutoff_millis)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn forget_node(&self, node: &str) -> Result<(), ClusterPresenceError> {
        sqlx::query("DELETE FROM cluster_nodes WHERE node_id = $1")
            .bind(node)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn orphans(&self, limit: i64) -> Result<Orphans, ClusterPresenceError> {
        let members = sqlx::query_as(
            "SELECT node_id, app_id, channel, user_id FROM cluster_presence_members m
             WHERE NOT EXISTS (SELECT 1 FROM cluster_nodes n WHERE n.node_id = m.node_id)
             LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let channels = sqlx::query_as(
            "SELECT node_id, app_id, channel FROM cluster_channel_occupancy o
             WHERE NOT EXISTS (SELECT 1 FROM cluster_nodes n WHERE n.node_id = o.node_id)
             LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(Orphans { members, channels })
    }

    async fn members_elsewhere(
        &self,
        node: &str,
        app: &str,
        channel: &str,
    ) -> Result<Vec<RemoteMember>, ClusterPresenceError> {
        Ok(sqlx::query_as::<_, (String, Option<String>)>(
            "SELECT DISTINCT ON (user_id) user_id, user_info FROM cluster_presence_members
             WHERE app_id = $1 AND channel = $2 AND node_id <> $3
             ORDER BY user_id, joined_at",
        )
        .bind(app)
        .bind(channel)
        .bind(node)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn counts_elsewhere(
        &self,
        node: &str,
        app: &str,
        prefix: &str,
    ) -> Result<Vec<(String, i64)>, ClusterPresenceError> {
        Ok(sqlx::query_as(
            "SELECT channel, SUM(subscriptions)::BIGINT FROM cluster_channel_occupancy
             WHERE app_id = $1 AND node_id <> $2 AND left(channel, length($3)) = $3
             GROUP BY channel",
        )
        .bind(app)
        .bind(node)
        .bind(prefix)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn users_elsewhere(
        &self,
        node: &str,
        app: &str,
        prefix: &str,
    ) -> Result<Vec<(String, String)>, ClusterPresenceError> {
        Ok(sqlx::query_as(
            "SELECT DISTINCT channel, user_id FROM cluster_presence_members
             WHERE app_id = $1 AND node_id <> $2 AND left(channel, length($3)) = $3",
        )
        .bind(app)
        .bind(node)
        .bind(prefix)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn member_info(
        &self,
        app: &str,
        channel: &str,
        user_id: &str,
    ) -> Result<Option<String>, ClusterPresenceError> {
        Ok(sqlx::query_scalar::<_, Option<String>>(
            "SELECT user_info FROM cluster_presence_members
             WHERE app_id = $1 AND channel = $2 AND user_id = $3 LIMIT 1",
        )
        .bind(app)
        .bind(channel)
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?
        .flatten())
    }

    async fn announce(&self, notice: Notice) -> Result<(), ClusterPresenceError> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(PRESENCE_CHANNEL)
            .bind(encode(notice)?)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
