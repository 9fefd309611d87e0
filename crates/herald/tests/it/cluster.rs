//! Several nodes as one: three servers on loopback ports share one throwaway database, and
//! clients on different nodes see one Herald.
//!
//! These run in the suite's PostgreSQL pass (`HERALD_TEST_STORE=postgres`, with
//! `HERALD_TEST_POSTGRES_URL`); elsewhere each says it was skipped and why. Publications
//! travel over the suite's broker (`HERALD_TEST_BROKER`: PostgreSQL's LISTEN/NOTIFY by
//! default, or Redis or NATS, each cluster on a topic of its own; see
//! `harness::test_broker`), so `.ci/run` runs this file once per broker.

use std::{collections::HashSet, time::Duration};

use serde_json::{Value, json};

use crate::{
    cluster_presence::{join as join_presence, until_users},
    delivery::{arrivals_once_each, assert_no_sooner_than_their_turns, send_to_a_paced_endpoint},
    harness::{
        Backend, Receiver, Reply, TestBroker, TestServer, ThrowawayDatabase, backend,
        join_cluster_broker, test_broker,
    },
    history::join,
    process::{await_all_within, send_many, spawn_herald_env},
    pusher::{Client, Creds, pusher_app, trigger},
};

/// Nodes on one database (and, with a bus, on one topic of the suite's broker), or `None`
/// (and a line saying why) outside the PostgreSQL pass.
pub(crate) struct Cluster {
    pub nodes: Vec<TestServer>,
    pub db: ThrowawayDatabase,
}

impl Cluster {
    pub async fn start(test: &str, nodes: usize) -> Option<Self> {
        Self::start_with(test, nodes, |_| {}).await
    }

    /// [`Cluster::start`], each node's configuration adjusted by `adjust`.
    pub async fn start_with(
        test: &str,
        nodes: usize,
        adjust: impl Fn(&mut herald::Config),
    ) -> Option<Self> {
        if backend() != Backend::Postgres {
            herald_test_support::skip!(
                "{test}: cluster tests run in the PostgreSQL pass (HERALD_TEST_STORE=postgres and HERALD_TEST_POSTGRES_URL)"
            );
            return None;
        }
        let db = ThrowawayDatabase::create().await;
        let mut started = Vec::new();
        for _ in 0..nodes {
            let url = db.url.clone();
            started.push(
                TestServer::start_with(|c| {
                    c.store.url = Some(url);
                    join_cluster_broker(c, &db.name);
                    adjust(c);
                })
                .await,
            );
        }
        Some(Self { nodes: started, db })
    }

    pub async fn stop(self) {
        for node in self.nodes {
            node.stop().await;
        }
        self.db.drop_now().await;
    }
}

