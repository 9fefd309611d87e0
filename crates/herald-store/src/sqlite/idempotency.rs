//! [`IdempotencyStore`] on SQLite: saved `Idempotency-Key` responses and their purge by age,
//! rows and bytes, and the keys claimed by requests still running, kept in memory
//! ([`Claims`]): a SQLite store belongs to one process, so no other node needs to see them,
//! and a keyed request costs no write beyond its response's.

use std::{
    collections::{HashMap, hash_map::Entry},
    sync::Mutex,
};

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{SqliteStore, batch::WriteOp, rows::millis};
use crate::{IdempotencyClaim, IdempotencyStore, Result, StoreError};

/// The keys claimed in this process, each with its claim's expiry, by [`claim_id`].
#[derive(Default)]
pub(super) struct Claims(Mutex<HashMap<String, DateTime<Utc>>>);

impl Claims {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, DateTime<Utc>>> {
        // The map is consistent after every statement, so a panic elsewhere leaves it usable.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes the claim on `id` only if it is still the one that expires at `until`.
    fn remove_own(&self, id: &str, until: DateTime<Utc>) {
        let mut claims = self.lock();
        if claims.get(id) == Some(&until) {
            claims.remove(id);
        }
    }
}

/// One map key per scope and key. Neither holds a newline (scopes are a digest and a path,
/// keys a header value), so the joined form is unambiguous.
fn claim_id(scope: &str, key: &str) -> String {
    format!("{scope}\n{key}")
}

#[async_trait::async_trait]
impl IdempotencyStore for SqliteStore {
    async fn idempotent_response(&self, scope: &str, key: &str) -> Result<Option<(u16, Vec<u8>)>> {
        let row = sqlx::query("SELECT status, body FROM idempotency WHERE scope = $1 AND key = $2")
            .bind(scope)
            .bind(key)
            .fetch_optional(&self.reader)
            .await?;
        row.map(|row| {
            let status: i64 = row.try_get("status")?;
            let status = u16::try_from(status)
                .map_err(|_| StoreError::Corrupt(format!("idempotency status {status}")))?;
            Ok((status, row.try_get("body")?))
        })
        .transpose()
    }

    async fn claim_idempotency_key(
        &self,
        scope: &str,
        key: &str,
        now: DateTime<Utc>,
        claim_until: DateTime<Utc>,
    ) -> Result<IdempotencyClaim> {
        let id = claim_id(scope, key);
        // Claim before reading the table: a request's response is committed before its claim
        // is dropped, so finding no live claim here means the read below sees any response.
        let held = match self.claims.lock().entry(id.clone()) {
            Entry::Occupied(claim) if *claim.get() > now => true,
            Entry::Occupied(mut expired) => {
                expired.insert(claim_until);
                false
            }
            Entry::Vacant(free) => {
                free.insert(claim_until);
                false
            }
        };
        // A held key is read too: the holder may be a claim that is about to find a response.
        let saved = match self.idempotent_response(scope, key).await {
            Ok(saved) => saved,
            Err(e) => {
                if !held {
                    self.claims.remove_own(&id, claim_until);
                }
                return Err(e);
            }
        };
        Ok(match (saved, held) {
            (Some((status, body)), held) => {
                if !held {
                    self.claims.remove_own(&id, claim_until);
                }
                IdempotencyClaim::Done { status, body }
            }
            (None, true) => IdempotencyClaim::InProgress,
            (None, false) => IdempotencyClaim::Claimed,
        })
    }

    async fn release_idempotency_key(
        &self,
        scope: &str,
        key: &str,
        claimed_until: DateTime<Utc>,
    ) -> Result<()> {
        // Only this request's claim, not one that took the key over after it expired.
        self.claims.remove_own(&claim_id(scope, key), claimed_until);
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
        self.submit(WriteOp::SaveIdempotent {
            scope: scope.to_owned(),
            key: key.to_owned(),
            status,
            body: body.to_vec(),
            at: millis(now),
        })
        .await?;
        // Only now that the response is committed: a claim arriving meanwhile found this one
        // and answered in progress, rather than finding neither claim nor response.
        self.claims.lock().remove(&claim_id(scope, key));
        Ok(())
    }

    async fn purge_idempotency(
        &self,
        older_than: DateTime<Utc>,
        max_rows: u64,
        max_bytes: u64,
    ) -> Result<u64> {
        // Claims whose release was lost (the runtime ended first) would otherwise stay.
        self.claims.lock().retain(|_, until| *until >= older_than);
        // A batch per statement, so an hour's worth never holds the writer for long. Rowids
        // grow with insertion, so the old rows come first in rowid order.
        let mut expired = 0;
        loop {
            let done = sqlx::query(
                "DELETE FROM idempotency WHERE rowid IN (
                     SELECT rowid FROM idempotency WHERE created_at < $1
                     ORDER BY rowid LIMIT CAST($2 AS BIGINT))",
            )
            .bind(millis(older_than))
            .bind(i64::from(crate::RETENTION_BATCH))
            .execute(&self.writer)
            .await?
            .rows_affected();
            expired += done;
            if done < u64::from(crate::RETENTION_BATCH) {
                break;
            }
            tokio::task::yield_now().await;
        }
        // Rowids grow with insertion, so the newest rows are the highest: no sort needed.
        let keep = i64::try_from(max_rows).unwrap_or(i64::MAX);
        let excess_rows = sqlx::query(
            "DELETE FROM idempotency WHERE rowid <= \
             (SELECT rowid FROM idempotency ORDER BY rowid DESC LIMIT 1 OFFSET $1)",
        )
        .bind(keep)
        .execute(&self.writer)
        .await?;
        // Then, newest first, everything from the row where the bodies add up past the cap.
        let budget = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        let excess_bytes = sqlx::query(
            "DELETE FROM idempotency WHERE rowid <= (
                 SELECT rowid FROM (
                     SELECT rowid, SUM(LENGTH(body)) OVER (ORDER BY rowid DESC) AS kept
                     FROM idempotency)
                 WHERE kept > $1 ORDER BY rowid DESC LIMIT 1)",
        )
        .bind(budget)
        .execute(&self.writer)
        .await?;
        Ok(expired + excess_rows.rows_affected() + excess_bytes.rows_affected())
    }
}
