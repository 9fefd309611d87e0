//! `terminate_connections` kept in PostgreSQL for [`KEPT_FOR`], so that a node that did not
//! hear one (its LISTEN session or its bus was down when the notice went out) applies it
//! once its link is back ([`replay`]), to the connections signed in before it. The notice
//! itself still travels as it always did (the presence record's `announce`); this table is
//! only the memory of it. Applying a termination twice changes nothing: the connections
//! signed in before it are closed already, and later ones are left alone.
//!
//! Schema (migrations/postgres/0017_cluster_terminations.sql): `cluster_terminations`
//! (app_id, user_id, terminated_at in the cluster's Unix milliseconds), indexed by time.

use std::time::Duration;

use herald_channels::Hub;
use herald_core::AppId;
use herald_store::ClusterClock;
use sqlx::PgPool;

/// How long a termination is kept: longer than a link is expected to be down. A node whose
/// link was down longer misses the terminations older than this.
pub const KEPT_FOR: Duration = Duration::from_secs(15 * 60);

fn kept_for_millis() -> i64 {
    i64::try_from(KEPT_FOR.as_millis()).unwrap_or(i64::MAX)
}

/// Records that `user_id`'s connections to `app_id` were terminated at `at_millis` (the
/// cluster's time), and forgets terminations older than [`KEPT_FOR`].
pub async fn remember(
    pool: &PgPool,
    app_id: &str,
    user_id: &str,
    at_millis: i64,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO cluster_terminations (app_id, user_id, terminated_at) VALUES ($1, $2, $3)",
    )
    .bind(app_id)
    .bind(user_id)
    .bind(at_millis)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM cluster_terminations WHERE terminated_at < $1")
        .bind(at_millis.saturating_sub(kept_for_millis()))
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// A termination as kept: app, user, and when (the cluster's Unix milliseconds).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Termination {
    pub app_id: String,
    pub user_id: String,
    pub terminated_at: i64,
}

/// The terminations kept at `now_millis` (the cluster's time), oldest first.
pub async fn kept(pool: &PgPool, now_millis: i64) -> Result<Vec<Termination>, sqlx::Error> {
    sqlx::query_as(
        "SELECT app_id, user_id, terminated_at FROM cluster_terminations
         WHERE terminated_at >= $1 ORDER BY terminated_at",
    )
    .bind(now_millis.saturating_sub(kept_for_millis()))
    .fetch_all(pool)
    .await
}

/// After this node's link was back: applies every termination kept to this node's
/// connections that signed in before it (their sign-in times are this process's clock; a
/// termination's is the cluster's, turned into this process's by `clock`'s reading now).
/// Returns how many connections it closed.
pub async fn replay(pool: &PgPool, hub: &Hub, clock: &ClusterClock) -> Result<usize, sqlx::Error> {
    let (cluster_now, local_now) = (clock.now().timestamp_millis(), tokio::time::Instant::now());
    let kept = kept(pool, cluster_now).await?;
    let mut closed = 0;
    for termination in kept {
        let Ok(app_id) = AppId::parse(&termination.app_id) else {
            continue;
        };
        let Some(app) = hub.existing(&app_id) else {
            continue;
        };
        let ago = u64::try_from(cluster_now.saturating_sub(termination.terminated_at)).unwrap_or(0);
        // A termination further back than this process's clock reaches: every sign-in here
        // is later than it.
        let Some(before) = local_now.checked_sub(Duration::from_millis(ago)) else {
            continue;
        };
        closed += app.terminate_user_signed_in_before(&termination.user_id, Some(before));
    }
    Ok(closed)
}
