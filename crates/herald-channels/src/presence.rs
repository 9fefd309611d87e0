//! Presence and occupancy, as the Pusher HTTP API and channel queries see them: which channels
//! of an app are occupied, by how many subscriptions, and which users are in a presence
//! channel.
//!
//! [`PresenceManager`] is the seam: one node answers from its own hub ([`LocalPresence`]); a
//! cluster answers for every node (entries per node with a lease, in PostgreSQL, Redis or
//! NATS) behind the same trait, and the API that asks does not change. The hub still decides
//! membership changes on this node (first socket of a user in, last one out), under its channel
//! lock, so the events it reports for channel webhooks keep their order.
//!
//! [`PresenceSync`] is the hub's other seam, for a cluster: a hub that has one hands it this
//! node's changes ([`LocalChange`]) instead of reporting them as channel webhooks and having
//! the connection announce members itself, because only the cluster knows whether a user's
//! first socket on this node is the user's first anywhere (and so whether `member_added`, the
//! `channel_occupied` webhook, and their leaves happen at all). It also reads the members other
//! nodes hold, for a presence subscriber's snapshot. One node has none: nothing changes there.

use herald_core::AppId;
use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use crate::{Hub, hub::ChannelInfo};

/// Why presence could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("presence is unavailable: {0}")]
    Unavailable(String),
}

/// Occupancy and presence members per app, across every node.
#[async_trait::async_trait]
pub trait PresenceManager: Send + Sync + 'static {
    /// The channel's subscription count (and user count, for presence channels), or `None`
    /// if nobody is subscribed.
    async fn channel_info(
        &self,
        app_id: &AppId,
        channel: &str,
    ) -> Result<Option<ChannelInfo>, PresenceError>;
    /// Occupied channels whose names start with `prefix`, by name.
    async fn channels(
        &self,
        app_id: &AppId,
        prefix: &str,
    ) -> Result<Vec<(String, ChannelInfo)>, PresenceError>;
    /// The user ids in a presence channel.
    async fn users(&self, app_id: &AppId, channel: &str) -> Result<Vec<String>, PresenceError>;
    /// Closes every connection signed in as `user_id`; returns how many.
    async fn terminate_user(&self, app_id: &AppId, user_id: &str) -> Result<usize, PresenceError>;
}

/// A change of this node's channel state, as the hub decided it under its channel lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalChange {
    /// The channel got its first subscriber on this node.
    Occupied { channel: String },
    /// The channel's last subscriber on this node left.
    Vacated { channel: String },
    /// A user's first socket on this node joined a presence channel.
    Joined {
        channel: String,
        user_id: String,
        /// The user's `user_info` as JSON text.
        info: Option<String>,
        /// The joining socket, which is not told of its own arrival.
        socket_id: String,
    },
    /// A user's last socket on this node left a presence channel.
    Left { channel: String, user_id: String },
}

/// A presence member held elsewhere: its user id and `user_info` as JSON text.
pub type RemoteMember = (String, Option<String>);

/// What reading other nodes' members returns.
pub type MembersFuture =
    Pin<Box<dyn Future<Output = Result<Vec<RemoteMember>, PresenceError>> + Send + 'static>>;

/// How a hub shares its presence and occupancy with other nodes (see the module doc).
pub trait PresenceSync: Send + Sync + 'static {
    /// Called with the channel lock held, in the order changes happen: it must only queue.
    fn changed(&self, app_id: &AppId, change: LocalChange);
    /// The members of `channel` that other nodes hold.
    fn members_elsewhere(&self, app_id: &AppId, channel: &str) -> MembersFuture;
}

/// Adds `others` to a `{"presence": {"ids", "hash", "count"}}` snapshot (this node's members
/// win where both have a user: theirs is the same user's info).
pub fn merge_snapshot(snapshot: &mut serde_json::Value, others: Vec<RemoteMember>) {
    let Some(presence) = snapshot
        .get_mut("presence")
        .and_then(serde_json::Value::as_object_mut)
    else {
        return;
    };
    let mut hash = match presence.remove("hash") {
        Some(serde_json::Value::Object(hash)) => hash,
        _ => serde_json::Map::new(),
    };
    for (user_id, info) in others {
        hash.entry(user_id).or_insert_with(|| {
            info.as_deref()
                .and_then(|i| serde_json::from_str(i).ok())
                .unwrap_or(serde_json::Value::Null)
        });
    }
    let mut ids: Vec<String> = hash.keys().cloned().collect();
    ids.sort();
    presence.insert("count".into(), hash.len().into());
    presence.insert("ids".into(), ids.into());
    presence.insert("hash".into(), serde_json::Value::Object(hash));
}

