//! The presence record on Redis: entries per node, each change one Lua script (Redis runs a
//! script atomically, so it decides and announces in one step), notices published on the Redis
//! bus's pub/sub channel (the topic) as `P` followed by the notice's JSON (publications start
//! with `{`, so the broker tells them apart by the first byte).
//!
//! **Keys.** All under `herald:{<topic>}:`, one hash tag, so every key lives in one Redis
//! Cluster slot and a script may touch any of them; every script declares the keys it touches
//! (`US` is the unit separator, `\x1f`). The connection is a plain one, not a cluster client:
//! on a Redis Cluster the URL must name the primary serving that slot (the topic must not
//! contain `{` or `}`).
//!
//! - `nodes`: sorted set, node → last heartbeat (Unix milliseconds); `known`: set of every node
//!   that registered or holds entries (added by `register`, `join` and `occupy` in the same
//!   script as the entry, so a node with entries is always in it; the sweep drops a node once
//!   it is unregistered and holds nothing). Orphans are the entries of `known` nodes missing
//!   from `nodes`.
//! - `held:<node>`: set of what the node holds: `m US app US channel US user` per member,
//!   `o US app US channel` per occupied channel. The node's side of every entry.
//! - `users:<app> US <channel>`: hash user → how many nodes hold the user there;
//!   `info:<app> US <channel>`: hash user → `user_info` (the first joiner's, kept while any node
//!   holds the user); `present:<app>`: sorted set (all scores 0, for prefix ranges) of the
//!   app's channels with members.
//! - `occ:<app> US <channel>`: hash node → its subscription count; `occupied:<app>`: sorted set
//!   (scores 0) of the app's channels some node occupies.
//!
//! **Why scripts.** `join` is "add this node's entry, count the other nodes holding the user,
//! and announce `member_added` if none": two nodes joining the same user at once must not both
//! see "none", and the notice must go out exactly when the decision is made. A script is
//! Redis's transaction with logic: it runs alone, so every node's change of one key takes turns
//! (as the PostgreSQL record's advisory locks make them), and it `PUBLISH`es the notice (built
//! here and passed as an argument) only when it decided so. The same for `leave`, `occupy`,
//! `vacate`, the heartbeat, the expiry of nodes and the count writes. Every change is
//! idempotent on the node's entry in `held:<node>` (a join whose entry exists reports nothing,
//! a leave whose entry is gone reports nothing). Notices are never sent by reference: Redis
//! takes values up to 512 MB.
//!
//! **No TTL on keys.** Entries live exactly as long as the record says, not as long as a key
//! expiry would: a node's entries are removed by the live nodes' sweep when its heartbeat (its
//! score in `nodes`) is older than `node_ttl`, each as a leave through the same script, so each
//! member of a dead node leaves once and is reported once. A key expiring by itself reports
//! nothing: nobody would announce `member_removed`, and the counts in `users:*` would be
//! wrong.

use std::{collections::HashSet, sync::LazyLock, time::Duration};

use herald_channels::presence::RemoteMember;
use redis::{
    Client, Script,
    aio::{ConnectionManager, ConnectionManagerConfig},
};

use super::{ClusterPresenceError, Held, Notice, NoticeKind, Orphans, PresenceRecord};
use crate::bus::redacted;

/// How long connecting and each command may take before the record counts as unavailable.
const TIMEOUT: Duration = Duration::from_secs(3);

/// The separator in keys and entries.
const US: char = '\u{1f}';

/// The presence record on Redis (see the module doc).
pub struct RedisRecord {
    connection: ConnectionManager,
    /// The server's URL without its password, for errors.
    url: String,
    /// The pub/sub channel of notices (the Redis bus's topic).
    topic: String,
    /// `herald:{<topic>}:`, before every key.
    prefix: String,
}

static REGISTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"-- KEYS: nodes, known; ARGV: node, now
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[1])
return 0",
    )
});

static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"-- KEYS: nodes; ARGV: node, now
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == false then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return 1",
    )
});

static EXPIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"-- KEYS: nodes; ARGV: cutoff
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
for _, node in ipairs(dead) do redis.call('ZREM', KEYS[1], node) end
return dead",
    )
});

static FORGET_KNOWN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"-- KEYS: nodes, known, held; ARGV: node
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == false and redis.call('SCARD', KEYS[3]) == 0 then
  redis.call('SREM', KEYS[2], ARGV[1])
end
return 0",
    )
});

static JOIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"-- KEYS: held, users, info, present, known
-- ARGV: entry, user, has info ('1'/'0'), info, channel, topic, notice, node
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('SADD', KEYS[5], ARGV[8])
local holders = redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
redis.call('ZADD', KEYS[4], 0, ARGV[5])
if holders == 1 then
  if ARGV[3] == '1' then
    redis.call('HSET', KEYS[3], ARGV[2], ARGV[4])
  else
    redis.call('HDEL', KEYS[3], ARGV[2])
  end
  redis.call('PUBLISH', ARGV[6], ARGV[7])
  return 1
end
if ARGV[3] == '1' then redis.call('HSETNX', KEYS[3], ARGV[2], ARGV[4]) end
return 0",
    )
});

static LEAVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"-- KEYS: held, users, info, present; ARGV: entry, user, channel, topic, notice
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) > 0 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
if redis.call('HLEN', KEYS[2]) == 0 then redis.call('ZREM', KEYS[4], ARGV[3]) end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1",
    )
});

static OCCUPY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"-- KEYS: held, occ, occupied, known; ARGV: entry, node, subscriptions, channel
local added = redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[2])
local others = redis.call('HLEN', KEYS[2]) - redis.call('HEXISTS', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[3], 0, ARGV[4])
if added == 1 and others == 0 then return 1 end
return 0",
    )
});

static VACATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"-- KEYS: held, occ, occupied; ARGV: entry, node, channel
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[2])
if redis.call('HLEN', KEYS[2]) > 0 then return 0 end
redis.call('ZREM', KEYS[3], ARGV[3])
return 1",
    )
});

static WRITE_COUNTS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"-- KEYS: held, then the occ hash of each count; ARGV: node, then entry and count each
for i = 2, #KEYS do
  if redis.call('SISMEMBER', KEYS[1], ARGV[2 * i - 2]) == 1 then
    redis.call('HSET', KEYS[i], ARGV[1], ARGV[2 * i - 1])
  end
end
return 0",
    )
});

static MEMBERS_ELSEWHERE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"-- KEYS: held, users, info; ARGV: the node's entry of a user, less the user
local out = {}
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local holders = tonumber(all[i + 1])
  if redis.call('SISMEMBER', KEYS[1], ARGV[1] .. all[i]) == 1 then holders = holders - 1 end
  if holders > 0 then table.insert(out, {all[i], redis.call('HGET', KEYS[3], all[i])}) end
end
return out",
    )
});

static USERS_ELSEWHERE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"-- KEYS: held, then the users hash of each channel
-- ARGV: channel and the node's entry of a user there (less the user), each
local out = {}
for i = 2, #KEYS do
  local channel, entry = ARGV[2 * i - 3], ARGV[2 * i - 2]
  local all = redis.call('HGETALL', KEYS[i])
  for j = 1, #all, 2 do
    local holders = tonumber(all[j + 1])
    if redis.call('SISMEMBER', KEYS[1], entry .. all[j]) == 1 then holders = holders - 1 end
    if holders > 0 then table.insert(out, {channel, all[j]}) end
  end
end
return out",
    )
});

static COUNTS_ELSEWHERE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"-- KEYS: the occ hash of each channel; ARGV: node, then each channel
local out = {}
for i = 1, #KEYS do
  local all = redis.call('HGETALL', KEYS[i])
  local sum, others = 0, 0
  for j = 1, #all, 2 do
    if all[j] ~= ARGV[1] then
      sum = sum + tonumber(all[j + 1])
      others = others + 1
    end
  end
  if others > 0 then table.insert(out, {ARGV[i + 1], sum}) end
end
return out",
    )
});

