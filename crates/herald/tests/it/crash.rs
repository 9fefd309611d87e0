//! Crashes under load: the server SIGKILLed at random points, again and again, while it takes
//! a stream of messages through the API and of inbound webhooks from a provider, and delivers
//! them to a local receiver. On SQLite one process is killed and restarted on its data
//! directory; on PostgreSQL two nodes share the database and one is killed at a time while the
//! other serves.
//!
//! Senders behave as real ones do: a message is sent until it is acknowledged (201, or 409 for
//! an `eventId` whose earlier answer was lost in a kill), an inbound webhook until it gets a
//! 2xx. Every acknowledged one must arrive at the receiver at least once; the duplicates that
//! at-least-once delivery allows are counted and printed.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use rand::Rng;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::{
    harness::{ADMIN_TOKEN, Backend, PATIENCE, Receiver, ThrowawayDatabase, backend},
    ingest::stripe_header,
    process::{HeraldProcess, spawn_herald_env},
};

const MESSAGES: usize = 20_000;
const INBOUND: usize = 2_000;
const KILLS: usize = 5;
const SENDERS: usize = 16;
const STRIPE_SECRET: &str = "whsec_crash_test";

/// The nodes' addresses as senders see them: a killed node's is gone until it is back.
#[derive(Default)]
struct Live {
    bases: Mutex<Vec<Option<String>>>,
    next: AtomicUsize,
}

impl Live {
    /// A live node's base URL (round robin), or `None` while every node is down.
    fn pick(&self) -> Option<String> {
        let bases = self.bases.lock().expect("lock");
        let up: Vec<&String> = bases.iter().flatten().collect();
        if up.is_empty() {
            return None;
        }
        Some(up[self.next.fetch_add(1, Ordering::Relaxed) % up.len()].clone())
    }

    fn set(&self, node: usize, base: Option<String>) {
        self.bases.lock().expect("lock")[node] = base;
    }
}

