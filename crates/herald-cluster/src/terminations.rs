//! `terminate_connections` kept in PostgreSQL for [`KEPT_FOR`], so that a node that did not
//! hear one (its LISTEN session or its bus was down when the notice went out) applies it
//! once its link is back ([`replay`]), to the connections signed in before it. The notice
//! itself still travels as it always did (the presence record's `announce`); this table is
//! only the memory of it. Applying a termination twice changes nothing: the connections
//! signed in before it are closed already, and later ones are left alone.
//!
//! Schema (migrations/postgres/0017_cluster_terminations.sql): `cluster_terminations`, one
//! row per (app_id, user_id) with its latest `terminated_at` (the cluster's Unix
//! milliseconds), indexed by time.
//!
//! **Limits.** A termination is kept only if the node asked could reach the database (one
//! asked during a database outage reaches only the nodes that hear its notice, if any). Times
//! are the cluster's as each node reads it, which nodes may read up to about a second apart:
//! a connection that signed in within that second after a termination may be closed by its
//! replay.

use std::time::Duration;

use herald_channels::Hub;
use herald_core::AppId;
use herald_store::ClusterClock;
use sqlx::PgPool;

/// How long a termination is kept: longer than a link is expected to be down. A node whose
/// link was down longer misses the terminations older than this.
pub const KEPT_FOR: Duration = Duration::from_secs(15 * 60);

/// How long keeping a termination may take before the call goes on without it (its notice
/// still goes out).
pub const KEEP_PATIENCE: Duration = Duration::from_secs(2);

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
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
        "INSERT INTO cluster_terminations (app_id, user_id, terminated_at) VALUES ($1, $2, $3)
         ON CONFLICT (app_id, user_id) DO UPDATE
         SET terminated_at = GREATEST(cluster_terminations.terminated_at, EXCLUDED.terminated_at)",
    )
    .bind(app_id)
    .bind(user_id)
    .bind(at_millis)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM cluster_terminations WHERE terminated_at < $1")
        .bind(at_millis.saturating_sub(millis(KEPT_FOR)))
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

/// The terminations of `apps` kept from `since_millis` on (the cluster's time; never older
/// than [`KEPT_FOR`] before `now_millis`), oldest first.
pub async fn kept(
    pool: &PgPool,
    apps: &[String],
    since_millis: i64,
    now_millis: i64,
) -> Result<Vec<Termination>, sqlx::Error> {
    sqlx::query_as(
        "SELECT app_id, user_id, terminated_at FROM cluster_terminations
         WHERE terminated_at >= $1 AND app_id = ANY($2) ORDER BY terminated_at",
    )
    .bind(since_millis.max(now_millis.saturating_sub(millis(KEPT_FOR))))
    .bind(apps)
    .fetch_all(pool)
    .await
}

/// After this node's link was back: applies the terminations kept from `since_millis` on
/// (the cluster's time: when the link was last known to work, less a margin) to this node's
/// connections that signed in before each (their sign-in times are this process's clock; a
/// termination's is the cluster's, turned into this process's by `clock`'s reading now).
/// Returns how many connections it closed.
pub async fn replay(
    pool: &PgPool,
    hub: &Hub,
    clock: &ClusterClock,
    since_millis: i64,
) -> Result<usize, sqlx::Error> {
    let apps: Vec<String> = hub
        .apps()
        .iter()
        .map(|app| app.app_id().as_str().to_owned())
        .collect();
    if apps.is_empty() {
        return Ok(0);
    }
    let (cluster_now, local_now) = (clock.now().timestamp_millis(), tokio::time::Instant::now());
    let kept = kept(pool, &apps, since_millis, cluster_now).await?;
    let mut closed = 0;
    for termination in kept {
        let Ok(app_id) = AppId::parse(&termination.app_id) else {
            continue;
        };
        let Some(app) = hub.existing(&app_id) else {
            continue;
        };
        // The termination's moment on this process's clock: so long ago (or, dated ahead of
        // this node's reading of the cluster's time, so far ahead).
        let ago = cluster_now.saturating_sub(termination.terminated_at);
        let before = match u64::try_from(ago) {
            Ok(ago) => local_now.checked_sub(Duration::from_millis(ago)),
            Err(_) => Some(local_now + Duration::from_millis(ago.unsigned_abs())),
        };
        // Further back than this process's clock reaches: every sign-in here is later.
        let Some(before) = before else {
            continue;
        };
        closed += app.terminate_user_signed_in_before(&termination.user_id, Some(before));
    }
    Ok(closed)
}