impl RedisRecord {
    /// Connects to the Redis server at `url`; notices go to the pub/sub channel `topic` (the
    /// Redis bus's), keys under `herald:{<topic>}:`. Fails at once if the server does not answer
    /// within 3 s.
    pub async fn connect(url: &str, topic: &str) -> Result<Self, ClusterPresenceError> {
        let shown = redacted(url);
        let client = Client::open(url).map_err(|e| {
            ClusterPresenceError::Record(format!("Redis: {shown} is not a Redis URL: {e}"))
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(2);
        let connection = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| unavailable(&shown, &e))?;
        Ok(Self {
            connection,
            url: shown,
            topic: topic.to_owned(),
            prefix: format!("herald:{{{topic}}}:"),
        })
    }

    fn failed(&self, e: &redis::RedisError) -> ClusterPresenceError {
        unavailable(&self.url, e)
    }

    fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn nodes(&self) -> String {
        self.key("nodes")
    }

    fn known(&self) -> String {
        self.key("known")
    }

    fn held(&self, node: &str) -> String {
        self.key(&format!("held:{node}"))
    }

    fn per_channel(&self, kind: &str, app: &str, channel: &str) -> String {
        self.key(&format!("{kind}:{app}{US}{channel}"))
    }

    fn per_app(&self, kind: &str, app: &str) -> String {
        self.key(&format!("{kind}:{app}"))
    }

    /// The channels of the sorted set `key` whose name starts with `prefix`.
    async fn channels_starting(
        &self,
        key: &str,
        prefix: &str,
    ) -> Result<Vec<String>, ClusterPresenceError> {
        let (min, max) = if prefix.is_empty() {
            (b"-".to_vec(), b"+".to_vec())
        } else {
            let min = [b"[", prefix.as_bytes()].concat();
            // Channel names are UTF-8, which never has the byte 0xff.
            let max = [b"[", prefix.as_bytes(), b"\xff"].concat();
            (min, max)
        };
        let channels: Vec<String> = redis::cmd("ZRANGEBYLEX")
            .arg(key)
            .arg(min)
            .arg(max)
            .query_async(&mut self.connection())
            .await
            .map_err(|e| self.failed(&e))?;
        Ok(channels
            .into_iter()
            .filter(|c| c.starts_with(prefix))
            .collect())
    }

    /// `P` and the notice's JSON, as published.
    fn payload(notice: &Notice) -> Result<String, ClusterPresenceError> {
        Ok(format!("P{}", notice.to_json()?))
    }
}

/// An error naming the server (without its password).
fn unavailable(url: &str, e: &redis::RedisError) -> ClusterPresenceError {
    ClusterPresenceError::Record(format!("Redis {url}: {e}"))
}

fn member_entry(app: &str, channel: &str, user_id: &str) -> String {
    format!("m{US}{app}{US}{channel}{US}{user_id}")
}

/// A member's entry without its user (the user follows).
fn member_entry_prefix(app: &str, channel: &str) -> String {
    format!("m{US}{app}{US}{channel}{US}")
}

fn channel_entry(app: &str, channel: &str) -> String {
    format!("o{US}{app}{US}{channel}")
}

/// An entry of a `held:<node>` set.
enum Entry {
    Member(String, String, String),
    Channel(String, String),
}

fn parse_entry(entry: &str) -> Option<Entry> {
    let mut parts = entry.splitn(4, US);
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("m"), Some(app), Some(channel), Some(user)) => {
            Some(Entry::Member(app.into(), channel.into(), user.into()))
        }
        (Some("o"), Some(app), Some(channel), None) => {
            Some(Entry::Channel(app.into(), channel.into()))
        }
        _ => None,
    }
}

#[async_trait::async_trait]
impl PresenceRecord for RedisRecord {
    async fn register(&self, node: &str, beat: i64) -> Result<(), ClusterPresenceError> {
        REGISTER
            .key(self.nodes())
            .key(self.known())
            .arg(node)
            .arg(beat)
            .invoke_async::<()>(&mut self.connection())
            .await
            .map_err(|e| self.failed(&e))
    }

    async fn heartbeat(&self, node: &str, beat: i64) -> Result<bool, ClusterPresenceError> {
        HEARTBEAT
            .key(self.nodes())
            .arg(node)
            .arg(beat)
            .invoke_async(&mut self.connection())
            .await
            .map_err(|e| self.failed(&e))
    }

    async fn join(
        &self,
        node: &str,
        app: &str,
        channel: &str,
        user_id: &str,
        info: Option<&str>,
        except: Option<&str>,
    ) -> Result<bool, ClusterPresenceError> {
        let notice =
            Notice::member(NoticeKind::Added, node, app, channel, user_id).with_info(info, except);
        JOIN.key(self.held(node))
            .key(self.per_channel("users", app, channel))
            .key(self.per_channel("info", app, channel))
            .key(self.per_app("present", app))
            .key(self.known())
            .arg(member_entry(app, channel, user_id))
            .arg(user_id)
            .arg(if info.is_some() { "1" } else { "0" })
            .arg(info.unwrap_or(""))
            .arg(channel)
            .arg(&self.topic)
            .arg(Self::payload(&notice)?)
            .arg(node)
            .invoke_async(&mut self.connection())
            .await
            .map_err(|e| self.failed(&e))
    }