async fn publish(node: &TestServer, creds: &Creds, channel: &str, n: u64, pad: usize) {
    let data = json!({"n": n, "pad": "x".repeat(pad)}).to_string();
    let (status, body) = trigger(
        node,
        creds,
        json!({"name": "note", "channel": channel, "data": data}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

/// The next `count` `note` events: (offset if any, the payload's n).
async fn notes(client: &mut Client, count: usize) -> Vec<(Option<u64>, u64)> {
    padded_notes(client, count)
        .await
        .into_iter()
        .map(|(offset, n, _)| (offset, n))
        .collect()
}

/// [`notes`], with the length of each payload's `pad`.
async fn padded_notes(client: &mut Client, count: usize) -> Vec<(Option<u64>, u64, usize)> {
    let mut seen = Vec::with_capacity(count);
    while seen.len() < count {
        let event = client.expect("note").await;
        let data: Value =
            serde_json::from_str(event["data"].as_str().expect("data")).expect("json");
        let pad = data["pad"].as_str().map_or(0, str::len);
        seen.push((
            event["offset"].as_u64(),
            data["n"].as_u64().expect("n"),
            pad,
        ));
    }
    seen
}

/// Publications accepted on one node reach subscribers on the others once each, history
/// channels in offset order; one too large for a NOTIFY (over 8,000 bytes; by reference on
/// PostgreSQL, whole on a bus) arrives whole.
#[tokio::test]
async fn a_publication_on_one_node_reaches_subscribers_on_every_node_once_and_in_order() {
    let Some(cluster) = Cluster::start("cluster publish", 3).await else {
        return;
    };
    let [one, two, three] = &cluster.nodes[..] else {
        unreachable!("three nodes")
    };
    let (_, creds) = pusher_app(one, "cluster-publish").await;
    let mut on_two = Client::connect(two, &creds.key).await;
    let mut on_three = Client::connect(three, &creds.key).await;
    for client in [&mut on_two, &mut on_three] {
        join(client, "history-feed", None).await;
        join(client, "feed", None).await;
    }
    // Every fifth over NOTIFY's limit: on PostgreSQL it travels by reference.
    let pad = |n: u64| if n.is_multiple_of(5) { 9_000 } else { 10 };
    for n in 1..=20 {
        publish(one, &creds, "history-feed", n, pad(n)).await;
        publish(one, &creds, "feed", n, pad(n)).await;
    }
    for client in [&mut on_two, &mut on_three] {
        let mut history = Vec::new();
        let mut plain = Vec::new();
        for (offset, n, padded) in padded_notes(client, 40).await {
            assert_eq!(padded, pad(n), "event {n} arrives whole");
            match offset {
                Some(offset) => history.push((offset, n)),
                None => plain.push(n),
            }
        }
        assert_eq!(
            history,
            (1..=20).map(|n| (n, n)).collect::<Vec<_>>(),
            "the history channel in offset order, each once"
        );
        assert_eq!(
            plain,
            (1..=20).collect::<Vec<_>>(),
            "the plain channel in publishing order, each once"
        );
    }
    cluster.stop().await;
}

/// Publishes for one history channel arriving at three nodes at once get gap-free offsets,
/// and a subscriber on each node receives them all in offset order.
#[tokio::test]
async fn concurrent_publishes_on_three_nodes_reach_every_node_in_one_offset_order() {
    let Some(cluster) = Cluster::start("cluster concurrent publishes", 3).await else {
        return;
    };
    let (_, creds) = pusher_app(&cluster.nodes[0], "cluster-concurrent").await;
    let mut clients = Vec::new();
    for node in &cluster.nodes {
        let mut client = Client::connect(node, &creds.key).await;
        join(&mut client, "history-race", None).await;
        clients.push(client);
    }
    let per_node = 30;
    let mut publishers = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let (remote, creds) = (TestServer::remote(node.base.clone()), creds.clone());
        publishers.push(tokio::spawn(async move {
            for k in 0..per_node {
                publish(&remote, &creds, "history-race", (i * 1000 + k) as u64, 10).await;
            }
        }));
    }
    for publisher in publishers {
        publisher.await.expect("publisher");
    }
    let total = per_node * 3;
    let mut first: Option<Vec<u64>> = None;
    for client in &mut clients {
        let seen = notes(client, total).await;
        let offsets: Vec<u64> = seen.iter().map(|(o, _)| o.expect("an offset")).collect();
        assert_eq!(
            offsets,
            (1..=total as u64).collect::<Vec<_>>(),
            "gap-free offsets, in order"
        );
        let payloads: Vec<u64> = seen.iter().map(|(_, n)| *n).collect();
        match &first {
            None => first = Some(payloads),
            Some(first) => assert_eq!(&payloads, first, "every node in the same order"),
        }
    }
    cluster.stop().await;
}

/// A client that received events on node 2 and reconnects to node 3 while node 1 keeps
/// publishing gets exactly what it missed: no gap, no duplicate, at the seam.
#[tokio::test]
async fn a_client_moving_between_nodes_resumes_exactly_while_another_node_publishes() {
    let Some(cluster) = Cluster::start("cluster history seam", 3).await else {
        return;
    };
    let [one, two, three] = &cluster.nodes[..] else {
        unreachable!("three nodes")
    };
    let (_, creds) = pusher_app(one, "cluster-seam").await;
    let channel = "history-seam";
    let mut first = Client::connect(two, &creds.key).await;
    let status = join(&mut first, channel, None).await;
    let epoch = status["epoch"].as_str().expect("epoch").to_owned();
    for n in 1..=3 {
        publish(one, &creds, channel, n, 10).await;
    }
    assert_eq!(
        notes(&mut first, 3).await,
        [(Some(1), 1), (Some(2), 2), (Some(3), 3)]
    );
    drop(first);
    for n in 4..=8 {
        publish(one, &creds, channel, n, 10).await;
    }
    let publisher = {
        let (remote, creds) = (TestServer::remote(one.base.clone()), creds.clone());
        tokio::spawn(async move {
            for n in 9..=40 {
                publish(&remote, &creds, channel, n, 10).await;
            }
        })
    };
    let mut again = Client::connect(three, &creds.key).await;
    let status = join(&mut again, channel, Some((&epoch, 3))).await;
    assert_eq!(status["recovered"], true, "{status}");
    publisher.await.expect("publisher");
    let seen = notes(&mut again, 37).await;
    assert_eq!(
        seen,
        (4..=40).map(|n| (Some(n), n)).collect::<Vec<_>>(),
        "in order, no gap, no duplicate"
    );
    cluster.stop().await;
}

/// Three processes' worth of failure: a node killed with -9 while 2,000 deliveries wait has
/// them finished by the nodes that remain (its leases run out and are taken over); every
/// acknowledged message arrives.
#[tokio::test]
async fn a_node_killed_with_pending_deliveries_has_every_one_finished_by_the_others() {
    if backend() != Backend::Postgres {
        herald_test_support::skip!(
            "a node killed with pending deliveries: cluster tests run in the PostgreSQL pass"
        );
        return;
    }
    let db = ThrowawayDatabase::create().await;
    let dirs = [(); 3].map(|()| tempfile::tempdir().expect("dir"));
    // Attempts time out after 2 s and leases after 2 * 2 + 1 + 5 s; thirty quick retries
    // (no extra pause after a timeout) keep every message alive while the receiver hangs.
    let retries = format!("[{}]", vec!["0.1"; 30].join(", "));
    let env = [
        ("HERALD_STORE__URL", db.url.as_str()),
        ("HERALD_DELIVERY__REQUEST_TIMEOUT_SECS", "2"),
        ("HERALD_SHUTDOWN_GRACE_SECS", "1"),
        ("HERALD_DELIVERY__RETRY_SCHEDULE_SECS", retries.as_str()),
        ("HERALD_DELIVERY__OVERLOAD_PENALTY_SECS", "0.1"),
    ];
    let mut receiver = Receiver::start().await;
    // Until the kill, nothing is answered: the doomed node holds leases on attempts in flight
    // and everything else waits in the queue.
    receiver.fallback(Reply::Hang);
    let mut doomed = spawn_herald_env(dirs[0].path(), &[], &env).await;
    let app = doomed.api.create_app("cluster-kill").await;
    doomed
        .api
        .create_endpoint(&app, json!({"url": receiver.url}))
        .await;
    let want = send_many(&doomed.api, &app, 2_000).await;
    doomed.child.start_kill().expect("SIGKILL");
    doomed.child.wait().await.expect("killed");

    receiver.fallback(Reply::Status(200));
    let mut others = Vec::new();
    for dir in &dirs[1..] {
        others.push(spawn_herald_env(dir.path(), &[], &env).await);
    }
    await_all_within(&mut receiver, &want, Duration::from_secs(30)).await;
    for mut node in others {
        node.child.start_kill().expect("kill");
        node.child.wait().await.expect("stopped");
    }
    db.drop_now().await;
}

/// Sets whether the database accepts connections, and cuts the open ones: to the nodes, the
/// database is down (as in a PostgreSQL restart or a network cut), while the suite's other
/// databases on the same server are untouched.
async fn database_reachable(db: &ThrowawayDatabase, reachable: bool) {
    use sqlx::{Connection, PgConnection};
    let mut admin = PgConnection::connect(&crate::harness::postgres_admin_url())
        .await
        .expect("connect as admin");
    // The name is made of digits and underscores (see ThrowawayDatabase).
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {} ALLOW_CONNECTIONS {reachable}",
        db.name
    )))
    .execute(&mut admin)
    .await
    .expect("alter the database");
    if !reachable {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&db.name)
        .execute(&mut admin)
        .await
        .expect("cut the connections");
    }
    admin.close().await.expect("close");
}

