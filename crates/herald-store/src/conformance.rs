//! The store conformance suite: behaviour checks that every [`Store`] implementation must pass,
//! written once against the traits.
//!
//! Each check takes a fresh, empty store and panics on a failure. [`run_all`] runs every check
//! in [`CHECKS`] against a new store from a factory that also returns a guard (a temporary
//! directory, a throwaway database) kept alive for the check's length. The SQLite store runs
//! the suite in its unit tests, the PostgreSQL store against a server named by
//! `HERALD_TEST_POSTGRES_URL`. Compiled for this crate's tests and, for other crates' tests,
//! with the `conformance` feature.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    pin::Pin,
    task::Poll,
    time::Duration,
};

use bytes::Bytes;
use chrono::{DateTime, SubsecRound, Utc};
use herald_core::{
    AppId, EndpointId, MessageId, TokenId,
    history::{ChannelPosition, NewHistoryEntry, Position, Retention},
    model::{
        App, Attempt, DeliveryStatus, EXPIRED_PAYLOAD, Endpoint, EndpointFormat, EventType,
        IngestEvent, IngestSource, Message, Metadata, PusherCredentials, TriggerType,
    },
};

use crate::{
    ApiToken, AttemptQuery, AttemptRecord, AttemptScope, ClaimRequest, ENDPOINT_CHANGED,
    EndpointChange, HistoryQuery, IdempotencyClaim, IngestRecorded, LeaseToken, MessageQuery,
    NextStep, OccupancyChange, Occupant, Page, Recorded, StatsWindow, Store, StoreError,
    TokenScope,
};

/// One check: a future over a fresh store.
pub type Check = for<'a> fn(&'a dyn Store) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

macro_rules! checks {
    ($($name:ident),* $(,)?) => {
        /// Every check, by name.
        pub const CHECKS: &[(&str, Check)] = &[$((stringify!($name), |store| Box::pin($name(store)))),*];
    };
}

checks!(
    apps_resolve_by_id_uid_and_pusher_ids,
    socketio_app_keys_name_the_apps_with_socketio_settings,
    an_app_update_from_an_out_of_date_copy_is_refused,
    a_source_update_from_an_out_of_date_copy_is_refused,
    what_is_made_under_a_deleted_app_is_not_found,
    an_exact_id_wins_over_a_uid_equal_to_it,
    token_scopes_round_trip,
    expired_tokens_are_purged,
    event_type_names_are_unique,
    endpoints_resolve_within_their_app,
    a_repeated_event_id_conflicts_once,
    a_claim_leaves_out_apps_at_their_share_and_looks_past_their_backlog,
    a_disabled_endpoints_deliveries_take_none_of_their_apps_share,
    a_claim_leaves_out_endpoints_at_their_limit,
    records_being_saved_do_not_count_against_their_endpoints_limit,
    a_claim_finds_work_behind_a_full_endpoints_long_backlog,
    a_recorded_attempt_is_logged_and_settles_the_delivery,
    each_lane_says_when_its_next_delivery_falls_due,
    a_failing_streak_is_what_the_next_reads_of_its_endpoint_see,
    due_deliveries_count_the_unfinished_and_date_the_oldest,
    concurrent_records_each_report_their_own_fence,
    a_record_under_a_lapsed_lease_is_logged_but_leaves_the_newer_claims_state,
    a_released_claim_is_claimable_at_once_and_a_stale_release_keeps_the_newer_lease,
    a_resend_during_an_attempt_fences_the_attempts_record,
    a_resend_while_a_retry_waits_keeps_the_schedule,
    a_recovered_delivery_is_claimed_under_a_new_lease_whose_record_applies,
    a_recovery_leaves_failed_the_messages_whose_payload_expired,
    a_resend_queues_nothing_for_a_message_without_its_payload,
    an_endpoints_stats_and_delivery_lists_count_each_status,
    an_endpoint_update_read_before_the_workers_disable_conflicts,
    a_disable_for_a_streak_that_ended_meanwhile_leaves_the_endpoint_enabled,
    history_appends_advance_the_position_and_trim_to_the_retention,
    history_keeps_the_socket_each_event_must_not_reach,
    history_trims_delete_the_entries_past_their_age,
    a_conflicting_publication_commits_no_history,
    offsets_are_assigned_gap_free_in_call_order,
    concurrent_publications_get_each_offset_once,
    a_conflicting_publication_consumes_no_offset,
    queued_publications_take_offsets_in_queue_order,
    a_duplicate_delivery_assigns_no_offset,
    a_delivery_whose_message_conflicts_records_nothing,
    a_delivery_to_a_source_deleted_meanwhile_is_not_found,
    a_reset_changes_the_epoch_and_offsets_go_on,
    offsets_go_on_past_a_batch_that_fails_and_a_deleted_apps_channels,
    an_append_returns_the_next_position,
    the_first_append_starts_the_channel_under_the_epoch_it_names,
    a_repeated_delivery_id_is_recorded_once,
    a_found_source_follows_its_updates_and_deletion,
    history_rules_and_hmac_settings_round_trip,
    socketio_settings_round_trip,
    idempotency_purge_keeps_at_most_the_newest_records,
    an_idempotency_key_is_claimed_once_until_saved_released_or_expired,
    occupancy_changes_collapse_to_the_last,
    expired_payloads_are_expunged_in_batches_but_not_under_a_pending_delivery,
    old_messages_are_deleted_in_batches_but_not_while_a_delivery_is_pending,
    an_expunge_names_the_message_by_id_or_event_id,
    an_expunge_fails_the_deliveries_still_to_be_made,
    deleting_an_app_deletes_its_messages_in_batches_and_no_other_app_s,
    concurrent_pusher_rotations_each_retire_the_secret_they_replace,
);

/// Runs every check, each against a new store from `factory`, and closes it afterwards. The
/// check's name is printed first, so a failure's output names it.
pub async fn run_all<G, S, F, Fut>(factory: F)
where
    S: Store,
    F: Fn() -> Fut,
    Fut: Future<Output = (G, S)>,
{
    for (name, check) in CHECKS {
        eprintln!("store conformance: {name}");
        let (guard, store) = factory().await;
        check(&store).await;
        store.close().await;
        drop(guard);
    }
}

/// Fixtures, shared with the backends' own tests.
/// An endpoint, source or message made under an app deleted since it was looked up (the API
/// checks the app first, then writes) is `NotFound`, a 404 the client understands, not a
/// database error answered 500; a message whose endpoint went meanwhile is not.
async fn what_is_made_under_a_deleted_app_is_not_found(store: &dyn Store) {
    let gone = stored_app(store, "gone").await;
    assert!(store.delete_app(&gone.id).await.expect("delete"));
    let made = store.create_endpoint(&endpoint(&gone.id)).await;
    assert!(matches!(made, Err(StoreError::NotFound)), "{made:?}");
    let made = store.create_source(&source(&gone.id)).await;
    assert!(matches!(made, Err(StoreError::NotFound)), "{made:?}");
    let made = store
        .create_message(message(&gone.id, None), Vec::new())
        .await;
    assert!(matches!(made, Err(StoreError::NotFound)), "{made:?}");

    // An endpoint deleted since the targets were read, in an app still there: not
    // `NotFound` (a 404 the SDKs would not retry, losing the message), the error it was.
    let kept = stored_app(store, "kept").await;
    let gone_endpoint = endpoint(&kept.id);
    store
        .create_endpoint(&gone_endpoint)
        .await
        .expect("endpoint");
    assert!(
        store
            .delete_endpoint(&kept.id, &gone_endpoint.id)
            .await
            .expect("delete")
    );
    let made = store
        .create_message(message(&kept.id, None), vec![gone_endpoint.id.clone()])
        .await;
    assert!(
        made.as_ref()
            .is_err_and(|e| !matches!(e, StoreError::NotFound)),
        "{made:?}"
    );
}

/// Two changes of an app prepared from one read (two PATCHes of different fields, or one made
/// on a node whose cached copy is behind): the first goes in, the second is refused
/// (`APP_CHANGED`) rather than putting back what the first changed; read again, it goes in.
async fn an_app_update_from_an_out_of_date_copy_is_refused(store: &dyn Store) {
    let made = stored_app(store, "A").await;
    let read = store
        .get_app(made.id.as_str())
        .await
        .expect("read")
        .expect("app");
    let later = read.updated_at + chrono::Duration::seconds(1);
    let renamed = App {
        name: "renamed".into(),
        updated_at: later,
        ..read.clone()
    };
    store
        .update_app(&renamed, read.updated_at)
        .await
        .expect("the first change");
    let mut tagged = read.clone();
    tagged.metadata.insert("tier".into(), "gold".into());
    tagged.updated_at = later;
    let refused = store.update_app(&tagged, read.updated_at).await;
    assert!(
        matches!(&refused, Err(StoreError::Conflict(why)) if why == crate::APP_CHANGED),
        "{refused:?}"
    );
    let stored = store
        .get_app(made.id.as_str())
        .await
        .expect("read")
        .expect("app");
    assert_eq!(stored.name, "renamed", "the first change stands");
    assert!(stored.metadata.is_empty());

    let mut again = stored.clone();
    again.metadata.insert("tier".into(), "gold".into());
    again.updated_at = later + chrono::Duration::seconds(1);
    store
        .update_app(&again, stored.updated_at)
        .await
        .expect("read again, it goes in");
    let stored = store
        .get_app(made.id.as_str())
        .await
        .expect("read")
        .expect("app");
    assert_eq!(
        (
            stored.name.as_str(),
            stored.metadata.get("tier").map(String::as_str)
        ),
        ("renamed", Some("gold"))
    );

    assert!(store.delete_app(&made.id).await.expect("delete"));
    let gone = store.update_app(&again, again.updated_at).await;
    assert!(matches!(gone, Err(StoreError::NotFound)), "{gone:?}");
}

pub(crate) fn app(name: &str) -> App {
    let now = Utc::now();
    App {
        id: herald_core::AppId::new(now),
        uid: None,
        name: name.into(),
        throttle_rate: None,
        metadata: Metadata::new(),
        pusher: PusherCredentials::generate(),
        history: None,
        socketio: None,
        payload_retention_days: None,
        created_at: now,
        updated_at: now,
    }
}

/// A new app named `name`, created in `store` (a fixture for other crates' store tests too).
pub async fn stored_app(store: &dyn Store, name: &str) -> App {
    let app = app(name);
    store.create_app(&app).await.expect("create app");
    app
}

/// A new enabled Standard Webhooks endpoint of `app_id`, not stored (a fixture for other
/// crates' store tests too).
pub fn endpoint(app_id: &AppId) -> Endpoint {
    let now = Utc::now();
    Endpoint {
        id: herald_core::EndpointId::new(now),
        app_id: app_id.clone(),
        uid: None,
        url: "https://example.com".into(),
        description: String::new(),
        throttle_rate: None,
        disabled: false,
        format: EndpointFormat::StandardWebhooks,
        event_types: None,
        channels: None,
        metadata: Metadata::new(),
        headers: Default::default(),
        secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        previous_secrets: vec![],
        failing_since: None,
        created_at: now,
        updated_at: now,
    }
}

pub(crate) fn message(app_id: &AppId, event_id: Option<&str>) -> Message {
    let now = Utc::now();
    Message {
        id: herald_core::MessageId::new(now),
        app_id: app_id.clone(),
        event_id: event_id.map(str::to_owned),
        event_type: "t".into(),
        channels: None,
        tags: None,
        payload: Bytes::from_static(b"{}"),
        created_at: now,
        payload_expires_at: None,
    }
}

/// Keeps plenty: checks that do not test trimming see every event.
const KEEP_ALL: Retention = Retention {
    max_events: 10_000,
    max_age: Duration::from_secs(3600),
};

fn history_entry(
    app_id: &AppId,
    channel: &str,
    data: &str,
    retention: Retention,
) -> NewHistoryEntry {
    NewHistoryEntry {
        app_id: app_id.clone(),
        channel: channel.into(),
        event: "e".into(),
        data: data.into(),
        raw_json: false,
        user_id: None,
        created_at: Utc::now(),
        retention,
        first_epoch: None,
        except: None,
    }
}

/// The positions of a channel's kept events, oldest first, with their data.
async fn kept(store: &dyn Store, app_id: &AppId, channel: &str) -> Vec<(Position, String)> {
    store
        .history(app_id, channel, &all_history())
        .await
        .expect("history")
        .into_iter()
        .map(|e| {
            (
                Position {
                    epoch: e.epoch,
                    offset: e.offset,
                },
                e.data,
            )
        })
        .collect()
}

