//! The delivery loop: claim due deliveries, attempt them concurrently, record the outcomes.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::Utc;
use herald_core::{
    AppId, AttemptOutcome, EndpointId, EndpointSecret, RetryDecision,
    model::{Attempt, DeliveryStatus, EndpointFormat, PusherCredentials, TriggerType},
    pusher,
    signing::{self, signature_header},
};
use herald_metrics::DeliveryMetrics;
use herald_store::{
    AttemptRecord, ClaimRequest, ClusterClock, DeliveryJob, EndpointChange, FreshDeliveries,
    LeaseToken, NextStep, Recorded, Store, StoreError, Turn,
};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use tokio::sync::{Notify, Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    DeliveryConfig, WebhookClient,
    client::SendError,
    pace::{self, Pacer, pace_of},
};

/// Why a job's attempt was not made (see [`Dispatcher::send`]).
#[derive(Debug)]
enum Unsent {
    /// Shutdown came first: the job's lease is let go at once (see [`Dispatcher::leave`]).
    Stopping,
    /// A passing reason of this server's (its store unreachable, out of file descriptors):
    /// the job stays leased, and its lease is the back-off.
    Trouble(String),
    /// Its start came too late for its lease (reading its credentials took long): let go at
    /// once for a later claim, as a job whose turn comes too late ([`Paced::TooLate`]).
    TooLate,
}

/// When a delivery may go, by its endpoint's pace (see [`Dispatcher::pace`]).
enum Paced {
    Now,
    At(tokio::time::Instant),
    /// Not within its lease: not sent.
    TooLate,
    /// The store keeping the cluster's turns could not be asked: not sent, for a reason of
    /// this server's (see [`Unsent::Trouble`]).
    Trouble(String),
    /// Shutdown came while the turn was being reserved: let go.
    Stopping,
}

/// Claims per store round trip, per lane.
const CLAIM_BATCH: u32 = 128;
/// Longest sleep between looks at the queue when nothing is known to be due.
const IDLE_POLL: Duration = Duration::from_secs(5);
/// Pause before looking again when something is due but the last claim found nothing to start:
/// either it fell due just after the claim, or every due endpoint is at its limit (then a
/// finishing attempt usually wakes the loop first). Short, so neither case waits long.
const RECHECK: Duration = Duration::from_millis(25);
/// [`RECHECK`] while some endpoint is paced: its due deliveries may be held back for seconds
/// by their turns, and no finishing attempt says when they come.
const PACED_RECHECK: Duration = Duration::from_millis(250);
/// Pause after a store error, so a broken database does not become a busy loop.
const ERROR_BACKOFF: Duration = Duration::from_secs(1);
/// Added to every delivery lease beyond the time its attempt may take (see `claim`).
const LEASE_MARGIN: Duration = Duration::from_secs(5);
/// How long shutdown waits at least for the store to let go of jobs not started (see
/// [`Dispatcher::let_go`]), even once the grace period is over.
const LET_GO_PATIENCE: Duration = Duration::from_secs(1);
/// A paced delivery whose turn is further off than this gives its slot up meanwhile (see
/// [`Lane::park`]); a shorter wait keeps the slot, as a parked delivery costs a task.
const PARK_BEYOND: Duration = Duration::from_millis(50);
/// The arrival number of a waiting job whose turn came (see [`Lane::unpark`]); admitted jobs
/// are numbered from 1.
const WITH_TURN: u64 = 0;

/// Wakes the dispatcher's lanes when work is queued for them.
///
/// Each lane claims in a loop of its own (see [`Dispatcher::run`]), so a wake-up goes only to
/// the lanes the work is for: new messages' first attempts would otherwise send the retry lane
/// to the store once per message, for nothing.
#[derive(Clone, Default)]
pub struct DispatcherHandle {
    first_attempts: Arc<Notify>,
    retries: Arc<Notify>,
}

impl DispatcherHandle {
    /// Work may be due in either lane: a resend or a recovery (manual attempts are in the
    /// retry lane), another node's deliveries.
    pub fn wake(&self) {
        self.first_attempts.notify_one();
        self.retries.notify_one();
    }

    /// New messages' first attempts were queued.
    pub fn wake_first_attempts(&self) {
        self.first_attempts.notify_one();
    }

    fn lane(&self, first_attempts: bool) -> &Notify {
        if first_attempts {
            &self.first_attempts
        } else {
            &self.retries
        }
    }
}

/// One lane's bookkeeping, shared with the attempt tasks it spawned.
///
/// The lane claims up to twice its concurrency: jobs beyond the running limit wait here,
/// already leased, so an attempt that finishes hands its slot straight to a waiting job instead
/// of waiting for the dispatcher's next trip to the store.
///
/// Three budgets bound what runs: the lane's, each app's and each endpoint's. The app budget is
/// what keeps apps apart: without it, one app whose endpoints hang holds every slot for a whole
/// request timeout. A free slot goes to the waiting job whose app has the fewest attempts
/// running (then whose endpoint has, then the one waiting longest), so apps and endpoints that
/// compete for the lane take turns rather than keeping the slots they hold.
struct Lane {
    first_attempts: bool,
    /// Bounds attempt records handed to the store but not yet committed.
    unsaved: Arc<Semaphore>,
    /// Attempts running at once over all endpoints.
    limit: u32,
    /// Attempts running at once for one app.
    per_app: u32,
    /// Attempts running at once to one endpoint.
    per_endpoint: u32,
    /// The paces of endpoints with a `throttleRate`, shared by both lanes: a paced endpoint
    /// is held to fewer deliveries than `per_endpoint` allows (see [`Lane::endpoint_cap`]).
    pacer: Arc<Pacer>,
    /// What is noted of each admitted job, by its token, until the job starts (see
    /// [`Lane::noted`]).
    notes: Mutex<HashMap<LeaseToken, Noted>>,
    state: Mutex<LaneState>,
}

/// What a lane notes of a job it holds, for when the job starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Noted {
    /// When its lease runs out, on this node's monotonic clock (see [`Lane::leased`]).
    lease_end: Option<tokio::time::Instant>,
    /// Its endpoint's turn, reserved for it while it was parked (see [`Lane::park`]).
    turn: Option<tokio::time::Instant>,
}

#[derive(Default)]
struct LaneState {
    running: u32,
    waiting: u32,
    /// Jobs waiting for their endpoint's turn without a slot (see [`Lane::park`]).
    parked: u32,
    /// Rooms granted to new deliveries being committed (see [`Handoff`]).
    reserved: u32,
    /// A new delivery was refused room (the lane, its endpoint or its app was full), so it went
    /// to the queue for a claim to find. Until a claim has drained that backlog, new deliveries
    /// of the same kind are refused too, so they cannot overtake it.
    backlog: bool,
    backlogged_endpoints: HashSet<EndpointId>,
    backlogged_apps: HashSet<AppId>,
    /// Arrival order of waiting jobs, for the last tie-break.
    arrivals: u64,
    endpoints: HashMap<EndpointId, EndpointSlots>,
    apps: HashMap<AppId, AppSlots>,
    /// Attempts over whose records are still being saved, per endpoint (see [`Saving`]).
    saving_endpoints: HashMap<EndpointId, u32>,
}

struct EndpointSlots {
    app: AppId,
    running: u32,
    reserved: u32,
    parked: u32,
    /// Waiting jobs with their arrival number, oldest first.
    waiting: VecDeque<(u64, DeliveryJob)>,
}

#[derive(Default)]
struct AppSlots {
    running: u32,
    waiting: u32,
    reserved: u32,
    parked: u32,
}

impl EndpointSlots {
    fn new(app: &AppId) -> Self {
        Self {
            app: app.clone(),
            running: 0,
            reserved: 0,
            parked: 0,
            waiting: VecDeque::new(),
        }
    }

    fn held(&self) -> u32 {
        self.running + self.waiting.len() as u32 + self.reserved + self.parked
    }

    fn idle(&self) -> bool {
        self.held() == 0
    }
}

impl AppSlots {
    fn held(&self) -> u32 {
        self.running + self.waiting + self.reserved + self.parked
    }
}

/// An attempt's record being saved, told to claims under its endpoint (see
/// [`Lane::claim_limits`]) until dropped.
struct Saving {
    lane: Arc<Lane>,
    endpoint: EndpointId,
}

impl Drop for Saving {
    fn drop(&mut self) {
        let mut state = self.lane.state();
        if let Some(n) = state.saving_endpoints.get_mut(&self.endpoint) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                state.saving_endpoints.remove(&self.endpoint);
            }
        }
    }
}

/// What the lane already holds, for the next claim.
struct ClaimBudget {
    /// How many more jobs the lane takes.
    room: u32,
    /// Jobs held (running or waiting) per endpoint and per app.
    endpoints: HashMap<EndpointId, u32>,
    apps: HashMap<AppId, u32>,
    /// Records being saved per endpoint.
    saving_endpoints: HashMap<EndpointId, u32>,
}

impl Lane {
    #[cfg(test)]
    fn new(first_attempts: bool, limit: u32, per_app: u32, per_endpoint: u32) -> Arc<Self> {
        Self::pacing(first_attempts, limit, per_app, per_endpoint, Arc::default())
    }

    fn pacing(
        first_attempts: bool,
        limit: u32,
        per_app: u32,
        per_endpoint: u32,
        pacer: Arc<Pacer>,
    ) -> Arc<Self> {
        Arc::new(Self {
            first_attempts,
            unsaved: Arc::new(Semaphore::new(Self::unsaved_capacity(limit))),
            limit,
            per_app,
            per_endpoint,
            pacer,
            notes: Mutex::new(HashMap::new()),
            state: Mutex::new(LaneState::default()),
        })
    }

    /// Notes that `jobs`, about to be admitted, are leased until `ends`, on this node's
    /// monotonic clock: no later than the store's lease, which was taken from a time no
    /// earlier than the caller's. (The store's leases are in the cluster's time, which on
    /// PostgreSQL counts on monotonically too; SQLite's read the wall clock, so a step of it
    /// forward ends them early, as it always has.)
    fn leased(&self, jobs: &[DeliveryJob], ends: tokio::time::Instant) {
        let mut notes = self.notes();
        for job in jobs {
            notes.insert(
                job.lease,
                Noted {
                    lease_end: Some(ends),
                    turn: None,
                },
            );
        }
    }

    /// What was noted of `job` ([`Lane::leased`], [`Lane::park`]); forgotten as it starts.
    fn noted(&self, job: &DeliveryJob) -> Noted {
        self.notes().remove(&job.lease).unwrap_or_default()
    }