/// Losing the database: publishing and creating fail with 503 and say why, nothing is
/// acknowledged, `/health/ready` says not ready; when it returns, the nodes recover by
/// themselves and a subscriber on another node receives what is published next, in order.
#[tokio::test]
async fn losing_the_database_refuses_writes_with_503_and_the_cluster_recovers_by_itself() {
    let Some(cluster) = Cluster::start("cluster database outage", 2).await else {
        return;
    };
    let [one, two] = &cluster.nodes[..] else {
        unreachable!("two nodes")
    };
    let (app, creds) = pusher_app(one, "cluster-outage").await;
    // Webhooks acknowledged just before the outage, not yet delivered when it starts: the
    // receiver holds its answers until the database is gone.
    let mut receiver = Receiver::start().await;
    receiver.fallback(Reply::Hang);
    one.create_endpoint(&app, json!({"url": receiver.url}))
        .await;
    let acknowledged = send_many(one, &app, 20).await;
    let channel = "history-outage";
    let mut client = Client::connect(two, &creds.key).await;
    join(&mut client, channel, None).await;
    for n in 1..=3 {
        publish(one, &creds, channel, n, 10).await;
    }
    assert_eq!(
        notes(&mut client, 3).await,
        [(Some(1), 1), (Some(2), 2), (Some(3), 3)]
    );

    database_reachable(&cluster.db, false).await;
    let (status, body) = trigger(
        one,
        &creds,
        json!({"name": "note", "channel": channel, "data": "{\"n\": 0}"}),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("cannot be reached"), "{body}");
    let (status, body) = one
        .call(
            reqwest::Method::POST,
            &format!("/api/v1/app/{app}/msg"),
            Some(json!({"eventType": "order.created", "payload": {}})),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "store_unavailable", "{body}");
    let ready = reqwest::get(format!("{}/health/ready", one.base))
        .await
        .expect("ready");
    assert_eq!(ready.status(), 503);
    let said: Value = ready.json().await.expect("json");
    assert_eq!(said["ready"], false, "{said}");
    assert_ne!(said["store"], "ok", "{said}");

    receiver.fallback(Reply::Status(200));
    database_reachable(&cluster.db, true).await;
    recovers(
        &cluster,
        &creds,
        channel,
        &mut client,
        &mut receiver,
        &acknowledged,
    )
    .await;
    cluster.stop().await;
}