/// Runs every future at once (the store sees them as concurrent callers) and returns their
/// outputs in the order given.
async fn join_all<'a, T>(futures: Vec<Pin<Box<dyn Future<Output = T> + Send + 'a>>>) -> Vec<T> {
    let mut futures: Vec<_> = futures.into_iter().map(Some).collect();
    let mut outputs: Vec<Option<T>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if let Some(future) = slot {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => {
                        *output = Some(value);
                        *slot = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().map(|o| o.expect("finished")).collect()
}

fn all_history() -> HistoryQuery {
    HistoryQuery {
        after: None,
        before: None,
        limit: 100,
        newest_first: false,
        not_before: DateTime::<Utc>::MIN_UTC,
    }
}

fn first_page(descending: bool) -> Page {
    Page {
        limit: 50,
        iterator: None,
        descending,
        backwards: false,
    }
}

/// A claim at `now` (leases of a minute) of up to `limit` deliveries in the first-attempt lane,
/// with these endpoints' and apps' attempts in flight and their limits.
pub fn claim(
    now: DateTime<Utc>,
    limit: u32,
    in_flight: HashMap<EndpointId, u32>,
    per_endpoint_limit: u32,
    app_in_flight: HashMap<AppId, u32>,
    per_app_limit: u32,
) -> ClaimRequest {
    ClaimRequest {
        now,
        lease_until: now + chrono::Duration::seconds(60),
        limit,
        first_attempts: true,
        in_flight,
        per_endpoint_limit,
        app_in_flight,
        per_app_limit,
        saving: HashMap::new(),
    }
}

/// An app is found by its id, its uid, its Pusher key and its numeric Pusher id, and is gone
/// after its deletion.
pub async fn socketio_app_keys_name_the_apps_with_socketio_settings(store: &dyn Store) {
    let with_uid = App {
        uid: Some("chat".into()),
        socketio: Some(herald_core::socketio::SocketIoSettings::default()),
        ..app("with uid")
    };
    let without_uid = App {
        socketio: Some(herald_core::socketio::SocketIoSettings::default()),
        ..app("without uid")
    };
    let plain = App {
        uid: Some("webhooks-only".into()),
        ..app("no settings")
    };
    for app in [&with_uid, &without_uid, &plain] {
        store.create_app(app).await.expect("create");
    }
    let mut keys = store.socketio_app_keys().await.expect("keys");
    keys.sort();
    let mut expected = vec![
        with_uid.id.to_string(),
        "chat".to_owned(),
        without_uid.id.to_string(),
    ];
    expected.sort();
    assert_eq!(
        keys, expected,
        "ids and uids of the apps with Socket.IO settings only"
    );

    // Settings removed: the app is no longer named.
    let cleared = App {
        socketio: None,
        ..with_uid.clone()
    };
    store
        .update_app(&cleared, cleared.updated_at)
        .await
        .expect("update");
    assert_eq!(
        store.socketio_app_keys().await.expect("keys"),
        [without_uid.id.to_string()]
    );
}

pub async fn apps_resolve_by_id_uid_and_pusher_ids(store: &dyn Store) {
    let app = App {
        uid: Some("my-app".into()),
        ..app("A")
    };
    store.create_app(&app).await.expect("create");
    let duplicate = App {
        uid: Some("my-app".into()),
        ..self::app("B")
    };
    assert!(
        matches!(
            store.create_app(&duplicate).await,
            Err(StoreError::Conflict(_))
        ),
        "a uid is unique"
    );
    for key in [app.id.as_str(), "my-app"] {
        let found = store.get_app(key).await.expect("read").expect("found");
        assert_eq!(found.id, app.id, "{key}");
        assert_eq!(found.pusher, app.pusher, "{key}");
    }
    let by_key = store
        .get_app_by_pusher_key(&app.pusher.key)
        .await
        .expect("read");
    assert_eq!(by_key.map(|a| a.id), Some(app.id.clone()));
    let by_id = store
        .get_app_by_pusher_id(app.pusher.app_id)
        .await
        .expect("read");
    assert_eq!(by_id.map(|a| a.id), Some(app.id.clone()));
    assert!(store.get_app("app_missing").await.expect("read").is_none());
    assert!(store.delete_app(&app.id).await.expect("delete"));
    assert!(!store.delete_app(&app.id).await.expect("delete again"));
    assert!(store.get_app(&app.id).await.expect("read").is_none());
    assert!(store.get_app("my-app").await.expect("read").is_none());
}

/// Rotations close together each retire the secret stored when they write: every rotation's
/// previous secret is a different one (the app's first, or another rotation's), so none is
/// lost, and the last one written is the app's.
pub async fn concurrent_pusher_rotations_each_retire_the_secret_they_replace(store: &dyn Store) {
    let app = stored_app(store, "A").await;
    let until = Utc::now().trunc_subsecs(3) + chrono::Duration::hours(1);
    let secrets: Vec<String> = (0..8).map(|n| format!("rotated-secret-{n:02}")).collect();
    let rotated = join_all(
        secrets
            .iter()
            .map(|secret| store.rotate_pusher_secret(&app.id, secret, Some(until)))
            .collect(),
    )
    .await
    .into_iter()
    .map(|done| done.expect("rotated"))
    .collect::<Vec<_>>();
    let mut retired: Vec<&str> = rotated
        .iter()
        .map(|c| c.previous.as_ref().expect("a grace").secret.as_str())
        .collect();
    retired.sort_unstable();
    let mut expected: Vec<&str> = std::iter::once(app.pusher.secret.as_str())
        .chain(secrets.iter().map(String::as_str))
        .collect();
    // One chain: the first secret and every rotation's but the last are each retired once.
    let stored = store.get_app(&app.id).await.expect("read").expect("found");
    expected.retain(|secret| *secret != stored.pusher.secret);
    expected.sort_unstable();
    assert_eq!(retired, expected);
    let last = rotated
        .iter()
        .find(|c| c.secret == stored.pusher.secret)
        .expect("the stored secret is a rotation's");
    assert_eq!(stored.pusher, *last);
    // Without a grace, the replaced secret stops at once.
    let dropped = store
        .rotate_pusher_secret(&app.id, "rotated-secret-final", None)
        .await
        .expect("rotated");
    assert_eq!(dropped.previous, None);
    assert_eq!(dropped.key, app.pusher.key);
    assert!(matches!(
        store
            .rotate_pusher_secret(&herald_core::AppId::new(Utc::now()), "s", None)
            .await,
        Err(StoreError::NotFound)
    ));
}

/// An exact id wins over another app's uid equal to it, whichever is read first (a store that
/// caches must keep the rule too). The API refuses such uids now; rows written before that
/// rule must still resolve.
pub async fn an_exact_id_wins_over_a_uid_equal_to_it(store: &dyn Store) {
    // A is written first, so a scan without the exact-id rule would find it first.
    let b_id = herald_core::AppId::new(Utc::now());
    let a = App {
        uid: Some(b_id.to_string()),
        ..app("A")
    };
    store.create_app(&a).await.expect("app a");
    let b = App {
        id: b_id,
        ..app("B")
    };
    store.create_app(&b).await.expect("app b");
    for round in ["first read", "second read"] {
        let found = store.get_app(&b.id).await.expect("read").expect("found");
        assert_eq!(found.id, b.id, "{round}");
        // Reading A by its id must not make its uid shadow B's id.
        let found = store.get_app(&a.id).await.expect("read").expect("found");
        assert_eq!(found.id, a.id, "{round}");
    }
    // A read first, after a write: B's id is still not answered from A's uid.
    store
        .set_pusher_credentials(&b.id, &b.pusher)
        .await
        .expect("write");
    let found = store.get_app(&a.id).await.expect("read").expect("found");
    assert_eq!(found.id, a.id);
    let found = store.get_app(&b.id).await.expect("read").expect("found");
    assert_eq!(found.id, b.id, "A read first, B looked up by id");
}

/// A token reads back as it was added (an app portal link's with its own scope), by its digest
/// and by its id, in lists (all, or one app's), until it is revoked; a digest added twice keeps
/// its first token.
pub async fn token_scopes_round_trip(store: &dyn Store) {
    let app = stored_app(store, "A").await;
    let now = Utc::now().trunc_subsecs(3);
    let environment = ApiToken {
        id: TokenId::new(now),
        name: "env".to_owned(),
        scope: TokenScope::Environment,
        created_at: now,
        expires_at: None,
    };
    let scoped = ApiToken {
        id: TokenId::new(now),
        name: "app".to_owned(),
        scope: TokenScope::App(app.id.clone()),
        created_at: now,
        expires_at: Some(now + chrono::Duration::hours(1)),
    };
    store
        .add_token(&environment, b"environment-hash")
        .await
        .expect("add");
    store.add_token(&scoped, b"app-hash").await.expect("add");
    // An app portal link's token keeps its narrower scope.
    let portal = ApiToken {
        id: TokenId::new(now),
        name: "app portal".to_owned(),
        scope: TokenScope::Portal(app.id.clone()),
        created_at: now,
        expires_at: Some(now + chrono::Duration::hours(1)),
    };
    store.add_token(&portal, b"portal-hash").await.expect("add");
    assert_eq!(
        store.find_token(b"portal-hash").await.expect("read"),
        Some(portal.clone())
    );
    assert_eq!(
        store.get_token(&portal.id).await.expect("read"),
        Some(portal.clone())
    );
    assert!(store.revoke_token(&portal.id).await.expect("revoke"));
    let again = ApiToken {
        id: TokenId::new(now),
        name: "again".to_owned(),
        ..environment.clone()
    };
    store
        .add_token(&again, b"environment-hash")
        .await
        .expect("adding a stored digest again is not an error");
    assert_eq!(
        store.find_token(b"environment-hash").await.expect("read"),
        Some(environment.clone())
    );
    assert_eq!(
        store.find_token(b"app-hash").await.expect("read"),
        Some(scoped.clone())
    );
    assert_eq!(
        store.get_token(&scoped.id).await.expect("read"),
        Some(scoped.clone())
    );
    assert_eq!(store.find_token(b"unknown").await.expect("read"), None);
    let page = Page {
        limit: 10,
        iterator: None,
        descending: false,
        backwards: false,
    };
    assert_eq!(
        store.list_tokens(&page, None).await.expect("list"),
        vec![environment.clone(), scoped.clone()]
    );
    assert_eq!(
        store.list_tokens(&page, Some(&app.id)).await.expect("list"),
        vec![scoped.clone()]
    );
    assert!(store.revoke_token(&scoped.id).await.expect("revoke"));
    assert!(!store.revoke_token(&scoped.id).await.expect("revoke again"));
    assert_eq!(store.find_token(b"app-hash").await.expect("read"), None);
    assert!(
        store
            .remove_token(b"environment-hash")
            .await
            .expect("remove")
    );
    assert!(
        !store
            .remove_token(b"environment-hash")
            .await
            .expect("remove again")
    );
    assert_eq!(
        store.find_token(b"environment-hash").await.expect("read"),
        None
    );
}

/// Tokens that expired before the time given are deleted; those expired since, and those that
/// never expire, stay.
pub async fn expired_tokens_are_purged(store: &dyn Store) {
    let now = Utc::now().trunc_subsecs(3);
    let token = |name: &str, expires_at| ApiToken {
        id: TokenId::new(now),
        name: name.to_owned(),
        scope: TokenScope::Environment,
        created_at: now - chrono::Duration::days(60),
        expires_at,
    };
    let long_gone = token("long gone", Some(now - chrono::Duration::days(31)));
    let lately = token("lately", Some(now - chrono::Duration::days(1)));
    let lasting = token("lasting", None);
    for (t, hash) in [
        (&long_gone, b"long-gone".as_slice()),
        (&lately, b"lately"),
        (&lasting, b"lasting"),
    ] {
        store.add_token(t, hash).await.expect("add");
    }
    // More than one statement's batch of them.
    let batch = usize::try_from(crate::sql::TOKEN_PURGE_BATCH).expect("small");
    for n in 0..batch + 5 {
        let old = token("old", Some(now - chrono::Duration::days(40)));
        store
            .add_token(&old, format!("old-{n}").as_bytes())
            .await
            .expect("add");
    }
    // Read once, so a cache holds it.
    assert!(
        store
            .find_token(b"long-gone")
            .await
            .expect("read")
            .is_some()
    );
    let purged = store
        .purge_expired_tokens(now - chrono::Duration::days(30))
        .await
        .expect("purge");
    assert_eq!(purged, u64::try_from(batch + 6).expect("small"));
    assert_eq!(store.find_token(b"old-0").await.expect("read"), None);
    assert_eq!(store.find_token(b"long-gone").await.expect("read"), None);
    assert_eq!(
        store.find_token(b"lately").await.expect("read"),
        Some(lately)
    );
    assert_eq!(
        store.find_token(b"lasting").await.expect("read"),
        Some(lasting)
    );
}

/// An event type's name is unique; archived ones are listed only when asked for.
pub async fn event_type_names_are_unique(store: &dyn Store) {
    let now = Utc::now();
    let mut event_type = EventType {
        name: "user.created".into(),
        description: "A user".into(),
        archived: false,
        deprecated: false,
        schemas: None,
        group_name: None,
        feature_flags: None,
        created_at: now,
        updated_at: now,
    };
    store.create_event_type(&event_type).await.expect("create");
    assert!(matches!(
        store.create_event_type(&event_type).await,
        Err(StoreError::Conflict(_))
    ));
    let found = store
        .get_event_type("user.created")
        .await
        .expect("read")
        .expect("found");
    assert_eq!(found.description, "A user");
    event_type.archived = true;
    store.update_event_type(&event_type).await.expect("update");
    let listed = store
        .list_event_types(&first_page(false), false)
        .await
        .expect("list");
    assert!(listed.is_empty(), "archived: {listed:?}");
    let listed = store
        .list_event_types(&first_page(false), true)
        .await
        .expect("list");
    assert_eq!(listed.len(), 1);
}

/// An endpoint is found by id or uid within its app only, and `app_endpoints` follows every
/// write.
pub async fn endpoints_resolve_within_their_app(store: &dyn Store) {
    let a = stored_app(store, "A").await;
    let b = stored_app(store, "B").await;
    let mut ep = Endpoint {
        uid: Some("hook".into()),
        ..endpoint(&a.id)
    };
    assert!(store.app_endpoints(&a.id).await.expect("read").is_empty());
    store.create_endpoint(&ep).await.expect("create");
    for key in [ep.id.as_str(), "hook"] {
        let found = store
            .get_endpoint(&a.id, key)
            .await
            .expect("read")
            .expect("found");
        assert_eq!(found.id, ep.id, "{key}");
        assert!(
            store
                .get_endpoint(&b.id, key)
                .await
                .expect("read")
                .is_none(),
            "{key} under another app"
        );
    }
    assert_eq!(store.app_endpoints(&a.id).await.expect("read").len(), 1);
    ep.url = "https://example.org/hook".into();
    let read_at = ep.updated_at;
    ep.updated_at += chrono::Duration::milliseconds(1);
    store.update_endpoint(&ep, read_at).await.expect("update");
    let listed = store.app_endpoints(&a.id).await.expect("read");
    assert_eq!(
        listed.first().map(|e| e.url.as_str()),
        Some("https://example.org/hook")
    );
    assert!(store.delete_endpoint(&a.id, &ep.id).await.expect("delete"));
    assert!(store.app_endpoints(&a.id).await.expect("read").is_empty());
    assert!(
        store
            .get_endpoint(&a.id, &ep.id)
            .await
            .expect("read")
            .is_none()
    );
}

/// Of concurrent messages with one `eventId`, exactly one is stored; it is found by id and by
/// `eventId`.
pub async fn a_repeated_event_id_conflicts_once(store: &dyn Store) {
    let app = stored_app(store, "A").await;
    let (first, second, other) = (
        message(&app.id, Some("evt-1")),
        message(&app.id, Some("evt-1")),
        message(&app.id, None),
    );
    let ids = [first.id.clone(), second.id.clone()];
    let (a, b, c) = tokio::join!(
        store.create_message(first, vec![]),
        store.create_message(second, vec![]),
        store.create_message(other, vec![]),
    );
    let conflicts = [&a, &b]
        .iter()
        .filter(|r| matches!(r, Err(StoreError::Conflict(_))))
        .count();
    assert_eq!(conflicts, 1, "{a:?} {b:?}");
    assert!(c.is_ok(), "{c:?}");
    let stored = if a.is_ok() { &ids[0] } else { &ids[1] };
    for key in [stored.as_str(), "evt-1"] {
        let found = store.get_message(&app.id, key).await.expect("read");
        assert_eq!(found.map(|m| m.id).as_ref(), Some(stored), "{key}");
    }
}

/// A claim gives an app no more than its share, then looks past its backlog to other apps.
pub async fn a_claim_leaves_out_apps_at_their_share_and_looks_past_their_backlog(
    store: &dyn Store,
) {
    let a = stored_app(store, "A").await;
    let b = stored_app(store, "B").await;
    let (ea, eb) = (endpoint(&a.id), endpoint(&b.id));
    store.create_endpoint(&ea).await.expect("ea");
    store.create_endpoint(&eb).await.expect("eb");
    for _ in 0..20 {
        store
            .create_message(message(&a.id, None), vec![ea.id.clone()])
            .await
            .expect("m");
    }
    store
        .create_message(message(&b.id, None), vec![eb.id.clone()])
        .await
        .expect("m");
    let now = Utc::now() + chrono::Duration::seconds(1);
    let jobs = store
        .claim_due(&claim(
            now,
            4,
            HashMap::new(),
            100,
            HashMap::from([(a.id.clone(), 6)]),
            8,
        ))
        .await
        .expect("claim");
    let mut apps: Vec<&str> = jobs
        .iter()
        .map(|j| if j.app_id == a.id { "A" } else { "B" })
        .collect();
    apps.sort_unstable();
    assert_eq!(
        apps,
        ["A", "A", "B"],
        "A's two free slots, then B, though A has 18 more due"
    );
    let jobs = store
        .claim_due(&claim(
            now,
            4,
            HashMap::new(),
            100,
            HashMap::from([(a.id.clone(), 8)]),
            8,
        ))
        .await
        .expect("claim");
    assert!(
        jobs.is_empty(),
        "B's row is leased, A is full: {}",
        jobs.len()
    );
}

/// A disabled endpoint's due deliveries are failed, not leased, so they take none of their
/// app's share: an enabled endpoint of the same app, due later, still gets it.
pub async fn a_disabled_endpoints_deliveries_take_none_of_their_apps_share(store: &dyn Store) {
    let app = stored_app(store, "A").await;
    let mut disabled = endpoint(&app.id);
    disabled.disabled = true;
    let enabled = endpoint(&app.id);
    store.create_endpoint(&disabled).await.expect("disabled");
    store.create_endpoint(&enabled).await.expect("enabled");
    let start = Utc::now() - chrono::Duration::seconds(10);
    let create = async |seconds: i64, target: &Endpoint| {
        let mut msg = message(&app.id, None);
        msg.created_at = start + chrono::Duration::seconds(seconds);
        store
            .create_message(msg.clone(), vec![target.id.clone()])
            .await
            .expect("message");
        msg.id
    };
    for seconds in 0..5 {
        create(seconds, &disabled).await;
    }
    let mut expected = vec![create(6, &enabled).await, create(7, &enabled).await];
    expected.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));

    let now = Utc::now() + chrono::Duration::seconds(1);
    let jobs = store
        .claim_due(&claim(now, 4, HashMap::new(), 100, HashMap::new(), 2))
        .await
        .expect("claim");
    let mut ids: Vec<MessageId> = jobs.into_iter().map(|job| job.msg_id).collect();
    ids.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
    assert_eq!(
        ids, expected,
        "the app's share of 2 goes to the enabled endpoint's two deliveries"
    );
}

/// A claim gives an endpoint no more than its limit minus what it holds, and nothing once it
/// is at its limit; leased deliveries are not claimed twice.
pub async fn a_claim_leaves_out_endpoints_at_their_limit(store: &dyn Store) {
    let app = stored_app(store, "A").await;
    let (full, free) = (endpoint(&app.id), endpoint(&app.id));
    store.create_endpoint(&full).await.expect("full");
    store.create_endpoint(&free).await.expect("free");
    for _ in 0..5 {
        store
            .create_message(
                message(&app.id, None),
                vec![full.id.clone(), free.id.clone()],
            )
            .await
            .expect("m");
    }
    let now = Utc::now() + chrono::Duration::seconds(1);
    let jobs = store
        .claim_due(&claim(
            now,
            10,
            HashMap::from([(full.id.clone(), 4), (free.id.clone(), 7)]),
            10,
            HashMap::new(),
            100,
        ))
        .await
        .expect("claim");
    let to_full = jobs.iter().filter(|j| j.endpoint.id == full.id).count();
    let to_free = jobs.iter().filter(|j| j.endpoint.id == free.id).count();
    assert_eq!((to_full, to_free), (5, 3), "free holds 7 of 10");
    let jobs = store
        .claim_due(&claim(
            now,
            10,
            HashMap::from([(free.id.clone(), 10)]),
            10,
            HashMap::new(),
            100,
        ))
        .await
        .expect("claim");
    assert!(
        jobs.is_empty(),
        "full's rows are leased and free is at its limit: {}",
        jobs.len()
    );
}

/// Deliveries whose attempts are over and whose records the caller is still saving keep their
/// leases, but a claim that is told of them (`saving`) leaves them out of their endpoint's
/// count: the endpoint gets its whole limit of new deliveries, and no more.
pub async fn records_being_saved_do_not_count_against_their_endpoints_limit(store: &dyn Store) {
    let (_, target) = endpoint_with_messages(store, 6).await;
    let now = Utc::now() + chrono::Duration::seconds(1);
    let first = store
        .claim_due(&claim(now, 10, HashMap::new(), 2, HashMap::new(), 100))
        .await
        .expect("claim");
    assert_eq!(first.len(), 2, "the endpoint's limit");
    // Both attempts are over; their records are being saved, their leases still live.
    let request = ClaimRequest {
        saving: HashMap::from([(target.id.clone(), 2)]),
        ..claim(now, 10, HashMap::new(), 2, HashMap::new(), 100)
    };
    let second = store.claim_due(&request).await.expect("claim");
    assert_eq!(
        second.len(),
        2,
        "the records being saved leave room for two more, and only two"
    );
    assert!(
        second
            .iter()
            .all(|j| first.iter().all(|f| f.msg_id != j.msg_id)),
        "leased deliveries are not claimed again"
    );
}