    fn notes(&self) -> std::sync::MutexGuard<'_, HashMap<LeaseToken, Noted>> {
        // Inserts and removals only, which cannot panic midway.
        self.notes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most deliveries `endpoint` may hold in this lane (running, waiting and reserved):
    /// two rounds of `per_endpoint`, or, for an endpoint paced lately, what its rate sends in
    /// a few seconds ([`Pacer::claim_cap`]), so that its deliveries do not wait for their
    /// turns past their leases.
    fn endpoint_cap(&self, endpoint: &EndpointId) -> u32 {
        self.pacer
            .claim_cap(endpoint, self.per_endpoint * 2, tokio::time::Instant::now())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LaneState> {
        // Every update is a few integer and queue operations that cannot panic midway.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the lane lets wait for the store at once: four per slot.
    fn unsaved_capacity(limit: u32) -> usize {
        limit as usize * 4
    }

    /// The most deliveries a claim may let one endpoint and one app hold: one round running
    /// plus one round waiting each, so that a claimed job starts within a round's time and its
    /// lease (two rounds and a margin) outlives its wait.
    ///
    /// Attempts that ended and whose records are still being saved keep their leases until the
    /// record commits, but they no longer load their endpoint or app: the claim is told them
    /// per endpoint and per app ([`ClaimBudget`]), and a store that counts leases leaves them
    /// out. (Without that, an endpoint's delivery rate was its leases over the record's commit
    /// latency: on a busy PostgreSQL, about 700 a second. Raising every endpoint's limit by the
    /// whole lane's records being saved, as this once did, let a slow endpoint hold rounds of
    /// jobs that waited past their leases and were then sent again.)
    fn claim_limits(&self) -> (u32, u32) {
        (self.per_endpoint * 2, self.per_app * 2)
    }

    /// Counts an attempt's record to `endpoint` as being saved until the returned guard is
    /// dropped.
    fn saving(self: &Arc<Self>, endpoint: &EndpointId) -> Saving {
        *self
            .state()
            .saving_endpoints
            .entry(endpoint.clone())
            .or_insert(0) += 1;
        Saving {
            lane: Arc::clone(self),
            endpoint: endpoint.clone(),
        }
    }

    /// How many more jobs to claim, and how many each endpoint and app already holds.
    fn claim_budget(&self) -> ClaimBudget {
        let state = self.state();
        let mut endpoints: HashMap<EndpointId, u32> = state
            .endpoints
            .iter()
            .map(|(id, slots)| (id.clone(), slots.held()))
            .collect();
        // A paced endpoint is told to the claim as holding what it may not take beyond its
        // cap: the claim's per-endpoint limit is the same for every endpoint.
        let limit = self.per_endpoint * 2;
        for (endpoint, cap) in self.pacer.caps(limit, tokio::time::Instant::now()) {
            *endpoints.entry(endpoint).or_insert(0) += limit - cap;
        }
        ClaimBudget {
            room: (self.limit * 2).saturating_sub(state.held()),
            endpoints,
            apps: state
                .apps
                .iter()
                .map(|(id, slots)| (id.clone(), slots.held()))
                .collect(),
            saving_endpoints: state.saving_endpoints.clone(),
        }
    }

    /// Room for a new delivery of `app` to `endpoint`, within the limits a claim keeps (the
    /// lane, the endpoint and the app each hold at most twice what they may run).
    fn reserve(&self, app: &AppId, endpoint: &EndpointId) -> bool {
        let mut state = self.state();
        if state.backlog
            || state.backlogged_endpoints.contains(endpoint)
            || state.backlogged_apps.contains(app)
        {
            return false;
        }
        if state.held() >= self.limit * 2 {
            state.backlog = true;
            return false;
        }
        let held = state.endpoints.get(endpoint).map_or(0, EndpointSlots::held);
        if held >= self.endpoint_cap(endpoint) {
            state.backlogged_endpoints.insert(endpoint.clone());
            return false;
        }
        if state
            .apps
            .get(app)
            .is_some_and(|slots| slots.held() >= self.per_app * 2)
        {
            state.backlogged_apps.insert(app.clone());
            return false;
        }
        state.reserved += 1;
        state.apps.entry(app.clone()).or_default().reserved += 1;
        state
            .endpoints
            .entry(endpoint.clone())
            .or_insert_with(|| EndpointSlots::new(app))
            .reserved += 1;
        true
    }

    /// Rooms reserved for deliveries that did not commit.
    fn give_back(&self, rooms: &[(AppId, EndpointId)]) {
        let mut state = self.state();
        for (app, endpoint) in rooms {
            state.reserved = state.reserved.saturating_sub(1);
            unreserve(&mut state, app, endpoint);
        }
    }

    /// A claim that asked for `asked` jobs got `got`: if fewer, it found every claimable one,
    /// so the backlog that new deliveries were held behind is gone, except for the endpoints
    /// and apps still full (their next deliveries would go to the queue anyway).
    fn claimed(&self, asked: u32, got: usize) {
        if got >= asked as usize {
            return;
        }
        let mut state = self.state();
        let LaneState {
            backlog,
            backlogged_endpoints,
            backlogged_apps,
            endpoints,
            apps,
            ..
        } = &mut *state;
        *backlog = false;
        backlogged_endpoints.retain(|id| {
            endpoints
                .get(id)
                .is_some_and(|slots| slots.held() >= self.endpoint_cap(id))
        });
        backlogged_apps.retain(|id| {
            apps.get(id)
                .is_some_and(|slots| slots.held() >= self.per_app * 2)
        });
    }

    /// Takes jobs handed over for reserved rooms: like [`Lane::admit`], their rooms become
    /// waiting jobs.
    fn admit_reserved(&self, jobs: Vec<DeliveryJob>) -> Vec<DeliveryJob> {
        {
            let mut state = self.state();
            for job in &jobs {
                state.reserved = state.reserved.saturating_sub(1);
                if let Some(slots) = state.apps.get_mut(&job.app_id) {
                    slots.reserved = slots.reserved.saturating_sub(1);
                }
                if let Some(slots) = state.endpoints.get_mut(&job.endpoint.id) {
                    slots.reserved = slots.reserved.saturating_sub(1);
                }
            }
        }
        self.admit(jobs)
    }

    /// Takes claimed jobs; returns those that may start now, with any already waiting that now
    /// fit. The rest wait for a slot.
    fn admit(&self, jobs: Vec<DeliveryJob>) -> Vec<DeliveryJob> {
        let mut state = self.state();
        for job in jobs {
            // From 1: 0 is `WITH_TURN`.
            state.arrivals += 1;
            let arrival = state.arrivals;
            state.waiting += 1;
            state.apps.entry(job.app_id.clone()).or_default().waiting += 1;
            state
                .endpoints
                .entry(job.endpoint.id.clone())
                .or_insert_with(|| EndpointSlots::new(&job.app_id))
                .waiting
                .push_back((arrival, job));
        }
        std::iter::from_fn(|| self.start_next(&mut state)).collect()
    }

    /// `job`, running, waits for its endpoint's `turn` (reserved for it) without its slot,
    /// which the caller then gives up with [`Lane::next_after`] as if the attempt had ended:
    /// the turns of an app's slowly paced endpoints would otherwise fill its share of the lane
    /// and hold its other endpoints back. The job still counts as held by its endpoint, its app
    /// and the lane, so claims take no more than before; `lease_end` and the turn are noted
    /// for its start.
    fn park(
        &self,
        job: &DeliveryJob,
        turn: tokio::time::Instant,
        lease_end: Option<tokio::time::Instant>,
    ) {
        self.notes().insert(
            job.lease,
            Noted {
                lease_end,
                turn: Some(turn),
            },
        );
        let mut state = self.state();
        state.parked += 1;
        state.apps.entry(job.app_id.clone()).or_default().parked += 1;
        state
            .endpoints
            .entry(job.endpoint.id.clone())
            .or_insert_with(|| EndpointSlots::new(&job.app_id))
            .parked += 1;
    }

    /// A parked job's turn has come: it waits for a slot ahead of every job without a turn
    /// (behind those of its endpoint whose turns came before). Returns the job to start now,
    /// if a slot is free (it, or another whose turn came).
    fn unpark(&self, job: DeliveryJob) -> Option<DeliveryJob> {
        let mut state = self.state();
        state.parked = state.parked.saturating_sub(1);
        state.waiting += 1;
        let app = state.apps.entry(job.app_id.clone()).or_default();
        app.parked = app.parked.saturating_sub(1);
        app.waiting += 1;
        let slots = state
            .endpoints
            .entry(job.endpoint.id.clone())
            .or_insert_with(|| EndpointSlots::new(&job.app_id));
        slots.parked = slots.parked.saturating_sub(1);
        let behind = slots
            .waiting
            .iter()
            .take_while(|(arrival, _)| *arrival == WITH_TURN)
            .count();
        slots.waiting.insert(behind, (WITH_TURN, job));
        self.start_next(&mut state)
    }

    /// An attempt of `app` to `endpoint` ended. Its slot goes to the waiting job that fits
    /// best, if any; a job that fits besides it is left for the dispatcher, which this wakes.
    fn next_after(&self, app: &str, endpoint: &str) -> Option<DeliveryJob> {
        let mut state = self.state();
        state.running = state.running.saturating_sub(1);
        if let Some(slots) = state.endpoints.get_mut(endpoint) {
            slots.running = slots.running.saturating_sub(1);
            if slots.idle() {
                state.endpoints.remove(endpoint);
            }
        }
        if let Some(slots) = state.apps.get_mut(app) {
            slots.running = slots.running.saturating_sub(1);
            if slots.held() == 0 {
                state.apps.remove(app);
            }
        }
        self.start_next(&mut state)
    }

    /// Takes every job waiting for a slot out of the lane: shutdown came, so none will start
    /// (see [`Dispatcher::leave`]).
    fn take_waiting(&self) -> Vec<DeliveryJob> {
        let mut state = self.state();
        let LaneState {
            endpoints,
            apps,
            waiting,
            ..
        } = &mut *state;
        let mut taken = Vec::with_capacity(*waiting as usize);
        endpoints.retain(|_, slots| {
            if let Some(app) = apps.get_mut(&slots.app) {
                app.waiting = app.waiting.saturating_sub(slots.waiting.len() as u32);
            }
            taken.extend(slots.waiting.drain(..).map(|(_, job)| job));
            !slots.idle()
        });
        apps.retain(|_, app| app.held() > 0);
        *waiting = 0;
        taken
    }

    /// Starts the waiting job that fits best, if one fits: one whose turn came (parked until
    /// then, see [`Lane::park`]), then fewest running for its app, then for its endpoint, then
    /// the longest waiting. Looks at each endpoint with waiting jobs once; there are at most as
    /// many as the lane holds jobs.
    fn start_next(&self, state: &mut LaneState) -> Option<DeliveryJob> {
        if state.waiting == 0 || state.running >= self.limit {
            return None;
        }
        let LaneState {
            endpoints, apps, ..
        } = &mut *state;
        let (endpoint, app) = endpoints
            .iter()
            .filter_map(|(id, slots)| {
                let (arrival, _) = slots.waiting.front()?;
                let app_running = apps.get(&slots.app).map_or(0, |a| a.running);
                (slots.running < self.per_endpoint && app_running < self.per_app).then_some((
                    (*arrival != WITH_TURN, app_running, slots.running, *arrival),
                    id,
                    &slots.app,
                ))
            })
            .min_by_key(|(rank, _, _)| *rank)
            .map(|(_, id, app)| (id.clone(), app.clone()))?;
        let slots = endpoints.get_mut(&endpoint)?;
        let (_, job) = slots.waiting.pop_front()?;
        slots.running += 1;
        let app = apps.entry(app).or_default();
        app.running += 1;
        app.waiting = app.waiting.saturating_sub(1);
        state.running += 1;
        state.waiting -= 1;
        Some(job)
    }
}

impl LaneState {
    /// Jobs the lane holds: running, waiting for a slot or a turn, and rooms reserved.
    fn held(&self) -> u32 {
        self.running + self.waiting + self.reserved + self.parked
    }
}

/// One room of `app` and `endpoint` is no longer reserved.
fn unreserve(state: &mut LaneState, app: &str, endpoint: &str) {
    if let Some(slots) = state.endpoints.get_mut(endpoint) {
        slots.reserved = slots.reserved.saturating_sub(1);
        if slots.idle() {
            state.endpoints.remove(endpoint);
        }
    }
    if let Some(slots) = state.apps.get_mut(app) {
        slots.reserved = slots.reserved.saturating_sub(1);
        if slots.held() == 0 {
            state.apps.remove(app);
        }
    }
}

/// The first-attempt lane's side of [`FreshDeliveries`]: the store reserves room in the lane
/// for each new delivery before its commit and hands the leased job over after it, and the job
/// starts at once if a slot is free. No claim has to find it again in the store.
struct Handoff {
    /// Weak: the store holds this, and the dispatcher holds the store.
    dispatcher: std::sync::Weak<Dispatcher>,
    lane: Arc<Lane>,
    tasks: TaskTracker,
    abandon: CancellationToken,
    /// Once shutdown is requested, new deliveries stay in the store for the next start.
    shutdown: CancellationToken,
    lease: Duration,
}

impl FreshDeliveries for Handoff {
    fn reserve(&self, app: &AppId, endpoint: &EndpointId) -> bool {
        !self.shutdown.is_cancelled() && self.lane.reserve(app, endpoint)
    }

    fn hand_over(&self, jobs: Vec<DeliveryJob>, leased_from: std::time::Instant) {
        let Some(dispatcher) = self.dispatcher.upgrade() else {
            // Stopped: the jobs' leases run out and they are claimed after the next start.
            return;
        };
        // Leased in the commit that just returned, for `lease` from no earlier than its start
        // (an fsync that stalled since does not make the lease look longer than it is).
        self.lane.leased(
            &jobs,
            tokio::time::Instant::from_std(leased_from) + self.lease,
        );
        for job in self.lane.admit_reserved(jobs) {
            self.tasks.spawn(Arc::clone(&dispatcher).attempts(
                job,
                Arc::clone(&self.lane),
                self.tasks.clone(),
                self.abandon.clone(),
            ));
        }
    }

    fn give_back(&self, rooms: Vec<(AppId, EndpointId)>) {
        self.lane.give_back(&rooms);
        if let Some(dispatcher) = self.dispatcher.upgrade() {
            // The deliveries may be in the queue after all (committed, not leased).
            dispatcher.handle.wake_first_attempts();
        }
    }

    fn lease(&self) -> Duration {
        self.lease
    }
}

pub struct Dispatcher {
    store: Arc<dyn Store>,
    /// The store's clock (the database's, on a shared one): leases, due times and attempt
    /// times are compared across nodes in it.
    clock: ClusterClock,
    client: WebhookClient,
    config: DeliveryConfig,
    handle: DispatcherHandle,
    metrics: Arc<DeliveryMetrics>,
    /// Spaces the attempts to endpoints with a `throttleRate` (see [`crate::pace`]).
    pacer: Arc<Pacer>,
    /// Cancelled when shutdown is requested (see [`Dispatcher::run`]): from then on no attempt
    /// starts, and jobs not yet started are let go ([`Dispatcher::leave`]).
    stopping: CancellationToken,
    /// Jobs claimed but not attempted (see [`Dispatcher::leave`]), until their leases are let
    /// go.
    left: Mutex<Vec<DeliveryJob>>,
    /// Told when a job is added to `left`.
    job_left: Notify,
}

impl Dispatcher {
    pub fn new(
        store: Arc<dyn Store>,
        client: WebhookClient,
        config: DeliveryConfig,
        metrics: Arc<DeliveryMetrics>,
    ) -> Self {
        // A job claimed under the caps must find its turn before the latest start its lease
        // allows, a request timeout and the shutdown's grace after the claim (see `start_by`);
        // else it would be let go and claimed again, and again.
        let pacer = Pacer::holding_turns_within(config.request_timeout + config.shutdown_grace);
        Self {
            clock: store.clock(),
            store,
            client,
            config,
            handle: DispatcherHandle::default(),
            metrics,
            pacer: Arc::new(pacer),
            stopping: CancellationToken::new(),
            left: Mutex::default(),
            job_left: Notify::new(),
        }
    }

    pub fn handle(&self) -> DispatcherHandle {
        self.handle.clone()
    }

    /// Deliver until `shutdown`, then give in-flight attempts `shutdown_grace` to finish.
    /// Attempts cut off by the grace period keep their lease and are retried after a restart
    /// (or by another node) once it runs out: they may have reached their endpoints. Jobs not
    /// started by then are let go at once instead ([`Dispatcher::leave`]).
    pub async fn run(mut self, shutdown: CancellationToken) {
        // Attempts that started before shutdown run on within the grace period; none starts
        // after it (one that did was likely cut off by the grace period's end, and sent again
        // after the restart).
        self.stopping = shutdown.clone();
        let me = Arc::new(self);
        let lane = |first_attempts: bool, limit: u32| {
            let per_app = me.config.per_app_limit(limit);
            Lane::pacing(
                first_attempts,
                limit,
                per_app,
                me.config.per_endpoint_in_flight,
                Arc::clone(&me.pacer),
            )
        };
        let lanes = [
            lane(true, me.config.max_in_flight),
            lane(false, me.config.max_retries_in_flight),
        ];
        let tasks = TaskTracker::new();
        // Cancelled once the grace period is over: attempts still running then are abandoned
        // without a record, so their lease brings them back after the restart.
        let abandon = CancellationToken::new();
        me.store.hand_fresh_deliveries_to(Arc::new(Handoff {
            dispatcher: Arc::downgrade(&me),
            lane: Arc::clone(&lanes[0]),
            tasks: tasks.clone(),
            abandon: abandon.clone(),
            shutdown: shutdown.clone(),
            lease: me.lease(),
        }));
        // One loop per lane: a lane's claim never waits for the other's. On PostgreSQL a claim
        // is a transaction of several round trips, and the first attempts of one busy endpoint
        // waited for the retry lane's (usually empty) claim at every turn.
        let [first_attempts, retries] = &lanes;
        tokio::join!(
            Arc::clone(&me).claim_loop(first_attempts, &tasks, &abandon, &shutdown),
            Arc::clone(&me).claim_loop(retries, &tasks, &abandon, &shutdown),
            me.release_loop(&shutdown),
        );
        tasks.close();
        let grace_end = tokio::time::Instant::now() + me.config.shutdown_grace;
        let grace = tokio::time::sleep_until(grace_end);
        tokio::pin!(grace);
        loop {
            me.let_go(&lanes, grace_end).await;
            tokio::select! {
                () = tasks.wait() => break,
                () = me.job_left.notified() => {}
                () = &mut grace => {
                    tracing::warn!(
                        in_flight = tasks.len(),
                        "shutdown grace period over; unfinished attempts will be retried after restart"
                    );
                    abandon.cancel();
                    tasks.wait().await;
                    break;
                }
            }
        }
        me.let_go(&lanes, grace_end).await;
    }

    /// `job`, claimed, is not attempted: shutdown came, or its turn (or a slot) came too late
    /// for its lease. Its lease is let go (by [`Dispatcher::let_go`]), so a later claim, this
    /// node's or another's or the next start's, takes it as soon as it may go rather than when
    /// the lease runs out, which may be a minute.
    fn leave(&self, job: DeliveryJob) {
        self.left
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(job);
        self.job_left.notify_one();
    }

    /// Leaves `job` for a later claim ([`Dispatcher::leave`]) while this task goes on with its
    /// lane: wakes the lane's claims (a freed slot) and returns the lane's next job for it.
    fn leave_for_later(&self, job: DeliveryJob, lane: &Lane) -> Option<DeliveryJob> {
        let (app, endpoint) = (job.app_id.clone(), job.endpoint.id.clone());
        self.leave(job);
        self.handle.lane(lane.first_attempts).notify_one();
        lane.next_after(&app, &endpoint)
    }

    /// Until shutdown, lets go of the jobs left for a later claim ([`Dispatcher::leave`]) as
    /// they come, several at a time when they come together. Shutdown does not wait for a
    /// release under way: its jobs go back to `left`, for shutdown's own.
    async fn release_loop(&self, shutdown: &CancellationToken) {
        loop {
            tokio::select! {
                () = self.job_left.notified() => {}
                () = shutdown.cancelled() => return,
            }
            let jobs = self.take_left(&[]);
            if jobs.is_empty() {
                continue;
            }
            let stopped = tokio::select! {
                () = self.release(&jobs, None) => false,
                () = shutdown.cancelled() => true,
            };
            if stopped {
                self.left
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(jobs);
                return;
            }
        }
    }

    /// The jobs left since the last call, and those waiting in `lanes` for a slot (at
    /// shutdown, when no attempt will take them).
    fn take_left(&self, lanes: &[Arc<Lane>]) -> Vec<DeliveryJob> {
        let mut jobs = std::mem::take(&mut *self.left.lock().unwrap_or_else(|p| p.into_inner()));
        for lane in lanes {
            jobs.extend(lane.take_waiting());
        }
        jobs
    }

    /// Lets go of the leases of the jobs [`Dispatcher::take_left`] takes, at shutdown.
    async fn let_go(&self, lanes: &[Arc<Lane>], grace_end: tokio::time::Instant) {
        let jobs = self.take_left(lanes);
        self.release(&jobs, Some(grace_end)).await;
    }

    /// Lets go of the leases of `jobs`. At shutdown a slow store is given until `grace_end`
    /// (at least [`LET_GO_PATIENCE`]), and no longer. Jobs not let go are claimable again when
    /// their leases run out.
    async fn release(&self, jobs: &[DeliveryJob], grace_end: Option<tokio::time::Instant>) {
        if jobs.is_empty() {
            return;
        }
        let releasing = self.store.release_unattempted(jobs);
        let released = match grace_end {
            Some(grace_end) => {
                let until = grace_end.max(tokio::time::Instant::now() + LET_GO_PATIENCE);
                tokio::time::timeout_at(until, releasing).await
            }
            None => Ok(releasing.await),
        };
        let failure = match released {
            Ok(Ok(released)) if grace_end.is_some() => {
                tracing::info!(
                    released,
                    "shutting down: deliveries claimed but not attempted are let go for the next start or another node"
                );
                return;
            }
            Ok(Ok(released)) => {
                tracing::debug!(
                    released,
                    "deliveries claimed but not attempted in time for their leases are let go for a later claim"
                );
                // A shared store tells every node; the embedded one tells nobody.
                self.handle.wake();
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "the store did not answer in time".to_owned(),
        };
        tracing::warn!(
            error = failure,
            jobs = jobs.len(),
            "could not let go of deliveries claimed but not attempted; they are claimable again when their leases run out"
        );
    }

    /// Claims for `lane` and starts what it may run, until `shutdown`.
    async fn claim_loop(
        self: Arc<Self>,
        lane: &Arc<Lane>,
        tasks: &TaskTracker,
        abandon: &CancellationToken,
        shutdown: &CancellationToken,
    ) {
        let wake = self.handle.lane(lane.first_attempts);
        while !shutdown.is_cancelled() {
            // The store leases from a time no earlier than this.
            let claiming = tokio::time::Instant::now();
            let pause = match self.claim(lane).await {
                Ok((jobs, asked)) => {
                    lane.leased(&jobs, claiming + self.lease());
                    let got = jobs.len();
                    let started = lane.admit(jobs);
                    lane.claimed(asked, got);
                    for job in started {
                        tasks.spawn(Arc::clone(&self).attempts(
                            job,
                            Arc::clone(lane),
                            tasks.clone(),
                            abandon.clone(),
                        ));
                    }
                    if got as u32 == CLAIM_BATCH {
                        continue;
                    }
                    // After a claim that found work, the attempts it started wake the loop as
                    // they finish, so the lane's next due time (a query) is only worth asking
                    // when the claim found nothing.
                    if got > 0 {
                        RECHECK
                    } else {
                        self.idle_pause(lane.first_attempts).await
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "claiming deliveries failed");
                    ERROR_BACKOFF
                }
            };
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(pause) => {}
                () = shutdown.cancelled() => {}
            }
        }
    }

    /// How long a claimed (or handed-over) job stays leased.
    ///
    /// Long enough for a claimed job to wait behind one running round (a request timeout),
    /// run (another), and be drained at shutdown, with a margin; no longer, since a node that
    /// dies holds its jobs until their leases run out. A late result after expiry is fenced by
    /// the lease token, so a lease that runs out early costs at most a duplicate.
    fn lease(&self) -> Duration {
        self.config.request_timeout * 2 + self.config.shutdown_grace + LEASE_MARGIN
    }

    /// Claims what the lane has room for; returns the jobs and how many it asked for.
    async fn claim(&self, lane: &Lane) -> Result<(Vec<DeliveryJob>, u32), StoreError> {
        let budget = lane.claim_budget();
        if budget.room == 0 {
            return Ok((Vec::new(), 0));
        }
        let now = self.clock.now();
        let lease = self.lease();
        let limit = budget.room.min(CLAIM_BATCH);
        let (per_endpoint_limit, per_app_limit) = lane.claim_limits();
        self.metrics.claim(lane.first_attempts);
        let jobs = self
            .store
            .claim_due(&ClaimRequest {
                now,
                lease_until: now + lease,
                limit,
                first_attempts: lane.first_attempts,
                in_flight: budget.endpoints,
                per_endpoint_limit,
                app_in_flight: budget.apps,
                per_app_limit,
                saving: budget.saving_endpoints,
            })
            .await?;
        self.metrics
            .claimed_jobs_total
            .inc_by(u64::try_from(jobs.len()).unwrap_or(u64::MAX));
        Ok((jobs, limit))
    }

    /// How long a lane waits before looking again when its last look found nothing to start.
    /// A finishing attempt or new work wakes it sooner.
    async fn idle_pause(&self, first_attempts: bool) -> Duration {
        match self.store.next_due_at(first_attempts).await {
            Ok(Some(due)) => {
                let until_due = (due - self.clock.now()).to_std().unwrap_or(Duration::ZERO);
                // Due now but not claimed: fell due just after the claim, or held back by a
                // limit, which finishing attempts lift (and wake the lane), or by a pace, which
                // only time lifts: with endpoints paced, look again less often (a claim on
                // PostgreSQL is a transaction under the cluster's claim lock).
                let recheck = if self.pacer.is_empty() {
                    RECHECK
                } else {
                    PACED_RECHECK
                };
                until_due.clamp(recheck, IDLE_POLL)
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
            if self.stopping.is_cancelled() {
                self.leave(job);
                return;
            }
            let Noted {
                lease_end,
                turn: parked_turn,
            } = lane.noted(&job);
            let start_by = self.start_by(lease_end, tokio::time::Instant::now());
            let turn = match self.pace(&job, start_by, parked_turn).await {
                Paced::Now => true,
                Paced::At(at) if at <= tokio::time::Instant::now() + PARK_BEYOND => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => true,
                        () = self.stopping.cancelled() => {
                            self.leave(job);
                            return;
                        }
                    }
                }
                Paced::At(at) => {
                    let (app, endpoint) = (job.app_id.clone(), job.endpoint.id.clone());
                    lane.park(&job, at, lease_end);
                    self.wait_for_turn(job, at, &lane, &tasks, &abandon);
                    match lane.next_after(&app, &endpoint) {
                        Some(next) => {
                            job = next;
                            continue;
                        }
                        None => return,
                    }
                }
                Paced::Stopping => {
                    self.leave(job);
                    return;
                }
                Paced::TooLate => {
                    // Let go for a later claim, which the lanes make once the endpoint's
                    // turns come close enough (see `Lane::endpoint_cap`).
                    let Some(next) = self.leave_for_later(job, &lane) else {
                        return;
                    };
                    job = next;
                    continue;
                }
                Paced::Trouble(reason) => {
                    self.back_off(&job, &reason).await;
                    false
                }
            };
            let current = if turn {
                // Given way to a shutdown, as the pacing and the send are.
                tokio::select! {
                    current = self.current(&mut job) => Some(current),
                    () = self.stopping.cancelled() => None,
                }
            } else {
                Some(true)
            };
            let Some(current) = current else {
                self.leave(job);
                return;
            };
            if !current {
                // Disabled (a 410 to a job before it, say) or deleted since its claim: not
                // sent. Let go, so the next claim settles it as claims do (a disabled
                // endpoint's delivery fails, recoverable), and go on with the lane.
                let Some(next) = self.leave_for_later(job, &lane) else {
                    return;
                };
                job = next;
                continue;
            }
            if turn {
                let sent = async {
                    match self.send(&job, start_by).await {
                        Ok(record) => Ok(Some((
                            record,
                            Arc::clone(&lane.unsaved).acquire_owned().await,
                        ))),
                        Err(unsent @ (Unsent::Stopping | Unsent::TooLate)) => Err(unsent),
                        Err(Unsent::Trouble(reason)) => {
                            self.back_off(&job, &reason).await;
                            Ok(None)
                        }
                    }
                };
                let sent = tokio::select! {
                    sent = sent => sent,
                    // Shutdown's grace period is over: leave the rest to the next start.
                    () = abandon.cancelled() => return,
                };
                let sent = match sent {
                    Ok(sent) => sent,
                    Err(Unsent::TooLate) => {
                        let Some(next) = self.leave_for_later(job, &lane) else {
                            return;
                        };
                        job = next;
                        continue;
                    }
                    Err(_) => {
                        self.leave(job);
                        return;
                    }
                };
                if let Some((record, permit)) = sent {
                    let Ok(permit) = permit else {
                        return; // The semaphore is never closed; nothing to save to if it were.
                    };
                    let saving = lane.saving(&job.endpoint.id);
                    let me = Arc::clone(&self);
                    tasks.spawn(async move {
                        me.save(record).await;
                        drop((saving, permit));
                    });
                }
            }
            let next = lane.next_after(&job.app_id, &job.endpoint.id);
            // A freed slot may let the lane claim more.
            self.handle.lane(lane.first_attempts).notify_one();
            match next {
                Some(next) => job = next,
                None => return,
            }
        }
    }

    /// Brings the job's copy of its endpoint up to date from this node's endpoint cache just
    /// before the send: a job can wait in its lane for up to a lease after its claim, while
    /// the endpoint is disabled (a 410 to a job ahead of it), deleted, or given a new URL,
    /// secret or headers through the API. `false` when it is no longer to be sent to. The job
    /// goes as claimed when the cache cannot say: paused, or holding an older copy than the
    /// claim read (a change made on another node, not yet heard of here).
    async fn current(&self, job: &mut DeliveryJob) -> bool {
        let endpoints = match self.store.cached_app_endpoints(&job.app_id).await {
            Ok(Some(endpoints)) => endpoints,
            Ok(None) => return true,
            Err(e) => {
                tracing::debug!(error = %e, endpoint_id = %job.endpoint.id, "could not look at the endpoint again before sending; sending as claimed");
                return true;
            }
        };
        let Some(now) = endpoints.iter().find(|e| e.id == job.endpoint.id) else {
            // Not in the app's list: deleted, or made on another node whose notice has not
            // come yet (the claim just found it). Only the store can tell.
            return match self
                .store
                .get_endpoint(&job.app_id, job.endpoint.id.as_str())
                .await
            {
                Ok(None) => false,
                Ok(Some(stored)) if stored.disabled => false,
                Ok(Some(stored)) => {
                    if stored.updated_at > job.endpoint.updated_at {
                        job.endpoint = stored;
                    }
                    true
                }
                Err(_) => true,
            };
        };
        if now.updated_at < job.endpoint.updated_at {
            return true;
        }
        if now.disabled {
            return false;
        }
        if now.updated_at != job.endpoint.updated_at
            || now.failing_since != job.endpoint.failing_since
        {
            job.endpoint = now.clone();
        }
        true
    }

    /// Whether this node's endpoint cache shows `job`'s endpoint failing since before
    /// `answered_at` (when this attempt's success came), where the job's copy (read at the
    /// claim, or just before the send) did not: another job's failure began a streak while
    /// this one was in flight. A streak begun after the success is not this success's to end.
    async fn streak_began_meanwhile(
        &self,
        job: &DeliveryJob,
        answered_at: chrono::DateTime<Utc>,
    ) -> bool {
        match self.store.cached_app_endpoints(&job.app_id).await {
            Ok(Some(endpoints)) => endpoints
                .iter()
                .find(|e| e.id == job.endpoint.id)
                .and_then(|e| e.failing_since)
                .is_some_and(|since| since <= answered_at),
            _ => false,
        }
    }

    /// `job` was not sent for a passing reason of this server's: it is left leased and
    /// unrecorded (its lease is the back-off), and the slot waits before its next job, which
    /// would most likely fail the same way: a lane in trouble tries at most a slot's worth a
    /// second, rather than leasing its whole queue at once.
    async fn back_off(&self, job: &DeliveryJob, reason: &str) {
        tracing::warn!(msg_id = %job.msg_id, endpoint_id = %job.endpoint.id, reason,
            "a delivery was not sent for a reason of this server's, not its endpoint's; left unrecorded and attempted again once its lease runs out");
        tokio::select! {
            () = tokio::time::sleep(ERROR_BACKOFF) => {}
            () = self.stopping.cancelled() => {}
        }
    }

    /// Waits, off any slot, for a parked job's turn at `at`, then queues it for a slot and
    /// starts what that lets start. Once shutdown is requested, the job is let go, as any job
    /// not started is.
    fn wait_for_turn(
        self: &Arc<Self>,
        job: DeliveryJob,
        at: tokio::time::Instant,
        lane: &Arc<Lane>,
        tasks: &TaskTracker,
        abandon: &CancellationToken,
    ) {
        let (me, lane, tracker, abandon) = (
            Arc::clone(self),
            Arc::clone(lane),
            tasks.clone(),
            abandon.clone(),
        );
        tasks.spawn(async move {
            tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                () = me.stopping.cancelled() => {
                    me.leave(job);
                    return;
                }
            }
            if let Some(start) = lane.unpark(job) {
                let attempts = me.attempts(start, Arc::clone(&lane), tracker.clone(), abandon);
                tracker.spawn(attempts);
            }
        });
    }

