//! Presence and occupancy across nodes: three servers share one throwaway database, and to
//! clients, to the Pusher HTTP API and to channel webhook receivers they are one Herald
//! (members announced once each, counts summed, a stopped node's members removed once).
//!
//! These run in the suite's PostgreSQL pass (`HERALD_TEST_STORE=postgres`, with
//! `HERALD_TEST_POSTGRES_URL`); elsewhere each says it was skipped and why. Presence always
//! goes through PostgreSQL; publications travel over the suite's broker
//! (`HERALD_TEST_BROKER`, see `cluster::Cluster`), the killed process's too.

use std::time::Duration;

use herald::Config;
use serde_json::{Value, json};

use crate::{
    cluster::Cluster,
    harness::{Receiver, TestServer, eventually},
    process::spawn_herald_env,
    pusher::{Client, Creds, channel_auth, pusher_api, pusher_app},
};

/// Short, so the tests do not wait Pusher's 3 s.
const DELAY_MS: u64 = 300;

/// Nodes on one database with this file's webhook delay, or `None` outside the PostgreSQL pass.
async fn start(test: &str, nodes: usize, adjust: impl Fn(&mut Config)) -> Option<Cluster> {
    Cluster::start_with(test, nodes, |c| {
        c.ws.webhook_delay_ms = DELAY_MS;
        adjust(c);
    })
    .await
}

fn member(user: &str) -> String {
    json!({"user_id": user, "user_info": {"name": user}}).to_string()
}

/// Subscribes `client` to a presence channel as `user`; returns the snapshot's ids.
pub(crate) async fn join(
    client: &mut Client,
    creds: &Creds,
    channel: &str,
    user: &str,
) -> Vec<String> {
    let data = member(user);
    let auth = channel_auth(creds, &client.socket_id, channel, Some(&data));
    client
        .send(json!({"event": "pusher:subscribe", "data": {
            "channel": channel, "auth": auth, "channel_data": data
        }}))
        .await;
    let ok = client
        .expect("pusher_internal:subscription_succeeded")
        .await;
    let snapshot: Value =
        serde_json::from_str(ok["data"].as_str().expect("data string")).expect("json");
    let ids: Vec<String> = snapshot["presence"]["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|id| id.as_str().expect("id").to_owned())
        .collect();
    assert_eq!(snapshot["presence"]["count"], ids.len(), "{snapshot}");
    ids
}

/// The presence notices `client` receives within `wait`: ("added"/"removed", user id).
async fn notices(client: &mut Client, wait: Duration) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(event) = tokio::time::timeout_at(deadline, client.next()).await {
        let kind = match event["event"].as_str() {
            Some("pusher_internal:member_added") => "added",
            Some("pusher_internal:member_removed") => "removed",
            _ => continue,
        };
        let data: Value =
            serde_json::from_str(event["data"].as_str().expect("data")).expect("json");
        seen.push((
            kind.to_owned(),
            data["user_id"].as_str().expect("user_id").to_owned(),
        ));
    }
    seen
}

/// The next presence notice, then none more for a while: it came once.
async fn once(client: &mut Client, kind: &str, user: &str) {
    notice(client, kind, user).await;
    quiet(client, kind, user).await;
}

/// The next presence notice is `member_{kind}` of `user`.
async fn notice(client: &mut Client, kind: &str, user: &str) {
    let event = client
        .expect(&format!("pusher_internal:member_{kind}"))
        .await;
    let data: Value = serde_json::from_str(event["data"].as_str().expect("data")).expect("json");
    assert_eq!(data["user_id"], user, "{event}");
}

/// No presence notice comes for a while after `member_{kind}` of `user`: it came once.
async fn quiet(client: &mut Client, kind: &str, user: &str) {
    assert_eq!(
        notices(client, Duration::from_millis(500)).await,
        [],
        "member_{kind} {user} came once"
    );
}

/// The users the Pusher HTTP API lists for `channel` on `node`.
async fn users(node: &TestServer, creds: &Creds, channel: &str) -> Vec<String> {
    let path = format!("/apps/{}/channels/{channel}/users", creds.id);
    let (status, body) = pusher_api(node, creds, "GET", &path, &[], None).await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).expect("json");
    let mut ids: Vec<String> = body["users"]
        .as_array()
        .expect("users")
        .iter()
        .map(|u| u["id"].as_str().expect("id").to_owned())
        .collect();
    ids.sort();
    ids
}

pub(crate) async fn until_users(
    node: &TestServer,
    creds: &Creds,
    channel: &str,
    expected: &[&str],
) {
    eventually(&format!("users {expected:?} in {channel}"), || async {
        (users(node, creds, channel).await == expected).then_some(())
    })
    .await;
}