/// One busy endpoint at its limit with a long backlog due before another endpoint's delivery:
/// a claim still finds the other's (and, once the busy one has room again, the busy one's
/// earliest first). Longer than any walk of the queue a store may cut short.
pub async fn a_claim_finds_work_behind_a_full_endpoints_long_backlog(store: &dyn Store) {
    const BACKLOG: usize = 300;
    let app = stored_app(store, "A").await;
    let (busy, quiet) = (endpoint(&app.id), endpoint(&app.id));
    store.create_endpoint(&busy).await.expect("busy");
    store.create_endpoint(&quiet).await.expect("quiet");
    let start = Utc::now() - chrono::Duration::seconds(10);
    let mut first_busy = Vec::new();
    for i in 0..BACKLOG {
        let mut msg = message(&app.id, None);
        msg.created_at = start + chrono::Duration::milliseconds(i64::try_from(i).expect("small"));
        if i < 2 {
            first_busy.push(msg.id.clone());
        }
        store
            .create_message(msg, vec![busy.id.clone()])
            .await
            .expect("busy message");
    }
    // A message for quiet, created `seconds` after the first of busy's backlog.
    let quiet_message = |seconds: i64| {
        let mut msg = message(&app.id, None);
        msg.created_at = start + chrono::Duration::seconds(seconds);
        let quiet_id = quiet.id.clone();
        async move {
            store
                .create_message(msg.clone(), vec![quiet_id])
                .await
                .expect("quiet message");
            msg.id
        }
    };
    let now = Utc::now() + chrono::Duration::seconds(1);
    // What a claim of up to 4 takes, with busy holding `busy_held` against a limit of 8.
    let claim_with_busy_holding = |busy_held: u32| {
        let request = claim(
            now,
            4,
            HashMap::from([(busy.id.clone(), busy_held)]),
            8,
            HashMap::new(),
            1000,
        );
        async move {
            let jobs = store.claim_due(&request).await.expect("claim");
            let mut ids: Vec<MessageId> = jobs.into_iter().map(|job| job.msg_id).collect();
            ids.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
            ids
        }
    };

    let behind = quiet_message(1).await;
    assert_eq!(
        claim_with_busy_holding(8).await,
        [behind],
        "busy is full: only quiet's delivery"
    );

    let later = quiet_message(2).await;
    let mut expected = vec![first_busy[0].clone(), first_busy[1].clone(), later];
    expected.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
    assert_eq!(
        claim_with_busy_holding(6).await,
        expected,
        "busy's two earliest, then quiet's, past busy's backlog"
    );

    // A caller may hold more than the limit (its leases ran out mid-attempt): busy has no
    // room at all, which must not keep the claim from quiet's delivery.
    let third = quiet_message(3).await;
    assert_eq!(
        claim_with_busy_holding(12).await,
        [third],
        "busy is over its limit: only quiet's delivery"
    );
}

/// A delivered attempt is in the attempt log, by message and by endpoint, and its delivery
/// reads as a success and is not due again.
pub async fn a_recorded_attempt_is_logged_and_settles_the_delivery(store: &dyn Store) {
    let ClaimedDelivery {
        app,
        ep,
        msg,
        now,
        job: jobs,
    } = one_claimed_delivery(store).await;
    let attempt = Attempt {
        id: herald_core::AttemptId::new(now),
        msg_id: msg.id.clone(),
        endpoint_id: ep.id.clone(),
        app_id: app.id.clone(),
        url: ep.url.clone(),
        status: DeliveryStatus::Success,
        response_status_code: 200,
        response: "ok".into(),
        response_duration_ms: 5,
        trigger_type: TriggerType::Scheduled,
        created_at: now,
    };
    let recorded = store
        .record_attempt(AttemptRecord {
            attempt: attempt.clone(),
            next: NextStep::Delivered,
            endpoint_change: EndpointChange::Unchanged,
            lease: jobs.lease,
        })
        .await
        .expect("record");
    assert_eq!(recorded, Recorded::Applied, "the claim's lease still holds");
    for scope in [
        AttemptScope::Message(msg.id.clone()),
        AttemptScope::Endpoint(ep.id.clone()),
    ] {
        let logged = store
            .list_attempts(&app.id, &scope, &AttemptQuery::default(), &first_page(true))
            .await
            .expect("list");
        assert_eq!(
            logged.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
            [attempt.id.as_str()],
            "{scope:?}"
        );
    }
    let deliveries = store
        .list_message_deliveries(&app.id, &msg.id, &first_page(false))
        .await
        .expect("deliveries");
    assert_eq!(deliveries.len(), 1);
    assert!(
        deliveries
            .iter()
            .all(|(e, state)| e.id == ep.id && state.status == DeliveryStatus::Success),
        "{deliveries:?}"
    );
    // Nothing is due in either lane: no due time, or (a store that bounds it from what its
    // last claim saw) one still to come.
    for first_attempts in [true, false] {
        let due = store.next_due_at(first_attempts).await.expect("next due");
        assert!(due.is_none_or(|due| due > Utc::now()), "{due:?}");
    }
}

/// Each claim lane has its own next due time (a dispatcher claims each lane in its own loop
/// and sleeps until it): deliveries in flight are not waiting, a retry is due in the retry
/// lane only, and a delivery whose lease ran out is due again.
pub async fn each_lane_says_when_its_next_delivery_falls_due(store: &dyn Store) {
    let app = stored_app(store, "lanes").await;
    let ep = endpoint(&app.id);
    store.create_endpoint(&ep).await.expect("endpoint");
    let (first, second) = (message(&app.id, None), message(&app.id, None));
    for msg in [&first, &second] {
        store
            .create_message(msg.clone(), vec![ep.id.clone()])
            .await
            .expect("message");
    }
    let now = Utc::now() + chrono::Duration::seconds(1);
    let jobs = store
        .claim_due(&claim(now, 10, HashMap::new(), 10, HashMap::new(), 100))
        .await
        .expect("claim");
    assert_eq!(jobs.len(), 2, "both first attempts are claimed");
    let retry_at = now + chrono::Duration::hours(1);
    let retried = jobs
        .iter()
        .find(|job| job.msg_id == first.id)
        .expect("the first message's delivery");
    let recorded = store
        .record_attempt(job_record(
            retried,
            retried.lease,
            now,
            NextStep::RetryAt(retry_at),
        ))
        .await
        .expect("record");
    assert_eq!(recorded, Recorded::Applied);
    let next_due = |first_attempts: bool| async move {
        store
            .next_due_at(first_attempts)
            .await
            .expect("next due")
            .map(|due| due.timestamp_millis())
    };
    assert_eq!(
        next_due(false).await,
        Some(retry_at.timestamp_millis()),
        "the retry is the retry lane's next"
    );
    assert_eq!(
        next_due(true).await,
        None,
        "the other first attempt is in flight, and the retry is not a first attempt"
    );

    // A first attempt claimed under a lease that has run out is due again.
    let an_hour_ago = Utc::now() - chrono::Duration::hours(1);
    let old = Message {
        id: herald_core::MessageId::new(an_hour_ago),
        created_at: an_hour_ago,
        ..message(&app.id, None)
    };
    store
        .create_message(old.clone(), vec![ep.id.clone()])
        .await
        .expect("old message");
    let claimed_at = an_hour_ago + chrono::Duration::minutes(10);
    let lapsed = store
        .claim_due(&ClaimRequest {
            lease_until: claimed_at + chrono::Duration::minutes(10),
            ..claim(claimed_at, 10, HashMap::new(), 10, HashMap::new(), 100)
        })
        .await
        .expect("claim");
    assert_eq!(
        lapsed.iter().map(|job| &job.msg_id).collect::<Vec<_>>(),
        [&old.id],
        "only the old message was due then"
    );
    let due = next_due(true)
        .await
        .expect("the lapsed lease's delivery is due");
    assert!(
        (an_hour_ago.timestamp_millis()..=Utc::now().timestamp_millis()).contains(&due),
        "due already: {due}"
    );
    assert_eq!(next_due(false).await, Some(retry_at.timestamp_millis()));
}

/// A failing streak that an attempt's record starts or ends is what the next reads of its
/// endpoint see: the app's endpoints (which new messages' first attempts carry) and a claim.
/// The dispatcher decides from it whether a success ends a streak and how long an endpoint has
/// been failing, so a stale one could leave a streak running through successes and disable an
/// endpoint that recovered.
pub async fn a_failing_streak_is_what_the_next_reads_of_its_endpoint_see(store: &dyn Store) {
    let ClaimedDelivery {
        app,
        ep,
        msg,
        now,
        job,
    } = one_claimed_delivery(store).await;
    let failing_since = |endpoints: &[Endpoint]| {
        let found = endpoints
            .iter()
            .find(|e| e.id == ep.id)
            .expect("the endpoint");
        found.failing_since.map(|t| t.timestamp_millis())
    };
    // Read before the record, as the publisher reads them for every message.
    let before = store.app_endpoints(&app.id).await.expect("endpoints");
    assert_eq!(failing_since(&before), None);

    let retry_at = now + chrono::Duration::seconds(10);
    let started = attempt_record(
        &msg,
        &ep,
        job.lease,
        now,
        TriggerType::Scheduled,
        NextStep::RetryAt(retry_at),
        EndpointChange::StreakStarted { at: now },
    );
    assert_eq!(
        store.record_attempt(started).await.expect("record"),
        Recorded::Applied
    );
    let endpoints = store.app_endpoints(&app.id).await.expect("endpoints");
    assert_eq!(
        failing_since(&endpoints),
        Some(now.timestamp_millis()),
        "the app's endpoints carry the streak the record started"
    );

    let mut request = claim(retry_at, 10, HashMap::new(), 10, HashMap::new(), 100);
    request.first_attempts = false;
    let mut retries = store.claim_due(&request).await.expect("claim");
    assert_eq!(retries.len(), 1, "the retry is claimed when due");
    let retry = retries.remove(0);
    assert_eq!(
        retry.endpoint.failing_since.map(|t| t.timestamp_millis()),
        Some(now.timestamp_millis()),
        "a claimed job's endpoint carries the streak"
    );

    let ended = attempt_record(
        &msg,
        &ep,
        retry.lease,
        retry_at,
        TriggerType::Scheduled,
        NextStep::Delivered,
        EndpointChange::StreakEnded,
    );
    assert_eq!(
        store.record_attempt(ended).await.expect("record"),
        Recorded::Applied
    );
    let endpoints = store.app_endpoints(&app.id).await.expect("endpoints");
    assert_eq!(
        failing_since(&endpoints),
        None,
        "a success ends the streak for the next reads too"
    );
}

/// Records made at once (a store may commit them together) each report their own fence: the
/// ones under their claim's lease apply, the ones under a stale token are logged only.
pub async fn concurrent_records_each_report_their_own_fence(store: &dyn Store) {
    let app = stored_app(store, "A").await;
    let ep = endpoint(&app.id);
    store.create_endpoint(&ep).await.expect("endpoint");
    let mut msgs = Vec::new();
    for _ in 0..4 {
        let msg = message(&app.id, None);
        store
            .create_message(msg.clone(), vec![ep.id.clone()])
            .await
            .expect("message");
        msgs.push(msg);
    }
    let now = Utc::now() + chrono::Duration::seconds(1);
    let jobs = store
        .claim_due(&claim(now, 4, HashMap::new(), 10, HashMap::new(), 100))
        .await
        .expect("claim");
    assert_eq!(jobs.len(), 4);
    let record = |i: usize, stale: bool| {
        let job = &jobs[i];
        let msg = msgs
            .iter()
            .find(|m| m.id == job.msg_id)
            .expect("a claimed message");
        let lease = if stale {
            LeaseToken(job.lease.0 + 1_000_000)
        } else {
            job.lease
        };
        store.record_attempt(attempt_record(
            msg,
            &ep,
            lease,
            now,
            TriggerType::Scheduled,
            NextStep::Delivered,
            EndpointChange::Unchanged,
        ))
    };
    let outcomes = tokio::join!(
        record(0, false),
        record(1, true),
        record(2, false),
        record(3, true)
    );
    let outcomes = [outcomes.0, outcomes.1, outcomes.2, outcomes.3].map(|o| o.expect("record"));
    assert_eq!(
        outcomes,
        [
            Recorded::Applied,
            Recorded::Stale,
            Recorded::Applied,
            Recorded::Stale
        ]
    );
    let page = first_page(true);
    for (i, job) in jobs.iter().enumerate() {
        let logged = store
            .list_attempts(
                &app.id,
                &AttemptScope::Message(job.msg_id.clone()),
                &AttemptQuery::default(),
                &page,
            )
            .await
            .expect("attempts");
        assert_eq!(
            logged.len(),
            1,
            "every record is logged, stale or not ({i})"
        );
    }
    let due = store.due_deliveries(now).await.expect("due");
    assert_eq!(
        due.count, 2,
        "the two stale records left their deliveries due"
    );
}

/// The queue an operator watches: every due delivery not finished counts, those being
/// attempted too, and the oldest is dated by when it fell due.
pub async fn due_deliveries_count_the_unfinished_and_date_the_oldest(store: &dyn Store) {
    let app = stored_app(store, "A").await;
    let ep = endpoint(&app.id);
    store.create_endpoint(&ep).await.expect("endpoint");
    let before = Utc::now() - chrono::Duration::seconds(1);
    let empty = store.due_deliveries(before).await.expect("due");
    assert_eq!(empty, crate::DueDeliveries::default(), "nothing queued yet");
    // Both created in the past, so each falls due at its creation (one created in the future
    // falls due at once on PostgreSQL: `first_attempt_due`).
    let mut first = message(&app.id, None);
    first.created_at -= chrono::Duration::milliseconds(500);
    let mut second = message(&app.id, None);
    second.created_at = first.created_at + chrono::Duration::milliseconds(5);
    for msg in [&first, &second] {
        store
            .create_message(msg.clone(), vec![ep.id.clone()])
            .await
            .expect("message");
    }
    let millis = |at: DateTime<Utc>| at.timestamp_millis();
    let now = Utc::now() + chrono::Duration::seconds(1);
    let due = store.due_deliveries(now).await.expect("due");
    assert_eq!(due.count, 2);
    assert_eq!(
        due.oldest_due_at.map(millis),
        Some(millis(first.created_at))
    );
    assert_eq!(
        store.due_deliveries(before).await.expect("due").count,
        0,
        "not due before their time"
    );

    let jobs = store
        .claim_due(&claim(now, 1, HashMap::new(), 10, HashMap::new(), 100))
        .await
        .expect("claim");
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        store.due_deliveries(now).await.expect("due").count,
        2,
        "a delivery being attempted is still in the queue"
    );
    let (msg, rest) = if jobs[0].msg_id == first.id {
        (&first, &second)
    } else {
        (&second, &first)
    };
    let recorded = store
        .record_attempt(attempt_record(
            msg,
            &ep,
            jobs[0].lease,
            now,
            TriggerType::Scheduled,
            NextStep::Delivered,
            EndpointChange::Unchanged,
        ))
        .await
        .expect("record");
    assert_eq!(recorded, Recorded::Applied);
    let due = store.due_deliveries(now).await.expect("due");
    assert_eq!(due.count, 1, "a delivered one leaves the queue");
    assert_eq!(due.oldest_due_at.map(millis), Some(millis(rest.created_at)));
}

/// A stopping node lets go of the claims it never attempted: the delivery is claimable again
/// at once, as the first attempt it still is. A release under a token that no longer holds the
/// delivery (claimed again since) leaves the newer lease alone.
pub async fn a_released_claim_is_claimable_at_once_and_a_stale_release_keeps_the_newer_lease(
    store: &dyn Store,
) {
    let ClaimedDelivery {
        app,
        msg,
        now,
        job: first,
        ..
    } = one_claimed_delivery(store).await;
    let claim_now = || claim(now, 10, HashMap::new(), 10, HashMap::new(), 100);
    let held = store.claim_due(&claim_now()).await.expect("claim");
    assert!(held.is_empty(), "the lease holds the delivery");

    let released = store
        .release_unattempted(std::slice::from_ref(&first))
        .await
        .expect("release");
    assert_eq!(released, 1);
    let due = store.due_deliveries(now).await.expect("due");
    assert_eq!(due.count, 1, "still due, not finished");
    let second = store.claim_due(&claim_now()).await.expect("claim again");
    assert_eq!(
        second.len(),
        1,
        "claimable at once, not when the lease runs out"
    );
    assert_ne!(second[0].lease, first.lease, "each claim has its own token");
    assert_eq!(second[0].attempts, 0, "no attempt was counted");
    assert_eq!(second[0].msg_id, msg.id);

    let stale = store
        .release_unattempted(std::slice::from_ref(&first))
        .await
        .expect("stale release");
    assert_eq!(stale, 0, "the first token no longer holds the delivery");
    let still_held = store.claim_due(&claim_now()).await.expect("claim");
    assert!(still_held.is_empty(), "the newer claim's lease stands");
    let deliveries = store
        .list_message_deliveries(&app.id, &msg.id, &first_page(false))
        .await
        .expect("deliveries");
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].1.status, DeliveryStatus::Sending);
    assert!(
        store.release_unattempted(&[]).await.expect("nothing") == 0,
        "releasing nothing is a no-op"
    );
}