    /// When `job`, which may start until `latest` ([`Dispatcher::start_by`]), may go: its
    /// endpoint's `throttleRate` spaces the attempts to it ([`Dispatcher::reserve_turn`]). A
    /// job may start until a request timeout before its lease ends; one whose turn comes later
    /// is not sent, since the lease would run out during the attempt and another claim could
    /// send it again meanwhile. It is let go, unrecorded ([`Dispatcher::leave`]), and claimed
    /// again once its turn is near: the lanes claim none of its endpoint's deliveries before
    /// ([`Lane::endpoint_cap`]). The same holds for any job that waited
    /// that long for a slot, paced or not (the claims' limits are meant to prevent it). A job
    /// parked until its `parked_turn` goes now, within the same bound, unless it then waited
    /// for a slot past the turn after it: it takes a new turn then, rather than go out
    /// together with that turn's job.
    async fn pace(
        &self,
        job: &DeliveryJob,
        latest: tokio::time::Instant,
        parked_turn: Option<tokio::time::Instant>,
    ) -> Paced {
        let now = tokio::time::Instant::now();
        // An unpaced job leaves its endpoint's pace alone: jobs claimed before a throttleRate
        // was set would otherwise restart its burst; a pace no job reserves from ends after a
        // minute (`pace::FORGET_AFTER`).
        let rate = pace_of(job.endpoint.throttle_rate);
        let turn_kept = parked_turn
            .zip(rate)
            .is_some_and(|(turn, rate)| now <= turn + pace::interval(rate).max(PARK_BEYOND));
        let Some(rate) = rate.filter(|_| !turn_kept) else {
            return if now <= latest {
                Paced::Now
            } else {
                tracing::warn!(msg_id = %job.msg_id, endpoint_id = %job.endpoint.id,
                    "a delivery waited in the dispatcher past the start of its lease's last attempt; let go for a later claim");
                Paced::TooLate
            };
        };
        // Asking a store that keeps the cluster's turns is a round trip: shutdown does not wait
        // for it.
        let reserved = tokio::select! {
            reserved = self.reserve_turn(&job.endpoint.id, rate, now, latest) => reserved,
            () = self.stopping.cancelled() => return Paced::Stopping,
        };
        match reserved {
            Err(e) => {
                self.metrics.not_sent();
                Paced::Trouble(format!("could not reserve the endpoint's turn: {e}"))
            }
            Ok(Some(at)) if at <= now => Paced::Now,
            Ok(Some(at)) => Paced::At(at),
            Ok(None) => {
                self.metrics.paced_past_lease();
                tracing::debug!(msg_id = %job.msg_id, endpoint_id = %job.endpoint.id, rate,
                    "the endpoint's throttleRate gives this delivery no turn within its lease; let go for a later claim");
                Paced::TooLate
            }
        }
    }