/// Completes a joining presence subscriber's `{"presence": ...}` snapshot with the members
/// other nodes hold (`elsewhere`, from [`AppHub::members_elsewhere`](crate::hub::AppHub)),
/// then tells the hub which members it lists, so member notices that crossed the snapshot are
/// not repeated to it.
///
/// If the other nodes cannot be read, the snapshot lists this node's members, and the
/// subscriber is told of the others (`member_added`) once a read succeeds: a task reads them
/// again after [`REPAIR_FIRST_WAIT`], then after waits doubling up to [`REPAIR_LAST_WAIT`],
/// until one succeeds or the subscriber has left (see [`repair_snapshot`]). Refusing the
/// subscribe instead would announce the member to the others, then its leaving, at each try.
pub async fn complete_snapshot(
    hub: &Arc<crate::hub::AppHub>,
    channel: &str,
    socket_id: &str,
    snapshot: &mut serde_json::Value,
    elsewhere: MembersFuture,
) {
    let mut repair = false;
    match elsewhere.await {
        Ok(others) => merge_snapshot(snapshot, others),
        Err(e) => {
            tracing::warn!(error = %e, channel, "reading other nodes' presence members failed; the subscriber is told of them once they can be read");
            repair = true;
        }
    }
    let listed = snapshot["presence"]["ids"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter_map(|id| id.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if !repair {
        hub.know_members(channel, socket_id, listed);
    } else if let Some(ticket) = hub.know_members_but_others(channel, socket_id, listed) {
        tokio::spawn(repair_snapshot(
            Arc::clone(hub),
            channel.to_owned(),
            socket_id.to_owned(),
            ticket,
        ));
    }
}

/// How long after a snapshot that lacks the other nodes' members they are read again.
pub const REPAIR_FIRST_WAIT: Duration = Duration::from_secs(1);
/// The longest wait between two reads of a repair.
pub const REPAIR_LAST_WAIT: Duration = Duration::from_secs(30);

/// Tells a presence subscriber whose snapshot lacks the other nodes' members
/// ([`complete_snapshot`]) what it lacks: reads them again after a wait (doubling after each
/// failure, with jitter, so a node's subscribers do not all read at once), until a read
/// succeeds and is applied ([`AppHub::finish_repair`](crate::hub::AppHub::finish_repair)), or
/// the subscriber has left the channel or has a newer snapshot (subscribing again), which
/// ends `ticket`.
pub async fn repair_snapshot(
    hub: Arc<crate::hub::AppHub>,
    channel: String,
    socket_id: String,
    ticket: u64,
) {
    use crate::hub::{Repair, Repaired};
    let mut wait = REPAIR_FIRST_WAIT;
    loop {
        tokio::time::sleep(wait.mul_f64(rand::random_range(0.5..=1.0))).await;
        match hub.begin_repair(&channel, &socket_id, ticket) {
            Repair::Begun => {}
            Repair::NotYet => {
                wait = (wait * 2).min(REPAIR_LAST_WAIT);
                continue;
            }
            Repair::Gone => return,
        }
        let Some(read) = hub.members_elsewhere(&channel) else {
            hub.abandon_repair(&channel, &socket_id, ticket);
            return;
        };
        match read.await {
            Ok(others) => match hub.finish_repair(&channel, &socket_id, ticket, &others) {
                Repaired::Told(sent) => {
                    tracing::debug!(
                        channel,
                        socket_id,
                        sent,
                        "a presence subscriber was told of the other nodes' members its snapshot lacked"
                    );
                    return;
                }
                Repaired::Superseded => wait = REPAIR_FIRST_WAIT,
                Repaired::Gone => return,
            },
            Err(e) => {
                hub.abandon_repair(&channel, &socket_id, ticket);
                wait = (wait * 2).min(REPAIR_LAST_WAIT);
                tracing::debug!(error = %e, channel, socket_id, "reading other nodes' presence members failed again");
            }
        }
    }
}

/// One node: the answers are this process's hub's.
pub struct LocalPresence {
    hub: Arc<Hub>,
}

impl LocalPresence {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

#[async_trait::async_trait]
impl PresenceManager for LocalPresence {
    async fn channel_info(
        &self,
        app_id: &AppId,
        channel: &str,
    ) -> Result<Option<ChannelInfo>, PresenceError> {
        Ok(self.hub.app(app_id).channel_info(channel))
    }

    async fn channels(
        &self,
        app_id: &AppId,
        prefix: &str,
    ) -> Result<Vec<(String, ChannelInfo)>, PresenceError> {
        Ok(self.hub.app(app_id).channels(prefix))
    }

    async fn users(&self, app_id: &AppId, channel: &str) -> Result<Vec<String>, PresenceError> {
        Ok(self.hub.app(app_id).users(channel))
    }

    async fn terminate_user(&self, app_id: &AppId, user_id: &str) -> Result<usize, PresenceError> {
        Ok(self.hub.app(app_id).terminate_user(user_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{Joining, Outbox};

    #[tokio::test]
    async fn local_presence_answers_from_the_hub() {
        let hub = Arc::new(Hub::default());
        let presence = LocalPresence::new(Arc::clone(&hub));
        let app = hub.app(&AppId::parse("app_1").expect("valid"));
        let (outbox, _rx, _) = Outbox::new(4);
        let joining = Joining {
            user_id: "u1".into(),
            info: None,
        };
        app.subscribe("presence-room", "1.1", &outbox, Some(joining), 10)
            .expect("subscribed");
        app.subscribe("public", "1.1", &outbox, None, 10)
            .expect("subscribed");
        let info = presence
            .channel_info(&AppId::parse("app_1").expect("valid"), "presence-room")
            .await
            .expect("read")
            .expect("occupied");
        assert_eq!((info.subscription_count, info.user_count), (1, Some(1)));
        assert_eq!(
            presence
                .users(&AppId::parse("app_1").expect("valid"), "presence-room")
                .await
                .expect("read"),
            ["u1"]
        );
        let listed = presence
            .channels(&AppId::parse("app_1").expect("valid"), "presence-")
            .await
            .expect("read");
        assert_eq!(listed.len(), 1);
        assert!(
            presence
                .channel_info(&AppId::parse("app_2").expect("valid"), "presence-room")
                .await
                .expect("read")
                .is_none(),
            "apps are apart"
        );
        let token = app.connection_token();
        app.sign_in("u1", "1.1", token.clone());
        assert_eq!(
            presence
                .terminate_user(&AppId::parse("app_1").expect("valid"), "u1")
                .await
                .expect("ok"),
            1
        );
        assert!(token.is_cancelled());
    }

    /// Reads other nodes' members (alice) unless `down`, counting the reads.
    #[derive(Default)]
    struct Flaky {
        down: std::sync::atomic::AtomicBool,
        reads: std::sync::atomic::AtomicUsize,
    }

    impl PresenceSync for Flaky {
        fn changed(&self, _: &AppId, _: LocalChange) {}
        fn members_elsewhere(&self, _: &AppId, _: &str) -> MembersFuture {
            use std::sync::atomic::Ordering::SeqCst;
            self.reads.fetch_add(1, SeqCst);
            let down = self.down.load(SeqCst);
            Box::pin(async move {
                match down {
                    true => Err(PresenceError::Unavailable("the record is down".into())),
                    false => Ok(vec![("alice".to_owned(), Some(r#"{"n":1}"#.to_owned()))]),
                }
            })
        }
    }

    /// Joins `socket_id` as `user` and completes its snapshot as a session does; returns the
    /// snapshot's member ids and the subscriber's frames.
    async fn join(
        app: &Arc<crate::hub::AppHub>,
        socket_id: &str,
        user: &str,
    ) -> (serde_json::Value, crate::hub::Frames) {
        let (outbox, rx, _) = Outbox::new(16);
        let joining = Joining {
            user_id: user.into(),
            info: None,
        };
        let subscribed = app
            .subscribe_joining("presence-x", socket_id, &outbox, Some(joining), 10)
            .expect("subscribed");
        let mut snapshot = subscribed.presence.expect("a snapshot");
        let elsewhere = app.members_elsewhere("presence-x").expect("shared");
        complete_snapshot(app, "presence-x", socket_id, &mut snapshot, elsewhere).await;
        assert!(app.go_live("presence-x", socket_id, 0, |_| {}));
        (snapshot["presence"]["ids"].clone(), rx)
    }

    /// A snapshot taken while the other nodes' members could not be read lists this node's;
    /// the subscriber is told of the others once a read succeeds, and the reads stop when it
    /// leaves.
    #[tokio::test(start_paused = true)]
    async fn a_snapshot_that_lacked_the_other_nodes_is_completed_once_they_can_be_read() {
        use std::sync::atomic::Ordering::SeqCst;
        let flaky = Arc::new(Flaky::default());
        let hub = Hub::default();
        assert!(hub.share_presence(Arc::clone(&flaky) as _));
        let app = hub.app(&AppId::parse("app_1").expect("valid"));

        flaky.down.store(true, SeqCst);
        let (ids, mut rx) = join(&app, "1.1", "bob").await;
        assert_eq!(ids, serde_json::json!(["bob"]), "this node's members");
        // Down for about 6 s more: the reads after 1 s and 2 s fail at most.
        tokio::time::sleep(std::time::Duration::from_secs(6)).await;
        assert!(rx.try_recv().is_err(), "nothing told while the read fails");
        let failed = flaky.reads.load(SeqCst);
        assert!((2..=5).contains(&failed), "{failed} reads");
        flaky.down.store(false, SeqCst);
        tokio::time::sleep(REPAIR_LAST_WAIT).await;
        let told: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|item| match item {
                crate::Outgoing::Frame(f) => f.as_str().to_owned(),
                crate::Outgoing::Publication(_) => panic!("a publication"),
            })
            .collect();
        assert_eq!(told.len(), 1, "{told:?}");
        assert!(
            told[0].contains("member_added")
                && told[0].contains("alice")
                && told[0].contains(r#"\"n\":1"#),
            "{told:?}"
        );
        let done = flaky.reads.load(SeqCst);
        assert_eq!(done, failed + 1, "one read more, which succeeded");
        tokio::time::sleep(REPAIR_LAST_WAIT * 4).await;
        assert_eq!(flaky.reads.load(SeqCst), done, "no read after the repair");

        flaky.down.store(true, SeqCst);
        let (ids, _rx) = join(&app, "2.2", "carol").await;
        assert_eq!(ids, serde_json::json!(["bob", "carol"]));
        tokio::time::sleep(REPAIR_LAST_WAIT).await;
        assert!(flaky.reads.load(SeqCst) > done + 1, "read again while down");
        app.unsubscribe("presence-x", "2.2");
        tokio::time::sleep(REPAIR_LAST_WAIT).await;
        let after_leaving = flaky.reads.load(SeqCst);
        tokio::time::sleep(REPAIR_LAST_WAIT * 4).await;
        assert_eq!(
            flaky.reads.load(SeqCst),
            after_leaving,
            "no read once the subscriber has left"
        );
    }

    #[test]
    fn a_snapshot_merges_other_nodes_members_once_each() {
        let mut snapshot = serde_json::json!({"presence": {
            "ids": ["u2"], "hash": {"u2": {"name": "two"}}, "count": 1
        }});
        merge_snapshot(
            &mut snapshot,
            vec![
                ("u1".into(), Some(r#"{"name":"one"}"#.into())),
                ("u2".into(), Some(r#"{"name":"other"}"#.into())),
                ("u3".into(), None),
            ],
        );
        assert_eq!(
            snapshot,
            serde_json::json!({"presence": {
                "ids": ["u1", "u2", "u3"],
                "hash": {"u1": {"name": "one"}, "u2": {"name": "two"}, "u3": null},
                "count": 3
            }})
        );
    }
}
