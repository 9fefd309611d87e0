//! The delivery loop: claim due deliveries, attempt them concurrently, record the outcomes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::Utc;
use herald_core::{
    AttemptOutcome, EndpointSecret, RetryDecision, id,
    model::{Attempt, DeliveryStatus, TriggerType},
    signing::signature_header,
};
use herald_store::{
    AttemptRecord, ClaimRequest, DeliveryJob, EndpointChange, NextStep, Store, StoreError,
};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use tokio::sync::Notify;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{DeliveryConfig, WebhookClient, client::SendError};

/// Claims per store round trip, per lane.
const CLAIM_BATCH: u32 = 128;
/// Longest sleep between looks at the queue when nothing is known to be due.
const IDLE_POLL: Duration = Duration::from_secs(5);
/// Pause after a store error, so a broken database does not become a busy loop.
const ERROR_BACKOFF: Duration = Duration::from_secs(1);

/// Wakes the dispatcher when new work is queued (a message created, a resend requested).
#[derive(Clone, Default)]
pub struct DispatcherHandle {
    wake: Arc<Notify>,
}

impl DispatcherHandle {
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

/// One lane's in-flight bookkeeping, shared with the attempt tasks it spawned.
struct Lane {
    first_attempts: bool,
    limit: u32,
    in_flight: Mutex<LaneCounts>,
}

#[derive(Default)]
struct LaneCounts {
    total: u32,
    per_endpoint: HashMap<String, u32>,
}

impl Lane {
    fn new(first_attempts: bool, limit: u32) -> Arc<Self> {
        Arc::new(Self {
            first_attempts,
            limit,
            in_flight: Mutex::new(LaneCounts::default()),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, LaneCounts> {
        // The counters stay consistent even if a holder panicked mid-update is impossible:
        // updates are single statements, so recover from poisoning.
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn start(&self, endpoint: &str) {
        let mut counts = self.counts();
        counts.total += 1;
        *counts.per_endpoint.entry(endpoint.to_owned()).or_insert(0) += 1;
    }

    fn finish(&self, endpoint: &str) {
        let mut counts = self.counts();
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_endpoint.get_mut(endpoint) {
            *n -= 1;
            if *n == 0 {
                counts.per_endpoint.remove(endpoint);
            }
        }
    }
}

pub struct Dispatcher {
    store: Arc<dyn Store>,
    client: WebhookClient,
    config: DeliveryConfig,
    handle: DispatcherHandle,
}

impl Dispatcher {
    pub fn new(store: Arc<dyn Store>, client: WebhookClient, config: DeliveryConfig) -> Self {
        Self {
            store,
            client,
            config,
            handle: DispatcherHandle::default(),
        }
    }

    pub fn handle(&self) -> DispatcherHandle {
        self.handle.clone()
    }

    /// Deliver until `shutdown`, then give in-flight attempts `shutdown_grace` to finish.
    /// Attempts cut off by the grace period keep their lease and are retried after a restart.
    pub async fn run(self, shutdown: CancellationToken) {
        let me = Arc::new(self);
        let lanes = [
            Lane::new(true, me.config.max_in_flight),
            Lane::new(false, me.config.max_retries_in_flight),
        ];
        let tasks = TaskTracker::new();
        // Cancelled once the grace period is over: attempts still running then are abandoned
        // without a record, so their lease brings them back after the restart.
        let abandon = CancellationToken::new();
        while !shutdown.is_cancelled() {
            let mut saturated_batch = false;
            let mut failed = false;
            for lane in &lanes {
                match me.claim(lane).await {
                    Ok(jobs) => {
                        saturated_batch |= jobs.len() as u32 == CLAIM_BATCH;
                        for job in jobs {
                            lane.start(&job.endpoint.id);
                            tasks.spawn(Arc::clone(&me).attempt(
                                job,
                                Arc::clone(lane),
                                abandon.clone(),
                            ));
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "claiming deliveries failed");
                        failed = true;
                    }
                }
            }
            if saturated_batch {
                continue;
            }
            let pause = if failed {
                ERROR_BACKOFF
            } else {
                me.idle_pause().await
            };
            tokio::select! {
                () = me.handle.wake.notified() => {}
                () = tokio::time::sleep(pause) => {}
                () = shutdown.cancelled() => {}
            }
        }
        tasks.close();
        if tokio::time::timeout(me.config.shutdown_grace, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = tasks.len(),
                "shutdown grace period over; unfinished attempts will be retried after restart"
            );
            abandon.cancel();
            tasks.wait().await;
        }
    }

    async fn claim(&self, lane: &Lane) -> Result<Vec<DeliveryJob>, StoreError> {
        let (room, in_flight) = {
            let counts = lane.counts();
            (
                lane.limit.saturating_sub(counts.total),
                counts.per_endpoint.clone(),
            )
        };
        if room == 0 {
            return Ok(Vec::new());
        }
        let now = Utc::now();
        let lease =
            self.config.request_timeout + self.config.shutdown_grace + Duration::from_secs(30);
        self.store
            .claim_due(&ClaimRequest {
                now,
                lease_until: now + lease,
                limit: room.min(CLAIM_BATCH),
                first_attempts: lane.first_attempts,
                in_flight,
                per_endpoint_limit: self.config.per_endpoint_in_flight,
            })
            .await
    }

    /// How long to wait before looking again when the last look found nothing to start. A
    /// finishing attempt or new work wakes the loop sooner.
    async fn idle_pause(&self) -> Duration {
        match self.store.next_due_at().await {
            Ok(Some(due)) => {
                let until_due = (due - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                // Due already but nothing claimable: every due endpoint is at its limit, and a
                // finishing attempt will wake us.
                if until_due.is_zero() {
                    IDLE_POLL
                } else {
                    until_due.min(IDLE_POLL)
                }
            }
            Ok(None) => IDLE_POLL,
            Err(e) => {
                tracing::error!(error = %e, "reading the delivery queue failed");
                ERROR_BACKOFF
            }
        }
    }

    async fn attempt(
        self: Arc<Self>,
        job: DeliveryJob,
        lane: Arc<Lane>,
        abandon: CancellationToken,
    ) {
        let record = tokio::select! {
            record = self.send(&job) => record,
            () = abandon.cancelled() => {
                lane.finish(&job.endpoint.id);
                return;
            }
        };
        if let Err(e) = self.store.record_attempt(record).await {
            // The delivery keeps its lease and is attempted again when the lease runs out.
            tracing::error!(error = %e, msg_id = %job.msg_id, endpoint_id = %job.endpoint.id,
                "recording an attempt failed");
        }
        lane.finish(&job.endpoint.id);
        self.handle.wake();
    }

    async fn send(&self, job: &DeliveryJob) -> AttemptRecord {
        let now = Utc::now();
        let started = Instant::now();
        let headers = signed_headers(job, now.timestamp());
        let result = self
            .client
            .post(&job.endpoint.url, headers, job.payload.clone())
            .await;
        let duration_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);

        let (outcome, status_code, response) = match &result {
            Ok(resp) => {
                let code = resp.status.as_u16();
                let outcome = match code {
                    200..=299 => AttemptOutcome::Success,
                    410 => AttemptOutcome::Gone,
                    429 | 502 | 504 => AttemptOutcome::Overloaded {
                        retry_after: resp.retry_after,
                    },
                    _ => AttemptOutcome::Failed {
                        retry_after: resp.retry_after,
                    },
                };
                (
                    outcome,
                    i32::from(code),
                    String::from_utf8_lossy(&resp.body).into_owned(),
                )
            }
            Err(SendError::TimedOut(_)) => (
                AttemptOutcome::Overloaded { retry_after: None },
                0,
                result_text(&result),
            ),
            Err(_) => (
                AttemptOutcome::Failed { retry_after: None },
                0,
                result_text(&result),
            ),
        };

        let manual = job.trigger == TriggerType::Manual;
        let failing_for = job
            .endpoint
            .failing_since
            .and_then(|since| (now - since).to_std().ok())
            .unwrap_or(Duration::ZERO);
        let decision =
            self.config
                .retry
                .decide(outcome, job.attempts, manual, failing_for, &mut rand::rng());
        let (next, endpoint_change) = match decision {
            RetryDecision::Delivered => (NextStep::Delivered, EndpointChange::Succeeded),
            RetryDecision::RetryIn(delay) => (
                NextStep::RetryAt(now + delay),
                EndpointChange::Failed { at: now },
            ),
            RetryDecision::GiveUp => (NextStep::Failed, EndpointChange::Failed { at: now }),
            RetryDecision::DisableEndpoint => {
                tracing::warn!(endpoint_id = %job.endpoint.id, status_code, "disabling endpoint");
                (NextStep::Failed, EndpointChange::Disable)
            }
        };
        let status = match next {
            NextStep::Delivered => DeliveryStatus::Success,
            NextStep::RetryAt(_) | NextStep::Failed => DeliveryStatus::Fail,
        };
        tracing::debug!(msg_id = %job.msg_id, endpoint_id = %job.endpoint.id, status_code,
            ?decision, "attempt finished");
        AttemptRecord {
            attempt: Attempt {
                id: id::new_id(id::ATTEMPT, now),
                msg_id: job.msg_id.clone(),
                endpoint_id: job.endpoint.id.clone(),
                app_id: job.app_id.clone(),
                url: job.endpoint.url.clone(),
                status,
                response_status_code: status_code,
                response,
                response_duration_ms: duration_ms,
                trigger_type: job.trigger,
                created_at: now,
            },
            next,
            endpoint_change,
        }
    }
}

fn result_text(result: &Result<crate::client::Response, SendError>) -> String {
    match result {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    }
}

/// The Standard Webhooks headers plus the endpoint's own. The signature covers the payload
/// bytes exactly as stored, which are exactly the bytes sent.
fn signed_headers(job: &DeliveryJob, timestamp: i64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in &job.endpoint.headers {
        // Validated when set; anything unparseable is skipped rather than failing delivery.
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
    let now = Utc::now();
    let mut secrets = Vec::with_capacity(1 + job.endpoint.previous_secrets.len());
    secrets.extend(EndpointSecret::parse(&job.endpoint.secret).ok());
    secrets.extend(
        job.endpoint
            .previous_secrets
            .iter()
            .filter(|(_, expires)| *expires > now)
            .filter_map(|(s, _)| EndpointSecret::parse(s).ok()),
    );
    let signature = signature_header(&secrets, &job.msg_id, timestamp, &job.payload);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    for (name, value) in [
        ("webhook-id", job.msg_id.clone()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", signature),
    ] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    headers
}