    /// Reserves the next turn of `endpoint`, paced at `rate`, for an attempt that may start
    /// until `latest`: when it may go, or `None` if its turn comes later (nothing is reserved
    /// then). A store shared by several nodes keeps the turns, so the rate holds for the
    /// cluster, and this node's pacer only follows them for its claim caps; a store of one
    /// node leaves them to this node's pacer.
    async fn reserve_turn(
        &self,
        endpoint: &EndpointId,
        rate: u16,
        now: tokio::time::Instant,
        latest: tokio::time::Instant,
    ) -> Result<Option<tokio::time::Instant>, StoreError> {
        if latest < now {
            return Ok(None);
        }
        let cluster_now = self.clock.now();
        let ahead = chrono::Duration::from_std(latest.saturating_duration_since(now))
            .unwrap_or(chrono::Duration::MAX);
        let cluster_latest = cluster_now
            .checked_add_signed(ahead)
            .unwrap_or(chrono::DateTime::<Utc>::MAX_UTC);
        // The store's times on this node's clock.
        let local =
            |at: chrono::DateTime<Utc>| now + (at - cluster_now).to_std().unwrap_or_default();
        Ok(
            match self
                .store
                .reserve_turn(endpoint, rate, cluster_now, cluster_latest)
                .await?
            {
                Turn::NotKept => self.pacer.reserve(endpoint, rate, now, latest),
                Turn::TooLate { due } => {
                    if let Some(due) = due {
                        self.pacer.follow(endpoint, rate, local(due));
                    }
                    None
                }
                Turn::At { at, due } => {
                    self.pacer.follow(endpoint, rate, local(due));
                    Some(local(at))
                }
            },
        )
    }