    async fn leave(
        &self,
        node: &str,
        deciding: &str,
        app: &str,
        channel: &str,
        user_id: &str,
    ) -> Result<bool, ClusterPresenceError> {
        let notice = Notice::member(NoticeKind::Removed, deciding, app, channel, user_id);
        LEAVE
            .key(self.held(node))
            .key(self.per_channel("users", app, channel))
            .key(self.per_channel("info", app, channel))
            .key(self.per_app("present", app))
            .arg(member_entry(app, channel, user_id))
            .arg(user_id)
            .arg(channel)
            .arg(&self.topic)
            .arg(Self::payload(&notice)?)
            .invoke_async(&mut self.connection())
            .await
            .map_err(|e| self.failed(&e))
    }

    async fn occupy(
        &self,
        node: &str,
        app: &str,
        channel: &str,
        subscriptions: i64,
    ) -> Result<bool, ClusterPresenceError> {
        OCCUPY
            .key(self.held(node))
            .key(self.per_channel("occ", app, channel))
            .key(self.per_app("occupied", app))
            .key(self.known())
            .arg(channel_entry(app, channel))
            .arg(node)
            .arg(subscriptions)
            .arg(channel)
            .invoke_async(&mut self.connection())
            .await
            .map_err(|e| self.failed(&e))
    }

    async fn vacate(
        &self,
        node: &str,
        app: &str,
        channel: &str,
    ) -> Result<bool, ClusterPresenceError> {
        VACATE
            .key(self.held(node))
            .key(self.per_channel("occ", app, channel))
            .key(self.per_app("occupied", app))
            .arg(channel_entry(app, channel))
            .arg(node)
            .arg(channel)
            .invoke_async(&mut self.connection())
            .await
            .map_err(|e| self.failed(&e))
    }

    async fn write_counts(
        &self,
        node: &str,
        counts: &[(String, String, i64)],
    ) -> Result<(), ClusterPresenceError> {
        if counts.is_empty() {
            return Ok(());
        }
        let mut invocation = WRITE_COUNTS.key(self.held(node));
        invocation.arg(node);
        for (app, channel, count) in counts {
            invocation
                .key(self.per_channel("occ", app, channel))
                .arg(channel_entry(app, channel))
                .arg(*count);
        }
        invocation
            .invoke_async::<()>(&mut self.connection())
            .await
            .map_err(|e| self.failed(&e))
    }