/// After the database came back: every node is ready again by itself, what node 1 publishes
/// next reaches the subscriber on node 2 in order (nothing was stored while it was away), and
/// every webhook acknowledged before the outage is delivered.
async fn recovers(
    cluster: &Cluster,
    creds: &Creds,
    channel: &str,
    client: &mut Client,
    receiver: &mut Receiver,
    acknowledged: &HashSet<String>,
) {
    for node in &cluster.nodes {
        crate::harness::eventually("the node to be ready again", || async {
            let ready = reqwest::get(format!("{}/health/ready", node.base))
                .await
                .ok()?;
            (ready.status() == 204).then_some(())
        })
        .await;
    }
    for n in 4..=6 {
        publish(&cluster.nodes[0], creds, channel, n, 10).await;
    }
    assert_eq!(
        notes(client, 3).await,
        [(Some(4), 4), (Some(5), 5), (Some(6), 6)],
        "in order after the outage"
    );
    await_all_within(receiver, acknowledged, Duration::from_secs(30)).await;
}

/// Deleting an app on node 1 closes its sockets on node 2 with 4001, as on one node.
#[tokio::test]
async fn deleting_an_app_on_one_node_closes_its_sockets_on_every_node() {
    let Some(cluster) = Cluster::start("cluster app deletion", 2).await else {
        return;
    };
    let [one, two] = &cluster.nodes[..] else {
        unreachable!("two nodes")
    };
    let (app, creds) = pusher_app(one, "cluster-deleted").await;
    let mut far = Client::connect(two, &creds.key).await;
    join(&mut far, "news", None).await;
    let (status, body) = one
        .call(reqwest::Method::DELETE, &format!("/api/v1/app/{app}"), None)
        .await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(far.closed().await, 4001);
    cluster.stop().await;
}

