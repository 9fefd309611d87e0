//! New deliveries handed to the dispatcher as they commit, and the claim gate.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use chrono::{DateTime, Utc};
use herald_core::{
    AppId, EndpointId,
    model::{App, Endpoint, TriggerType},
};

use super::{SqliteStore, gate::Plan};
use crate::{
    AppStore, AttemptRecord, ClaimRequest, DeliveryJob, EndpointStore, FreshDeliveries,
    MessageStore, NextStep, Recorded, StoreError, StoreLifecycle, conformance,
};

/// Grants `rooms` reservations, then refuses; records what it is handed and given back.
#[derive(Default)]
struct Sink {
    rooms: AtomicU32,
    handed: Mutex<Vec<DeliveryJob>>,
    given_back: Mutex<Vec<(AppId, EndpointId)>>,
}

impl FreshDeliveries for Sink {
    fn reserve(&self, _app: &AppId, _endpoint: &EndpointId) -> bool {
        self.rooms
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    fn hand_over(&self, jobs: Vec<DeliveryJob>, _leased_from: std::time::Instant) {
        self.handed.lock().expect("lock").extend(jobs);
    }

    fn give_back(&self, rooms: Vec<(AppId, EndpointId)>) {
        self.given_back.lock().expect("lock").extend(rooms);
    }

    fn lease(&self) -> std::time::Duration {
        std::time::Duration::from_secs(60)
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: SqliteStore,
    app: App,
    endpoints: Vec<Endpoint>,
}

async fn fixture(endpoints: usize) -> Fixture {
    let dir = tempfile::tempdir().expect("dir");
    let store = SqliteStore::open(dir.path()).await.expect("open");
    let app = conformance::app("test");
    store.create_app(&app).await.expect("app");
    let mut created = Vec::new();
    for _ in 0..endpoints {
        let endpoint = conformance::endpoint(&app.id);
        store.create_endpoint(&endpoint).await.expect("endpoint");
        created.push(endpoint);
    }
    // The publisher reads them (into the cache) to choose a message's targets.
    store.app_endpoints(&app.id).await.expect("endpoints");
    Fixture {
        _dir: dir,
        store,
        app,
        endpoints: created,
    }
}

fn claim(at: DateTime<Utc>, first_attempts: bool, held: &[(&EndpointId, u32)]) -> ClaimRequest {
    ClaimRequest {
        now: at,
        lease_until: at + chrono::Duration::seconds(60),
        limit: 10,
        first_attempts,
        in_flight: held.iter().map(|(id, n)| ((*id).clone(), *n)).collect(),
        per_endpoint_limit: 1,
        app_in_flight: HashMap::new(),
        per_app_limit: 100,
        saving: Default::default(),
    }
}

fn record(job: &DeliveryJob, next: NextStep) -> AttemptRecord {
    crate::conformance::job_record(job, job.lease, Utc::now(), next)
}

fn later() -> DateTime<Utc> {
    Utc::now() + chrono::Duration::seconds(1)
}

#[tokio::test]
async fn a_new_delivery_with_room_is_handed_over_leased_and_no_claim_takes_it_again() {
    let f = fixture(2).await;
    let sink = Arc::new(Sink {
        rooms: AtomicU32::new(1),
        ..Sink::default()
    });
    f.store.hand_fresh_deliveries_to(Arc::clone(&sink) as _);
    let (ep1, ep2) = (&f.endpoints[0], &f.endpoints[1]);
    let msg = conformance::message(&f.app.id, None);
    f.store
        .create_message(msg.clone(), vec![ep1.id.clone(), ep2.id.clone()])
        .await
        .expect("message");

    let handed = sink.handed.lock().expect("lock").clone();
    assert_eq!(handed.len(), 1, "one room, one job");
    let job = &handed[0];
    assert_eq!(
        (&job.msg_id, &job.endpoint.id, job.attempts, job.trigger),
        (&msg.id, &ep1.id, 0, TriggerType::Scheduled)
    );
    assert_eq!(job.payload, msg.payload);
    assert_eq!(
        job.endpoint.secret, ep1.secret,
        "the endpoint as claims read it"
    );

    let claimed = f
        .store
        .claim_due(&claim(later(), true, &[]))
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1, "only the delivery without a room");
    assert_eq!(claimed[0].endpoint.id, ep2.id);

    let recorded = f
        .store
        .record_attempt(record(job, NextStep::Delivered))
        .await
        .expect("record");
    assert_eq!(recorded, Recorded::Applied, "the handed-over lease holds");
    assert!(sink.given_back.lock().expect("lock").is_empty());
    f.store.close().await;
}

#[tokio::test]
async fn a_delivery_that_does_not_commit_gives_its_room_back() {
    let f = fixture(1).await;
    let sink = Arc::new(Sink {
        rooms: AtomicU32::new(10),
        ..Sink::default()
    });
    f.store.hand_fresh_deliveries_to(Arc::clone(&sink) as _);
    let ep = &f.endpoints[0];
    f.store
        .create_message(
            conformance::message(&f.app.id, Some("once")),
            vec![ep.id.clone()],
        )
        .await
        .expect("first");
    let again = f
        .store
        .create_message(
            conformance::message(&f.app.id, Some("once")),
            vec![ep.id.clone()],
        )
        .await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    assert_eq!(sink.handed.lock().expect("lock").len(), 1);
    assert_eq!(
        *sink.given_back.lock().expect("lock"),
        vec![(f.app.id.clone(), ep.id.clone())],
        "the repeated eventId's room"
    );
    f.store.close().await;
}

/// A new message dropped before the group commit takes it (its caller cancelled while it
/// waited for room in the writer's queue, as a request whose client went away is) gives the
/// rooms reserved for its deliveries back.
#[tokio::test]
async fn a_new_message_dropped_before_it_is_queued_gives_its_rooms_back() {
    let f = fixture(2).await;
    let sink = Arc::new(Sink {
        rooms: AtomicU32::new(10),
        ..Sink::default()
    });
    f.store.hand_fresh_deliveries_to(Arc::clone(&sink) as _);
    let targets: Vec<EndpointId> = f.endpoints.iter().map(|e| e.id.clone()).collect();
    let new = f
        .store
        .new_message(conformance::message(&f.app.id, None), targets);
    assert_eq!(new.fresh.len(), 2, "a room for each delivery");
    drop(new);
    assert_eq!(sink.given_back.lock().expect("lock").len(), 2);
    assert!(sink.handed.lock().expect("lock").is_empty());
    f.store.close().await;
}

#[tokio::test]
async fn once_a_claim_has_taken_all_it_could_the_next_asks_only_for_held_back_endpoints() {
    let f = fixture(2).await;
    let (ep1, ep2) = (&f.endpoints[0].id, &f.endpoints[1].id);
    for _ in 0..3 {
        f.store
            .create_message(conformance::message(&f.app.id, None), vec![ep1.clone()])
            .await
            .expect("message");
    }
    // One may run per endpoint: the claim takes one and leaves ep1 held back.
    let at = later();
    let first = f
        .store
        .claim_due(&claim(at, true, &[]))
        .await
        .expect("claim");
    assert_eq!(first.len(), 1);
    assert_eq!(
        f.store.gate.plan(&claim(at, true, &[(ep1, 1)])),
        Plan::Nothing,
        "ep1 still full: nothing to ask"
    );
    assert!(
        f.store
            .claim_due(&claim(at, true, &[(ep1, 1)]))
            .await
            .expect("skipped claim")
            .is_empty()
    );
    assert_eq!(
        f.store.gate.plan(&claim(at, true, &[])),
        Plan::Endpoints(vec![ep1.clone()])
    );
    let second = f
        .store
        .claim_due(&claim(at, true, &[]))
        .await
        .expect("targeted claim");
    assert_eq!(second.len(), 1);
    assert_ne!(
        second[0].msg_id, first[0].msg_id,
        "the next one, not a leased one"
    );
    assert!(first[0].msg_id < second[0].msg_id, "earliest first");

    // A new delivery to another endpoint, not handed over, must be found.
    f.store
        .create_message(conformance::message(&f.app.id, None), vec![ep2.clone()])
        .await
        .expect("message");
    let at = later();
    let third = f
        .store
        .claim_due(&claim(at, true, &[(ep1, 1)]))
        .await
        .expect("claim");
    assert_eq!(third.len(), 1);
    assert_eq!(&third[0].endpoint.id, ep2);

    // A retry makes anything possible: the next claim reads the whole queue.
    let retry = f
        .store
        .record_attempt(record(
            &third[0],
            NextStep::RetryAt(at + chrono::Duration::hours(1)),
        ))
        .await
        .expect("record");
    assert_eq!(retry, Recorded::Applied);
    assert_eq!(
        f.store.gate.plan(&claim(at, true, &[(ep1, 1)])),
        Plan::Everything
    );
    let last = f
        .store
        .claim_due(&claim(at, true, &[]))
        .await
        .expect("claim");
    assert_eq!(last.len(), 1, "ep1's third message");
    assert_eq!(
        f.store
            .next_due_at(false)
            .await
            .expect("next due")
            .map(|due| due.timestamp_millis()),
        Some((at + chrono::Duration::hours(1)).timestamp_millis()),
        "the retry (the retry lane has no summary yet: read from the queue)"
    );
    f.store.close().await;
}

#[tokio::test]
async fn a_claim_of_one_endpoint_seeks_its_index() {
    use sqlx::Row;
    let f = fixture(1).await;
    let sql = format!("EXPLAIN QUERY PLAN {}", super::messages::CLAIM_OF_ENDPOINT);
    let details: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(0_i64)
        .bind(true)
        .bind("[]")
        .bind(f.endpoints[0].id.as_str())
        .bind(1_i64)
        .fetch_all(&f.store.reader)
        .await
        .expect("plan")
        .iter()
        .map(|row| row.try_get("detail").expect("detail"))
        .collect();
    assert!(
        details
            .iter()
            .any(|d| d.contains("USING INDEX deliveries_due_by_endpoint")),
        "{details:#?}"
    );
    assert!(
        !details
            .iter()
            .any(|d| d.contains("TEMP B-TREE FOR ORDER BY")),
        "the index gives the order: {details:#?}"
    );
    f.store.close().await;
}

/// An attempt whose record the store could not write (a full disk, a failed fsync) keeps its
/// lease until it runs out: the delivery is not claimed, and sent, again at once, over and
/// over for as long as records fail.
#[tokio::test]
async fn a_delivery_whose_record_failed_stays_leased_until_the_lease_runs_out() {
    let f = fixture(1).await;
    let msg = conformance::message(&f.app.id, None);
    f.store
        .create_message(msg, vec![f.endpoints[0].id.clone()])
        .await
        .expect("message");
    let at = later();
    let claimed = f
        .store
        .claim_due(&claim(at, true, &[]))
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    sqlx::query(
        "CREATE TRIGGER refuse_attempts BEFORE INSERT ON attempts
         BEGIN SELECT RAISE(ABORT, 'the disk is full'); END",
    )
    .execute(&f.store.writer)
    .await
    .expect("trigger");
    let failed = f
        .store
        .record_attempt(record(&claimed[0], NextStep::RetryAt(at)))
        .await;
    assert!(failed.is_err(), "{failed:?}");
    assert!(
        f.store
            .claim_due(&claim(at, true, &[]))
            .await
            .expect("claim")
            .is_empty(),
        "still leased"
    );
    // The claim leased it for 60 s: a claim after that takes it again.
    let again = f
        .store
        .claim_due(&claim(at + chrono::Duration::seconds(61), true, &[]))
        .await
        .expect("claim");
    assert_eq!(again.len(), 1, "claimable once the lease ran out");
    f.store.close().await;
}