/// Sends `request` to a live node until `done` says its answer acknowledged it. Connection
/// errors (a node killed mid-request) and any other answer are retried after a short pause,
/// as a webhook provider or an SDK with retries would.
async fn until_acknowledged(
    live: &Live,
    client: &reqwest::Client,
    request: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    done: impl Fn(u16) -> bool,
) {
    let give_up = Instant::now() + Duration::from_secs(300);
    loop {
        assert!(Instant::now() < give_up, "a request was never acknowledged");
        if let Some(base) = live.pick()
            && let Ok(response) = request(client, &base).send().await
            && done(response.status().as_u16())
        {
            return;
        }
        // The sender's back-off between attempts, not a wait for a condition.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What arrived: a message's `n` or an inbound event's id, with how many times.
fn key_of(body: &[u8]) -> String {
    let value: Value = serde_json::from_slice(body).expect("a JSON payload");
    if let Some(n) = value["n"].as_u64() {
        format!("msg-{n}")
    } else {
        value["id"].as_str().expect("an event id").to_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_message_and_inbound_webhook_arrives_despite_five_sigkills() {
    let mut receiver = Receiver::start().await;
    let db = match backend() {
        Backend::Sqlite => None,
        Backend::Postgres => Some(ThrowawayDatabase::create().await),
    };
    // On PostgreSQL the killed node's leases must run out (request timeout + grace + 30 s)
    // before the other node takes its deliveries over: shortened, and waited for below.
    let mut env: Vec<(&str, String)> = vec![
        (
            "HERALD_DELIVERY__RETRY_SCHEDULE_SECS",
            "[0.05, 0.1, 0.2, 0.5, 1]".into(),
        ),
        ("HERALD_INGEST__REQUESTS_PER_SECOND_PER_IP", "0".into()),
        ("HERALD_INGEST__REQUESTS_PER_SECOND_PER_SOURCE", "0".into()),
    ];
    let (nodes, patience) = match &db {
        None => (1, PATIENCE),
        Some(db) => {
            env.push(("HERALD_STORE__URL", db.url.clone()));
            env.push(("HERALD_DELIVERY__REQUEST_TIMEOUT_SECS", "5".into()));
            env.push(("HERALD_SHUTDOWN_GRACE_SECS", "1".into()));
            (2, Duration::from_secs(5 + 1 + 30) + PATIENCE)
        }
    };
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let dirs: Vec<tempfile::TempDir> = (0..nodes)
        .map(|_| tempfile::tempdir().expect("dir"))
        .collect();
    let mut processes: Vec<HeraldProcess> = Vec::new();
    for dir in &dirs {
        processes.push(spawn_herald_env(dir.path(), &[], &env_refs).await);
    }
    let api = &processes[0].api;
    let app = api.create_app("crash-load").await;
    api.create_endpoint(&app, json!({"url": receiver.url}))
        .await;
    let (status, source) = api
        .call(
            Method::POST,
            &format!("/api/v1/app/{app}/ingest/source"),
            Some(json!({"kind": "stripe", "secrets": [STRIPE_SECRET]})),
        )
        .await;
    assert_eq!(status, 201, "{source}");
    let ingest_path = source["ingestPath"]
        .as_str()
        .expect("ingestPath")
        .to_owned();

    let live = Arc::new(Live::default());
    *live.bases.lock().expect("lock") =
        processes.iter().map(|p| Some(p.api.base.clone())).collect();

    // Senders: messages and inbound webhooks, each until acknowledged.
    let next_message = Arc::new(AtomicUsize::new(0));
    let next_inbound = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for _ in 0..SENDERS {
        let (live, app, ingest_path) = (Arc::clone(&live), app.clone(), ingest_path.clone());
        let (next_message, next_inbound) = (Arc::clone(&next_message), Arc::clone(&next_inbound));
        senders.push(tokio::spawn(async move {
            let client = crate::harness::http_client();
            loop {
                let n = next_message.fetch_add(1, Ordering::Relaxed);
                if n < MESSAGES {
                    let body = json!({
                        "eventType": "order.created",
                        "eventId": format!("order-{n}"),
                        "payload": {"n": n},
                    });
                    until_acknowledged(
                        &live,
                        &client,
                        |client, base| {
                            client
                                .post(format!("{base}/api/v1/app/{app}/msg"))
                                .bearer_auth(ADMIN_TOKEN)
                                .json(&body)
                        },
                        // 409: an earlier attempt was stored, its answer lost in a kill.
                        |status| status == 201 || status == 409,
                    )
                    .await;
                }
                // One inbound webhook for every ten messages.
                let j = next_inbound.fetch_add(1, Ordering::Relaxed);
                if j < INBOUND {
                    let body = format!(r#"{{"id":"evt_crash_{j}","type":"charge.succeeded"}}"#);
                    until_acknowledged(
                        &live,
                        &client,
                        |client, base| {
                            let (name, signature) = stripe_header(
                                STRIPE_SECRET,
                                body.as_bytes(),
                                chrono::Utc::now().timestamp(),
                            );
                            client
                                .post(format!("{base}{ingest_path}"))
                                .header(name, signature)
                                .header("content-type", "application/json")
                                .body(body.clone())
                        },
                        |status| (200..300).contains(&status),
                    )
                    .await;
                }
                if n >= MESSAGES && j >= INBOUND {
                    return;
                }
            }
        }));
    }

    // The receiver's side: every successful delivery counted by what it carried; `progress`
    // says how many deliveries and how many distinct ones so far.
    let (progress_tx, mut progress) = watch::channel((0usize, 0usize));
    let (stop_collecting, mut stopped) = watch::channel(false);
    let collector = tokio::spawn(async move {
        let mut arrived: HashMap<String, u32> = HashMap::new();
        let mut delivered = 0;
        loop {
            tokio::select! {
                delivery = receiver.next_within(patience) => {
                    if delivery.succeeded() {
                        *arrived.entry(key_of(&delivery.body)).or_insert(0) += 1;
                        delivered += 1;
                        progress_tx.send_replace((delivered, arrived.len()));
                    }
                }
                _ = stopped.changed() => return arrived,
            }
        }
    });

    // The killer: at a random number of deliveries into each stretch, SIGKILL a node (on a
    // cluster, each in turn) and start it again on its directory.
    let mut kills = 0;
    let stretch = MESSAGES / (KILLS + 1);
    for round in 0..KILLS {
        let at = round * stretch + rand::rng().random_range(200..stretch);
        tokio::time::timeout(
            patience * 4,
            progress.wait_for(|(delivered, _)| *delivered >= at),
        )
        .await
        .unwrap_or_else(|_| panic!("deliveries stopped before {at}"))
        .expect("collector");
        let node = round % nodes;
        live.set(node, None);
        let process = &mut processes[node];
        process.child.start_kill().expect("SIGKILL");
        process.child.wait().await.expect("reap");
        kills += 1;
        let restarted = spawn_herald_env(dirs[node].path(), &[], &env_refs).await;
        live.set(node, Some(restarted.api.base.clone()));
        processes[node] = restarted;
    }
    for sender in senders {
        sender.await.expect("sender");
    }

    // Everything acknowledged arrives: every message and every inbound event, at least once.
    let want = MESSAGES + INBOUND;
    let waited = tokio::time::timeout(
        patience * 4,
        progress.wait_for(|(_, distinct)| *distinct >= want),
    )
    .await;
    let arrived_in_time = waited.is_ok();
    drop(waited);
    let distinct = progress.borrow().1;
    assert!(
        arrived_in_time,
        "only {distinct} of {want} acknowledged messages and inbound webhooks arrived"
    );
    stop_collecting.send(true).expect("collector");
    let arrived = collector.await.expect("collector");
    for n in 0..MESSAGES {
        assert!(
            arrived.contains_key(&format!("msg-{n}")),
            "message {n} never arrived"
        );
    }
    for j in 0..INBOUND {
        assert!(
            arrived.contains_key(&format!("evt_crash_{j}")),
            "inbound event {j} never arrived"
        );
    }
    let duplicates: u32 = arrived.values().map(|times| times - 1).sum();
    println!(
        "crash test on {}: {MESSAGES} messages and {INBOUND} inbound webhooks acknowledged, {kills} SIGKILLs, all arrived; {duplicates} duplicate deliveries",
        match backend() {
            Backend::Sqlite => "SQLite (one process)",
            Backend::Postgres => "PostgreSQL (two nodes, one killed at a time)",
        }
    );
    assert!(kills >= KILLS);
    for mut process in processes {
        process.child.start_kill().expect("kill");
        let _ = process.child.wait().await;
    }
    if let Some(db) = db {
        db.drop_now().await;
    }
}