/// A real PostgreSQL restart cuts every session of every database on the server, so this test
/// runs alone, after the suites: `.ci/run` sets `HERALD_TEST_PG_RESTART` to the command that
/// restarts the server and runs only this test. Nothing acknowledged is lost, and the nodes
/// recover by themselves: a subscriber on node 2 receives what node 1 publishes next, in
/// order, and every acknowledged webhook is delivered.
#[tokio::test]
async fn a_postgresql_restart_loses_nothing_acknowledged_and_the_cluster_recovers_by_itself() {
    const RESTART: &str = "HERALD_TEST_PG_RESTART";
    let Ok(restart) = std::env::var(RESTART) else {
        herald_test_support::skip!(
            "a PostgreSQL restart: {RESTART} is unset (.ci/run sets it and runs this test alone, after the suites, since a restart cuts every test's sessions)"
        );
        return;
    };
    let Some(cluster) = Cluster::start("cluster PostgreSQL restart", 2).await else {
        return;
    };
    let [one, two] = &cluster.nodes[..] else {
        unreachable!("two nodes")
    };
    let (app, creds) = pusher_app(one, "cluster-restart").await;
    let mut receiver = Receiver::start().await;
    one.create_endpoint(&app, json!({"url": receiver.url}))
        .await;
    let channel = "history-restart";
    let mut client = Client::connect(two, &creds.key).await;
    join(&mut client, channel, None).await;
    for n in 1..=3 {
        publish(one, &creds, channel, n, 10).await;
    }
    assert_eq!(
        notes(&mut client, 3).await,
        [(Some(1), 1), (Some(2), 2), (Some(3), 3)]
    );
    let acknowledged = send_many(one, &app, 50).await;

    let restarted = tokio::process::Command::new("sh")
        .args(["-c", &restart])
        .status()
        .await
        .expect("run the restart command");
    assert!(restarted.success(), "{restart}: {restarted}");
    recovers(
        &cluster,
        &creds,
        channel,
        &mut client,
        &mut receiver,
        &acknowledged,
    )
    .await;
    cluster.stop().await;
}

/// What one subscriber heard, read by a task of its own while the test publishes: `note`
/// events as (offset, the payload's n), and how many pongs.
#[derive(Default)]
struct Heard {
    notes: Vec<(u64, u64)>,
    pongs: usize,
    ended: Option<String>,
}

/// A subscriber whose frames a task reads as they come (so the server never waits on it);
/// the test keeps the sending half to ping it.
struct Listening {
    name: String,
    sink: futures_util::stream::SplitSink<
        crate::pusher::Socket,
        tokio_tungstenite::tungstenite::Message,
    >,
    heard: std::sync::Arc<std::sync::Mutex<Heard>>,
    task: tokio::task::JoinHandle<()>,
}

impl Listening {
    fn start(name: String, client: Client) -> Self {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        let (sink, mut stream) = client.socket.split();
        let heard = std::sync::Arc::new(std::sync::Mutex::new(Heard::default()));
        let task = {
            let heard = heard.clone();
            tokio::spawn(async move {
                let ended = loop {
                    let text = match stream.next().await {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Close(frame))) => break format!("closed: {frame:?}"),
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => break format!("failed: {e}"),
                        None => break "ended".to_owned(),
                    };
                    let event: Value = serde_json::from_str(text.as_str()).expect("JSON");
                    let mut heard = heard.lock().expect("lock");
                    match event["event"].as_str() {
                        Some("note") => {
                            let data: Value =
                                serde_json::from_str(event["data"].as_str().expect("data"))
                                    .expect("json");
                            let offset = event["offset"].as_u64().expect("an offset");
                            heard.notes.push((offset, data["n"].as_u64().expect("n")));
                        }
                        Some("pusher:pong") => heard.pongs += 1,
                        _ => {}
                    }
                };
                heard.lock().expect("lock").ended = Some(ended);
            })
        };
        Self {
            name,
            sink,
            heard,
            task,
        }
    }

    fn heard<T>(&self, read: impl FnOnce(&Heard) -> T) -> T {
        read(&self.heard.lock().expect("lock"))
    }
}