    async fn save(&self, record: AttemptRecord) {
        let (msg_id, endpoint_id) = (
            record.attempt.msg_id.clone(),
            record.attempt.endpoint_id.clone(),
        );
        // A disable the store may decline retries at `retry_at` instead.
        let retries = matches!(record.next, NextStep::RetryAt(_))
            || matches!(
                record.endpoint_change,
                EndpointChange::Disable {
                    retry_at: Some(_),
                    ..
                }
            );
        match self.store.record_attempt(record).await {
            Ok(Recorded::Applied) => {}
            Ok(Recorded::Stale) => {
                // The lease ran out during the attempt (and the delivery may have been claimed
                // again), or a resend took the delivery back: the attempt is logged, and the
                // newer claim or the resend decides the delivery's state.
                tracing::info!(%msg_id, %endpoint_id,
                    "the attempt lost its lease (expired, or taken back by a resend or an expunge); logged without changing the delivery");
            }
            Err(e) => {
                // The delivery is attempted again once its lease runs out.
                tracing::error!(error = %e, %msg_id, %endpoint_id, "recording an attempt failed");
            }
        }
        // A retry may be due sooner than the retry lane's next look. A saved record frees no
        // room for a claim of its own lane, so that lane is not woken: a claim is told of the
        // records being saved per endpoint (`Lane::saving`), which drops by one when this one
        // is (as does the store's count of the endpoint's leases, on a store that counts
        // them). Waking it here made the embedded store's first-attempt lane ask for a claim
        // more than twice per delivery.
        if retries {
            self.handle.lane(false).notify_one();
        }
    }