/// Users on node 2 and node 3 see each other arrive and leave, once each, and a client joining
/// later gets both in its snapshot.
#[tokio::test]
async fn members_on_different_nodes_see_each_other_join_and_leave_once() {
    let Some(cluster) = start("cluster presence join", 3, |_| {}).await else {
        return;
    };
    let [one, two, three] = &cluster.nodes[..] else {
        unreachable!("three nodes")
    };
    let (_, creds) = pusher_app(one, "cluster-presence").await;
    let channel = "presence-room";
    let mut alice = Client::connect(two, &creds.key).await;
    assert_eq!(join(&mut alice, &creds, channel, "alice").await, ["alice"]);
    until_users(one, &creds, channel, &["alice"]).await;

    let mut bob = Client::connect(three, &creds.key).await;
    assert_eq!(
        join(&mut bob, &creds, channel, "bob").await,
        ["alice", "bob"],
        "the snapshot on node 3 has node 2's member"
    );
    once(&mut alice, "added", "bob").await;
    assert_eq!(
        notices(&mut bob, Duration::from_millis(300)).await,
        [],
        "bob is not told of himself, nor of alice again"
    );

    let mut carol = Client::connect(one, &creds.key).await;
    assert_eq!(
        join(&mut carol, &creds, channel, "carol").await,
        ["alice", "bob", "carol"]
    );
    once(&mut alice, "added", "carol").await;
    once(&mut bob, "added", "carol").await;

    // Alice subscribes again on node 2: the confirmation lists the other nodes' members too,
    // and she is still told, once, when one of them leaves.
    assert_eq!(
        join(&mut alice, &creds, channel, "alice").await,
        ["alice", "bob", "carol"],
        "subscribing again lists the whole cluster's members"
    );

    drop(bob);
    once(&mut alice, "removed", "bob").await;
    once(&mut carol, "removed", "bob").await;
    drop((alice, carol));
    cluster.stop().await;
}

/// A user with sockets on two nodes is one member: added once, and removed only when the
/// last socket closes.
#[tokio::test]
async fn a_user_on_two_nodes_leaves_only_when_the_last_socket_closes() {
    let Some(cluster) = start("cluster presence two sockets", 3, |_| {}).await else {
        return;
    };
    let [one, two, three] = &cluster.nodes[..] else {
        unreachable!("three nodes")
    };
    let (_, creds) = pusher_app(one, "cluster-two-sockets").await;
    let channel = "presence-tabs";
    let mut watcher = Client::connect(one, &creds.key).await;
    join(&mut watcher, &creds, channel, "watcher").await;
    until_users(one, &creds, channel, &["watcher"]).await;

    let mut tab_two = Client::connect(two, &creds.key).await;
    join(&mut tab_two, &creds, channel, "alice").await;
    once(&mut watcher, "added", "alice").await;
    let mut tab_three = Client::connect(three, &creds.key).await;
    assert_eq!(
        join(&mut tab_three, &creds, channel, "alice").await,
        ["alice", "watcher"]
    );
    assert_eq!(
        notices(&mut watcher, Duration::from_millis(500)).await,
        [],
        "alice's second socket, on another node, is not a new member"
    );

    drop(tab_two);
    assert_eq!(
        notices(&mut watcher, Duration::from_millis(700)).await,
        [],
        "alice still has a socket on node 3"
    );
    until_users(one, &creds, channel, &["alice", "watcher"]).await;
    drop(tab_three);
    once(&mut watcher, "removed", "alice").await;
    until_users(one, &creds, channel, &["watcher"]).await;
    drop(watcher);
    cluster.stop().await;
}