/// A claim whose lease ran out and whose delivery was claimed again is fenced off: its late
/// records are logged (the attempts happened) but change neither the delivery nor the
/// endpoint, before or after the newer claim's record; the newer claim's record applies.
pub async fn a_record_under_a_lapsed_lease_is_logged_but_leaves_the_newer_claims_state(
    store: &dyn Store,
) {
    let ClaimedDelivery {
        app,
        ep,
        msg,
        now,
        job: first,
    } = one_claimed_delivery(store).await;
    // The first claim's 60 s lease has run out by then: the delivery is claimable again.
    let later = now + chrono::Duration::seconds(120);
    let second = store
        .claim_due(&claim(later, 10, HashMap::new(), 10, HashMap::new(), 100))
        .await
        .expect("second claim");
    assert_eq!(
        second.len(),
        1,
        "the lapsed lease no longer holds the delivery"
    );
    assert_ne!(first.lease, second[0].lease, "each claim has its own token");

    let record = |lease: LeaseToken, at: DateTime<Utc>, next, endpoint_change| AttemptRecord {
        attempt: Attempt {
            id: herald_core::AttemptId::new(at),
            msg_id: msg.id.clone(),
            endpoint_id: ep.id.clone(),
            app_id: app.id.clone(),
            url: ep.url.clone(),
            status: if next == NextStep::Delivered {
                DeliveryStatus::Success
            } else {
                DeliveryStatus::Fail
            },
            response_status_code: if next == NextStep::Delivered {
                200
            } else {
                500
            },
            response: String::new(),
            response_duration_ms: 5,
            trigger_type: TriggerType::Scheduled,
            created_at: at,
        },
        next,
        endpoint_change,
        lease,
    };
    let state = || async {
        let deliveries = store
            .list_message_deliveries(&app.id, &msg.id, &first_page(false))
            .await
            .expect("deliveries");
        assert_eq!(deliveries.len(), 1);
        deliveries[0].1
    };

    // The first claim's late result, before the newer claim's: nothing changes.
    let stale = store
        .record_attempt(record(
            first.lease,
            later,
            NextStep::Delivered,
            EndpointChange::Unchanged,
        ))
        .await
        .expect("stale record");
    assert_eq!(stale, Recorded::Stale);
    assert_eq!(
        state().await.status,
        DeliveryStatus::Sending,
        "still in flight under the newer claim, not delivered"
    );

    // The newer claim's result applies.
    let retry_at = later + chrono::Duration::hours(1);
    let applied = store
        .record_attempt(record(
            second[0].lease,
            later,
            NextStep::RetryAt(retry_at),
            EndpointChange::StreakStarted { at: later },
        ))
        .await
        .expect("current record");
    assert_eq!(applied, Recorded::Applied);

    // Another late result of the first claim, after it: still nothing changes.
    let stale = store
        .record_attempt(record(
            first.lease,
            later,
            NextStep::Failed,
            EndpointChange::Disable {
                streak_since: None,
                retry_at: None,
            },
        ))
        .await
        .expect("stale record");
    assert_eq!(stale, Recorded::Stale);
    let now_state = state().await;
    assert_eq!(now_state.status, DeliveryStatus::Pending);
    assert_eq!(
        now_state.next_attempt.map(|at| at.timestamp_millis()),
        Some(retry_at.timestamp_millis()),
        "the newer claim's retry stands"
    );
    let stored = store
        .get_endpoint(&app.id, &ep.id)
        .await
        .expect("read endpoint")
        .expect("endpoint");
    assert!(
        !stored.disabled,
        "a stale record does not disable the endpoint"
    );
    assert_eq!(
        stored.failing_since.map(|at| at.timestamp_millis()),
        Some(later.timestamp_millis())
    );

    let logged = store
        .list_attempts(
            &app.id,
            &AttemptScope::Message(msg.id.clone()),
            &AttemptQuery::default(),
            &first_page(true),
        )
        .await
        .expect("attempts");
    assert_eq!(logged.len(), 3, "every attempt is logged, stale ones too");
}

/// The record of an attempt to `ep`'s delivery of `msg` made under `lease`: failed and retried
/// or given up unless `next` is [`NextStep::Delivered`].
/// An app, an endpoint and a message whose one delivery has just been claimed (at `now`).
struct ClaimedDelivery {
    app: App,
    ep: Endpoint,
    msg: Message,
    now: DateTime<Utc>,
    job: crate::DeliveryJob,
}

/// `enqueue_failed` works in batches of [`crate::RETENTION_BATCH`]: more failed deliveries
/// than two batches are all requeued, and counted once. `fail_all` marks every delivery
/// failed, in the backend's own SQL (no trait method does that in bulk).
pub async fn a_recovery_larger_than_a_batch_requeues_every_failed_delivery<F>(
    store: &dyn Store,
    fail_all: impl FnOnce() -> F,
) where
    F: Future<Output = ()>,
{
    let app = stored_app(store, "recover in batches").await;
    let ep = endpoint(&app.id);
    store.create_endpoint(&ep).await.expect("endpoint");
    let count = crate::RETENTION_BATCH as usize * 2 + 100;
    for _ in 0..count / 100 {
        let writes = (0..100)
            .map(|_| {
                Box::pin(store.create_message(message(&app.id, None), vec![ep.id.clone()]))
                    as Pin<Box<dyn Future<Output = crate::Result<()>> + Send + '_>>
            })
            .collect();
        for result in join_all(writes).await {
            result.expect("create message");
        }
    }
    fail_all().await;
    let now = Utc::now();
    let recovered = store
        .enqueue_failed(
            &ep.id,
            now - chrono::Duration::hours(1),
            now + chrono::Duration::hours(1),
            now,
        )
        .await
        .expect("recover");
    assert_eq!(recovered, count as u64);
    let stats = store
        .endpoint_stats(&ep.id, &StatsWindow::default())
        .await
        .expect("stats");
    assert_eq!((stats.pending, stats.fail), (count as i64, 0));
}

/// An app with one endpoint and `messages` messages to it, none claimed yet.
async fn endpoint_with_messages(store: &dyn Store, messages: usize) -> (App, Endpoint) {
    let app = stored_app(store, "A").await;
    let ep = endpoint(&app.id);
    store.create_endpoint(&ep).await.expect("endpoint");
    for _ in 0..messages {
        store
            .create_message(message(&app.id, None), vec![ep.id.clone()])
            .await
            .expect("message");
    }
    (app, ep)
}

async fn one_claimed_delivery(store: &dyn Store) -> ClaimedDelivery {
    let app = stored_app(store, "A").await;
    let ep = endpoint(&app.id);
    store.create_endpoint(&ep).await.expect("endpoint");
    let msg = message(&app.id, None);
    store
        .create_message(msg.clone(), vec![ep.id.clone()])
        .await
        .expect("message");
    let now = Utc::now() + chrono::Duration::seconds(1);
    let mut jobs = store
        .claim_due(&claim(now, 10, HashMap::new(), 10, HashMap::new(), 100))
        .await
        .expect("claim");
    assert_eq!(jobs.len(), 1, "the one delivery is claimed");
    ClaimedDelivery {
        app,
        ep,
        msg,
        now,
        job: jobs.remove(0),
    }
}

/// [`one_claimed_delivery`], whose attempt failed for good, then its message's payload
/// expunged.
async fn one_failed_delivery_expunged(store: &dyn Store) -> ClaimedDelivery {
    let claimed = one_claimed_delivery(store).await;
    let job = &claimed.job;
    let failed = store
        .record_attempt(job_record(job, job.lease, claimed.now, NextStep::Failed))
        .await
        .expect("record");
    assert_eq!(failed, Recorded::Applied);
    assert!(
        store
            .expunge_payload(&claimed.app.id, claimed.msg.id.as_str())
            .await
            .expect("expunge")
    );
    claimed
}

/// The record of `job`'s attempt made at `at` under `lease`, its endpoint unchanged:
/// delivered (200), or failed (500) for any other next step, as `attempt_record`.
pub fn job_record(
    job: &crate::DeliveryJob,
    lease: LeaseToken,
    at: DateTime<Utc>,
    next: NextStep,
) -> AttemptRecord {
    let attempt = attempt(
        &job.msg_id,
        &job.app_id,
        &job.endpoint,
        at,
        job.trigger,
        next,
    );
    AttemptRecord {
        attempt,
        next,
        endpoint_change: EndpointChange::Unchanged,
        lease,
    }
}

fn attempt_record(
    msg: &Message,
    ep: &Endpoint,
    lease: LeaseToken,
    at: DateTime<Utc>,
    trigger_type: TriggerType,
    next: NextStep,
    endpoint_change: EndpointChange,
) -> AttemptRecord {
    AttemptRecord {
        attempt: attempt(&msg.id, &msg.app_id, ep, at, trigger_type, next),
        next,
        endpoint_change,
        lease,
    }
}

/// An attempt of `msg_id` to `ep` at `at`: delivered (200) if `next` says so, else failed
/// (500).
pub(crate) fn attempt(
    msg_id: &MessageId,
    app_id: &AppId,
    ep: &Endpoint,
    at: DateTime<Utc>,
    trigger_type: TriggerType,
    next: NextStep,
) -> Attempt {
    let delivered = next == NextStep::Delivered;
    Attempt {
        id: herald_core::AttemptId::new(at),
        msg_id: msg_id.clone(),
        endpoint_id: ep.id.clone(),
        app_id: app_id.clone(),
        url: ep.url.clone(),
        status: if delivered {
            DeliveryStatus::Success
        } else {
            DeliveryStatus::Fail
        },
        response_status_code: if delivered { 200 } else { 500 },
        response: String::new(),
        response_duration_ms: 5,
        trigger_type,
        created_at: at,
    }
}

/// `ep`'s delivery of `msg`, as the API reads it.
async fn delivery_state(store: &dyn Store, msg: &Message, ep: &Endpoint) -> crate::DeliveryState {
    let deliveries = store
        .list_message_deliveries(&msg.app_id, &msg.id, &first_page(false))
        .await
        .expect("deliveries");
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].0.id, ep.id);
    deliveries[0].1
}

/// The ids of `msg`'s logged attempts.
async fn logged_attempts(store: &dyn Store, msg: &Message) -> HashSet<String> {
    store
        .list_attempts(
            &msg.app_id,
            &AttemptScope::Message(msg.id.clone()),
            &AttemptQuery::default(),
            &first_page(true),
        )
        .await
        .expect("attempts")
        .into_iter()
        .map(|a| a.id.into_string())
        .collect()
}

/// A resend takes the delivery back from the attempt in flight: that attempt's record, however
/// final, is logged but fenced off (it changes neither the delivery nor the endpoint), and the
/// attempt the API asked for is claimed under a new lease whose record applies.
pub async fn a_resend_during_an_attempt_fences_the_attempts_record(store: &dyn Store) {
    let ClaimedDelivery {
        app,
        ep,
        msg,
        now,
        job: in_flight,
    } = one_claimed_delivery(store).await;
    assert_eq!(
        delivery_state(store, &msg, &ep).await.status,
        DeliveryStatus::Sending
    );

    // The API resends while the attempt is in flight...
    store
        .enqueue_manual(&app.id, &msg.id, &ep.id, now)
        .await
        .expect("resend");
    let resent = delivery_state(store, &msg, &ep).await;
    assert_eq!(
        resent.status,
        DeliveryStatus::Pending,
        "no longer in flight"
    );

    // ...then the attempt fails for good, and would disable the endpoint.
    let given_up = attempt_record(
        &msg,
        &ep,
        in_flight.lease,
        now,
        TriggerType::Scheduled,
        NextStep::Failed,
        EndpointChange::Disable {
            streak_since: None,
            retry_at: None,
        },
    );
    let recorded = store
        .record_attempt(given_up.clone())
        .await
        .expect("record");
    assert_eq!(
        recorded,
        Recorded::Stale,
        "the resend took the delivery back"
    );
    assert!(
        logged_attempts(store, &msg)
            .await
            .contains(given_up.attempt.id.as_str()),
        "the fenced attempt happened, so it is logged"
    );
    let state = delivery_state(store, &msg, &ep).await;
    assert_eq!(state.status, DeliveryStatus::Pending, "not failed");
    assert!(
        state.next_attempt.is_some_and(|at| at <= now),
        "the resend is still due, no later than it was: {:?}",
        state.next_attempt
    );
    let stored = store
        .get_endpoint(&app.id, &ep.id)
        .await
        .expect("read endpoint")
        .expect("endpoint");
    assert!(
        !stored.disabled,
        "a fenced record does not disable the endpoint"
    );
    // Resent during its first attempt, it is still that first attempt, on its schedule.
    assert_eq!(
        store.next_due_at(true).await.expect("next due"),
        state.next_attempt,
        "the resend is due in the first-attempt lane"
    );
    assert_eq!(
        store.next_due_at(false).await.expect("next due"),
        None,
        "and the retry lane has nothing"
    );

    // The resent attempt: a new claim under a new token.
    let manual = store
        .claim_due(&claim(now, 10, HashMap::new(), 10, HashMap::new(), 100))
        .await
        .expect("manual claim");
    assert_eq!(manual.len(), 1, "the resend is claimable");
    assert_eq!(
        manual[0].trigger,
        TriggerType::Scheduled,
        "resent while on its schedule, it stays on it"
    );
    assert_eq!(manual[0].attempts, 0);
    assert_ne!(manual[0].lease, in_flight.lease, "a new lease");
    let delivered = attempt_record(
        &msg,
        &ep,
        manual[0].lease,
        now,
        TriggerType::Scheduled,
        NextStep::Delivered,
        EndpointChange::Unchanged,
    );
    let recorded = store
        .record_attempt(delivered.clone())
        .await
        .expect("manual record");
    assert_eq!(recorded, Recorded::Applied);
    assert_eq!(
        delivery_state(store, &msg, &ep).await.status,
        DeliveryStatus::Success
    );
    assert_eq!(
        logged_attempts(store, &msg).await,
        HashSet::from([
            given_up.attempt.id.into_string(),
            delivered.attempt.id.into_string()
        ])
    );
}

/// A resend of a delivery waiting for its next retry brings that retry forward: it is claimed
/// at once as the schedule's next attempt (scheduled, with the attempts made so far), so a
/// failure goes on with the schedule rather than ending it. Once the schedule is over, a
/// resend is one manual attempt.
pub async fn a_resend_while_a_retry_waits_keeps_the_schedule(store: &dyn Store) {
    let ClaimedDelivery {
        app,
        ep,
        msg,
        now,
        job,
    } = one_claimed_delivery(store).await;
    let retry_lane = || ClaimRequest {
        first_attempts: false,
        ..claim(now, 10, HashMap::new(), 10, HashMap::new(), 100)
    };
    let failed = attempt_record(
        &msg,
        &ep,
        job.lease,
        now,
        TriggerType::Scheduled,
        NextStep::RetryAt(now + chrono::Duration::hours(1)),
        EndpointChange::Unchanged,
    );
    assert_eq!(
        store.record_attempt(failed).await.expect("record"),
        Recorded::Applied
    );
    assert!(
        store
            .claim_due(&retry_lane())
            .await
            .expect("claim")
            .is_empty(),
        "the retry waits an hour"
    );

    store
        .enqueue_manual(&app.id, &msg.id, &ep.id, now)
        .await
        .expect("resend");
    let state = delivery_state(store, &msg, &ep).await;
    assert_eq!(state.status, DeliveryStatus::Pending);
    assert_eq!(
        state.next_attempt.map(|at| at.timestamp_millis()),
        Some(now.timestamp_millis()),
        "brought forward to now"
    );
    let resent = store.claim_due(&retry_lane()).await.expect("claim");
    assert_eq!(resent.len(), 1);
    assert_eq!(
        resent[0].trigger,
        TriggerType::Scheduled,
        "still on its schedule"
    );
    assert_eq!(resent[0].attempts, 1, "with the attempt made before");

    // The schedule gives up on it; a resend now is a manual attempt.
    let given_up = attempt_record(
        &msg,
        &ep,
        resent[0].lease,
        now,
        TriggerType::Scheduled,
        NextStep::Failed,
        EndpointChange::Unchanged,
    );
    assert_eq!(
        store.record_attempt(given_up).await.expect("record"),
        Recorded::Applied
    );
    assert_eq!(
        delivery_state(store, &msg, &ep).await.status,
        DeliveryStatus::Fail
    );
    store
        .enqueue_manual(&app.id, &msg.id, &ep.id, now)
        .await
        .expect("resend");
    let manual = store.claim_due(&retry_lane()).await.expect("claim");
    assert_eq!(manual.len(), 1);
    assert_eq!(manual[0].trigger, TriggerType::Manual);
}

/// Recovering an endpoint's failed deliveries leaves failed those whose message's payload was
/// expunged or is past its time: a retry never sends `{"expired":true}` (a resend by hand is
/// refused with `missing_payload` for the same reason).
pub async fn a_recovery_leaves_failed_the_messages_whose_payload_expired(store: &dyn Store) {
    let ClaimedDelivery {
        app, ep, msg, now, ..
    } = one_failed_delivery_expunged(store).await;
    // Another message to the endpoint, failed too, whose payload is still there.
    let kept = message(&app.id, None);
    store
        .create_message(kept.clone(), vec![ep.id.clone()])
        .await
        .expect("message");
    let later = now + chrono::Duration::seconds(1);
    let jobs = store
        .claim_due(&claim(later, 10, HashMap::new(), 10, HashMap::new(), 100))
        .await
        .expect("claim");
    assert_eq!(jobs.len(), 1);
    let failed = store
        .record_attempt(job_record(&jobs[0], jobs[0].lease, later, NextStep::Failed))
        .await
        .expect("record");
    assert_eq!(failed, Recorded::Applied);

    let recovered = store
        .enqueue_failed(
            &ep.id,
            msg.created_at - chrono::Duration::seconds(1),
            later + chrono::Duration::seconds(1),
            later,
        )
        .await
        .expect("recover");
    assert_eq!(recovered, 1, "only the message with its payload");
    assert_eq!(
        delivery_state(store, &msg, &ep).await.status,
        DeliveryStatus::Fail
    );
    assert_eq!(
        delivery_state(store, &kept, &ep).await.status,
        DeliveryStatus::Pending
    );
}