    /// The request's headers for an attempt at `now` (the cluster's time).
    async fn headers(
        &self,
        job: &DeliveryJob,
        now: chrono::DateTime<Utc>,
    ) -> Result<HeaderMap, SendError> {
        match job.endpoint.format {
            EndpointFormat::StandardWebhooks => Ok(signed_headers(job, now)),
            EndpointFormat::Pusher => {
                // Served from the store's cache; read per attempt so a rotated secret applies.
                let app = match self.store.get_app(&job.app_id).await {
                    Ok(Some(app)) => app,
                    Ok(None) => {
                        return Err(SendError::Unbuildable("the app no longer exists".into()));
                    }
                    // Stored data that cannot be read will not be readable later.
                    Err(e @ StoreError::Corrupt(_)) => {
                        return Err(SendError::Unbuildable(format!(
                            "could not read the app's Pusher credentials: {e}"
                        )));
                    }
                    // The store unreachable or busy, or a key missing from the configuration:
                    // this server's to fix, not the endpoint's.
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

    /// The latest an attempt of a job leased until `lease_end` may start (`now` with a full
    /// lease if none was noted): the attempt must end, and its record be on its way, within the
    /// lease, so it may start a request timeout and a margin before (the margin also covers
    /// two nodes' readings of the cluster's time, each off by at most half a round trip).
    fn start_by(
        &self,
        lease_end: Option<tokio::time::Instant>,
        now: tokio::time::Instant,
    ) -> tokio::time::Instant {
        lease_end
            .unwrap_or(now + self.lease())
            .checked_sub(self.config.request_timeout + LEASE_MARGIN)
            .unwrap_or(now)
    }

    /// Makes `job`'s attempt; returns its record, or why nothing was sent for a passing reason
    /// of this server's ([`SendError::NotSent`]: its store unreachable, or out of file
    /// descriptors). Such a job is not charged to its endpoint: no attempt is recorded, its
    /// retry schedule and the endpoint's failure streak stay as they were, and it stays
    /// leased, so it is claimed again once the lease runs out (the lease is the back-off:
    /// this server's trouble is seldom over in the seconds of a first retry).
    ///
    /// The request leaves only until `start_by` ([`Dispatcher::start_by`]): reading the
    /// app's credentials for it may have taken long.
    async fn send(
        &self,
        job: &DeliveryJob,
        start_by: tokio::time::Instant,
    ) -> Result<AttemptRecord, Unsent> {
        let now = self.clock.now();
        let started = Instant::now();
        let result = match self.headers(job, now).await {
            // Shutdown came while the credentials were read: let go, as any job not started
            // by then.
            _ if self.stopping.is_cancelled() => return Err(Unsent::Stopping),
            Ok(_) if tokio::time::Instant::now() > start_by => {
                tracing::warn!(msg_id = %job.msg_id, endpoint_id = %job.endpoint.id,
                    "reading the request's credentials took so long that the attempt could outlast its lease; let go for a later claim");
                return Err(Unsent::TooLate);
            }
            Ok(headers) => {
                self.client
                    .post(&job.endpoint.url, headers, job.payload.clone())
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(SendError::NotSent(reason)) = result {
            self.metrics.not_sent();
            return Err(Unsent::Trouble(reason));
        }
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
                (outcome, i32::from(code), response_text(&resp.body))
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

        self.metrics.attempt(outcome_label(outcome));
        self.metrics.attempt_status(status_code);

        let manual = job.trigger == TriggerType::Manual;
        let decide = |failing_since: Option<chrono::DateTime<Utc>>| {
            let failing_for = failing_since
                .and_then(|since| (now - since).to_std().ok())
                .unwrap_or(Duration::ZERO);
            self.config
                .retry
                .decide(outcome, job.attempts, manual, failing_for, &mut rand::rng())
        };
        let mut failing_since = job.endpoint.failing_since;
        let mut decision = decide(failing_since);
        if decision == RetryDecision::DisableEndpoint && outcome != AttemptOutcome::Gone {
            // Decided on the endpoint as it was claimed: attempts in flight together may have
            // ended its streak since (it came back). Read again before disabling; the store
            // checks once more as it applies the disable (`EndpointChange::Disable`).
            if let Ok(Some(now_stored)) = self
                .store
                .get_endpoint(&job.app_id, job.endpoint.id.as_str())
                .await
                && now_stored.failing_since != failing_since
            {
                failing_since = now_stored.failing_since;
                decision = decide(failing_since);
            }
        }
        // A success ends a streak that another job's failure began while this one was in
        // flight, which this job's copy of the endpoint (read before) cannot show.
        let answered_at = now + chrono::Duration::milliseconds(duration_ms);
        let streak_running = failing_since.is_some()
            || (decision == RetryDecision::Delivered
                && self.streak_began_meanwhile(job, answered_at).await);
        let (next, endpoint_change) = match decision {
            RetryDecision::Delivered if streak_running => {
                (NextStep::Delivered, EndpointChange::StreakEnded)
            }
            RetryDecision::Delivered => (NextStep::Delivered, EndpointChange::Unchanged),
            // Counted from the attempt's end: a receiver that took its time to fail still gets
            // the whole delay before the next attempt.
            RetryDecision::RetryIn(delay) => (
                NextStep::RetryAt(now + started.elapsed() + delay),
                streak(streak_running, now),
            ),
            RetryDecision::GiveUp => (NextStep::Failed, streak(streak_running, now)),
            RetryDecision::DisableEndpoint => {
                tracing::warn!(endpoint_id = %job.endpoint.id, status_code, "disabling endpoint");
                // 410 Gone disables at once; a streak only if no success has ended it
                // since this job's copy of the endpoint was read.
                let streak_since = match outcome {
                    AttemptOutcome::Gone => None,
                    _ => failing_since,
                };
                // Should the store find that streak ended meanwhile, the delivery goes on with
                // its schedule, as if the endpoint had no streak: none is left when a streak
                // disables (only a message's last attempt does), so it is failed.
                let retry_at = streak_since.and_then(|_| match decide(None) {
                    RetryDecision::RetryIn(delay) => Some(now + started.elapsed() + delay),
                    _ => None,
                });
                (
                    NextStep::Failed,
                    EndpointChange::Disable {
                        streak_since,
                        retry_at,
                    },
                )
            }
        };
        let status = match next {
            NextStep::Delivered => DeliveryStatus::Success,
            NextStep::RetryAt(_) | NextStep::Failed => DeliveryStatus::Fail,
        };
        tracing::debug!(msg_id = %job.msg_id, endpoint_id = %job.endpoint.id, status_code,
            ?decision, "attempt finished");
        Ok(AttemptRecord {
            attempt: Attempt {
                id: herald_core::AttemptId::new(now),
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
            lease: job.lease,
        })
    }
}

/// How an attempt's outcome is counted.
fn outcome_label(outcome: AttemptOutcome) -> herald_metrics::AttemptOutcome {
    match outcome {
        AttemptOutcome::Success => herald_metrics::AttemptOutcome::Success,
        AttemptOutcome::Gone => herald_metrics::AttemptOutcome::Gone,
        AttemptOutcome::Overloaded { .. } => herald_metrics::AttemptOutcome::Overloaded,
        AttemptOutcome::Failed { .. } => herald_metrics::AttemptOutcome::Failed,
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

/// A receiver's response body as the attempt log keeps it: text, with what is not UTF-8 and
/// any NUL replaced by U+FFFD. PostgreSQL's text refuses NUL, and an attempt that cannot be
/// recorded is never counted: its delivery would be sent again at each lease's end, forever.
fn response_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text.into_owned()
    }
}

/// The attempt's recorded `response` when no HTTP answer came. A refused address is named by
/// its kind only: the attempt log is read by app tokens and app portal links, which must not
/// learn what internal names resolve to (the address goes to the debug log).
fn result_text(result: &Result<crate::client::Response, SendError>) -> String {
    match result {
        Ok(_) => String::new(),
        Err(SendError::Blocked(blocked)) => {
            tracing::debug!(address = %blocked.addr, kind = %blocked.kind, "refused a non-public webhook target");
            format!(
                "refused: the target's address is {}; outbound webhooks to it are refused (allow it with delivery.allow_private_targets or delivery.allowed_subnets)",
                blocked.kind
            )
        }
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
        (signing::headers::PUSHER_KEY, credentials.key.as_str()),
        (signing::headers::PUSHER_SIGNATURE, signature.as_str()),
    ] {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    headers
}

/// The Standard Webhooks headers plus the endpoint's own. The signature covers the payload
/// bytes exactly as stored, which are exactly the bytes sent.
/// Signed at `now` (the cluster's time), by every secret live then: rotated secrets expire
/// at times set in the cluster's time too.
fn signed_headers(job: &DeliveryJob, now: chrono::DateTime<Utc>) -> HeaderMap {
    let mut headers = custom_headers(job);
    let timestamp = now.timestamp();
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
        (signing::headers::WEBHOOK_ID, job.msg_id.to_string()),
        (signing::headers::WEBHOOK_TIMESTAMP, timestamp.to_string()),
        (signing::headers::WEBHOOK_SIGNATURE, signature),
    ] {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use herald_core::MessageId;
    use herald_core::model::Endpoint;

    use super::*;

    fn job(app: &str, endpoint: &str, n: u32) -> DeliveryJob {
        let now = Utc::now();
        DeliveryJob {
            msg_id: MessageId::parse(format!("msg_{n}")).expect("valid"),
            app_id: AppId::parse(app).expect("valid"),
            event_type: "x".into(),
            payload: bytes::Bytes::from_static(b"{}"),
            endpoint: Endpoint {
                id: EndpointId::parse(endpoint).expect("valid"),
                app_id: AppId::parse(app).expect("valid"),
                uid: None,
                url: "https://example.com/hook".into(),
                description: String::new(),
                throttle_rate: None,
                disabled: false,
                format: EndpointFormat::StandardWebhooks,
                event_types: None,
                channels: None,
                metadata: Default::default(),
                headers: Default::default(),
                secret: String::new(),
                previous_secrets: Vec::new(),
                failing_since: None,
                created_at: now,
                updated_at: now,
            },
            attempts: 0,
            trigger: TriggerType::Scheduled,
            lease: Default::default(),
        }
    }

    fn names(jobs: &[DeliveryJob]) -> Vec<(&str, &str)> {
        jobs.iter()
            .map(|j| (j.app_id.as_str(), j.endpoint.id.as_str()))
            .collect()
    }

    #[test]
    fn an_app_runs_at_most_its_share_and_leaves_the_rest_of_the_lane_to_others() {
        let lane = Lane::new(true, 8, 2, 2);
        // Five endpoints could run ten attempts; the app may run two.
        let a: Vec<_> = (0..10)
            .map(|n| job("app_A", &format!("ep_a{}", n % 5), n))
            .collect();
        assert_eq!(lane.admit(a).len(), 2);
        let started = lane.admit(vec![job("app_B", "ep_b0", 10)]);
        assert_eq!(
            names(&started),
            [("app_B", "ep_b0")],
            "B starts while A waits"
        );
        let budget = lane.claim_budget();
        assert_eq!(
            budget.apps.get("app_A"),
            Some(&10),
            "A's claims count as held"
        );
        assert_eq!(budget.room, 16 - 11);
    }

    /// A claim holds an endpoint and an app to two rounds each, whatever the lane is saving;
    /// records being saved are told to the claim by their own endpoint (their leases are still
    /// in the store, but their attempts are over), and forgotten once saved.
    #[test]
    fn records_being_saved_are_counted_by_their_own_endpoint() {
        let lane = Lane::new(true, 256, 64, 32);
        let (a, b) = (
            EndpointId::parse("ep_a").expect("id"),
            EndpointId::parse("ep_b").expect("id"),
        );
        let guards: Vec<Saving> = (0..100).map(|_| lane.saving(&a)).collect();
        let other = lane.saving(&b);
        assert_eq!(
            lane.claim_limits(),
            (64, 128),
            "101 records being saved raise no endpoint's limit"
        );
        let budget = lane.claim_budget();
        assert_eq!(budget.saving_endpoints.get(&a), Some(&100));
        assert_eq!(budget.saving_endpoints.get(&b), Some(&1));
        drop(guards);
        drop(other);
        assert!(lane.claim_budget().saving_endpoints.is_empty());
    }

    #[test]
    fn admission_takes_turns_between_apps() {
        let lane = Lane::new(true, 4, 4, 4);
        let jobs = vec![
            job("app_A", "ep_a0", 0),
            job("app_A", "ep_a1", 1),
            job("app_A", "ep_a2", 2),
            job("app_A", "ep_a3", 3),
            job("app_B", "ep_b0", 4),
            job("app_B", "ep_b0", 5),
        ];
        let started = lane.admit(jobs);
        assert_eq!(
            names(&started),
            [
                ("app_A", "ep_a0"),
                ("app_B", "ep_b0"),
                ("app_A", "ep_a1"),
                ("app_B", "ep_b0")
            ]
        );
    }

    #[test]
    fn a_freed_slot_goes_to_the_app_running_fewest() {
        let lane = Lane::new(true, 2, 2, 2);
        let started = lane.admit(vec![job("app_A", "ep_a0", 0), job("app_A", "ep_a0", 1)]);
        assert_eq!(started.len(), 2);
        // The lane is full: A's next job and B's wait.
        assert!(
            lane.admit(vec![job("app_A", "ep_a0", 2), job("app_B", "ep_b0", 3)])
                .is_empty()
        );
        let next = lane.next_after("app_A", "ep_a0").expect("a waiting job");
        assert_eq!(
            (next.app_id.as_str(), next.msg_id.as_str()),
            ("app_B", "msg_3"),
            "B runs nothing, A one: the slot is B's although A's job came first"
        );
        let next = lane.next_after("app_A", "ep_a0").expect("a waiting job");
        assert_eq!(next.msg_id, "msg_2");
        assert!(lane.next_after("app_A", "ep_a0").is_none());
        assert!(lane.next_after("app_B", "ep_b0").is_none());
        assert!(lane.next_after("app_A", "ep_a0").is_none());
        let budget = lane.claim_budget();
        assert_eq!(budget.room, 4, "every slot is free again");
        assert!(budget.apps.is_empty() && budget.endpoints.is_empty());
    }

    /// The defaults, with receivers on this machine allowed.
    fn to_local_receivers() -> DeliveryConfig {
        DeliveryConfig {
            addresses: herald_core::AddressPolicy {
                allow_private: true,
                ..Default::default()
            },
            ..DeliveryConfig::default()
        }
    }

    /// A dispatcher on `store` with `config`, and its metrics.
    fn dispatcher_on(
        store: Arc<dyn Store>,
        config: DeliveryConfig,
    ) -> (Dispatcher, Arc<DeliveryMetrics>) {
        let client = WebhookClient::new(&config).expect("client");
        let metrics = Arc::new(DeliveryMetrics::default());
        let dispatcher = Dispatcher::new(store, client, config, Arc::clone(&metrics));
        (dispatcher, metrics)
    }

    /// Asserts that nothing connected to `listener` (`what`: what that shows).
    async fn assert_unvisited(listener: &tokio::net::TcpListener, what: &str) {
        assert!(
            tokio::time::timeout(Duration::ZERO, listener.accept())
                .await
                .is_err(),
            "{what}"
        );
    }

    async fn sqlite_store(dir: &tempfile::TempDir) -> Arc<dyn Store> {
        Arc::new(
            herald_store::sqlite::SqliteStore::open(dir.path())
                .await
                .expect("store"),
        )
    }

    /// Answers one request with `200 OK` once its body has arrived.
    async fn answer_one_with_200(listener: tokio::net::TcpListener) {
        answer_one(listener, "200 OK").await;
    }

    /// Answers one request with `status` (as `200 OK`) once its body has arrived.
    async fn answer_one(listener: tokio::net::TcpListener, status: &str) {
        let (socket, _) = listener.accept().await.expect("a request");
        answer(socket, status).await;
    }

    /// Reads one request from `socket` and answers it with `status`; returns the request's
    /// head and body, lowercased.
    async fn answer(mut socket: tokio::net::TcpStream, status: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = socket.read(&mut buf).await.expect("read");
            assert!(n > 0, "the request ended early");
            seen.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&seen).to_ascii_lowercase();
            if let Some(head_end) = text.find("\r\n\r\n") {
                let length = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if seen.len() >= head_end + 4 + length {
                    break;
                }
            }
        }
        let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        socket.write_all(answer.as_bytes()).await.expect("write");
        String::from_utf8_lossy(&seen).to_ascii_lowercase()
    }

    /// Stores `n` messages to `endpoint` of `app`, each with a delivery due now.
    async fn queue_messages(store: &dyn Store, app: &AppId, endpoint: &EndpointId, n: usize) {
        for n in 0..n {
            let now = Utc::now();
            let message = herald_core::model::Message {
                id: MessageId::new(now),
                app_id: app.clone(),
                event_id: Some(format!("queued-{n}")),
                event_type: "t".into(),
                channels: None,
                tags: None,
                payload: bytes::Bytes::from_static(b"{}"),
                created_at: now,
                payload_expires_at: None,
            };
            store
                .create_message(message, vec![endpoint.clone()])
                .await
                .expect("message");
        }
    }

    /// A failure that would disable its endpoint for a streak (a message's last attempt, the
    /// endpoint failing for 5 days as the job was claimed) looks at the endpoint again first:
    /// a success in flight alongside ended the streak, so this failure only fails its message
    /// and starts a new streak.
    #[tokio::test]
    async fn a_failure_does_not_disable_an_endpoint_whose_streak_has_ended_since_its_claim() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let server = tokio::spawn(answer_one(listener, "500 Internal Server Error"));
        let dir = tempfile::tempdir().expect("dir");
        let store = sqlite_store(&dir).await;
        let app = herald_store::conformance::stored_app(store.as_ref(), "back").await;
        let mut endpoint = herald_store::conformance::endpoint(&app.id);
        endpoint.url = url;
        store.create_endpoint(&endpoint).await.expect("endpoint");
        let (dispatcher, _) = dispatcher_on(Arc::clone(&store), to_local_receivers());
        let mut job = job(app.id.as_str(), endpoint.id.as_str(), 1);
        job.endpoint = endpoint;
        job.endpoint.failing_since = Some(Utc::now() - chrono::Duration::days(6));
        job.attempts = u32::try_from(herald_core::retry::RetryPolicy::default().schedule.len())
            .expect("short");

        let record = dispatcher
            .send(&job, tokio::time::Instant::now() + Duration::from_secs(60))
            .await
            .expect("sent");
        server.await.expect("the receiver answered");
        assert!(matches!(record.next, NextStep::Failed), "{:?}", record.next);
        assert!(
            matches!(record.endpoint_change, EndpointChange::StreakStarted { .. }),
            "{:?}",
            record.endpoint_change
        );
        store.close().await;
    }

    /// An endpoint whose streak began 6 days ago and which got no message since (its receiver
    /// fixed meanwhile) is not disabled by one failure with retries left: the failure is
    /// retried on its schedule, as Svix retries it.
    #[tokio::test]
    async fn a_failure_with_retries_left_never_disables_however_old_the_streak() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let server = tokio::spawn(answer_one(listener, "502 Bad Gateway"));
        let dir = tempfile::tempdir().expect("dir");
        let store = sqlite_store(&dir).await;
        let app = herald_store::conformance::stored_app(store.as_ref(), "quiet").await;
        let mut endpoint = herald_store::conformance::endpoint(&app.id);
        endpoint.url = url;
        endpoint.failing_since = Some(Utc::now() - chrono::Duration::days(6));
        store.create_endpoint(&endpoint).await.expect("endpoint");
        let (dispatcher, _) = dispatcher_on(Arc::clone(&store), to_local_receivers());
        let mut job = job(app.id.as_str(), endpoint.id.as_str(), 1);
        job.endpoint = store
            .get_endpoint(&app.id, endpoint.id.as_str())
            .await
            .expect("read")
            .expect("endpoint");
        assert!(
            job.endpoint.failing_since.is_some(),
            "the old streak is stored"
        );

        let record = dispatcher
            .send(&job, tokio::time::Instant::now() + Duration::from_secs(60))
            .await
            .expect("sent");
        server.await.expect("the receiver answered");
        assert!(
            matches!(record.next, NextStep::RetryAt(_)),
            "{:?}",
            record.next
        );
        assert!(
            matches!(record.endpoint_change, EndpointChange::Unchanged),
            "{:?}",
            record.endpoint_change
        );
        store.close().await;
    }

    /// A job waiting in its lane takes its endpoint as it is now, just before the send: a new
    /// URL is where it goes, and an endpoint disabled or deleted since the claim gets nothing.
    #[tokio::test]
    async fn a_job_is_sent_to_its_endpoint_as_it_is_now() {
        let dir = tempfile::tempdir().expect("dir");
        let store = sqlite_store(&dir).await;
        let app = herald_store::conformance::stored_app(store.as_ref(), "moving").await;
        let mut endpoint = herald_store::conformance::endpoint(&app.id);
        endpoint.url = "https://old.example/hook".into();
        store.create_endpoint(&endpoint).await.expect("endpoint");
        let (dispatcher, _) = dispatcher_on(Arc::clone(&store), to_local_receivers());
        let mut job = job(app.id.as_str(), endpoint.id.as_str(), 1);
        job.endpoint = endpoint.clone();

        assert!(dispatcher.current(&mut job).await);
        assert_eq!(job.endpoint.url, "https://old.example/hook");

        let change = |endpoint: &mut herald_core::model::Endpoint| {
            let read_at = endpoint.updated_at;
            endpoint.updated_at = read_at + chrono::Duration::milliseconds(1);
            read_at
        };
        endpoint.url = "https://new.example/hook".into();
        let read_at = change(&mut endpoint);
        store
            .update_endpoint(&endpoint, read_at)
            .await
            .expect("moved");
        assert!(dispatcher.current(&mut job).await);
        assert_eq!(
            job.endpoint.url, "https://new.example/hook",
            "sent where it is now"
        );

        endpoint.disabled = true;
        let read_at = change(&mut endpoint);
        store
            .update_endpoint(&endpoint, read_at)
            .await
            .expect("disabled");
        assert!(
            !dispatcher.current(&mut job).await,
            "disabled since the claim"
        );

        endpoint.disabled = false;
        let read_at = change(&mut endpoint);
        store
            .update_endpoint(&endpoint, read_at)
            .await
            .expect("enabled");
        assert!(dispatcher.current(&mut job).await);
        store
            .delete_endpoint(&app.id, &endpoint.id)
            .await
            .expect("deleted");
        assert!(
            !dispatcher.current(&mut job).await,
            "deleted since the claim"
        );
        store.close().await;
    }

    /// Two jobs of one endpoint in flight together: one fails and begins a failing streak,
    /// then the other succeeds. Its copy of the endpoint, read before, shows no streak, yet
    /// its success ends the one begun meanwhile.
    #[tokio::test]
    async fn a_success_ends_a_streak_begun_while_it_was_in_flight() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let dir = tempfile::tempdir().expect("dir");
        let store = sqlite_store(&dir).await;
        let app = herald_store::conformance::stored_app(store.as_ref(), "flaky").await;
        let mut endpoint = herald_store::conformance::endpoint(&app.id);
        endpoint.url = url;
        store.create_endpoint(&endpoint).await.expect("endpoint");
        queue_messages(store.as_ref(), &app.id, &endpoint.id, 2).await;
        let now = Utc::now() + chrono::Duration::seconds(1);
        let mut jobs = store
            .claim_due(&herald_store::conformance::claim(
                now,
                10,
                HashMap::new(),
                10,
                HashMap::new(),
                10,
            ))
            .await
            .expect("claim");
        assert_eq!(jobs.len(), 2);
        let (failed, succeeding) = (jobs.remove(0), jobs.remove(0));
        assert_eq!(succeeding.endpoint.failing_since, None);
        let mut record = herald_store::conformance::job_record(
            &failed,
            failed.lease,
            now,
            NextStep::RetryAt(now + chrono::Duration::seconds(5)),
        );
        record.endpoint_change = EndpointChange::StreakStarted { at: Utc::now() };
        assert_eq!(
            store.record_attempt(record).await.expect("the failure"),
            herald_store::Recorded::Applied
        );

        let server = tokio::spawn(answer_one_with_200(listener));
        let (dispatcher, _) = dispatcher_on(Arc::clone(&store), to_local_receivers());
        let record = dispatcher
            .send(
                &succeeding,
                tokio::time::Instant::now() + Duration::from_secs(60),
            )
            .await
            .expect("sent");
        server.await.expect("the receiver answered");
        assert_eq!(record.next, NextStep::Delivered);
        assert_eq!(record.endpoint_change, EndpointChange::StreakEnded);
        store.close().await;
    }

    #[tokio::test]
    async fn a_delivered_attempt_counts_one_success() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let server = tokio::spawn(answer_one_with_200(listener));

        let dir = tempfile::tempdir().expect("dir");
        let store = sqlite_store(&dir).await;
        let (dispatcher, metrics) = dispatcher_on(Arc::clone(&store), to_local_receivers());
        let mut job = job("app_A", "ep_1", 1);
        job.endpoint.url = url;

        let record = dispatcher
            .send(&job, tokio::time::Instant::now() + Duration::from_secs(60))
            .await
            .expect("sent");
        server.await.expect("the receiver answered");
        assert_eq!(record.attempt.status, DeliveryStatus::Success);
        assert_eq!(metrics.attempts(herald_metrics::AttemptOutcome::Success), 1);
        for other in [
            herald_metrics::AttemptOutcome::Gone,
            herald_metrics::AttemptOutcome::Overloaded,
            herald_metrics::AttemptOutcome::Failed,
        ] {
            assert_eq!(metrics.attempts(other), 0, "{other:?}");
        }
        let by_status = |status_class| {
            metrics
                .attempt_statuses_total
                .get_or_create(&herald_metrics::StatusClassLabels { status_class })
                .get()
        };
        assert_eq!(by_status(herald_metrics::StatusClass::Success), 1);
        assert_eq!(by_status(herald_metrics::StatusClass::NoResponse), 0);
        store.close().await;
    }

    /// A delivery this server cannot send for a passing reason of its own (here its store,
    /// closed, cannot give the app's Pusher credentials) is not charged to its endpoint: no
    /// attempt is recorded or counted, and the job stays leased for a later claim. One that
    /// can never be sent (its app is gone) is a failed attempt, so its schedule ends.
    #[tokio::test]
    async fn a_delivery_this_server_cannot_send_is_not_charged_to_its_endpoint() {
        let dir = tempfile::tempdir().expect("dir");
        let store = sqlite_store(&dir).await;
        let (dispatcher, metrics) = dispatcher_on(Arc::clone(&store), DeliveryConfig::default());
        let mut job = job("app_A", "ep_1", 1);
        job.endpoint.format = EndpointFormat::Pusher;

        let lasting = dispatcher
            .send(&job, tokio::time::Instant::now() + Duration::from_secs(60))
            .await
            .expect("a failed attempt");
        assert_eq!(lasting.attempt.status, DeliveryStatus::Fail);
        assert!(
            lasting
                .attempt
                .response
                .contains("the app no longer exists"),
            "{}",
            lasting.attempt.response
        );
        assert_eq!(metrics.attempts(herald_metrics::AttemptOutcome::Failed), 1);

        store.close().await;
        let Err(Unsent::Trouble(reason)) = dispatcher
            .send(&job, tokio::time::Instant::now() + Duration::from_secs(60))
            .await
        else {
            panic!("nothing to record, for a reason of this server's");
        };
        assert!(
            reason.contains("could not read the app's Pusher credentials"),
            "{reason}"
        );
        assert_eq!(metrics.not_sent_total.get(), 1);
        assert_eq!(
            metrics.attempts(herald_metrics::AttemptOutcome::Failed),
            1,
            "no attempt counted for it"
        );
    }

    /// An attempt whose start, once its credentials are read, is past the latest its lease
    /// allows is not made, and is let go for a later claim at once (`Unsent::TooLate`), as a
    /// job whose turn comes too late: before, it stayed leased until the lease ran out, up to
    /// a minute, as for this server's trouble. Nothing is sent, recorded or counted.
    #[tokio::test]
    async fn an_attempt_that_can_no_longer_start_in_time_is_let_go_unsent() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let dir = tempfile::tempdir().expect("dir");
        let (dispatcher, metrics) = dispatcher_on(sqlite_store(&dir).await, to_local_receivers());
        let mut job = job("app_A", "ep_1", 1);
        job.endpoint.url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let past = tokio::time::Instant::now() - Duration::from_millis(1);
        let Err(Unsent::TooLate) = dispatcher.send(&job, past).await else {
            panic!("not sent: too late for its lease");
        };
        assert_eq!(metrics.not_sent_total.get(), 0, "not this server's trouble");
        for outcome in herald_metrics::AttemptOutcome::ALL {
            assert_eq!(metrics.attempts(outcome), 0, "{outcome:?}");
        }
        assert_unvisited(&listener, "nothing connected").await;
    }

    /// Once shutdown is requested no attempt starts (one cut off by the grace period's end
    /// would be sent again after the restart): a job not started is left for its lease to be
    /// let go.
    #[tokio::test]
    async fn no_attempt_starts_once_shutdown_is_requested() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let dir = tempfile::tempdir().expect("dir");
        let (dispatcher, metrics) = dispatcher_on(sqlite_store(&dir).await, to_local_receivers());
        dispatcher.stopping.cancel();
        let lane = Lane::new(true, 4, 4, 4);
        let mut job = job("app_A", "ep_1", 1);
        job.endpoint.url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let started = lane.admit(vec![job]).pop().expect("room");
        let tasks = TaskTracker::new();
        let dispatcher = Arc::new(dispatcher);
        Arc::clone(&dispatcher)
            .attempts(started, lane, tasks.clone(), CancellationToken::new())
            .await;
        tasks.close();
        tasks.wait().await;
        let left = dispatcher.left.lock().expect("left").clone();
        assert_eq!(names(&left), [("app_A", "ep_1")], "left to be let go");
        for outcome in herald_metrics::AttemptOutcome::ALL {
            assert_eq!(metrics.attempts(outcome), 0, "{outcome:?}");
        }
        assert_unvisited(&listener, "nothing connected").await;
    }