    async fn held_by(&self, node: &str) -> Result<Held, ClusterPresenceError> {
        let entries: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.held(node))
            .query_async(&mut self.connection())
            .await
            .map_err(|e| self.failed(&e))?;
        let mut held = Held::default();
        for entry in entries {
            match parse_entry(&entry) {
                Some(Entry::Member(app, channel, user)) => {
                    held.members.insert((app, channel, user));
                }
                Some(Entry::Channel(app, channel)) => {
                    held.channels.insert((app, channel));
                }
                None => {}
            }
        }
        Ok(held)
    }

    async fn stale_nodes(
        &self,
        cutoff_millis: i64,
    ) -> Result<Vec<(String, i64)>, ClusterPresenceError> {
        // Scores are Unix milliseconds, exact in a double.
        let stale: Vec<(String, f64)> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.nodes())
            .arg("-inf")
            .arg(format!("({cutoff_millis}"))
            .arg("WITHSCORES")
            .query_async(&mut self.connection())
            .await
            .map_err(|e| self.failed(&e))?;
        Ok(stale
            .into_iter()
            .map(|(node, beat)| (node, beat as i64))
            .collect())
    }

    async fn expire_nodes(&self, cutoff_millis: i64) -> Result<Vec<String>, ClusterPresenceError> {
        EXPIRE
            .key(self.nodes())
            .arg(cutoff_millis)
            .invoke_async(&mut self.connection())
            .await
            .map_err(|e| self.failed(&e))
    }

    async fn forget_node(&self, node: &str) -> Result<(), ClusterPresenceError> {
        redis::cmd("ZREM")
            .arg(self.nodes())
            .arg(node)
            .query_async::<()>(&mut self.connection())
            .await
            .map_err(|e| self.failed(&e))
    }

    async fn orphans(&self, limit: i64) -> Result<Orphans, ClusterPresenceError> {
        let limit = usize::try_from(limit).unwrap_or(0);
        let mut connection = self.connection();
        let known: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.known())
            .query_async(&mut connection)
            .await
            .map_err(|e| self.failed(&e))?;
        if known.is_empty() {
            return Ok(Orphans::default());
        }
        let mut scores = redis::pipe();
        for node in &known {
            scores.zscore(self.nodes(), node);
        }
        let scores: Vec<Option<f64>> = scores
            .query_async(&mut connection)
            .await
            .map_err(|e| self.failed(&e))?;
        let mut orphans = Orphans::default();
        for (node, _) in known.iter().zip(scores).filter(|(_, s)| s.is_none()) {
            if orphans.members.len() >= limit && orphans.channels.len() >= limit {
                break;
            }
            let entries: Vec<String> = redis::cmd("SMEMBERS")
                .arg(self.held(node))
                .query_async(&mut connection)
                .await
                .map_err(|e| self.failed(&e))?;
            if entries.is_empty() {
                // Unregistered and holding nothing: no longer a node to look at (unless it
                // registered again meanwhile, which the script checks).
                FORGET_KNOWN
                    .key(self.nodes())
                    .key(self.known())
                    .key(self.held(node))
                    .arg(node)
                    .invoke_async::<()>(&mut connection)
                    .await
                    .map_err(|e| self.failed(&e))?;
                continue;
            }
            for entry in entries {
                match parse_entry(&entry) {
                    Some(Entry::Member(app, channel, user)) if orphans.members.len() < limit => {
                        orphans.members.push((node.clone(), app, channel, user));
                    }
                    Some(Entry::Channel(app, channel)) if orphans.channels.len() < limit => {
                        orphans.channels.push((node.clone(), app, channel));
                    }
                    _ => {}
                }
            }
        }
        Ok(orphans)
    }

    async fn members_elsewhere(
        &self,
        node: &str,
        app: &str,
        channel: &str,
    ) -> Result<Vec<RemoteMember>, ClusterPresenceError> {
        MEMBERS_ELSEWHERE
            .key(self.held(node))
            .key(self.per_channel("users", app, channel))
            .key(self.per_channel("info", app, channel))
            .arg(member_entry_prefix(app, channel))
            .invoke_async(&mut self.connection())
            .await
            .map_err(|e| self.failed(&e))
    }

    async fn counts_elsewhere(
        &self,
        node: &str,
        app: &str,
        prefix: &str,
    ) -> Result<Vec<(String, i64)>, ClusterPresenceError> {
        let channels = self
            .channels_starting(&self.per_app("occupied", app), prefix)
            .await?;
        if channels.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = COUNTS_ELSEWHERE.arg(node);
        for channel in &channels {
            invocation
                .key(self.per_channel("occ", app, channel))
                .arg(channel);
        }
        invocation
            .invoke_async(&mut self.connection())
            .await
            .map_err(|e| self.failed(&e))
    }

    async fn users_elsewhere(
        &self,
        node: &str,
        app: &str,
        prefix: &str,
    ) -> Result<Vec<(String, String)>, ClusterPresenceError> {
        let channels = self
            .channels_starting(&self.per_app("present", app), prefix)
            .await?;
        if channels.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = USERS_ELSEWHERE.key(self.held(node));
        for channel in &channels {
            invocation
                .key(self.per_channel("users", app, channel))
                .arg(channel)
                .arg(member_entry_prefix(app, channel));
        }
        let pairs: Vec<(String, String)> = invocation
            .invoke_async(&mut self.connection())
            .await
            .map_err(|e| self.failed(&e))?;
        // Distinct, as the PostgreSQL record's.
        let mut seen = HashSet::new();
        Ok(pairs
            .into_iter()
            .filter(|p| seen.insert(p.clone()))
            .collect())
    }

    async fn member_info(
        &self,
        app: &str,
        channel: &str,
        user_id: &str,
    ) -> Result<Option<String>, ClusterPresenceError> {
        redis::cmd("HGET")
            .arg(self.per_channel("info", app, channel))
            .arg(user_id)
            .query_async(&mut self.connection())
            .await
            .map_err(|e| self.failed(&e))
    }

    async fn announce(&self, notice: Notice) -> Result<(), ClusterPresenceError> {
        redis::cmd("PUBLISH")
            .arg(&self.topic)
            .arg(Self::payload(&notice)?)
            .query_async::<()>(&mut self.connection())
            .await
            .map_err(|e| self.failed(&e))
    }
}