/// A resend of a message whose payload was expunged, or is past its retention, or of a message
/// gone, queues nothing and says so: the store checks in the statement that queues, so the API
/// refuses it (`missing_payload`) even when the expunge committed after it read the message.
pub async fn a_resend_queues_nothing_for_a_message_without_its_payload(store: &dyn Store) {
    let ClaimedDelivery {
        app, ep, msg, now, ..
    } = one_failed_delivery_expunged(store).await;
    assert!(
        !store
            .enqueue_manual(&app.id, &msg.id, &ep.id, now)
            .await
            .expect("resend"),
        "an expunged payload is not sent again"
    );
    assert_eq!(
        delivery_state(store, &msg, &ep).await.status,
        DeliveryStatus::Fail
    );

    // Past its retention, its deliveries done (the sweep has not expunged it yet).
    let past = Message {
        payload_expires_at: Some(now - chrono::Duration::seconds(1)),
        ..message(&app.id, None)
    };
    store
        .create_message(past.clone(), Vec::new())
        .await
        .expect("message");
    let kept = message(&app.id, None);
    store
        .create_message(kept.clone(), Vec::new())
        .await
        .expect("message");
    let other_app = stored_app(store, "B").await;
    for (who, msg_id, app_id) in [
        ("past its retention", &past.id, &app.id),
        ("in another app", &kept.id, &other_app.id),
        ("unknown", &MessageId::new(now), &app.id),
    ] {
        assert!(
            !store
                .enqueue_manual(app_id, msg_id, &ep.id, now)
                .await
                .expect("resend"),
            "a message {who} is not sent"
        );
    }
    assert!(
        store
            .enqueue_manual(&app.id, &kept.id, &ep.id, now)
            .await
            .expect("resend"),
        "a message with its payload is queued"
    );
    // Manual attempts are claimed in the retry lane.
    let jobs = store
        .claim_due(&ClaimRequest {
            first_attempts: false,
            ..claim(
                now + chrono::Duration::seconds(1),
                10,
                HashMap::new(),
                10,
                HashMap::new(),
                100,
            )
        })
        .await
        .expect("claim");
    assert_eq!(
        jobs.iter().map(|job| &job.msg_id).collect::<Vec<_>>(),
        [&kept.id],
        "only the message with its payload is due"
    );
}

/// Recovering an endpoint's failed deliveries queues each for a manual attempt, claimed under a
/// new lease whose record applies; a late record of the claim that failed it changes nothing.
pub async fn a_recovered_delivery_is_claimed_under_a_new_lease_whose_record_applies(
    store: &dyn Store,
) {
    let ClaimedDelivery {
        ep,
        msg,
        now,
        job: first,
        ..
    } = one_claimed_delivery(store).await;
    let failed = store
        .record_attempt(attempt_record(
            &msg,
            &ep,
            first.lease,
            now,
            TriggerType::Scheduled,
            NextStep::Failed,
            EndpointChange::Unchanged,
        ))
        .await
        .expect("record");
    assert_eq!(failed, Recorded::Applied);
    assert_eq!(
        delivery_state(store, &msg, &ep).await.status,
        DeliveryStatus::Fail
    );

    let recovered = store
        .enqueue_failed(
            &ep.id,
            msg.created_at - chrono::Duration::seconds(1),
            now + chrono::Duration::seconds(1),
            now,
        )
        .await
        .expect("recover");
    assert_eq!(recovered, 1);
    assert_eq!(
        delivery_state(store, &msg, &ep).await.status,
        DeliveryStatus::Pending
    );

    // A repeated record of the first claim is fenced off.
    let late = store
        .record_attempt(attempt_record(
            &msg,
            &ep,
            first.lease,
            now,
            TriggerType::Scheduled,
            NextStep::Failed,
            EndpointChange::Unchanged,
        ))
        .await
        .expect("late record");
    assert_eq!(late, Recorded::Stale);
    assert_eq!(
        delivery_state(store, &msg, &ep).await.status,
        DeliveryStatus::Pending,
        "still queued for the manual attempt"
    );

    let manual = store
        .claim_due(&ClaimRequest {
            first_attempts: false,
            ..claim(now, 10, HashMap::new(), 10, HashMap::new(), 100)
        })
        .await
        .expect("manual claim");
    assert_eq!(manual.len(), 1, "the recovered delivery is claimable");
    assert_eq!(manual[0].trigger, TriggerType::Manual);
    assert_ne!(manual[0].lease, first.lease, "a new lease");
    let recorded = store
        .record_attempt(attempt_record(
            &msg,
            &ep,
            manual[0].lease,
            now,
            TriggerType::Manual,
            NextStep::Delivered,
            EndpointChange::Unchanged,
        ))
        .await
        .expect("manual record");
    assert_eq!(recorded, Recorded::Applied);
    assert_eq!(
        delivery_state(store, &msg, &ep).await.status,
        DeliveryStatus::Success
    );
    assert_eq!(logged_attempts(store, &msg).await.len(), 3);
}

/// An endpoint's statistics count each of its deliveries once, by status (one under a live
/// lease is sending), and its deliveries list by status; another endpoint's deliveries count
/// for neither. Successes are kept out of SQLite's status index (migration 0015) and counted as
/// the endpoint's total less the rest, so every status is checked beside the others.
pub async fn an_endpoints_stats_and_delivery_lists_count_each_status(store: &dyn Store) {
    use herald_core::model::EndpointStats;

    let app = stored_app(store, "A").await;
    let ep = endpoint(&app.id);
    store.create_endpoint(&ep).await.expect("endpoint");
    for _ in 0..4 {
        store
            .create_message(message(&app.id, None), vec![ep.id.clone()])
            .await
            .expect("message");
    }
    let now = Utc::now() + chrono::Duration::seconds(1);
    let jobs = store
        .claim_due(&claim(now, 3, HashMap::new(), 10, HashMap::new(), 100))
        .await
        .expect("claim");
    assert_eq!(jobs.len(), 3);
    for (job, next) in jobs.iter().zip([NextStep::Delivered, NextStep::Failed]) {
        let recorded = store
            .record_attempt(job_record(job, job.lease, now, next))
            .await
            .expect("record");
        assert_eq!(recorded, Recorded::Applied);
    }
    // Made after the claim, so none of the claimed deliveries is its.
    let other = endpoint(&app.id);
    store.create_endpoint(&other).await.expect("other endpoint");
    store
        .create_message(message(&app.id, None), vec![other.id.clone()])
        .await
        .expect("other's message");

    let stats = store
        .endpoint_stats(&ep.id, &StatsWindow::default())
        .await
        .expect("stats");
    let expected = EndpointStats {
        success: 1,
        pending: 1,
        sending: 1,
        fail: 1,
    };
    assert_eq!(stats, expected);
    let others = store
        .endpoint_stats(&other.id, &StatsWindow::default())
        .await
        .expect("other's stats");
    assert_eq!(
        others,
        EndpointStats {
            pending: 1,
            ..EndpointStats::default()
        }
    );
    // A window counts the deliveries of the messages created in it, leased ones included:
    // every message above was made before `now`.
    let window = |since, until| StatsWindow { since, until };
    for (range, counted) in [
        (window(None, Some(now)), expected),
        (
            window(Some(now - chrono::Duration::hours(1)), None),
            expected,
        ),
        (window(Some(now), None), EndpointStats::default()),
        (
            window(None, Some(now - chrono::Duration::hours(1))),
            EndpointStats::default(),
        ),
    ] {
        let stats = store.endpoint_stats(&ep.id, &range).await.expect("stats");
        assert_eq!(stats, counted, "{range:?}");
    }

    let listed = |status: Option<DeliveryStatus>| {
        let query = crate::DeliveryQuery {
            status,
            ..Default::default()
        };
        let (app_id, ep_id) = (app.id.clone(), ep.id.clone());
        async move {
            let mut ids: Vec<String> = store
                .list_endpoint_deliveries(&app_id, &ep_id, &query, &first_page(true))
                .await
                .expect("list")
                .into_iter()
                .map(|(message, state)| {
                    if let Some(status) = status {
                        assert_eq!(state.status, status, "{}", message.id.as_str());
                    }
                    message.id.into_string()
                })
                .collect();
            ids.sort();
            ids
        }
    };
    let id = |job: &crate::DeliveryJob| vec![job.msg_id.as_str().to_owned()];
    assert_eq!(listed(Some(DeliveryStatus::Success)).await, id(&jobs[0]));
    assert_eq!(listed(Some(DeliveryStatus::Fail)).await, id(&jobs[1]));
    assert_eq!(listed(Some(DeliveryStatus::Sending)).await, id(&jobs[2]));
    let pending = listed(Some(DeliveryStatus::Pending)).await;
    assert_eq!(pending.len(), 1);
    assert!(!jobs.iter().any(|job| job.msg_id.as_str() == pending[0]));
    assert_eq!(listed(None).await.len(), 4);

    // Recovering the failed delivery moves it from fail to pending in both.
    let recovered = store
        .enqueue_failed(
            &ep.id,
            now - chrono::Duration::minutes(1),
            now + chrono::Duration::minutes(1),
            now,
        )
        .await
        .expect("recover");
    assert_eq!(recovered, 1);
    let stats = store
        .endpoint_stats(&ep.id, &StatsWindow::default())
        .await
        .expect("stats");
    assert_eq!(
        stats,
        EndpointStats {
            pending: 2,
            fail: 0,
            ..expected
        }
    );
    assert!(listed(Some(DeliveryStatus::Fail)).await.is_empty());
}

/// Attempts in flight together read the endpoint's streak when they were claimed: one that
/// decides to disable the endpoint for a streak a success has ended meanwhile, or that a new
/// streak has replaced, leaves it enabled; one whose streak still stands, or a 410 Gone,
/// disables it.
pub async fn a_disable_for_a_streak_that_ended_meanwhile_leaves_the_endpoint_enabled(
    store: &dyn Store,
) {
    let (app, ep) = endpoint_with_messages(store, 5).await;
    let now = Utc::now() + chrono::Duration::seconds(1);
    let jobs = store
        .claim_due(&claim(now, 10, HashMap::new(), 10, HashMap::new(), 100))
        .await
        .expect("claim");
    assert_eq!(jobs.len(), 5, "every delivery in flight at once");
    let first_streak = now - chrono::Duration::days(6);
    let second_streak = now - chrono::Duration::days(1);
    let disabled = || async {
        store
            .get_endpoint(&app.id, &ep.id)
            .await
            .expect("read")
            .expect("endpoint")
            .disabled
    };
    let apply = |job: &crate::DeliveryJob, next: NextStep, change: EndpointChange| {
        let msg = Message {
            id: job.msg_id.clone(),
            ..message(&app.id, None)
        };
        store.record_attempt(attempt_record(
            &msg,
            &ep,
            job.lease,
            now,
            TriggerType::Scheduled,
            next,
            change,
        ))
    };
    // Were the disable declined, the delivery would be retried in an hour.
    let retry_at = now + chrono::Duration::hours(1);
    let since = |at: DateTime<Utc>| EndpointChange::Disable {
        streak_since: Some(at),
        retry_at: Some(retry_at),
    };
    let outcomes = [
        (
            NextStep::RetryAt(now),
            EndpointChange::StreakStarted { at: first_streak },
        ),
        (NextStep::Delivered, EndpointChange::StreakEnded),
        (NextStep::Failed, since(first_streak)),
    ];
    for (job, (next, change)) in jobs.iter().zip(outcomes) {
        assert_eq!(
            apply(job, next, change).await.expect("record"),
            Recorded::Applied
        );
    }
    assert!(!disabled().await, "the streak it was failing for had ended");
    let declined = Message {
        id: jobs[2].msg_id.clone(),
        ..message(&app.id, None)
    };
    let state = delivery_state(store, &declined, &ep).await;
    assert_eq!(
        (
            state.status,
            state.next_attempt.map(|at| at.timestamp_millis())
        ),
        (DeliveryStatus::Pending, Some(retry_at.timestamp_millis())),
        "the failure whose disable was declined is retried on its schedule"
    );

    let outcomes = [
        (
            NextStep::RetryAt(now),
            EndpointChange::StreakStarted { at: second_streak },
        ),
        (NextStep::Failed, since(first_streak)),
    ];
    for (job, (next, change)) in jobs[3..].iter().zip(outcomes) {
        assert_eq!(
            apply(job, next, change).await.expect("record"),
            Recorded::Applied
        );
    }
    assert!(
        !disabled().await,
        "a newer streak is not the one it was failing for"
    );

    let mut request = claim(now, 10, HashMap::new(), 10, HashMap::new(), 100);
    request.first_attempts = false;
    let retry = store
        .claim_due(&request)
        .await
        .expect("claim")
        .into_iter()
        .next()
        .expect("a retry due");
    assert_eq!(
        apply(&retry, NextStep::Failed, since(second_streak))
            .await
            .expect("record"),
        Recorded::Applied
    );
    assert!(
        disabled().await,
        "failing since the streak that still stands"
    );

    // 410 Gone disables at once, with no streak at all.
    let gone = endpoint(&app.id);
    store.create_endpoint(&gone).await.expect("endpoint");
    let msg = message(&app.id, None);
    store
        .create_message(msg.clone(), vec![gone.id.clone()])
        .await
        .expect("message");
    let job = store
        .claim_due(&claim(now, 10, HashMap::new(), 10, HashMap::new(), 100))
        .await
        .expect("claim")
        .into_iter()
        .find(|job| job.endpoint.id == gone.id)
        .expect("its delivery");
    let record = attempt_record(
        &msg,
        &gone,
        job.lease,
        now,
        TriggerType::Scheduled,
        NextStep::Failed,
        EndpointChange::Disable {
            streak_since: None,
            retry_at: None,
        },
    );
    assert_eq!(
        store.record_attempt(record).await.expect("record"),
        Recorded::Applied
    );
    let stored = store
        .get_endpoint(&app.id, &gone.id)
        .await
        .expect("read")
        .expect("endpoint");
    assert!(stored.disabled, "gone");
}

/// An endpoint update is a compare-and-set on the `updated_at` it was read with: one prepared
/// before the worker disabled the endpoint conflicts instead of re-enabling it, and one
/// prepared before the worker started a failure streak keeps the streak. Read again, it goes in.
pub async fn an_endpoint_update_read_before_the_workers_disable_conflicts(store: &dyn Store) {
    let app = stored_app(store, "A").await;
    let ep = endpoint(&app.id);
    store.create_endpoint(&ep).await.expect("endpoint");
    let read = store
        .get_endpoint(&app.id, &ep.id)
        .await
        .expect("read")
        .expect("endpoint");

    // The worker records a failure that starts a streak, then one that disables the endpoint.
    let msg = message(&app.id, None);
    store
        .create_message(msg.clone(), vec![ep.id.clone()])
        .await
        .expect("message");
    let mut now = Utc::now() + chrono::Duration::seconds(1);
    for (next, change) in [
        (
            NextStep::RetryAt(now),
            EndpointChange::StreakStarted { at: now },
        ),
        (
            NextStep::Failed,
            EndpointChange::Disable {
                streak_since: Some(now),
                retry_at: None,
            },
        ),
    ] {
        let mut request = claim(now, 10, HashMap::new(), 10, HashMap::new(), 100);
        request.first_attempts = next != NextStep::Failed;
        let jobs = store.claim_due(&request).await.expect("claim");
        assert_eq!(jobs.len(), 1);
        let recorded = store
            .record_attempt(AttemptRecord {
                attempt: Attempt {
                    id: herald_core::AttemptId::new(now),
                    msg_id: msg.id.clone(),
                    endpoint_id: ep.id.clone(),
                    app_id: app.id.clone(),
                    url: ep.url.clone(),
                    status: DeliveryStatus::Fail,
                    response_status_code: 500,
                    response: String::new(),
                    response_duration_ms: 5,
                    trigger_type: TriggerType::Scheduled,
                    created_at: now,
                },
                next,
                endpoint_change: change,
                lease: jobs[0].lease,
            })
            .await
            .expect("record");
        assert_eq!(recorded, Recorded::Applied);
        if !matches!(change, EndpointChange::Disable { .. }) {
            // A streak alone leaves `updated_at`: an update read before it still goes in and
            // keeps the streak.
            let mut early = read.clone();
            early.description = "renamed".into();
            early.updated_at = read.updated_at + chrono::Duration::milliseconds(1);
            store
                .update_endpoint(&early, read.updated_at)
                .await
                .expect("update before any disable");
            let stored = store
                .get_endpoint(&app.id, &ep.id)
                .await
                .expect("read")
                .expect("endpoint");
            assert_eq!(
                stored.failing_since.map(|at| at.timestamp_millis()),
                Some(now.timestamp_millis()),
                "the update keeps the worker's streak"
            );
        }
        now += chrono::Duration::seconds(1);
    }

    // A PATCH of the description, prepared from the copy read before the disable.
    let reread = store
        .get_endpoint(&app.id, &ep.id)
        .await
        .expect("read")
        .expect("endpoint");
    assert!(reread.disabled);
    let mut stale = read.clone();
    stale.description = "renamed again".into();
    stale.updated_at = now;
    let refused = store.update_endpoint(&stale, read.updated_at).await;
    assert!(
        matches!(&refused, Err(StoreError::Conflict(why)) if why == ENDPOINT_CHANGED),
        "{refused:?}"
    );
    let stored = store
        .get_endpoint(&app.id, &ep.id)
        .await
        .expect("read")
        .expect("endpoint");
    assert!(stored.disabled, "the worker's disable stands");
    assert_eq!(stored.description, "renamed");

    // Read again, the same change goes in, and leaves the endpoint disabled.
    let mut fresh = stored.clone();
    fresh.description = "renamed again".into();
    fresh.updated_at = now + chrono::Duration::seconds(1);
    store
        .update_endpoint(&fresh, stored.updated_at)
        .await
        .expect("update after reading again");
    let stored = store
        .get_endpoint(&app.id, &ep.id)
        .await
        .expect("read")
        .expect("endpoint");
    assert!(stored.disabled);
    assert_eq!(stored.description, "renamed again");

    // An update of an endpoint that is gone is `NotFound`, not a conflict.
    assert!(
        store
            .delete_endpoint(&app.id, &ep.id)
            .await
            .expect("delete")
    );
    assert!(matches!(
        store.update_endpoint(&fresh, fresh.updated_at).await,
        Err(StoreError::NotFound)
    ));
}

