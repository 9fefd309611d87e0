//! Several nodes as one, on PostgreSQL alone: three servers on loopback ports share one
//! throwaway database, and clients on different nodes see one Herald.
//!
//! These run in the suite's PostgreSQL pass (`HERALD_TEST_STORE=postgres`, with
//! `HERALD_TEST_POSTGRES_URL`); elsewhere each says it was skipped and why.

use serde_json::{Value, json};

use crate::{
    harness::{Backend, TestServer, ThrowawayDatabase, backend},
    pusher::{Client, Creds, pusher_app, trigger},
};

/// Three nodes on one database, or `None` (and a line saying why) outside the PostgreSQL pass.
struct Cluster {
    nodes: Vec<TestServer>,
    db: ThrowawayDatabase,
}

impl Cluster {
    async fn start(test: &str, nodes: usize) -> Option<Self> {
        if backend() != Backend::Postgres {
            eprintln!(
                "skipped {test}: cluster tests run in the PostgreSQL pass (HERALD_TEST_STORE=postgres and HERALD_TEST_POSTGRES_URL)"
            );
            return None;
        }
        let db = ThrowawayDatabase::create().await;
        let mut started = Vec::new();
        for _ in 0..nodes {
            let url = db.url.clone();
            started.push(TestServer::start_with(move |c| c.store.url = Some(url)).await);
        }
        Some(Self { nodes: started, db })
    }

    async fn stop(self) {
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

async fn join(client: &mut Client, channel: &str, resume: Option<(&str, u64)>) -> Value {
    let mut data = json!({"channel": channel});
    if let Some((epoch, offset)) = resume {
        data["epoch"] = json!(epoch);
        data["offset"] = json!(offset);
    }
    client
        .send(json!({"event": "pusher:subscribe", "data": data}))
        .await;
    let ok = client
        .expect("pusher_internal:subscription_succeeded")
        .await;
    let confirmation: Value =
        serde_json::from_str(ok["data"].as_str().expect("data string")).expect("json");
    confirmation["history"].clone()
}

/// The next `count` `note` events: (offset if any, the payload's n).
async fn notes(client: &mut Client, count: usize) -> Vec<(Option<u64>, u64)> {
    let mut seen = Vec::with_capacity(count);
    while seen.len() < count {
        let event = client.expect("note").await;
        let data: Value =
            serde_json::from_str(event["data"].as_str().expect("data")).expect("json");
        seen.push((event["offset"].as_u64(), data["n"].as_u64().expect("n")));
    }
    seen
}

/// Publications accepted on one node reach subscribers on the others once each, history
/// channels in offset order; one too large for a NOTIFY (over 8,000 bytes) arrives whole.
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
    for n in 1..=20 {
        // Every fifth over NOTIFY's limit: it travels by reference.
        let pad = if n % 5 == 0 { 9_000 } else { 10 };
        publish(one, &creds, "history-feed", n, pad).await;
        publish(one, &creds, "feed", n, pad).await;
    }
    for client in [&mut on_two, &mut on_three] {
        let mut history = Vec::new();
        let mut plain = Vec::new();
        for (offset, n) in notes(client, 40).await {
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