/// The Pusher HTTP API on node 1 answers for the whole cluster: users, channels, counts.
#[tokio::test]
async fn the_pusher_api_on_one_node_answers_for_every_node() {
    let Some(cluster) = start("cluster presence API", 3, |_| {}).await else {
        return;
    };
    let [one, two, three] = &cluster.nodes[..] else {
        unreachable!("three nodes")
    };
    let (_, creds) = pusher_app(one, "cluster-api").await;
    let channel = "presence-api";
    let mut alice = Client::connect(two, &creds.key).await;
    join(&mut alice, &creds, channel, "alice").await;
    let mut bob = Client::connect(three, &creds.key).await;
    join(&mut bob, &creds, channel, "bob").await;
    let mut readers = Vec::new();
    for node in [two, three, three] {
        let mut reader = Client::connect(node, &creds.key).await;
        reader.subscribe("news", None, None).await;
        readers.push(reader);
    }
    until_users(one, &creds, channel, &["alice", "bob"]).await;

    let path = format!("/apps/{}/channels", creds.id);
    eventually(
        "every node's channels, with their users and counts",
        || async {
            let (status, body) = pusher_api(
                one,
                &creds,
                "GET",
                &path,
                &[("filter_by_prefix", "presence-"), ("info", "user_count")],
                None,
            )
            .await;
            assert_eq!(status, 200, "{body}");
            let presence: Value = serde_json::from_str(&body).expect("json");
            let (status, body) = pusher_api(one, &creds, "GET", &path, &[], None).await;
            assert_eq!(status, 200, "{body}");
            let all: Value = serde_json::from_str(&body).expect("json");
            let (status, body) = pusher_api(
                one,
                &creds,
                "GET",
                &format!("{path}/news"),
                &[("info", "subscription_count")],
                None,
            )
            .await;
            assert_eq!(status, 200, "{body}");
            let news: Value = serde_json::from_str(&body).expect("json");
            (presence == json!({"channels": {channel: {"user_count": 2}}})
                && all == json!({"channels": {channel: {}, "news": {}}})
                && news == json!({"occupied": true, "subscription_count": 3}))
            .then_some(())
        },
    )
    .await;
    drop(readers);
    drop((alice, bob));
    let news = format!("{path}/news");
    eventually("news vacated everywhere", || async {
        let (_, body) = pusher_api(one, &creds, "GET", &news, &[], None).await;
        (serde_json::from_str::<Value>(&body).expect("json") == json!({"occupied": false}))
            .then_some(())
    })
    .await;
    cluster.stop().await;
}

/// Reads webhook deliveries until `count` events have arrived, then checks none more come.
async fn webhook_events(receiver: &mut Receiver, count: usize) -> Vec<Value> {
    let mut all = Vec::new();
    while all.len() < count {
        let delivery = receiver.next().await;
        let body: Value = serde_json::from_slice(&delivery.body).expect("JSON body");
        all.extend(body["events"].as_array().expect("events").iter().cloned());
    }
    tokio::time::sleep(Duration::from_millis(DELAY_MS * 3)).await;
    for delivery in receiver.drain() {
        let body: Value = serde_json::from_slice(&delivery.body).expect("JSON body");
        all.extend(body["events"].as_array().expect("events").iter().cloned());
    }
    all
}

fn names(events: &[Value]) -> Vec<String> {
    let mut names: Vec<String> = events
        .iter()
        .map(|e| match e["user_id"].as_str() {
            Some(user) => format!("{} {user}", e["name"].as_str().expect("name")),
            None => e["name"].as_str().expect("name").to_owned(),
        })
        .collect();
    names.sort();
    names
}

/// Channel webhooks are the cluster's: occupied when the first subscriber anywhere arrives,
/// each member added and removed once, vacated when the last one anywhere leaves.
#[tokio::test]
async fn channel_webhooks_are_sent_once_for_the_whole_cluster() {
    let Some(cluster) = start("cluster presence webhooks", 3, |_| {}).await else {
        return;
    };
    let [one, two, three] = &cluster.nodes[..] else {
        unreachable!("three nodes")
    };
    let (app, creds) = pusher_app(one, "cluster-hooks").await;
    let mut receiver = Receiver::start().await;
    one.create_endpoint(
        &app,
        json!({"url": receiver.url, "format": "pusher", "eventTypes": [
            "channel_occupied", "channel_vacated", "member_added", "member_removed"
        ]}),
    )
    .await;
    let channel = "presence-hooks";
    let mut clients = Vec::new();
    for (node, user) in [
        (two, "alice"),
        (three, "alice"),
        (three, "bob"),
        (one, "bob"),
    ] {
        let mut client = Client::connect(node, &creds.key).await;
        join(&mut client, &creds, channel, user).await;
        clients.push(client);
    }
    until_users(one, &creds, channel, &["alice", "bob"]).await;
    let joined = webhook_events(&mut receiver, 3).await;
    assert_eq!(
        names(&joined),
        ["channel_occupied", "member_added alice", "member_added bob"],
        "{joined:?}"
    );
    drop(clients);
    let left = webhook_events(&mut receiver, 3).await;
    assert_eq!(
        names(&left),
        [
            "channel_vacated",
            "member_removed alice",
            "member_removed bob"
        ],
        "{left:?}"
    );
    cluster.stop().await;
}

