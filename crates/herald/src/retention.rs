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
use herald_store::{RetentionStore, Store, StoreError};
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

/// One sweep as of `now`: every kind, batch after batch until a batch comes back short. A kind
/// that fails does not hold up the others (a delete that keeps failing would otherwise stop
/// every later kind for good); the first failure is returned once all have run.
pub async fn sweep(
    store: &dyn RetentionStore,
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
    let mut failed = None;
    let swept = Swept {
        payloads: counted(
            batches(Op::Payloads(now, recheck_at)).run(store).await,
            &mut failed,
        ),
        attempts: counted(
            batches(Op::Attempts(attempts_before)).run(store).await,
            &mut failed,
        ),
        // Messages go with their attempt log: a message is kept while its attempts are.
        messages: counted(
            batches(Op::Messages(attempts_before)).run(store).await,
            &mut failed,
        ),
        received: counted(
            batches(Op::Received(received_before)).run(store).await,
            &mut failed,
        ),
    };
    match failed {
        Some(e) => Err(e),
        None => Ok(swept),
    }
}

/// What one kind's batches did: the count, or 0 with the error kept in `failed` (the first)
/// or logged (any later one).
fn counted(result: Result<u64, StoreError>, failed: &mut Option<StoreError>) -> u64 {
    match result {
        Ok(done) => done,
        Err(e) if failed.is_none() => {
            *failed = Some(e);
            0
        }
        Err(e) => {
            tracing::error!(error = %e, "retention sweep: another kind failed too");
            0
        }
    }
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
    async fn run(self, store: &dyn RetentionStore) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let (done, full) = match self.op {
                // Payloads set aside (their deliveries under way) count as work: a backlog of
                // them left at the head of the expiry index would be walked past by every
                // expunge until the next sweep set aside 500 more.
                Op::Payloads(now, recheck_at) => {
                    let expired = store.expire_payloads(now, recheck_at, self.limit).await?;
                    (expired.expunged, expired.full(self.limit))
                }
                Op::Attempts(before) => {
                    let done = store.delete_attempts_before(before, self.limit).await?;
                    (done, done >= u64::from(self.limit))
                }
                Op::Messages(before) => {
                    let done = store.delete_messages_before(before, self.limit).await?;
                    (done, done >= u64::from(self.limit))
                }
                Op::Received(before) => {
                    let done = store
                        .delete_ingest_events_before(before, self.limit)
                        .await?;
                    (done, done >= u64::from(self.limit))
                }
            };
            total += done;
            // A short batch means nothing is left (or what is left is held by another node).
            if !full || self.stop.is_cancelled() {
                return Ok(total);
            }
            tokio::time::sleep(self.pause).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use herald_core::AppId;
    use herald_store::ExpiredPayloads;

    use super::*;

    /// A store whose payload expunges answer as scripted (then fail), recording every call.
    #[derive(Default)]
    struct Scripted {
        payloads: Mutex<Vec<ExpiredPayloads>>,
        calls: Mutex<Vec<&'static str>>,
    }

    impl Scripted {
        fn called(&self, kind: &'static str) -> Result<u64, StoreError> {
            self.calls.lock().expect("lock").push(kind);
            Ok(0)
        }
    }

    #[async_trait::async_trait]
    impl RetentionStore for Scripted {
        async fn expire_payloads(
            &self,
            _: DateTime<Utc>,
            _: DateTime<Utc>,
            _: u32,
        ) -> Result<ExpiredPayloads, StoreError> {
            self.calls.lock().expect("lock").push("payloads");
            let mut payloads = self.payloads.lock().expect("lock");
            if payloads.is_empty() {
                return Err(StoreError::Corrupt("statement timeout".into()));
            }
            Ok(payloads.remove(0))
        }
        async fn expunge_payload(&self, _: &AppId, _: &str) -> Result<bool, StoreError> {
            Ok(false)
        }
        async fn expunge_attempt_response(
            &self,
            _: &AppId,
            _: &herald_core::MessageId,
            _: &str,
        ) -> Result<bool, StoreError> {
            Ok(false)
        }
        async fn delete_attempts_before(
            &self,
            _: DateTime<Utc>,
            _: u32,
        ) -> Result<u64, StoreError> {
            self.called("attempts")
        }
        async fn delete_messages_before(
            &self,
            _: DateTime<Utc>,
            _: u32,
        ) -> Result<u64, StoreError> {
            self.called("messages")
        }
        async fn delete_ingest_events_before(
            &self,
            _: DateTime<Utc>,
            _: u32,
        ) -> Result<u64, StoreError> {
            self.called("received")
        }
    }

    fn retention() -> Retention {
        Retention {
            day: Duration::from_secs(86_400),
            payload_days: 30,
            attempt_days: 90,
            ingest_days: 30,
            sweep_every: Duration::from_secs(60),
            batch: 500,
            pause: Duration::ZERO,
        }
    }

    #[tokio::test]
    async fn a_kind_that_keeps_failing_does_not_hold_up_the_others() {
        let store = Scripted::default();
        let swept = sweep(&store, &retention(), Utc::now(), &CancellationToken::new()).await;
        assert!(
            matches!(swept, Err(StoreError::Corrupt(_))),
            "the failure is reported: {swept:?}"
        );
        assert_eq!(
            *store.calls.lock().expect("lock"),
            ["payloads", "attempts", "messages", "received"],
            "every other kind still ran"
        );
    }

    /// A batch that set aside a whole batch of payloads (their deliveries under way) is
    /// followed by another, though it expunged none: the backlog is set aside in one sweep,
    /// not 500 a sweep while every expunge walks past the rest.
    #[tokio::test]
    async fn payloads_set_aside_count_as_a_batch_done() {
        let store = Scripted::default();
        store.payloads.lock().expect("lock").extend([
            ExpiredPayloads {
                expunged: 0,
                set_aside: 500,
            },
            ExpiredPayloads {
                expunged: 3,
                set_aside: 0,
            },
        ]);
        let batches = Batches {
            limit: 500,
            pause: Duration::ZERO,
            stop: &CancellationToken::new(),
            op: Op::Payloads(Utc::now(), Utc::now()),
        };
        assert_eq!(batches.run(&store).await.expect("run"), 3, "expunged");
        assert_eq!(*store.calls.lock().expect("lock"), ["payloads", "payloads"]);
    }
}
