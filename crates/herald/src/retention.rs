//! The retention sweeper: expunges payloads past their retention and deletes attempts,
//! messages and received requests past theirs, a bounded batch per transaction with a pause
//! between batches, so intake is never held up behind a long delete.
//!
//! What expires when is the store's to find ([`herald_store::RetentionStore`]): payloads carry
//! their own expiry (stamped at publication from the message, its app or the server's
//! default); the rest is older than a cut-off computed here. Several nodes sharing one
//! PostgreSQL store may sweep at once: every batch is idempotent and skips rows another
//! holds.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use herald_store::{Store, StoreError};
use tokio_util::sync::CancellationToken;

/// The sweeper's settings (`[retention]` in the configuration).
#[derive(Debug, Clone)]
pub struct Retention {
    /// How long a retention day lasts: 24 hours, except in tests.
    pub day: Duration,
    pub payload_days: u32,
    pub attempt_days: u32,
    pub ingest_days: u32,
    pub sweep_every: Duration,
    /// Rows per batch (one transaction).
    pub batch: u32,
    /// Between two batches of one kind.
    pub pause: Duration,
}

impl Retention {
    fn days(&self, days: u32) -> chrono::Duration {
        chrono::Duration::from_std(self.day.saturating_mul(days)).unwrap_or(chrono::Duration::MAX)
    }

    /// `days` retention days before `now`, checked: a date past chrono's range panics, and
    /// the sweeper would stop for good (the configuration bounds the days as well).
    pub fn days_before(&self, now: DateTime<Utc>, days: u32) -> DateTime<Utc> {
        now.checked_sub_signed(self.days(days))
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    /// What the publisher stamps messages with.
    pub fn payload(&self) -> herald_channels::publisher::PayloadRetention {
        herald_channels::publisher::PayloadRetention {
            day: self.day,
            default_days: self.payload_days,
        }
    }
}

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub payloads: u64,
    pub attempts: u64,
    pub messages: u64,
    pub received: u64,
}

/// Sweeps at once, then every `sweep_every`, until `stop`.
pub async fn run(store: Arc<dyn Store>, retention: Retention, stop: CancellationToken) {
    loop {
        match sweep(store.as_ref(), &retention, Utc::now(), &stop).await {
            Ok(swept) if swept == Swept::default() => {}
            Ok(swept) => tracing::debug!(
                payloads = swept.payloads,
                attempts = swept.attempts,
                messages = swept.messages,
                received = swept.received,
                "retention sweep: expired payloads expunged, old rows deleted"
            ),
            Err(e) => {
                tracing::error!(error = %e, "retention sweep failed; retrying at the next sweep")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(retention.sweep_every) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// One sweep as of `now`: every kind, batch after batch until a batch comes back short.
pub async fn sweep(
    store: &dyn Store,
    retention: &Retention,
    now: DateTime<Utc>,
    stop: &CancellationToken,
) -> Result<Swept, StoreError> {
    let limit = retention.batch;
    let batches = |op| Batches {
        limit,
        pause: retention.pause,
        stop,
        op,
    };
    // A payload past its time that a delivery still needs is looked at again ten sweeps on
    // (ten minutes by default): not at every batch, and not so late that it outlives its
    // deliveries by much.
    let blocked_recheck = chrono::Duration::from_std(retention.sweep_every.saturating_mul(10))
        .unwrap_or(chrono::Duration::MAX);
    let attempts_before = retention.days_before(now, retention.attempt_days);
    let received_before = retention.days_before(now, retention.ingest_days);
    let recheck_at = now
        .checked_add_signed(blocked_recheck)
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    Ok(Swept {
        payloads: batches(Op::Payloads(now, recheck_at)).run(store).await?,
        attempts: batches(Op::Attempts(attempts_before)).run(store).await?,
        // Messages go with their attempt log: a message is kept while its attempts are.
        messages: batches(Op::Messages(attempts_before)).run(store).await?,
        received: batches(Op::Received(received_before)).run(store).await?,
    })
}

#[derive(Clone, Copy)]
enum Op {
    /// As of the first time; payloads still needed by a delivery are looked at again at the
    /// second.
    Payloads(DateTime<Utc>, DateTime<Utc>),
    Attempts(DateTime<Utc>),
    Messages(DateTime<Utc>),
    Received(DateTime<Utc>),
}

struct Batches<'a> {
    limit: u32,
    pause: Duration,
    stop: &'a CancellationToken,
    op: Op,
}

impl Batches<'_> {
    async fn run(self, store: &dyn Store) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let done = match self.op {
                Op::Payloads(now, recheck_at) => {
                    store.expire_payloads(now, recheck_at, self.limit).await?
                }
                Op::Attempts(before) => store.delete_attempts_before(before, self.limit).await?,
                Op::Messages(before) => store.delete_messages_before(before, self.limit).await?,
                Op::Received(before) => {
                    store
                        .delete_ingest_events_before(before, self.limit)
                        .await?
                }
            };
            total += done;
            // A short batch means nothing is left (or what is left is held by another node).
            if done < u64::from(self.limit) || self.stop.is_cancelled() {
                return Ok(total);
            }
            tokio::time::sleep(self.pause).await;
        }
    }
}
