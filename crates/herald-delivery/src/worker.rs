//! The delivery loop: claim due deliveries, attempt them concurrently, record the outcomes.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::Utc;
use herald_core::{
    AttemptOutcome, EndpointSecret, RetryDecision, id,
    model::{Attempt, DeliveryStatus, EndpointFormat, PusherCredentials, TriggerType},
    pusher,
    signing::signature_header,
};
use herald_store::{
    AttemptRecord, ClaimRequest, DeliveryJob, EndpointChange, NextStep, Store, StoreError,
};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use tokio::sync::{Notify, Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{DeliveryConfig, WebhookClient, client::SendError};

/// Claims per store round trip, per lane.
const CLAIM_BATCH: u32 = 128;
/// Longest sleep between looks at the queue when nothing is known to be due.
const IDLE_POLL: Duration = Duration::from_secs(5);
/// Pause before looking again when something is due but the last claim found nothing to start:
/// either it fell due just after the claim, or every due endpoint is at its limit (then a
/// finishing attempt usually wakes the loop first). Short, so neither case waits long.
const RECHECK: Duration = Duration::from_millis(25);
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

/// One lane's bookkeeping, shared with the attempt tasks it spawned.
///
/// The lane claims up to twice its concurrency: jobs beyond the running limit wait here,
/// already leased, so an attempt that finishes hands its slot straight to the next job for the
/// same endpoint instead of waiting for the dispatcher's next trip to the store.
struct Lane {
    first_attempts: bool,
    /// Bounds attempt records handed to the store but not yet committed.
    unsaved: Arc<Semaphore>,
    /// Attempts running at once over all endpoints.
    limit: u32,
    /// Attempts running at once to one endpoint.
    per_endpoint: u32,
    state: Mutex<LaneState>,
}

#[derive(Default)]
struct LaneState {
    running: u32,
    waiting: u32,
    endpoints: HashMap<String, EndpointSlots>,
}

#[derive(Default)]
struct EndpointSlots {
    running: u32,
    waiting: VecDeque<DeliveryJob>,
}

impl Lane {
    fn new(first_attempts: bool, limit: u32, per_endpoint: u32) -> Arc<Self> {
        Arc::new(Self {
            first_attempts,
            unsaved: Arc::new(Semaphore::new((limit * 4) as usize)),
            limit,
            per_endpoint,
            state: Mutex::new(LaneState::default()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LaneState> {
        // Every update is a few integer and queue operations that cannot panic midway.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many more jobs to claim, and how many each endpoint already holds.
    fn claim_budget(&self) -> (u32, HashMap<String, u32>) {
        let state = self.state();
        let room = (self.limit * 2).saturating_sub(state.running + state.waiting);
        let held = state
            .endpoints
            .iter()
            .map(|(id, slots)| (id.clone(), slots.running + slots.waiting.len() as u32))
            .collect();
        (room, held)
    }

    /// Takes claimed jobs; returns those that may start now. The rest wait for a slot.
    fn admit(&self, jobs: Vec<DeliveryJob>) -> Vec<DeliveryJob> {
        let mut state = self.state();
        let mut start = Vec::new();
        for job in jobs {
            let can_run = state.running < self.limit;
            let slots = state.endpoints.entry(job.endpoint.id.clone()).or_default();
            if can_run && slots.running < self.per_endpoint {
                slots.running += 1;
                state.running += 1;
                start.push(job);
            } else {
                slots.waiting.push_back(job);
                state.waiting += 1;
            }
        }
        start
    }

    /// An attempt to `endpoint` ended. Hands its slot to the next job waiting for the same
    /// endpoint, or frees it and starts a job waiting for another endpoint that now fits.
    fn next_after(&self, endpoint: &str) -> Option<DeliveryJob> {
        let mut state = self.state();
        if let Some(slots) = state.endpoints.get_mut(endpoint) {
            if let Some(job) = slots.waiting.pop_front() {
                state.waiting -= 1;
                return Some(job);
            }
            slots.running = slots.running.saturating_sub(1);
            if slots.running == 0 {
                state.endpoints.remove(endpoint);
            }
        }
        state.running = state.running.saturating_sub(1);
        if state.waiting == 0 || state.running >= self.limit {
            return None;
        }
        let per_endpoint = self.per_endpoint;
        let job = state
            .endpoints
            .values_mut()
            .find(|slots| !slots.waiting.is_empty() && slots.running < per_endpoint)
            .and_then(|slots| {
                slots.running += 1;
                slots.waiting.pop_front()
            })?;
        state.waiting -= 1;
        state.running += 1;
        Some(job)
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
        let per_endpoint = me.config.per_endpoint_in_flight;
        let lanes = [
            Lane::new(true, me.config.max_in_flight, per_endpoint),
            Lane::new(false, me.config.max_retries_in_flight, per_endpoint),
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
                        for job in lane.admit(jobs) {
                            tasks.spawn(Arc::clone(&me).attempts(
                                job,
                                Arc::clone(lane),
                                tasks.clone(),
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
        let (room, in_flight) = lane.claim_budget();
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
                // One round running plus one round waiting per endpoint.
                per_endpoint_limit: lane.per_endpoint * 2,
            })
            .await
    }

    /// How long to wait before looking again when the last look found nothing to start. A
    /// finishing attempt or new work wakes the loop sooner.
    async fn idle_pause(&self) -> Duration {
        match self.store.next_due_at().await {
            Ok(Some(due)) => {
                let until_due = (due - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                until_due.clamp(RECHECK, IDLE_POLL)
            }
            Ok(None) => IDLE_POLL,
            Err(e) => {
                tracing::error!(error = %e, "reading the delivery queue failed");
                ERROR_BACKOFF
            }
        }
    }

    /// Runs `job`, then whatever the lane hands this slot next, until nothing is waiting.
    /// Records commit in the background: the delivery stays leased until its record lands, so
    /// the slot need not wait for the store, and the lane's semaphore bounds how many records
    /// may be outstanding.
    async fn attempts(
        self: Arc<Self>,
        mut job: DeliveryJob,
        lane: Arc<Lane>,
        tasks: TaskTracker,
        abandon: CancellationToken,
    ) {
        loop {
            let sent = async {
                let record = self.send(&job).await;
                let permit = Arc::clone(&lane.unsaved).acquire_owned().await;
                (record, permit)
            };
            let (record, permit) = tokio::select! {
                sent = sent => sent,
                // Shutdown's grace period is over: leave the rest to the next start.
                () = abandon.cancelled() => return,
            };
            let Ok(permit) = permit else {
                return; // The semaphore is never closed; nothing to save to if it were.
            };
            let me = Arc::clone(&self);
            tasks.spawn(async move {
                me.save(record).await;
                drop(permit);
            });
            let next = lane.next_after(&job.endpoint.id);
            // A freed slot may let the dispatcher claim more.
            self.handle.wake();
            match next {
                Some(next) => job = next,
                None => return,
            }
        }
    }

    async fn save(&self, record: AttemptRecord) {
        let (msg_id, endpoint_id) = (
            record.attempt.msg_id.clone(),
            record.attempt.endpoint_id.clone(),
        );
        if let Err(e) = self.store.record_attempt(record).await {
            // The delivery is attempted again once its lease runs out.
            tracing::error!(error = %e, %msg_id, %endpoint_id, "recording an attempt failed");
        }
        // The record may have scheduled a retry sooner than the dispatcher's next look.
        self.handle.wake();
    }

    async fn headers(&self, job: &DeliveryJob, timestamp: i64) -> Result<HeaderMap, SendError> {
        match job.endpoint.format {
            EndpointFormat::StandardWebhooks => Ok(signed_headers(job, timestamp)),
            EndpointFormat::Pusher => {
                // Served from the store's cache; read per attempt so a rotated secret applies.
                let app = match self.store.get_app(&job.app_id).await {
                    Ok(Some(app)) => app,
                    Ok(None) => return Err(SendError::NotSent("the app no longer exists".into())),
                    Err(e) => {
                        return Err(SendError::NotSent(format!(
                            "could not read the app's Pusher credentials: {e}"
                        )));
                    }
                };
                Ok(pusher_headers(job, &app.pusher))
            }
        }
    }

    async fn send(&self, job: &DeliveryJob) -> AttemptRecord {
        let now = Utc::now();
        let started = Instant::now();
        let result = match self.headers(job, now.timestamp()).await {
            Ok(headers) => {
                self.client
                    .post(&job.endpoint.url, headers, job.payload.clone())
                    .await
            }
            Err(e) => Err(e),
        };
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
        let streak_running = job.endpoint.failing_since.is_some();
        let (next, endpoint_change) = match decision {
            RetryDecision::Delivered if streak_running => {
                (NextStep::Delivered, EndpointChange::StreakEnded)
            }
            RetryDecision::Delivered => (NextStep::Delivered, EndpointChange::Unchanged),
            RetryDecision::RetryIn(delay) => {
                (NextStep::RetryAt(now + delay), streak(streak_running, now))
            }
            RetryDecision::GiveUp => (NextStep::Failed, streak(streak_running, now)),
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

/// A failure starts the endpoint's failing streak unless one is already running.
fn streak(running: bool, now: chrono::DateTime<Utc>) -> EndpointChange {
    if running {
        EndpointChange::Unchanged
    } else {
        EndpointChange::StreakStarted { at: now }
    }
}

fn result_text(result: &Result<crate::client::Response, SendError>) -> String {
    match result {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    }
}

/// The endpoint's own headers, which Herald's signing headers then override.
fn custom_headers(job: &DeliveryJob) -> HeaderMap {
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
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers
}

/// Pusher channel webhooks: `X-Pusher-Key` names the app, `X-Pusher-Signature` is the hex
/// HMAC-SHA256 of the body with the app's secret.
fn pusher_headers(job: &DeliveryJob, credentials: &PusherCredentials) -> HeaderMap {
    let mut headers = custom_headers(job);
    let signature = pusher::webhook_signature(&credentials.secret, &job.payload);
    for (name, value) in [
        ("x-pusher-key", credentials.key.as_str()),
        ("x-pusher-signature", signature.as_str()),
    ] {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    headers
}

/// The Standard Webhooks headers plus the endpoint's own. The signature covers the payload
/// bytes exactly as stored, which are exactly the bytes sent.
fn signed_headers(job: &DeliveryJob, timestamp: i64) -> HeaderMap {
    let mut headers = custom_headers(job);
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