/// Appends advance the channel's position and trim it to its retention; concurrent appends to
/// different channels do not disturb each other's order.
/// An event's `except` (its sender) is kept with it, so one read back for live subscribers
/// still leaves its sender out.
pub async fn history_keeps_the_socket_each_event_must_not_reach(store: &dyn Store) {
    let app = stored_app(store, "except").await;
    for except in [Some("1.1"), None] {
        store
            .append_history(NewHistoryEntry {
                except: except.map(str::to_owned),
                ..history_entry(&app.id, "history-x", "x", KEEP_ALL)
            })
            .await
            .expect("append");
    }
    let kept: Vec<Option<String>> = store
        .history(&app.id, "history-x", &all_history())
        .await
        .expect("history")
        .into_iter()
        .map(|e| e.except)
        .collect();
    assert_eq!(kept, [Some("1.1".to_owned()), None]);
}

pub async fn history_appends_advance_the_position_and_trim_to_the_retention(store: &dyn Store) {
    let app = stored_app(store, "A").await;
    let retention = Retention {
        max_events: 3,
        max_age: Duration::from_secs(3600),
    };
    let epoch = "e1";
    let reset = store
        .reset_history(&app.id, "history-x", epoch)
        .await
        .expect("reset");
    assert_eq!(
        reset,
        ChannelPosition {
            epoch: epoch.into(),
            next_offset: 1
        }
    );
    let mut y_epoch = None;
    for offset in 1..=32 {
        let (a, b) = tokio::join!(
            store.append_history(history_entry(&app.id, "history-x", "x", retention)),
            store.append_history(history_entry(&app.id, "history-y", "y", retention)),
        );
        let (a, b) = (a.expect("append x"), b.expect("append y"));
        assert_eq!(
            a,
            Position {
                epoch: epoch.into(),
                offset
            }
        );
        assert_eq!(b.offset, offset);
        let y_epoch = y_epoch.get_or_insert_with(|| b.epoch.clone());
        assert_eq!(&b.epoch, y_epoch, "a channel keeps its epoch");
    }
    assert_ne!(
        y_epoch.as_deref(),
        Some(epoch),
        "a new channel gets a new epoch"
    );
    let position = store
        .channel_position(&app.id, "history-x")
        .await
        .expect("read")
        .expect("position");
    assert_eq!(
        position,
        ChannelPosition {
            epoch: epoch.into(),
            next_offset: 33
        }
    );
    let all = store
        .history(&app.id, "history-x", &all_history())
        .await
        .expect("history");
    let offsets: Vec<u64> = all.iter().map(|e| e.offset).collect();
    assert_eq!(
        offsets,
        [30, 31, 32],
        "trimmed at offset 32 to the last three"
    );
    assert_eq!(
        store
            .oldest_history_offset(&app.id, "history-y", DateTime::<Utc>::MIN_UTC)
            .await
            .expect("oldest"),
        Some(30)
    );
}

/// The trim at every `TRIM_EVERY`th offset deletes the entries older than the retention's age
/// (not only those past its count) and keeps the rest.
pub async fn history_trims_delete_the_entries_past_their_age(store: &dyn Store) {
    let app = stored_app(store, "A").await;
    let retention = Retention {
        max_events: 1000,
        max_age: Duration::from_secs(3600),
    };
    let two_hours_ago = Utc::now() - chrono::Duration::hours(2);
    for n in 1..=16 {
        let mut entry = history_entry(&app.id, "history-aged", &n.to_string(), retention);
        if n <= 5 {
            entry.created_at = two_hours_ago;
        }
        let position = store.append_history(entry).await.expect("append");
        assert_eq!(position.offset, n);
    }
    assert_eq!(
        store
            .oldest_history_offset(&app.id, "history-aged", DateTime::<Utc>::MIN_UTC)
            .await
            .expect("oldest"),
        Some(6),
        "the trim at offset 16 deleted the five entries past the age limit"
    );
    let offsets: Vec<u64> = kept(store, &app.id, "history-aged")
        .await
        .iter()
        .map(|(position, _)| position.offset)
        .collect();
    assert_eq!(offsets, (6..=16).collect::<Vec<u64>>());
}

/// A publication whose message conflicts (`eventId`) commits none of its history entries; one
/// that does not commits both.
pub async fn a_conflicting_publication_commits_no_history(store: &dyn Store) {
    let app = stored_app(store, "A").await;
    let first = store
        .store_publication(
            Some((message(&app.id, Some("evt-1")), vec![])),
            vec![history_entry(&app.id, "history-p", "first", KEEP_ALL)],
        )
        .await
        .expect("first");
    let again = store
        .store_publication(
            Some((message(&app.id, Some("evt-1")), vec![])),
            vec![history_entry(&app.id, "history-p", "again", KEEP_ALL)],
        )
        .await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    assert_eq!(
        kept(store, &app.id, "history-p").await,
        [(first[0].clone(), "first".to_owned())]
    );
}

/// One channel's offsets are assigned from 1, gap-free, in the order of the calls and of the
/// entries within a call; each returned position is where the event is read back, and the
/// channel's position is past the last.
pub async fn offsets_are_assigned_gap_free_in_call_order(store: &dyn Store) {
    let app = stored_app(store, "A").await;
    let mut returned = Vec::new();
    for n in 0..4 {
        let positions = store
            .store_publication(
                Some((message(&app.id, None), vec![])),
                vec![
                    history_entry(&app.id, "history-o", &format!("{n}a"), KEEP_ALL),
                    history_entry(&app.id, "history-other", &format!("{n}"), KEEP_ALL),
                    history_entry(&app.id, "history-o", &format!("{n}b"), KEEP_ALL),
                ],
            )
            .await
            .expect("publish");
        assert_eq!(positions.len(), 3, "a position for every entry");
        assert_eq!(positions[1].offset, n + 1, "the other channel counts alone");
        returned.push((positions[0].clone(), format!("{n}a")));
        returned.push((positions[2].clone(), format!("{n}b")));
    }
    let positions = store
        .store_publication(
            None,
            vec![history_entry(&app.id, "history-o", "last", KEEP_ALL)],
        )
        .await
        .expect("publish without a message");
    returned.push((positions[0].clone(), "last".to_owned()));
    assert_eq!(
        returned.iter().map(|(p, _)| p.offset).collect::<Vec<_>>(),
        (1..=9).collect::<Vec<_>>()
    );
    let epoch = &returned[0].0.epoch;
    assert!(
        returned.iter().all(|(p, _)| &p.epoch == epoch),
        "{returned:?}"
    );
    assert_eq!(kept(store, &app.id, "history-o").await, returned);
    assert_eq!(
        store
            .channel_position(&app.id, "history-o")
            .await
            .expect("read"),
        Some(ChannelPosition {
            epoch: epoch.clone(),
            next_offset: 10
        })
    );
}

/// Concurrent publications on one channel get each offset exactly once, whatever order they
/// commit in, and so do those on a second channel beside them.
pub async fn concurrent_publications_get_each_offset_once(store: &dyn Store) {
    const ON_FIRST: u64 = 64;
    const ON_SECOND: u64 = 16;
    let app = stored_app(store, "A").await;
    let channels: Vec<&str> = (0..ON_FIRST)
        .map(|_| "history-busy")
        .chain((0..ON_SECOND).map(|_| "history-beside"))
        .collect();
    let publications = channels
        .iter()
        .enumerate()
        .map(|(n, channel)| {
            let entry = history_entry(&app.id, channel, &n.to_string(), KEEP_ALL);
            let message = Some((message(&app.id, None), vec![]));
            Box::pin(store.store_publication(message, vec![entry]))
                as Pin<Box<dyn Future<Output = crate::Result<Vec<Position>>> + Send + '_>>
        })
        .collect();
    let results = join_all(publications).await;
    for (channel, count) in [("history-busy", ON_FIRST), ("history-beside", ON_SECOND)] {
        let mut offsets = HashSet::new();
        let mut returned = Vec::new();
        for (n, result) in results.iter().enumerate() {
            if channels[n] != channel {
                continue;
            }
            let positions = result.as_ref().expect("publish");
            assert_eq!(positions.len(), 1);
            assert!(offsets.insert(positions[0].offset), "offset given twice");
            returned.push((positions[0].clone(), n.to_string()));
        }
        assert_eq!(offsets, (1..=count).collect::<HashSet<_>>(), "{channel}");
        returned.sort_by_key(|(p, _)| p.offset);
        assert_eq!(kept(store, &app.id, channel).await, returned, "{channel}");
        let position = store
            .channel_position(&app.id, channel)
            .await
            .expect("read")
            .expect("position");
        assert_eq!(position.next_offset, count + 1, "{channel}");
        assert_eq!(position.epoch, returned[0].0.epoch, "{channel}");
    }
}

/// A publication whose message conflicts consumes no offset: the next one gets the offset
/// after the last kept event.
pub async fn a_conflicting_publication_consumes_no_offset(store: &dyn Store) {
    let app = stored_app(store, "A").await;
    let publish = |event_id: Option<&'static str>, data: &'static str| {
        store.store_publication(
            Some((message(&app.id, event_id), vec![])),
            vec![history_entry(&app.id, "history-c", data, KEEP_ALL)],
        )
    };
    let first = publish(Some("evt-1"), "first").await.expect("first");
    assert_eq!(first[0].offset, 1);
    // Concurrently too: the conflicting write may share the batch with the next one.
    let (again, next) = tokio::join!(publish(Some("evt-1"), "again"), publish(None, "next"));
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    let next = next.expect("next");
    assert_eq!(next[0].offset, 2);
    let last = publish(Some("evt-2"), "last").await.expect("last");
    assert_eq!(last[0].offset, 3);
    assert_eq!(
        kept(store, &app.id, "history-c")
            .await
            .into_iter()
            .map(|(p, data)| (p.offset, data))
            .collect::<Vec<_>>(),
        [(1, "first".into()), (2, "next".into()), (3, "last".into())]
    );
    assert_eq!(
        store
            .channel_position(&app.id, "history-c")
            .await
            .expect("read")
            .map(|p| p.next_offset),
        Some(4)
    );
}

/// `queue_publication` fixes a write's place before its commit: publications queued one after
/// another, none awaited yet, take one channel's offsets in the order queued, and one in the
/// middle that conflicts consumes none, so the ones after it close the gap.
pub async fn queued_publications_take_offsets_in_queue_order(store: &dyn Store) {
    let app = stored_app(store, "A").await;
    store
        .store_publication(Some((message(&app.id, Some("evt-taken")), vec![])), vec![])
        .await
        .expect("the message a later publication conflicts with");
    let mut commits = Vec::new();
    for n in 0..8 {
        let event_id = (n == 3).then_some("evt-taken");
        let commit = store
            .queue_publication(
                Some((message(&app.id, event_id), vec![])),
                vec![history_entry(
                    &app.id,
                    "history-q",
                    &n.to_string(),
                    KEEP_ALL,
                )],
            )
            .await;
        commits.push((n, commit));
    }
    let mut committed = Vec::new();
    for (n, commit) in commits {
        // PostgreSQL reports the conflict as it queues (it commits there), SQLite with the
        // commit.
        let outcome = match commit {
            Ok(commit) => commit.await,
            Err(e) => Err(e),
        };
        if n == 3 {
            assert!(
                matches!(outcome, Err(StoreError::Conflict(_))),
                "{outcome:?}"
            );
        } else {
            let positions = outcome.expect("committed");
            committed.push((positions[0].offset, n.to_string()));
        }
    }
    let expected: Vec<(u64, String)> = [0, 1, 2, 4, 5, 6, 7]
        .iter()
        .zip(1..)
        .map(|(n, offset)| (offset, n.to_string()))
        .collect();
    assert_eq!(
        committed, expected,
        "queue order, no gap where the conflict was"
    );
    assert_eq!(
        kept(store, &app.id, "history-q")
            .await
            .into_iter()
            .map(|(p, data)| (p.offset, data))
            .collect::<Vec<_>>(),
        expected
    );
}