/// A node that stops without leaving (aborted, as a kill) has its members removed once, by
/// the live nodes, within the TTL and two heartbeat periods: clients on every node are told, and
/// the webhook is sent once.
#[tokio::test]
async fn a_stopped_nodes_members_are_removed_once_within_the_ttl() {
    let ttl = 2;
    let Some(mut cluster) = start("cluster presence dead node", 3, |c| {
        c.cluster.node_ttl_secs = ttl;
    })
    .await
    else {
        return;
    };
    let (app, creds) = pusher_app(&cluster.nodes[0], "cluster-dead-node").await;
    let mut receiver = Receiver::start().await;
    cluster.nodes[0]
        .create_endpoint(
            &app,
            json!({"url": receiver.url, "format": "pusher", "eventTypes": [
                "member_added", "member_removed"
            ]}),
        )
        .await;
    let channel = "presence-crash";
    let mut watchers = Vec::new();
    for (i, user) in [(0, "w1"), (1, "w2")] {
        let mut watcher = Client::connect(&cluster.nodes[i], &creds.key).await;
        join(&mut watcher, &creds, channel, user).await;
        watchers.push(watcher);
    }
    until_users(&cluster.nodes[0], &creds, channel, &["w1", "w2"]).await;
    let mut doomed = Client::connect(&cluster.nodes[2], &creds.key).await;
    join(&mut doomed, &creds, channel, "alice").await;
    for watcher in &mut watchers {
        watcher.expect("pusher_internal:member_added").await;
    }
    webhook_events(&mut receiver, 3).await;

    let node = cluster.nodes.pop().expect("node 3");
    let stopped = tokio::time::Instant::now();
    node.abort();
    // Timed up to the last notice; the quiet windows that show each came once come after.
    for watcher in &mut watchers {
        notice(watcher, "removed", "alice").await;
    }
    let took = stopped.elapsed();
    for watcher in &mut watchers {
        quiet(watcher, "removed", "alice").await;
    }
    assert!(
        took <= Duration::from_secs(ttl) + Duration::from_secs_f64(2.0 * ttl as f64 / 3.0 + 1.5),
        "removed after {took:?}"
    );
    until_users(&cluster.nodes[0], &creds, channel, &["w1", "w2"]).await;
    let removed = webhook_events(&mut receiver, 1).await;
    assert_eq!(names(&removed), ["member_removed alice"], "{removed:?}");
    drop(doomed);
    drop(watchers);
    cluster.stop().await;
}

/// The ghost-member bug, with a real process: a node killed with -9 (no graceful leave, no
/// chance to write anything) has its presence members removed once, within the TTL, for the
/// clients on the nodes that remain.
#[tokio::test]
async fn a_node_killed_with_sigkill_has_its_members_removed_once_within_the_ttl() {
    let ttl = 2;
    let Some(cluster) = start("cluster presence kill -9", 1, |c| {
        c.cluster.node_ttl_secs = ttl;
    })
    .await
    else {
        return;
    };
    let survivor = &cluster.nodes[0];
    let (_, creds) = pusher_app(survivor, "cluster-sigkill").await;
    let channel = "presence-sigkill";
    let mut watcher = Client::connect(survivor, &creds.key).await;
    join(&mut watcher, &creds, channel, "watcher").await;

    let dir = tempfile::tempdir().expect("dir");
    let ttl_env = ttl.to_string();
    let mut doomed = spawn_herald_env(
        dir.path(),
        &[],
        &[
            ("HERALD_STORE__URL", cluster.db.url.as_str()),
            ("HERALD_CLUSTER__NODE_TTL_SECS", ttl_env.as_str()),
        ],
    )
    .await;
    let mut alice = Client::connect(&doomed.api, &creds.key).await;
    join(&mut alice, &creds, channel, "alice").await;
    once(&mut watcher, "added", "alice").await;
    until_users(survivor, &creds, channel, &["alice", "watcher"]).await;

    let killed = tokio::time::Instant::now();
    doomed.child.start_kill().expect("SIGKILL");
    doomed.child.wait().await.expect("killed");
    notice(&mut watcher, "removed", "alice").await;
    let took = killed.elapsed();
    quiet(&mut watcher, "removed", "alice").await;
    assert!(
        took <= Duration::from_secs(ttl) + Duration::from_secs_f64(2.0 * ttl as f64 / 3.0 + 1.5),
        "removed after {took:?}"
    );
    until_users(survivor, &creds, channel, &["watcher"]).await;
    // Once: nothing more about alice follows.
    watcher
        .send(json!({"event": "pusher:ping", "data": {}}))
        .await;
    let next = watcher.next().await;
    assert_eq!(next["event"], "pusher:pong", "{next}");
    drop(alice);
    cluster.stop().await;
}