/// Polls `check` every 20 ms until it holds; panics with `what` and `detail()` at `deadline`.
async fn until(
    deadline: tokio::time::Instant,
    what: &str,
    mut check: impl AsyncFnMut() -> bool,
    detail: impl Fn() -> String,
) {
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {}",
            detail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A restart of the bus's server (Redis or NATS) while node 1 publishes a steady stream on a
/// history channel. Publishing goes on (the store commits; a failed send to the bus is logged
/// and caught up later), every node re-subscribes by itself and is ready again, and every
/// subscriber, on every node, ends up with every acknowledged event once, in consecutive
/// offsets. It runs when `HERALD_TEST_BROKER` is a bus and `HERALD_TEST_BROKER_RESTART` is the
/// shell command that restarts that server (`.ci/run` sets it and runs this test alone, after
/// the suites, since a restart cuts every test's links to the bus).
#[tokio::test]
async fn a_broker_restart_during_a_steady_publish_stream_leaves_every_history_client_gap_free() {
    const RESTART: &str = "HERALD_TEST_BROKER_RESTART";
    /// ~100 a second for 3 s; the restart starts after the first third.
    const EVENTS: u64 = 300;
    const RESTART_AFTER: u64 = 100;
    const EVERY: Duration = Duration::from_millis(10);
    /// After the stream ends, for the nodes to be ready and every subscriber complete.
    const SETTLE: Duration = Duration::from_secs(30);
    let test = "a broker restart";
    let broker = test_broker();
    if broker == TestBroker::Postgres {
        herald_test_support::skip!(
            "{test}: it restarts a bus's server, and HERALD_TEST_BROKER is postgres (or unset); set it to redis or nats"
        );
        return;
    }
    let Ok(restart) = std::env::var(RESTART) else {
        herald_test_support::skip!(
            "{test}: {RESTART} is unset (.ci/run sets it to a command that restarts the {} server and runs this test alone, after the suites, since a restart cuts every test's links)",
            broker.name()
        );
        return;
    };
    let Some(cluster) = Cluster::start(test, 3).await else {
        return;
    };
    let (_, creds) = pusher_app(&cluster.nodes[0], "cluster-broker-restart").await;
    let channel = "history-broker-restart";
    // Two subscribers on each node the publisher is not on, and one on the publisher's node
    // (its own history publications reach it through the bus too).
    let mut listening = Vec::new();
    for (node, name) in [(1, "a"), (1, "b"), (2, "a"), (2, "b"), (0, "a")] {
        let mut client = Client::connect(&cluster.nodes[node], &creds.key).await;
        join(&mut client, channel, None).await;
        listening.push(Listening::start(
            format!("node {} client {name}", node + 1),
            client,
        ));
    }

    // A presence member on node 2: its record (Redis's keys, when the broker is Redis) is
    // lost with a server that keeps nothing, and rebuilt by node 2 from its sockets.
    let ada_listed = async || {
        until_users(
            &cluster.nodes[2],
            &creds,
            "presence-broker-restart",
            &["ada"],
        )
        .await;
    };
    let mut member = Client::connect(&cluster.nodes[1], &creds.key).await;
    join_presence(&mut member, &creds, "presence-broker-restart", "ada").await;
    ada_listed().await;

    let (restart_now, restart_due) = tokio::sync::oneshot::channel();
    let publisher = {
        let (remote, creds) = (
            TestServer::remote(cluster.nodes[0].base.clone()),
            creds.clone(),
        );
        tokio::spawn(async move {
            let mut restart_now = Some(restart_now);
            let mut tick = tokio::time::interval(EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let (mut acknowledged, mut refused) = (Vec::new(), Vec::new());
            for n in 1..=EVENTS {
                tick.tick().await;
                if n == RESTART_AFTER + 1
                    && let Some(now) = restart_now.take()
                {
                    let _ = now.send(());
                }
                let data = json!({"n": n}).to_string();
                let (status, body) = trigger(
                    &remote,
                    &creds,
                    json!({"name": "note", "channel": channel, "data": data}),
                )
                .await;
                if status == 200 {
                    acknowledged.push(n);
                } else {
                    refused.push((n, status, body));
                }
            }
            (acknowledged, refused)
        })
    };
    tokio::time::timeout(Duration::from_secs(60), restart_due)
        .await
        .expect("the first publications within 60 s")
        .expect("the publisher is running");
    let restarting = tokio::time::Instant::now();
    let restarted = {
        let restart = restart.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("sh")
                .args(["-c", &restart])
                .stdin(std::process::Stdio::null())
                .status()
        })
    };
    let restarted = tokio::time::timeout(Duration::from_secs(60), restarted)
        .await
        .expect("the restart command finishes within 60 s")
        .expect("the restart command's thread")
        .expect("run the restart command");
    let restart_took = restarting.elapsed();
    assert!(restarted.success(), "{restart}: {restarted}");
    let (acknowledged, refused) = tokio::time::timeout(Duration::from_secs(120), publisher)
        .await
        .expect("the publishing stream ends within 120 s")
        .expect("the publisher");
    let deadline = tokio::time::Instant::now() + SETTLE;
    eprintln!(
        "{test}: the {} server restarted in {restart_took:?} after publication {RESTART_AFTER}; {} of {EVENTS} publishes acknowledged",
        broker.name(),
        acknowledged.len()
    );
    if !refused.is_empty() {
        eprintln!(
            "{test}: {} of {EVENTS} publishes were not acknowledged: {refused:?}",
            refused.len()
        );
    }
    assert!(
        acknowledged.len() as u64 >= RESTART_AFTER,
        "publishing acknowledged {} of {EVENTS}; refused: {refused:?}",
        acknowledged.len()
    );

    for (i, node) in cluster.nodes.iter().enumerate() {
        let last = std::sync::Mutex::new(String::new());
        until(
            deadline,
            &format!("node {} to be ready again after the restart", i + 1),
            async || {
                let answer = match reqwest::get(format!("{}/health/ready", node.base)).await {
                    Ok(answer) => answer,
                    Err(e) => {
                        *last.lock().expect("lock") = e.to_string();
                        return false;
                    }
                };
                let status = answer.status();
                *last.lock().expect("lock") =
                    format!("{status} {}", answer.text().await.unwrap_or_default());
                status.is_success()
            },
            || format!("/health/ready last said {}", last.lock().expect("lock")),
        )
        .await;
    }

    // The member is listed by every node again (rebuilt if the restart lost it).
    ada_listed().await;

    let wanted: HashSet<u64> = acknowledged.iter().copied().collect();
    for client in &listening {
        until(
            deadline,
            &format!("{} to have every acknowledged event", client.name),
            async || client.heard(|h| wanted.iter().all(|n| h.notes.iter().any(|s| s.1 == *n))),
            || {
                client.heard(|h| {
                    let heard: HashSet<u64> = h.notes.iter().map(|s| s.1).collect();
                    let mut missing: Vec<u64> = wanted.difference(&heard).copied().collect();
                    missing.sort_unstable();
                    format!(
                        "{} events heard (last {:?}), {} acknowledged ones missing: {:?}; its socket: {}",
                        h.notes.len(),
                        h.notes.last(),
                        missing.len(),
                        &missing[..missing.len().min(20)],
                        h.ended.as_deref().unwrap_or("open")
                    )
                })
            },
        )
        .await;
    }
    // Anything still on its way to a subscriber comes before the answer to a ping.
    for client in &mut listening {
        use futures_util::SinkExt;
        let ping = json!({"event": "pusher:ping", "data": {}}).to_string();
        client
            .sink
            .send(tokio_tungstenite::tungstenite::Message::text(ping))
            .await
            .expect("ping");
    }
    let refused_ns: HashSet<u64> = refused.iter().map(|(n, _, _)| *n).collect();
    for client in &listening {
        until(
            deadline,
            &format!("{}'s pong", client.name),
            async || client.heard(|h| h.pongs > 0),
            || "no pong".to_owned(),
        )
        .await;
        let notes = client.heard(|h| h.notes.clone());
        let offsets: Vec<u64> = notes.iter().map(|(offset, _)| *offset).collect();
        assert_eq!(
            offsets,
            (1..=notes.len() as u64).collect::<Vec<_>>(),
            "{}: every offset once, in order, no gap; heard (offset, n) {notes:?}",
            client.name
        );
        assert!(
            notes.windows(2).all(|w| w[0].1 < w[1].1),
            "{}: in publishing order, each once: {notes:?}",
            client.name
        );
        let unacknowledged: Vec<u64> = notes
            .iter()
            .map(|(_, n)| *n)
            .filter(|n| !wanted.contains(n))
            .collect();
        assert!(
            unacknowledged.iter().all(|n| refused_ns.contains(n)),
            "{}: only published events arrive: {unacknowledged:?}",
            client.name
        );
    }
    for client in listening {
        client.task.abort();
    }
    cluster.stop().await;
}

