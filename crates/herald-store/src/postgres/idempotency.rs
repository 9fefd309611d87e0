//! [`IdempotencyStore`] on PostgreSQL: saved `Idempotency-Key` responses and their purge by
//! age, rows and bytes (oldest first, by insertion order `seq`, as SQLite's rowid), and the
//! claims of requests still running. A claim is a row without a response (`status` and `body`
//! NULL, `claimed_until` set; migration 0002), so every node sharing the database sees it.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{PostgresStore, rows::millis};
use crate::{IdempotencyClaim, IdempotencyStore, Result, StoreError};

/// Claims, or takes over an expired claim, in one statement; otherwise reads the row that is
/// there. The row read comes from the statement's snapshot: one committed by another node after
/// it was taken makes the insert stand aside but is not read, and the statement returns no row.
const CLAIM: &str = "
    WITH claimed AS (
        INSERT INTO idempotency (scope, key, status, body, created_at, claimed_until)
        VALUES ($1, $2, NULL, NULL, $3, $4)
        ON CONFLICT (scope, key) DO UPDATE
            SET created_at = EXCLUDED.created_at, claimed_until = EXCLUDED.claimed_until
            WHERE idempotency.status IS NULL AND idempotency.claimed_until <= EXCLUDED.created_at
        RETURNING 1
    )
    SELECT TRUE AS claimed, NULL::INTEGER AS status, NULL::BYTEA AS body FROM claimed
    UNION ALL
    SELECT FALSE, status, body FROM idempotency
    WHERE scope = $1 AND key = $2 AND NOT EXISTS (SELECT 1 FROM claimed)";

/// How many times [`CLAIM`] runs when it returns no row (the row changed under it each time)
/// before the key is reported in progress, which it was a moment ago.
const CLAIM_ATTEMPTS: usize = 3;

fn status(status: i32) -> Result<u16> {
    u16::try_from(status).map_err(|_| StoreError::Corrupt(format!("idempotency status {status}")))
}