fn source(app_id: &AppId) -> IngestSource {
    let now = Utc::now();
    IngestSource {
        id: herald_core::SourceId::new(now),
        app_id: app_id.clone(),
        uid: None,
        name: "Stripe".into(),
        kind: herald_core::ingest::SourceKind::Stripe,
        secrets: vec!["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()],
        hmac: None,
        tolerance_secs: 300,
        event_type: vec![],
        channels: vec![],
        default_channel: None,
        trust_unsigned_headers: false,
        created_at: now,
        updated_at: now,
    }
}

/// Two changes of a source prepared from one read (one removing a leaked secret, one setting
/// its channels): the first goes in, the second is refused (`SOURCE_CHANGED`) rather than
/// putting the leaked secret back; read again, it goes in. A deleted source is `NotFound`.
async fn a_source_update_from_an_out_of_date_copy_is_refused(store: &dyn Store) {
    let app = stored_app(store, "A").await;
    let made = source(&app.id);
    store.create_source(&made).await.expect("source");
    let read = store
        .get_source(&app.id, made.id.as_str())
        .await
        .expect("read")
        .expect("source");
    let later = read.updated_at + chrono::Duration::milliseconds(1);
    let rotated = IngestSource {
        secrets: vec!["whsec_new".into()],
        updated_at: later,
        ..read.clone()
    };
    store
        .update_source(&rotated, read.updated_at)
        .await
        .expect("the first change");
    let routed = IngestSource {
        channels: vec!["orders".into()],
        updated_at: later,
        ..read.clone()
    };
    let refused = store.update_source(&routed, read.updated_at).await;
    assert!(
        matches!(&refused, Err(StoreError::Conflict(why)) if why == crate::SOURCE_CHANGED),
        "{refused:?}"
    );
    let stored = store
        .get_source(&app.id, made.id.as_str())
        .await
        .expect("read")
        .expect("source");
    assert_eq!(stored.secrets, ["whsec_new"], "the leaked secret stays out");
    assert!(stored.channels.is_empty());

    let again = IngestSource {
        channels: vec!["orders".into()],
        updated_at: later + chrono::Duration::milliseconds(1),
        ..stored.clone()
    };
    store
        .update_source(&again, stored.updated_at)
        .await
        .expect("read again, it goes in");
    let stored = store
        .get_source(&app.id, made.id.as_str())
        .await
        .expect("read")
        .expect("source");
    assert_eq!(
        (stored.secrets.as_slice(), stored.channels.as_slice()),
        (
            ["whsec_new".to_owned()].as_slice(),
            ["orders".to_owned()].as_slice()
        )
    );

    assert!(
        store
            .delete_source(&app.id, &made.id)
            .await
            .expect("delete")
    );
    let gone = store.update_source(&again, stored.updated_at).await;
    assert!(matches!(gone, Err(StoreError::NotFound)), "{gone:?}");
}

/// Every webhook posted to a source finds it by id (a store may keep what it found): the next
/// find after an update sees the update (a rotated secret verifies at once), and none finds it
/// after its deletion or its app's.
pub async fn a_found_source_follows_its_updates_and_deletion(store: &dyn Store) {
    // As stored: times in whole milliseconds.
    let millis = |mut source: IngestSource| {
        source.created_at = source.created_at.trunc_subsecs(3);
        source.updated_at = source.updated_at.trunc_subsecs(3);
        source
    };
    let app = stored_app(store, "A").await;
    let mut stored = millis(source(&app.id));
    store.create_source(&stored).await.expect("source");
    let found = |id: herald_core::SourceId| async move {
        store.find_source(id.as_str()).await.expect("find")
    };
    assert_eq!(found(stored.id.clone()).await.as_ref(), Some(&stored));
    assert_eq!(
        found(stored.id.clone()).await.as_ref(),
        Some(&stored),
        "found again"
    );

    stored.secrets = vec!["whsec_rotated".into(), stored.secrets[0].clone()];
    stored.name = "Stripe, rotated".into();
    let read_at = stored.updated_at;
    stored.updated_at = read_at + chrono::Duration::milliseconds(1);
    store.update_source(&stored, read_at).await.expect("update");
    assert_eq!(found(stored.id.clone()).await.as_ref(), Some(&stored));

    assert!(
        store
            .delete_source(&app.id, &stored.id)
            .await
            .expect("delete")
    );
    assert_eq!(found(stored.id.clone()).await, None);

    let other_app = stored_app(store, "B").await;
    let other = millis(source(&other_app.id));
    store.create_source(&other).await.expect("other source");
    assert_eq!(found(other.id.clone()).await.as_ref(), Some(&other));
    assert!(store.delete_app(&other_app.id).await.expect("delete app"));
    assert_eq!(found(other.id.clone()).await, None, "gone with its app");
}

fn ingest_event(source: &IngestSource, delivery_id: &str, msg: &Message) -> IngestEvent {
    IngestEvent {
        id: herald_core::IngestEventId::new(msg.created_at),
        source_id: source.id.clone(),
        app_id: source.app_id.clone(),
        delivery_id: delivery_id.into(),
        headers: vec![],
        body: Bytes::from_static(b"{}"),
        event_type: "t".into(),
        channels: vec![],
        msg_id: msg.id.clone(),
        received_at: msg.created_at,
    }
}

/// A delivery is recorded together with its message or not at all: one whose message cannot
/// go in (its eventId is taken) leaves no record behind, so the provider's retry is a new
/// delivery rather than a duplicate of a record that published nothing. With and without
/// history entries, which the stores record along different paths.
pub async fn a_delivery_whose_message_conflicts_records_nothing(store: &dyn Store) {
    let app = stored_app(store, "A").await;
    let source = source(&app.id);
    store.create_source(&source).await.expect("source");
    store
        .create_message(message(&app.id, Some("taken")), vec![])
        .await
        .expect("the message holding the eventId");
    let entries = || vec![history_entry(&app.id, "history-c", "x", KEEP_ALL)];
    for (delivery_id, history) in [("evt_plain", vec![]), ("evt_history", entries())] {
        let clash = message(&app.id, Some("taken"));
        let refused = store
            .record_ingest(
                ingest_event(&source, delivery_id, &clash),
                clash,
                vec![],
                history.clone(),
            )
            .await;
        assert!(
            matches!(refused, Err(StoreError::Conflict(_))),
            "{delivery_id}: {refused:?}"
        );
        let retry = message(&app.id, None);
        let recorded = store
            .record_ingest(
                ingest_event(&source, delivery_id, &retry),
                retry.clone(),
                vec![],
                history.clone(),
            )
            .await
            .expect("the retry");
        let IngestRecorded::New(positions) = recorded else {
            panic!("{delivery_id}: the retry is a new delivery: {recorded:?}");
        };
        // The refused delivery took no offset either.
        assert_eq!(
            positions.iter().map(|p| p.offset).collect::<Vec<_>>(),
            history.iter().map(|_| 1).collect::<Vec<_>>(),
            "{delivery_id}"
        );
        assert!(
            store
                .get_message(&app.id, retry.id.as_str())
                .await
                .expect("read")
                .is_some(),
            "{delivery_id}: the retry's message is stored"
        );
    }
}

/// A delivery recorded for a source deleted since the request found it (with and without
/// history entries, the stores' two paths) is `NotFound`, as the sender's retry will be, not
/// a database error answered 500; nothing of it is stored.
pub async fn a_delivery_to_a_source_deleted_meanwhile_is_not_found(store: &dyn Store) {
    let app = stored_app(store, "A").await;
    let source = source(&app.id);
    store.create_source(&source).await.expect("source");
    assert!(
        store
            .delete_source(&app.id, &source.id)
            .await
            .expect("delete")
    );
    let entries = || vec![history_entry(&app.id, "history-c", "x", KEEP_ALL)];
    for (delivery_id, history) in [("evt_plain", vec![]), ("evt_history", entries())] {
        let msg = message(&app.id, None);
        let refused = store
            .record_ingest(
                ingest_event(&source, delivery_id, &msg),
                msg.clone(),
                vec![],
                history,
            )
            .await;
        assert!(
            matches!(refused, Err(StoreError::NotFound)),
            "{delivery_id}: {refused:?}"
        );
        assert!(
            store
                .get_message(&app.id, msg.id.as_str())
                .await
                .expect("read")
                .is_none(),
            "{delivery_id}: its message is not stored"
        );
    }
}

/// A recorded delivery returns its entries' positions; a duplicate assigns no offset.
pub async fn a_duplicate_delivery_assigns_no_offset(store: &dyn Store) {
    let app = stored_app(store, "A").await;
    let source = source(&app.id);
    store.create_source(&source).await.expect("source");
    let record = |delivery_id: &'static str, data: &'static str| {
        let msg = message(&app.id, None);
        store.record_ingest(
            ingest_event(&source, delivery_id, &msg),
            msg,
            vec![],
            vec![
                history_entry(&app.id, "history-i", data, KEEP_ALL),
                history_entry(&app.id, "history-j", data, KEEP_ALL),
            ],
        )
    };
    let first = record("evt_1", "first").await.expect("first");
    let IngestRecorded::New(positions) = first else {
        panic!("the first delivery is new: {first:?}");
    };
    assert_eq!(
        positions.iter().map(|p| p.offset).collect::<Vec<_>>(),
        [1, 1]
    );
    assert_eq!(
        kept(store, &app.id, "history-i").await,
        [(positions[0].clone(), "first".to_owned())]
    );
    let (again, next) = tokio::join!(record("evt_1", "again"), record("evt_2", "next"));
    assert!(
        matches!(again, Ok(IngestRecorded::Duplicate(_))),
        "{again:?}"
    );
    let next = next.expect("next");
    let IngestRecorded::New(positions) = next else {
        panic!("a new delivery id is new: {next:?}");
    };
    assert_eq!(
        positions.iter().map(|p| p.offset).collect::<Vec<_>>(),
        [2, 2]
    );
    let appended = store
        .append_history(history_entry(&app.id, "history-i", "after", KEEP_ALL))
        .await
        .expect("append");
    assert_eq!(appended.offset, 3);

    // The same delivery twice at once (on SQLite, usually in one group commit): one goes in,
    // with its entries at the next offsets; the other is the duplicate and takes none.
    let (a, b) = tokio::join!(record("evt_3", "a"), record("evt_3", "b"));
    let outcomes = [a.expect("a"), b.expect("b")];
    let new: Vec<_> = outcomes
        .iter()
        .filter_map(|outcome| match outcome {
            IngestRecorded::New(positions) => Some(positions),
            IngestRecorded::Duplicate(_) => None,
        })
        .collect();
    assert_eq!(new.len(), 1, "exactly one is new: {outcomes:?}");
    assert_eq!(
        new[0].iter().map(|p| p.offset).collect::<Vec<_>>(),
        [4, 3],
        "history-i had 3 entries, history-j 2"
    );
}

/// A reset drops the kept events and changes the epoch, and offsets go on counting under the
/// new one; a channel with no position gets one at offset 1.
pub async fn a_reset_changes_the_epoch_and_offsets_go_on(store: &dyn Store) {
    let app = stored_app(store, "A").await;
    let mut old = None;
    for n in 0..3 {
        old = Some(
            store
                .append_history(history_entry(
                    &app.id,
                    "history-r",
                    &n.to_string(),
                    KEEP_ALL,
                ))
                .await
                .expect("append"),
        );
    }
    let old = old.expect("appended");
    assert_eq!(old.offset, 3);
    let reset = store
        .reset_history(&app.id, "history-r", "fresh")
        .await
        .expect("reset");
    assert_ne!(old.epoch, "fresh");
    assert_eq!(
        reset,
        ChannelPosition {
            epoch: "fresh".into(),
            next_offset: 4
        }
    );
    assert_eq!(
        store
            .channel_position(&app.id, "history-r")
            .await
            .expect("read"),
        Some(reset.clone())
    );
    assert!(kept(store, &app.id, "history-r").await.is_empty());
    let next = store
        .append_history(history_entry(&app.id, "history-r", "next", KEEP_ALL))
        .await
        .expect("append");
    assert_eq!(
        next,
        Position {
            epoch: "fresh".into(),
            offset: 4
        }
    );
    assert_eq!(
        kept(store, &app.id, "history-r").await,
        [(next, "next".to_owned())]
    );

    let unused = store
        .reset_history(&app.id, "history-unused", "first")
        .await
        .expect("reset an unused channel");
    assert_eq!(
        unused,
        ChannelPosition {
            epoch: "first".into(),
            next_offset: 1
        }
    );
    let first = store
        .append_history(history_entry(&app.id, "history-unused", "1", KEEP_ALL))
        .await
        .expect("append");
    assert_eq!(
        first,
        Position {
            epoch: "first".into(),
            offset: 1
        }
    );
}

/// A channel's offsets go on exactly, whatever fails beside its appends: an append for an app
/// deleted meanwhile fails alone, and the other channels' next appends take the offsets after
/// their last, even where their older events were trimmed away. (On SQLite, the failure makes
/// its batch fall back to one write at a time, and positions the group commit may have cached
/// must not outlive that.)
pub async fn offsets_go_on_past_a_batch_that_fails_and_a_deleted_apps_channels(store: &dyn Store) {
    let kept_app = stored_app(store, "A").await;
    let gone = stored_app(store, "B").await;
    // Keeping one event: every trim leaves only the channel's last.
    let keep_one = Retention {
        max_events: 1,
        max_age: Duration::from_secs(3600),
    };
    let append = |app_id: &AppId, channel: &str| {
        store.append_history(history_entry(app_id, channel, "e", keep_one))
    };
    for n in 1..=13 {
        let (kept, doomed) = tokio::join!(
            append(&kept_app.id, "history-k"),
            append(&gone.id, "history-g"),
        );
        assert_eq!(kept.expect("append kept").offset, n);
        assert_eq!(doomed.expect("append doomed").offset, n);
    }
    assert!(store.delete_app(&gone.id).await.expect("delete app"));
    let fourteenth = append(&kept_app.id, "history-k").await.expect("append");
    assert_eq!(fourteenth.offset, 14);
    let epoch = fourteenth.epoch;
    // Offsets 15 and 16 beside a failing append; 16 trims 15 away. (Concurrent appends to one
    // channel may land in either order.)
    let (first, second, doomed) = tokio::join!(
        append(&kept_app.id, "history-k"),
        append(&kept_app.id, "history-k"),
        append(&gone.id, "history-g"),
    );
    assert!(doomed.is_err(), "an append for a deleted app fails");
    let mut offsets = [
        first.expect("append kept").offset,
        second.expect("append kept").offset,
    ];
    offsets.sort_unstable();
    assert_eq!(offsets, [15, 16]);
    let next = append(&kept_app.id, "history-k").await.expect("append");
    assert_eq!(next, Position { epoch, offset: 17 });
    assert_eq!(
        kept(store, &kept_app.id, "history-k")
            .await
            .iter()
            .map(|(position, _)| position.offset)
            .collect::<Vec<_>>(),
        [16, 17]
    );
    assert_eq!(
        store
            .channel_position(&gone.id, "history-g")
            .await
            .expect("read"),
        None,
        "the deleted app's positions went with it"
    );
}

/// `append_history` returns where the event landed: the channel's epoch and next offset.
pub async fn an_append_returns_the_next_position(store: &dyn Store) {
    let app = stored_app(store, "A").await;
    assert_eq!(
        store
            .channel_position(&app.id, "history-a")
            .await
            .expect("read"),
        None
    );
    let first = store
        .append_history(history_entry(&app.id, "history-a", "1", KEEP_ALL))
        .await
        .expect("append");
    assert_eq!(first.offset, 1);
    let position = store
        .channel_position(&app.id, "history-a")
        .await
        .expect("read")
        .expect("stored at the first append");
    assert_eq!(
        position,
        ChannelPosition {
            epoch: first.epoch.clone(),
            next_offset: 2
        }
    );
    let second = store
        .append_history(history_entry(&app.id, "history-a", "2", KEEP_ALL))
        .await
        .expect("append");
    assert_eq!(
        second,
        Position {
            epoch: position.epoch,
            offset: position.next_offset
        }
    );
}

/// A channel's first append starts it under the epoch its subscribers were told
/// (`first_epoch`); later ones keep the stored epoch whatever they carry.
pub async fn the_first_append_starts_the_channel_under_the_epoch_it_names(store: &dyn Store) {
    let app = stored_app(store, "A").await;
    let with_epoch = |data: &str, epoch: &str| NewHistoryEntry {
        first_epoch: Some(epoch.to_owned()),
        ..history_entry(&app.id, "history-told", data, KEEP_ALL)
    };
    let first = store
        .append_history(with_epoch("1", "told-epoch"))
        .await
        .expect("append");
    assert_eq!((first.epoch.as_str(), first.offset), ("told-epoch", 1));
    let second = store
        .store_publication(None, vec![with_epoch("2", "another")])
        .await
        .expect("publish");
    assert_eq!(
        second,
        [Position {
            epoch: "told-epoch".into(),
            offset: 2
        }],
        "a stored position keeps its epoch"
    );
}

/// A delivery id a source has seen returns the earlier record and commits nothing new.
pub async fn a_repeated_delivery_id_is_recorded_once(store: &dyn Store) {
    let app = stored_app(store, "A").await;
    let now = Utc::now();
    let source = IngestSource {
        id: herald_core::SourceId::new(now),
        app_id: app.id.clone(),
        uid: Some("stripe".into()),
        name: "Stripe".into(),
        kind: herald_core::ingest::SourceKind::Stripe,
        secrets: vec!["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()],
        hmac: None,
        tolerance_secs: 300,
        event_type: vec![],
        channels: vec![],
        default_channel: None,
        trust_unsigned_headers: false,
        created_at: now,
        updated_at: now,
    };
    store.create_source(&source).await.expect("source");
    for key in [source.id.as_str(), "stripe"] {
        let found = store.get_source(&app.id, key).await.expect("read");
        assert_eq!(found.map(|s| s.id).as_ref(), Some(&source.id), "{key}");
    }
    let found = store.find_source(&source.id).await.expect("read");
    assert_eq!(found.map(|s| s.id).as_ref(), Some(&source.id));
    let event = |msg: &Message| IngestEvent {
        id: herald_core::IngestEventId::new(now),
        source_id: source.id.clone(),
        app_id: app.id.clone(),
        delivery_id: "evt_1".into(),
        headers: vec![("content-type".into(), "application/json".into())],
        body: Bytes::from_static(b"{}"),
        event_type: "t".into(),
        channels: vec![],
        msg_id: msg.id.clone(),
        received_at: now,
    };
    let first_msg = message(&app.id, None);
    let first = event(&first_msg);
    let recorded = store
        .record_ingest(first.clone(), first_msg.clone(), vec![], vec![])
        .await
        .expect("first");
    assert_eq!(recorded, IngestRecorded::New(vec![]));
    let second_msg = message(&app.id, None);
    let recorded = store
        .record_ingest(event(&second_msg), second_msg.clone(), vec![], vec![])
        .await
        .expect("again");
    match recorded {
        IngestRecorded::Duplicate(earlier) => {
            assert_eq!(earlier.id, first.id);
            assert_eq!(earlier.msg_id, first_msg.id);
        }
        IngestRecorded::New(_) => panic!("a repeated delivery id was recorded twice"),
    }
    assert!(
        store
            .get_message(&app.id, &second_msg.id)
            .await
            .expect("read")
            .is_none(),
        "the duplicate's message is not stored"
    );
    let events = store
        .list_ingest_events(&source.id, &first_page(true))
        .await
        .expect("list");
    assert_eq!(events.len(), 1);
    let found = store
        .get_ingest_event(&source.id, &first.id)
        .await
        .expect("read");
    assert_eq!(found.map(|e| e.delivery_id), Some("evt_1".into()));
}

/// An app's history rules and a source's hmac settings, which the store keeps as JSON in its
/// own row shapes, read back as they were written, through creation and updates.
pub async fn socketio_settings_round_trip(store: &dyn Store) {
    use herald_core::socketio::{EventRule, Relay, SocketIoSettings};
    async fn read(store: &dyn Store, id: &str) -> Option<SocketIoSettings> {
        let app = store.get_app(id).await.expect("read");
        app.expect("the app").socketio
    }
    let rule = |event: &str, relay, webhook| EventRule {
        event: event.into(),
        relay,
        webhook,
    };
    let mut app = app("A");
    app.socketio = Some(SocketIoSettings {
        allowed_origins: vec!["https://shop.example".into(), "*".into()],
        namespace_channel: Some("lobby".into()),
        events: vec![
            rule("chat message", Relay::Everyone, false),
            rule("typing", Relay::Others, false),
            rule("note", Relay::Rooms, false),
            rule("order.placed", Relay::None, true),
            rule("*", Relay::Refuse, false),
        ],
    });
    store.create_app(&app).await.expect("create app");
    assert_eq!(read(store, &app.id).await, app.socketio);
    for settings in [Some(SocketIoSettings::default()), None] {
        app.socketio = settings;
        store
            .update_app(&app, app.updated_at)
            .await
            .expect("update app");
        assert_eq!(read(store, &app.id).await, app.socketio);
    }
}

pub async fn history_rules_and_hmac_settings_round_trip(store: &dyn Store) {
    use herald_core::{
        history::HistoryRule,
        ingest::{Encoding, HmacScheme, SourceKind},
    };
    async fn read(store: &dyn Store, id: &str) -> Option<Vec<HistoryRule>> {
        let app = store.get_app(id).await.expect("read");
        app.expect("the app").history
    }
    async fn read_hmac(store: &dyn Store, app_id: &AppId, id: &str) -> Option<HmacScheme> {
        let source = store.get_source(app_id, id).await.expect("read");
        source.expect("the source").hmac
    }
    let rule = |pattern: &str, max_events, max_age_secs| HistoryRule {
        pattern: pattern.into(),
        max_events,
        max_age_secs,
    };
    let mut app = app("A");
    app.history = Some(vec![rule("chat-*", 500, 86_400), rule("*", 1, 1)]);
    store.create_app(&app).await.expect("create app");
    assert_eq!(read(store, &app.id).await, app.history);
    for history in [
        Some(vec![]),
        Some(vec![rule("a*b", 100_000, 2_592_000)]),
        None,
    ] {
        app.history = history;
        store
            .update_app(&app, app.updated_at)
            .await
            .expect("update app");
        assert_eq!(read(store, &app.id).await, app.history);
    }

    let now = Utc::now();
    let mut source = IngestSource {
        id: herald_core::SourceId::new(now),
        app_id: app.id.clone(),
        uid: None,
        name: "generic".into(),
        kind: SourceKind::HmacSha256,
        secrets: vec!["s".into()],
        hmac: Some(HmacScheme {
            header: "X-Sig".into(),
            encoding: Encoding::Base64,
            prefix: "sha256=".into(),
            id_header: Some("X-Id".into()),
        }),
        tolerance_secs: 300,
        event_type: vec![],
        channels: vec![],
        default_channel: None,
        trust_unsigned_headers: true,
        created_at: now,
        updated_at: now,
    };
    store.create_source(&source).await.expect("source");
    assert_eq!(read_hmac(store, &app.id, &source.id).await, source.hmac);
    let plain = HmacScheme {
        header: "X-Signature".into(),
        encoding: Encoding::Hex,
        prefix: String::new(),
        id_header: None,
    };
    for hmac in [Some(plain), None] {
        source.hmac = hmac;
        let read_at = source.updated_at;
        source.updated_at = read_at + chrono::Duration::milliseconds(1);
        store
            .update_source(&source, read_at)
            .await
            .expect("update source");
        assert_eq!(read_hmac(store, &app.id, &source.id).await, source.hmac);
    }
}

/// Idempotency records are purged by age, then beyond a number of rows, then beyond a number
/// of body bytes, oldest first.
pub async fn idempotency_purge_keeps_at_most_the_newest_records(store: &dyn Store) {
    let now = Utc::now();
    for n in 0..5 {
        store
            .save_idempotent_response("scope", &format!("key-{n}"), 201, b"{}", now)
            .await
            .expect("save");
    }
    assert_eq!(
        store
            .idempotent_response("scope", "key-0")
            .await
            .expect("read"),
        Some((201, b"{}".to_vec()))
    );
    let purged = store
        .purge_idempotency(now - chrono::Duration::hours(1), 2, u64::MAX)
        .await
        .expect("purge");
    assert_eq!(purged, 3);
    for (n, kept) in [(0, false), (2, false), (3, true), (4, true)] {
        let found = store
            .idempotent_response("scope", &format!("key-{n}"))
            .await
            .expect("read");
        assert_eq!(found.is_some(), kept, "key-{n}");
    }
    // By size: three bodies of 100 bytes with room for 250 keep the newest two.
    for n in 5..8 {
        store
            .save_idempotent_response("scope", &format!("key-{n}"), 201, &[b'x'; 100], now)
            .await
            .expect("save");
    }
    store
        .purge_idempotency(now - chrono::Duration::hours(1), 100, 250)
        .await
        .expect("purge");
    for (n, kept) in [(4, false), (5, false), (6, true), (7, true)] {
        let found = store
            .idempotent_response("scope", &format!("key-{n}"))
            .await
            .expect("read");
        assert_eq!(found.is_some(), kept, "key-{n}");
    }
}

/// An `Idempotency-Key` claim: the first claim wins and the next is in progress; a saved
/// response completes it (a repeat gets the response); a released claim is free again; an
/// expired one is taken over; a claim is never read as a response, and a purge keeps a live
/// claim but forgets one that expired before its cutoff.
pub async fn an_idempotency_key_is_claimed_once_until_saved_released_or_expired(store: &dyn Store) {
    let now = Utc::now();
    let minute = chrono::Duration::seconds(60);
    let claim = |key: &'static str, at: DateTime<Utc>| {
        store.claim_idempotency_key("scope", key, at, at + minute)
    };
    let claimed = |outcome: crate::Result<IdempotencyClaim>| outcome.expect("claim");

    assert_eq!(claimed(claim("k", now).await), IdempotencyClaim::Claimed);
    assert_eq!(claimed(claim("k", now).await), IdempotencyClaim::InProgress);
    assert_eq!(
        store.idempotent_response("scope", "k").await.expect("read"),
        None,
        "a claim is not a response"
    );
    // Other scopes and keys are free.
    assert_eq!(
        claimed(
            store
                .claim_idempotency_key("other", "k", now, now + minute)
                .await
        ),
        IdempotencyClaim::Claimed
    );
    store
        .save_idempotent_response("scope", "k", 201, b"{\"id\":1}", now)
        .await
        .expect("save");
    let done = IdempotencyClaim::Done {
        status: 201,
        body: b"{\"id\":1}".to_vec(),
    };
    assert_eq!(claimed(claim("k", now).await), done);
    // Saving again, or releasing, leaves the first response.
    store
        .save_idempotent_response("scope", "k", 200, b"{}", now)
        .await
        .expect("save again");
    store
        .release_idempotency_key("scope", "k", now + minute)
        .await
        .expect("release");
    assert_eq!(claimed(claim("k", now).await), done);
    assert_eq!(
        store.idempotent_response("scope", "k").await.expect("read"),
        Some((201, b"{\"id\":1}".to_vec()))
    );

    // Released: claimable again, and then in progress again.
    assert_eq!(claimed(claim("r", now).await), IdempotencyClaim::Claimed);
    store
        .release_idempotency_key("scope", "r", now + minute)
        .await
        .expect("release");
    assert_eq!(claimed(claim("r", now).await), IdempotencyClaim::Claimed);
    assert_eq!(claimed(claim("r", now).await), IdempotencyClaim::InProgress);
    // Releasing a key nobody claimed does nothing.
    store
        .release_idempotency_key("scope", "never", now + minute)
        .await
        .expect("release an unclaimed key");

    // Expired: the claim made at `now` holds until `now + minute`, and is taken over from then.
    assert_eq!(claimed(claim("e", now).await), IdempotencyClaim::Claimed);
    assert_eq!(
        claimed(claim("e", now + minute - chrono::Duration::seconds(1)).await),
        IdempotencyClaim::InProgress
    );
    let later = now + minute;
    assert_eq!(claimed(claim("e", later).await), IdempotencyClaim::Claimed);
    // The request that outlived its claim ends and releases: only its own claim, so the
    // key stays with the request that took it over.
    store
        .release_idempotency_key("scope", "e", now + minute)
        .await
        .expect("a late release");
    assert_eq!(
        claimed(claim("e", later).await),
        IdempotencyClaim::InProgress
    );
    store
        .save_idempotent_response("scope", "e", 202, b"", later)
        .await
        .expect("save after a takeover");
    assert_eq!(
        claimed(claim("e", later).await),
        IdempotencyClaim::Done {
            status: 202,
            body: Vec::new()
        }
    );

    // A purge counts no claim against its rows and keeps the live ones ...
    assert_eq!(claimed(claim("live", now).await), IdempotencyClaim::Claimed);
    store
        .purge_idempotency(now - chrono::Duration::hours(1), 0, 0)
        .await
        .expect("purge");
    assert_eq!(
        claimed(claim("live", now).await),
        IdempotencyClaim::InProgress
    );
    assert_eq!(
        claimed(claim("k", now).await),
        IdempotencyClaim::Claimed,
        "no row kept, so the response is forgotten"
    );
    // ... and forgets those that expired before its cutoff.
    store
        .purge_idempotency(now + chrono::Duration::hours(1), u64::MAX, u64::MAX)
        .await
        .expect("purge expired claims");
    assert_eq!(
        claimed(claim("live", now).await),
        IdempotencyClaim::Claimed,
        "a purged claim no longer holds, even at a time it covered"
    );
}

/// Occupancy changes keep only each occupant's last change, within one record and across
/// records; entering twice is one occupant.
pub async fn occupancy_changes_collapse_to_the_last(store: &dyn Store) {
    let app = stored_app(store, "A").await;
    let occupant = |channel: &str, user: Option<&str>| Occupant {
        app_id: app.id.clone(),
        channel: channel.into(),
        user_id: user.map(str::to_owned),
    };
    store
        .record_channel_events(
            vec![],
            vec![
                OccupancyChange::Entered(occupant("a", None)),
                OccupancyChange::Left(occupant("a", None)),
                OccupancyChange::Entered(occupant("b", None)),
                OccupancyChange::Entered(occupant("presence-c", Some("u1"))),
                OccupancyChange::Entered(occupant("presence-c", Some("u1"))),
                OccupancyChange::Left(occupant("d", None)),
            ],
        )
        .await
        .expect("record");
    let mut found = store.occupants().await.expect("read");
    found.sort_by(|x, y| (&x.channel, &x.user_id).cmp(&(&y.channel, &y.user_id)));
    assert_eq!(
        found,
        [occupant("b", None), occupant("presence-c", Some("u1"))]
    );
    store
        .record_channel_events(
            vec![(message(&app.id, None), vec![])],
            vec![
                OccupancyChange::Left(occupant("b", None)),
                OccupancyChange::Entered(occupant("a", None)),
            ],
        )
        .await
        .expect("record");
    let mut found = store.occupants().await.expect("read");
    found.sort_by(|x, y| (&x.channel, &x.user_id).cmp(&(&y.channel, &y.user_id)));
    assert_eq!(
        found,
        [occupant("a", None), occupant("presence-c", Some("u1"))]
    );
}

/// `count` messages of `app_id` (each with `expires_at` as its payload's expiry), stored a
/// hundred at a time by concurrent callers.
async fn many_messages(
    store: &dyn Store,
    app_id: &AppId,
    count: usize,
    expires_at: Option<DateTime<Utc>>,
) -> Vec<Message> {
    let messages: Vec<Message> = (0..count)
        .map(|n| Message {
            payload: Bytes::from(format!("{{\"n\":{n}}}")),
            payload_expires_at: expires_at,
            ..message(app_id, None)
        })
        .collect();
    for chunk in messages.chunks(100) {
        let writes = chunk
            .iter()
            .map(|m| {
                Box::pin(store.create_message(m.clone(), vec![]))
                    as Pin<Box<dyn Future<Output = crate::Result<()>> + Send + '_>>
            })
            .collect();
        for result in join_all(writes).await {
            result.expect("create message");
        }
    }
    messages
}

/// Calls `batch` until it comes back short; the sizes of the batches.
async fn batches<'a, F>(mut batch: F) -> Vec<u64>
where
    F: FnMut() -> Pin<Box<dyn Future<Output = crate::Result<u64>> + Send + 'a>>,
{
    let mut sizes = Vec::new();
    loop {
        let done = batch().await.expect("batch");
        sizes.push(done);
        if done < u64::from(crate::RETENTION_BATCH) {
            return sizes;
        }
    }
}

async fn expired_payloads_are_expunged_in_batches_but_not_under_a_pending_delivery(
    store: &dyn Store,
) {
    let app = stored_app(store, "retention").await;
    let endpoint = endpoint(&app.id);
    store.create_endpoint(&endpoint).await.expect("endpoint");
    let now = Utc::now();
    let past = Some(now - chrono::Duration::seconds(1));
    let expired = many_messages(store, &app.id, 1200, past).await;
    let later = many_messages(store, &app.id, 3, Some(now + chrono::Duration::hours(1))).await;
    let forever = many_messages(store, &app.id, 2, None).await;
    let pending = Message {
        payload_expires_at: past,
        ..message(&app.id, None)
    };
    store
        .create_message(pending.clone(), vec![endpoint.id.clone()])
        .await
        .expect("pending message");

    let sizes = batches(|| {
        Box::pin(async {
            let done = store
                .expire_payloads(now, now, crate::RETENTION_BATCH)
                .await?;
            assert_eq!(
                done.set_aside, 1,
                "the pending delivery's payload is set aside"
            );
            Ok(done.expunged)
        })
    })
    .await;
    assert_eq!(
        sizes,
        vec![500, 500, 200],
        "1,200 payloads in batches of 500"
    );
    let app_id = &app.id;
    let read = |m: &Message| {
        let id = m.id.to_string();
        async move {
            store
                .get_message(app_id, &id)
                .await
                .expect("get")
                .expect("the message stays")
        }
    };
    for m in [&expired[0], &expired[1199]] {
        let m = read(m).await;
        assert_eq!(m.payload.as_ref(), EXPIRED_PAYLOAD.as_bytes());
        assert_eq!(m.payload_expires_at, None, "nothing left to expire");
    }
    for m in [&later[0], &forever[0], &pending] {
        let stored = read(m).await;
        assert_eq!(stored.payload, m.payload, "{} keeps its payload", m.id);
    }
    assert_eq!(
        store
            .expire_payloads(now, now, crate::RETENTION_BATCH)
            .await
            .expect("again")
            .expunged,
        0,
        "idempotent"
    );
}

async fn old_messages_are_deleted_in_batches_but_not_while_a_delivery_is_pending(
    store: &dyn Store,
) {
    let app = stored_app(store, "retention").await;
    let endpoint = endpoint(&app.id);
    store.create_endpoint(&endpoint).await.expect("endpoint");
    many_messages(store, &app.id, 1100, None).await;
    let pending = message(&app.id, None);
    store
        .create_message(pending.clone(), vec![endpoint.id.clone()])
        .await
        .expect("pending message");
    // Ids sort by creation time: everything so far is before `cutoff`.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let cutoff = Utc::now();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let young = message(&app.id, None);
    store
        .create_message(young.clone(), vec![])
        .await
        .expect("young message");

    let sizes =
        batches(|| Box::pin(store.delete_messages_before(cutoff, crate::RETENTION_BATCH))).await;
    assert_eq!(sizes, vec![500, 500, 100]);
    let page = Page {
        limit: 10,
        iterator: None,
        descending: true,
        backwards: false,
    };
    let left: Vec<MessageId> = store
        .list_messages(&app.id, &page, &MessageQuery::default())
        .await
        .expect("list")
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(left, vec![young.id, pending.id]);
    assert_eq!(
        store
            .delete_attempts_before(cutoff, crate::RETENTION_BATCH)
            .await
            .expect("attempts"),
        0
    );
    assert_eq!(
        store
            .delete_ingest_events_before(cutoff, crate::RETENTION_BATCH)
            .await
            .expect("received"),
        0
    );
}

async fn an_expunge_names_the_message_by_id_or_event_id(store: &dyn Store) {
    let app = stored_app(store, "expunge").await;
    let other = stored_app(store, "other").await;
    let by_id = message(&app.id, None);
    let by_event = message(&app.id, Some("evt-1"));
    for m in [&by_id, &by_event] {
        store
            .create_message(m.clone(), vec![])
            .await
            .expect("message");
    }
    assert!(
        store
            .expunge_payload(&app.id, by_id.id.as_str())
            .await
            .expect("expunge")
    );
    assert!(
        store
            .expunge_payload(&app.id, "evt-1")
            .await
            .expect("expunge")
    );
    assert!(
        !store
            .expunge_payload(&app.id, "evt-none")
            .await
            .expect("expunge")
    );
    assert!(
        !store
            .expunge_payload(&other.id, by_id.id.as_str())
            .await
            .expect("expunge"),
        "another app's message is not found"
    );
    for id in [by_id.id.as_str(), "evt-1"] {
        let m = store
            .get_message(&app.id, id)
            .await
            .expect("get")
            .expect("kept");
        assert_eq!(m.payload.as_ref(), EXPIRED_PAYLOAD.as_bytes());
    }
}

/// A payload expunged by hand is not sent again: the message's deliveries still to be made
/// (a retry waiting, an attempt in flight) fail, and the one in flight records a stale
/// attempt; a delivery made already stays as it was.
async fn an_expunge_fails_the_deliveries_still_to_be_made(store: &dyn Store) {
    let app = stored_app(store, "expunged").await;
    let endpoints: Vec<Endpoint> = (0..3).map(|_| endpoint(&app.id)).collect();
    for ep in &endpoints {
        store.create_endpoint(ep).await.expect("endpoint");
    }
    let msg = message(&app.id, None);
    store
        .create_message(
            msg.clone(),
            endpoints.iter().map(|ep| ep.id.clone()).collect(),
        )
        .await
        .expect("message");
    let now = Utc::now() + chrono::Duration::seconds(1);
    let jobs = store
        .claim_due(&claim(now, 10, HashMap::new(), 10, HashMap::new(), 100))
        .await
        .expect("claim");
    assert_eq!(jobs.len(), 3);
    let job_of = |ep: &Endpoint| {
        jobs.iter()
            .find(|job| job.endpoint.id == ep.id)
            .expect("a job per endpoint")
    };
    let (delivered, retrying, in_flight) = (
        job_of(&endpoints[0]),
        job_of(&endpoints[1]),
        job_of(&endpoints[2]),
    );
    for (job, next) in [
        (delivered, NextStep::Delivered),
        (retrying, NextStep::RetryAt(now)),
    ] {
        let recorded = store
            .record_attempt(job_record(job, job.lease, now, next))
            .await
            .expect("record");
        assert_eq!(recorded, Recorded::Applied);
    }
    assert!(
        store
            .expunge_payload(&app.id, msg.id.as_str())
            .await
            .expect("expunge")
    );
    let recorded = store
        .record_attempt(job_record(
            in_flight,
            in_flight.lease,
            now,
            NextStep::RetryAt(now),
        ))
        .await
        .expect("record");
    assert_eq!(recorded, Recorded::Stale, "taken back from its claim");
    let later = now + chrono::Duration::minutes(10);
    for first_attempts in [true, false] {
        let due = store
            .claim_due(&ClaimRequest {
                first_attempts,
                ..claim(later, 10, HashMap::new(), 10, HashMap::new(), 100)
            })
            .await
            .expect("claim");
        assert!(due.is_empty(), "nothing of it is sent again: {due:?}");
    }
    let mut statuses = Vec::new();
    for ep in &endpoints {
        let stats = store
            .endpoint_stats(&ep.id, &StatsWindow::default())
            .await
            .expect("stats");
        statuses.push((stats.success, stats.pending, stats.fail));
    }
    assert_eq!(statuses, [(1, 0, 0), (0, 0, 1), (0, 0, 1)]);
}

async fn deleting_an_app_deletes_its_messages_in_batches_and_no_other_app_s(store: &dyn Store) {
    let gone = stored_app(store, "gone").await;
    let kept = stored_app(store, "kept").await;
    many_messages(store, &gone.id, 1100, None).await;
    many_messages(store, &kept.id, 3, None).await;
    assert!(store.delete_app(&gone.id).await.expect("delete"));
    assert!(
        !store.delete_app(&gone.id).await.expect("again"),
        "gone already"
    );
    let page = Page {
        limit: 10,
        iterator: None,
        descending: true,
        backwards: false,
    };
    for (app, count) in [(&gone, 0), (&kept, 3)] {
        let listed = store
            .list_messages(&app.id, &page, &MessageQuery::default())
            .await
            .expect("list");
        assert_eq!(listed.len(), count);
    }
}