    /// At shutdown, the deliveries a dispatcher claimed but did not start are let go: a claim
    /// right after (another node's, or the next start's) finds them, rather than waiting for
    /// their leases to run out. The attempt cut off by the grace period stays leased: it may
    /// have reached its endpoint.
    #[tokio::test]
    async fn deliveries_claimed_but_not_started_at_shutdown_are_claimable_at_once() {
        let dir = tempfile::tempdir().expect("dir");
        let store = sqlite_store(&dir).await;
        let app = herald_store::conformance::stored_app(store.as_ref(), "stopping").await;
        let mut endpoint = herald_store::conformance::endpoint(&app.id);
        // Accepts and never answers: the first attempt is in flight until the grace ends.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        endpoint.url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        store.create_endpoint(&endpoint).await.expect("endpoint");
        queue_messages(store.as_ref(), &app.id, &endpoint.id, 3).await;
        let config = DeliveryConfig {
            per_endpoint_in_flight: 1,
            shutdown_grace: Duration::from_millis(200),
            ..to_local_receivers()
        };
        let (dispatcher, _) = dispatcher_on(Arc::clone(&store), config);
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(dispatcher.run(shutdown.clone()));
        let (_in_flight, _) = listener.accept().await.expect("the first attempt");
        shutdown.cancel();
        running.await.expect("the dispatcher stops");

        let now = Utc::now() + chrono::Duration::seconds(1);
        let claimed = store
            .claim_due(&ClaimRequest {
                now,
                lease_until: now + chrono::Duration::seconds(60),
                limit: 10,
                first_attempts: true,
                in_flight: HashMap::new(),
                per_endpoint_limit: 10,
                app_in_flight: HashMap::new(),
                per_app_limit: 10,
                saving: HashMap::new(),
            })
            .await
            .expect("claim");
        assert_eq!(
            claimed.len(),
            2,
            "the one that waited for the endpoint's slot (let go) and the one never claimed, not the one cut off"
        );
        store.close().await;
    }

    #[test]
    fn a_new_delivery_gets_room_within_the_limits_a_claim_keeps() {
        // An endpoint holds twice what it may run: two rooms for ep_a0.
        let lane = Lane::new(true, 4, 4, 1);
        let (app, ep) = (
            AppId::parse("app_A").expect("valid"),
            EndpointId::parse("ep_a0").expect("valid"),
        );
        assert!(lane.reserve(&app, &ep));
        assert!(lane.reserve(&app, &ep));
        assert!(!lane.reserve(&app, &ep), "ep_a0 holds its two");
        let budget = lane.claim_budget();
        assert_eq!(
            budget.endpoints.get("ep_a0"),
            Some(&2),
            "rooms count as held"
        );
        assert_eq!(budget.room, 6);

        let started = lane.admit_reserved(vec![job("app_A", "ep_a0", 0), job("app_A", "ep_a0", 1)]);
        assert_eq!(names(&started), [("app_A", "ep_a0")], "one runs, one waits");
        assert_eq!(lane.claim_budget().endpoints.get("ep_a0"), Some(&2));

        // The refused delivery went to the queue: ep_a0's next ones may not overtake it, even
        // with room again, until a claim has found everything claimable.
        let next = lane.next_after("app_A", "ep_a0").expect("the waiting one");
        assert_eq!(next.msg_id, "msg_1");
        assert!(!lane.reserve(&app, &ep), "behind the queued one");
        lane.claimed(4, 4);
        assert!(!lane.reserve(&app, &ep), "a full claim may have left some");
        lane.claimed(4, 1);
        assert!(lane.reserve(&app, &ep), "the backlog is drained");
    }

    #[test]
    fn a_room_given_back_is_free_again() {
        let lane = Lane::new(true, 1, 1, 1);
        let (app, ep) = (
            AppId::parse("app_A").expect("valid"),
            EndpointId::parse("ep_a0").expect("valid"),
        );
        assert!(lane.reserve(&app, &ep));
        assert!(lane.reserve(&app, &ep));
        lane.give_back(&[(app.clone(), ep.clone()), (app.clone(), ep.clone())]);
        let budget = lane.claim_budget();
        assert_eq!(budget.room, 2);
        assert!(
            budget.endpoints.is_empty() && budget.apps.is_empty(),
            "nothing held"
        );
        assert!(lane.reserve(&app, &ep));
    }

    #[test]
    fn a_job_held_back_by_its_app_starts_when_the_app_has_room() {
        let lane = Lane::new(true, 8, 1, 4);
        let started = lane.admit(vec![job("app_A", "ep_a0", 0), job("app_A", "ep_a1", 1)]);
        assert_eq!(names(&started), [("app_A", "ep_a0")]);
        let next = lane.next_after("app_A", "ep_a0").expect("A's other job");
        assert_eq!(names(&[next]), [("app_A", "ep_a1")]);
    }