/// An endpoint's `throttleRate` is one pace for the cluster, not one per node. Deliveries a
/// second node takes over go on from the turns the first reserved, rather than starting a burst
/// of their own (as they did when each node paced its own attempts, so that N nodes could send
/// N times the rate). At 4 a second: a burst of four, then one every quarter second, over
/// both nodes.
#[tokio::test]
async fn an_endpoints_throttle_rate_holds_across_the_nodes_that_deliver_to_it() {
    let Some(mut cluster) = Cluster::start("an endpoint's throttle rate across nodes", 1).await
    else {
        return;
    };
    let mut receiver = Receiver::start().await;
    let first = cluster.nodes.remove(0);
    let app = first.create_app("paced-cluster").await;
    let started = send_to_a_paced_endpoint(&first, &app, &receiver, 4, 12).await;
    let mut seen = HashSet::new();
    // The burst and the next turn's delivery come from the first node; it then stops, letting
    // go of the deliveries it held for later turns.
    let mut arrivals = arrivals_once_each(&mut receiver, &mut seen, 5, started).await;
    first.stop().await;
    let db = &cluster.db;
    let second = TestServer::start_with(|c| {
        c.store.url = Some(db.url.clone());
        join_cluster_broker(c, &db.name);
    })
    .await;
    arrivals.extend(arrivals_once_each(&mut receiver, &mut seen, 7, started).await);
    // A burst of the second node's own would bring the sixth to the ninth in together, as
    // soon as it started.
    assert_no_sooner_than_their_turns(&arrivals, 4);
    second.stop().await;
    cluster.stop().await;
}