#[async_trait::async_trait]
impl IdempotencyStore for PostgresStore {
    async fn idempotent_response(&self, scope: &str, key: &str) -> Result<Option<(u16, Vec<u8>)>> {
        // A claim's row has no response yet.
        let row = sqlx::query(
            "SELECT status, body FROM idempotency
             WHERE scope = $1 AND key = $2 AND status IS NOT NULL",
        )
        .bind(scope)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| Ok((status(row.try_get("status")?)?, row.try_get("body")?)))
            .transpose()
    }

    async fn claim_idempotency_key(
        &self,
        scope: &str,
        key: &str,
        now: DateTime<Utc>,
        claim_until: DateTime<Utc>,
    ) -> Result<IdempotencyClaim> {
        for _ in 0..CLAIM_ATTEMPTS {
            let row = sqlx::query(CLAIM)
                .bind(scope)
                .bind(key)
                .bind(millis(now))
                .bind(millis(claim_until))
                .fetch_optional(&self.pool)
                .await?;
            // No row: another node committed the key's row after this statement began, so a
            // new statement, with a new snapshot, reads it (or claims, if it is gone again).
            let Some(row) = row else { continue };
            if row.try_get::<bool, _>("claimed")? {
                return Ok(IdempotencyClaim::Claimed);
            }
            let status_column: Option<i32> = row.try_get("status")?;
            let body: Option<Vec<u8>> = row.try_get("body")?;
            return Ok(match (status_column, body) {
                (Some(code), Some(body)) => IdempotencyClaim::Done {
                    status: status(code)?,
                    body,
                },
                // A live claim: had it expired, the statement would have taken it over.
                _ => IdempotencyClaim::InProgress,
            });
        }
        Ok(IdempotencyClaim::InProgress)
    }

    async fn release_idempotency_key(
        &self,
        scope: &str,
        key: &str,
        claimed_until: DateTime<Utc>,
    ) -> Result<()> {
        // Only this request's claim (a saved response stays, and so does a claim that took
        // the key over after this one expired).
        sqlx::query(
            "DELETE FROM idempotency WHERE scope = $1 AND key = $2 AND status IS NULL
             AND claimed_until = $3",
        )
        .bind(scope)
        .bind(key)
        .bind(millis(claimed_until))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn save_idempotent_response(
        &self,
        scope: &str,
        key: &str,
        status: u16,
        body: &[u8],
        now: DateTime<Utc>,
    ) -> Result<()> {
        // Completes a claim (the row keeps its seq, from when the request began); the first
        // response saved under a key stays (as in SQLite's batch).
        sqlx::query(
            "INSERT INTO idempotency (scope, key, status, body, created_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (scope, key) DO UPDATE
                 SET status = EXCLUDED.status, body = EXCLUDED.body,
                     created_at = EXCLUDED.created_at, claimed_until = NULL
                 WHERE idempotency.status IS NULL",
        )
        .bind(scope)
        .bind(key)
        .bind(i32::from(status))
        .bind(body)
        .bind(millis(now))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn purge_idempotency(
        &self,
        older_than: DateTime<Utc>,
        max_rows: u64,
        max_bytes: u64,
    ) -> Result<u64> {
        // Old responses, and claims that expired before the cutoff (a claim's created_at is
        // when it was made, before it expired, so the index on created_at still serves): a
        // batch per transaction, so an hour's worth never holds up the keys being written.
        let mut expired = 0;
        loop {
            let done = sqlx::query(
                "DELETE FROM idempotency WHERE seq IN (
                     SELECT seq FROM idempotency
                     WHERE created_at < $1 AND (status IS NOT NULL OR claimed_until < $1)
                     LIMIT $2 FOR UPDATE SKIP LOCKED)",
            )
            .bind(millis(older_than))
            .bind(i64::from(crate::RETENTION_BATCH))
            .execute(&self.pool)
            .await?
            .rows_affected();
            expired += done;
            if done < u64::from(crate::RETENTION_BATCH) {
                break;
            }
        }
        let mut tx = self.pool.begin().await?;
        // Everything older than the newest `max_rows` responses; claims are neither counted
        // nor deleted here.
        let keep = i64::try_from(max_rows).unwrap_or(i64::MAX);
        let excess_rows = sqlx::query(
            "DELETE FROM idempotency WHERE status IS NOT NULL AND seq <= \
             (SELECT seq FROM idempotency WHERE status IS NOT NULL
              ORDER BY seq DESC LIMIT 1 OFFSET $1)",
        )
        .bind(keep)
        .execute(&mut *tx)
        .await?;
        // Then, newest first, every response from the one where the bodies add up past the cap.
        let budget = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        let excess_bytes = sqlx::query(
            "DELETE FROM idempotency WHERE status IS NOT NULL AND seq <= (
                 SELECT seq FROM (
                     SELECT seq, SUM(octet_length(body)) OVER (ORDER BY seq DESC) AS kept
                     FROM idempotency WHERE status IS NOT NULL) AS running
                 WHERE kept > $1 ORDER BY seq DESC LIMIT 1)",
        )
        .bind(budget)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(expired + excess_rows.rows_affected() + excess_bytes.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use sqlx::{AssertSqlSafe, Connection, Executor};

    use super::super::{PostgresOptions, quote_identifier};
    use super::*;
    use crate::StoreLifecycle;

    const URL_VAR: &str = "HERALD_TEST_POSTGRES_URL";

    /// Two stores on one schema are two nodes: a key one of them claimed is in progress for
    /// the other, its saved response is replayed by the other, and a released claim is free for
    /// the other to take.
    #[tokio::test]
    async fn two_nodes_see_each_others_idempotency_claims() {
        let Ok(url) = std::env::var(URL_VAR) else {
            herald_test_support::skip!("{URL_VAR} is unset (this test needs a PostgreSQL server)");
            return;
        };
        let schema = format!(
            "herald_test_idempotency_{}_{}",
            std::process::id(),
            Utc::now().timestamp_micros()
        );
        let quoted = quote_identifier(&schema);
        let mut admin = sqlx::PgConnection::connect(&url).await.expect("connect");
        admin
            .execute(AssertSqlSafe(format!("CREATE SCHEMA {quoted}")))
            .await
            .expect("create the test schema");
        let open = || {
            PostgresStore::open(
                &url,
                PostgresOptions {
                    max_connections: 2,
                    schema: Some(schema.clone()),
                    ..PostgresOptions::default()
                },
            )
        };
        let a = open().await.expect("open node a");
        let b = open().await.expect("open node b");

        let now = Utc::now();
        let until = now + chrono::Duration::seconds(60);
        async fn claim(
            store: &PostgresStore,
            key: &str,
            now: DateTime<Utc>,
            until: DateTime<Utc>,
        ) -> Result<IdempotencyClaim> {
            store.claim_idempotency_key("scope", key, now, until).await
        }
        // What each node saw, checked after the schema is dropped, so a failure leaves none.
        let seen = async {
            let mut seen = vec![
                claim(&a, "k", now, until).await?,
                claim(&b, "k", now, until).await?,
            ];
            let replayed_early = b.idempotent_response("scope", "k").await?;
            a.save_idempotent_response("scope", "k", 201, b"{\"id\":1}", now)
                .await?;
            seen.push(claim(&b, "k", now, until).await?);
            seen.push(claim(&b, "other", now, until).await?);
            seen.push(claim(&a, "other", now, until).await?);
            b.release_idempotency_key("scope", "other", until).await?;
            seen.push(claim(&a, "other", now, until).await?);
            Ok::<_, StoreError>((seen, replayed_early))
        }
        .await;

        a.close().await;
        b.close().await;
        admin
            .execute(AssertSqlSafe(format!("DROP SCHEMA {quoted} CASCADE")))
            .await
            .expect("drop the test schema");
        admin.close().await.expect("close");
        let (seen, replayed_early) = seen.expect("claims across nodes");
        assert_eq!(
            seen,
            [
                IdempotencyClaim::Claimed,
                IdempotencyClaim::InProgress,
                IdempotencyClaim::Done {
                    status: 201,
                    body: b"{\"id\":1}".to_vec()
                },
                IdempotencyClaim::Claimed,
                IdempotencyClaim::InProgress,
                IdempotencyClaim::Claimed,
            ]
        );
        assert_eq!(replayed_early, None, "a claim is not a response");
    }
}