    /// A job waiting for its endpoint's turn gives up its slot, so its app's other endpoints
    /// run meanwhile, but it still counts for claims; when its turn comes it goes first, with
    /// the turn it reserved.
    #[test]
    fn a_parked_job_frees_its_slot_and_still_counts_for_claims() {
        let lane = Lane::new(true, 8, 1, 4);
        let started = lane.admit(vec![
            job("app_A", "ep_paced", 0),
            job("app_A", "ep_free", 1),
        ]);
        assert_eq!(
            names(&started),
            [("app_A", "ep_paced")],
            "the app's share is one"
        );
        let parked = started.into_iter().next().expect("one");
        lane.park(&parked, tokio::time::Instant::now(), None);
        let next = lane
            .next_after("app_A", "ep_paced")
            .expect("the slot goes to the app's other endpoint");
        assert_eq!(names(&[next]), [("app_A", "ep_free")]);
        let budget = lane.claim_budget();
        assert_eq!(budget.room, 16 - 2, "the parked job is held");
        assert_eq!(budget.endpoints.get(&parked.endpoint.id), Some(&1));
        assert_eq!(budget.apps.get(&parked.app_id), Some(&2));

        assert!(lane.unpark(parked).is_none(), "the app's slot is taken");
        let after = lane
            .next_after("app_A", "ep_free")
            .expect("the job whose turn came");
        assert_eq!(names(std::slice::from_ref(&after)), [("app_A", "ep_paced")]);
        assert!(lane.noted(&after).turn.is_some(), "its turn is reserved");
        assert!(lane.noted(&after).turn.is_none(), "once");
        assert!(lane.next_after("app_A", "ep_paced").is_none());
        let budget = lane.claim_budget();
        assert_eq!(budget.room, 16, "nothing held");
        assert!(budget.endpoints.is_empty() && budget.apps.is_empty());
    }

    /// A job whose turn came starts before jobs without one, even of an app running fewer.
    #[test]
    fn a_job_whose_turn_came_starts_before_jobs_without_one() {
        let lane = Lane::new(true, 2, 2, 4);
        let started = lane.admit(vec![job("app_A", "ep_x", 0), job("app_A", "ep_y", 1)]);
        assert_eq!(started.len(), 2);
        let parked = started
            .into_iter()
            .find(|j| j.endpoint.id.as_str() == "ep_x")
            .expect("ep_x started");
        lane.park(&parked, tokio::time::Instant::now(), None);
        assert!(lane.next_after("app_A", "ep_x").is_none());
        assert_eq!(
            names(&lane.admit(vec![job("app_B", "ep_b", 2)])),
            [("app_B", "ep_b")]
        );
        assert!(
            lane.admit(vec![job("app_C", "ep_c", 3)]).is_empty(),
            "the lane is full"
        );
        assert!(lane.unpark(parked).is_none(), "the lane is full");
        let next = lane.next_after("app_B", "ep_b").expect("a freed slot");
        assert_eq!(
            names(std::slice::from_ref(&next)),
            [("app_A", "ep_x")],
            "its turn came: ahead of app C's job, though app A runs one more"
        );
    }

    /// An endpoint paced lately is held to what its rate sends in a few seconds, by claims
    /// (told it holds the rest of its limit) and by new deliveries handed over at commit;
    /// other endpoints keep two rounds.
    #[tokio::test(start_paused = true)]
    async fn a_paced_endpoint_is_held_to_a_few_seconds_of_its_rate() {
        let pacer = Arc::new(Pacer::default());
        let lane = Lane::pacing(true, 256, 64, 32, Arc::clone(&pacer));
        let (app, paced, free) = (
            AppId::parse("app_A").expect("valid"),
            EndpointId::parse("ep_paced").expect("valid"),
            EndpointId::parse("ep_free").expect("valid"),
        );
        let now = tokio::time::Instant::now();
        pacer.reserve(&paced, 1, now, now + Duration::from_secs(60));
        let budget = lane.claim_budget();
        assert_eq!(
            budget.endpoints.get(&paced),
            Some(&(64 - 2)),
            "1 a second: 2 of its 64 left to claim"
        );
        assert_eq!(budget.endpoints.get(&free), None);
        for n in 0..2 {
            assert!(lane.reserve(&app, &paced), "room {n} of 2");
        }
        assert!(!lane.reserve(&app, &paced), "the third waits in the queue");
        assert!(
            lane.reserve(&app, &free),
            "another endpoint is not held back"
        );
        assert_eq!(
            lane.claim_budget().endpoints.get(&paced),
            Some(&64),
            "two held: nothing more to claim"
        );
    }

    /// A paced job whose turn comes after the latest start its lease allows is not sent but
    /// let go for a later claim, and frees its slot.
    #[tokio::test]
    async fn a_job_with_no_turn_within_its_lease_is_let_go_for_a_later_claim() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let dir = tempfile::tempdir().expect("dir");
        let config = to_local_receivers();
        let timeout = config.request_timeout;
        let (dispatcher, metrics) = dispatcher_on(sqlite_store(&dir).await, config);
        let dispatcher = Arc::new(dispatcher);
        let mut paced = job("app_A", "ep_1", 1);
        paced.endpoint.throttle_rate = Some(1);
        paced.endpoint.url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        // Two turns taken at 1 a second: this job's would be 2 s off, and its lease lets it
        // start only within 1 s.
        let now = tokio::time::Instant::now();
        for _ in 0..2 {
            dispatcher
                .pacer
                .reserve(&paced.endpoint.id, 1, now, now + Duration::from_secs(60));
        }
        let lane = Lane::new(true, 4, 4, 4);
        lane.leased(
            std::slice::from_ref(&paced),
            now + timeout + LEASE_MARGIN + Duration::from_secs(1),
        );
        let started = lane.admit(vec![paced]).pop().expect("room");
        let tasks = TaskTracker::new();
        Arc::clone(&dispatcher)
            .attempts(
                started,
                Arc::clone(&lane),
                tasks.clone(),
                CancellationToken::new(),
            )
            .await;
        let left = dispatcher.left.lock().expect("left").clone();
        assert_eq!(names(&left), [("app_A", "ep_1")], "let go");
        assert_eq!(metrics.paced_past_lease_total.get(), 1);
        assert!(
            lane.claim_budget().endpoints.is_empty(),
            "the lane holds nothing of it"
        );
        assert_unvisited(&listener, "nothing sent").await;
    }

    /// A paced delivery claimed before its endpoint's pace was known, whose turn comes after
    /// the latest start its lease allows, is let go at once, claimed again once its turn is
    /// near, and sent once, at its turn: here the third of three at 1 a second, with 1 s
    /// request timeouts (a lease of about 7 s that lets an attempt start until 1.1 s after
    /// the claim). When such a delivery stayed leased, it went after its lease, 7 s in.
    #[tokio::test]
    async fn a_delivery_let_go_for_its_lease_is_claimed_again_and_sent_once_at_its_turn() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let dir = tempfile::tempdir().expect("dir");
        let store = sqlite_store(&dir).await;
        let app = herald_store::conformance::stored_app(store.as_ref(), "paced").await;
        let mut endpoint = herald_store::conformance::endpoint(&app.id);
        endpoint.throttle_rate = Some(1);
        endpoint.url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        store.create_endpoint(&endpoint).await.expect("endpoint");
        // Queued before the dispatcher runs: its first claim takes all three.
        queue_messages(store.as_ref(), &app.id, &endpoint.id, 3).await;
        let config = DeliveryConfig {
            request_timeout: Duration::from_secs(1),
            shutdown_grace: Duration::from_millis(100),
            ..to_local_receivers()
        };
        let (dispatcher, metrics) = dispatcher_on(Arc::clone(&store), config);
        let shutdown = CancellationToken::new();
        let started = std::time::Instant::now();
        let running = tokio::spawn(dispatcher.run(shutdown.clone()));

        let mut ids = HashSet::new();
        let mut arrivals = Vec::new();
        for _ in 0..3 {
            let (socket, _) = tokio::time::timeout(Duration::from_secs(20), listener.accept())
                .await
                .expect("a delivery within 20 s")
                .expect("accept");
            let request = answer(socket, "200 OK").await;
            let id = request
                .lines()
                .find_map(|line| line.strip_prefix("webhook-id:"))
                .map(|id| id.trim().to_owned())
                .expect("a webhook-id");
            assert!(ids.insert(id), "each message once");
            arrivals.push(started.elapsed());
        }
        assert!(
            metrics.paced_past_lease_total.get() >= 1,
            "the third had no turn within its first lease"
        );
        // Turns at 0, 1 and 2 s after the first attempt, which came after `started`.
        assert!(
            arrivals[2] + Duration::from_millis(10) >= Duration::from_secs(2),
            "{arrivals:?}"
        );
        assert!(arrivals[2] < Duration::from_secs(6), "{arrivals:?}");
        shutdown.cancel();
        running.await.expect("the dispatcher stops");
        assert_unvisited(&listener, "nothing more").await;
        store.close().await;
    }

    /// A paced delivery goes at its turn if that comes a request timeout and a margin before
    /// its lease ends, and is left unsent otherwise; so is an unpaced one that waited that long.
    #[tokio::test]
    async fn a_delivery_starts_only_while_its_attempt_can_end_within_its_lease() {
        let dir = tempfile::tempdir().expect("dir");
        let store = sqlite_store(&dir).await;
        let config = DeliveryConfig::default();
        let timeout = config.request_timeout;
        let (dispatcher, metrics) = dispatcher_on(store, config);
        // Paused once the store is open (its pool's timeouts would fire on a paused clock):
        // every reading of the clock below is the same instant.
        tokio::time::pause();
        let mut paced = job("app_A", "ep_paced", 1);
        paced.endpoint.throttle_rate = Some(1);
        let now = tokio::time::Instant::now();
        let end = now + timeout + LEASE_MARGIN + Duration::from_millis(2500);
        // A burst of one, then one a second: turns at 0, 1 s, 2 s; the last start is 2.5 s.
        assert!(matches!(
            dispatcher
                .pace(&paced, dispatcher.start_by(Some(end), now), None)
                .await,
            Paced::Now
        ));
        assert!(
            matches!(dispatcher.pace(&paced, dispatcher.start_by(Some(end), now), None).await, Paced::At(at) if at == now + Duration::from_secs(1))
        );
        assert!(
            matches!(dispatcher.pace(&paced, dispatcher.start_by(Some(end), now), None).await, Paced::At(at) if at == now + Duration::from_secs(2))
        );
        assert!(matches!(
            dispatcher
                .pace(&paced, dispatcher.start_by(Some(end), now), None)
                .await,
            Paced::TooLate
        ));
        assert_eq!(metrics.paced_past_lease_total.get(), 1);
        assert_eq!(dispatcher.pacer.claim_cap(&paced.endpoint.id, 64, now), 2);

        let unpaced = job("app_A", "ep_free", 2);
        assert!(matches!(
            dispatcher
                .pace(&unpaced, dispatcher.start_by(Some(end), now), None)
                .await,
            Paced::Now
        ));
        let spent = now + timeout + LEASE_MARGIN - Duration::from_millis(1);
        assert!(matches!(
            dispatcher
                .pace(&unpaced, dispatcher.start_by(Some(spent), now), None)
                .await,
            Paced::TooLate
        ));

        // A parked job whose turn came goes now; one that then waited for a slot past the turn
        // after it takes a new turn.
        let mut other = job("app_A", "ep_other", 3);
        other.endpoint.throttle_rate = Some(1);
        assert!(matches!(
            dispatcher
                .pace(&other, dispatcher.start_by(Some(end), now), Some(now))
                .await,
            Paced::Now
        ));
        assert!(matches!(
            dispatcher
                .pace(&other, dispatcher.start_by(Some(end), now), None)
                .await,
            Paced::Now
        ));
        let late = now
            .checked_sub(Duration::from_secs(2))
            .expect("a past instant");
        assert!(
            matches!(dispatcher.pace(&other, dispatcher.start_by(Some(end), now), Some(late)).await, Paced::At(at) if at == now + Duration::from_secs(1))
        );

        // A job claimed before the pace was set neither waits nor restarts the burst.
        paced.endpoint.throttle_rate = None;
        assert!(matches!(
            dispatcher
                .pace(&paced, dispatcher.start_by(Some(end), now), None)
                .await,
            Paced::Now
        ));
        assert_eq!(dispatcher.pacer.claim_cap(&paced.endpoint.id, 64, now), 2);
    }
}