/// The same with both nodes delivering at once: with one delivery in flight per endpoint (two
/// leased across the cluster), the nodes take the endpoint's deliveries in turns as each
/// finishes, and each node's own burst would have let eight go in the first moments. At 4 a
/// second, the n-th delivery (from 0) comes no sooner than n - 3 quarter seconds in.
#[tokio::test]
async fn an_endpoints_throttle_rate_holds_while_two_nodes_deliver_to_it_at_once() {
    let Some(cluster) = Cluster::start_with(
        "an endpoint's throttle rate with two nodes delivering",
        2,
        |c| c.delivery.per_endpoint_in_flight = 1,
    )
    .await
    else {
        return;
    };
    let mut receiver = Receiver::start().await;
    let app = cluster.nodes[0].create_app("paced-two-nodes").await;
    let started = send_to_a_paced_endpoint(&cluster.nodes[0], &app, &receiver, 4, 12).await;
    let arrivals = arrivals_once_each(&mut receiver, &mut HashSet::new(), 12, started).await;
    assert_no_sooner_than_their_turns(&arrivals, 4);
    // Which node sent how many: both, as a rule (not asserted: the claims decide).
    let mut sent = Vec::new();
    for node in &cluster.nodes {
        let text = crate::metrics::scrape(node).await;
        sent.push(crate::metrics::sample(
            &text,
            "herald_delivery_attempts_total{outcome=\"success\"}",
        ));
    }
    eprintln!("deliveries sent by each node: {sent:?}");
    assert_eq!(sent.iter().sum::<f64>(), 12.0, "{sent:?}");
    cluster.stop().await;
}
