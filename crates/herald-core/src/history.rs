//! Channel history: which channels keep their recent events, for how long, and the positions
//! that let a client resume exactly where it left off.
//!
//! Each history channel has an **epoch** (a random id, changed when its history is reset or
//! lost) and gap-free, increasing **offsets** (1, 2, 3...). A client that saw `(epoch, offset)`
//! can ask for everything after it; if the epoch differs or the offset fell out of retention,
//! it is told recovery is impossible rather than given a silent gap.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::RngCore;

/// Which channels keep history (a `*` glob over the name) and how much. A domain value: the
/// API, the store and the config each read and write it through their own types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRule {
    pub pattern: String,
    /// Events kept per channel at most.
    pub max_events: u32,
    /// Events older than this are gone.
    pub max_age_secs: u64,
}

impl HistoryRule {
    pub fn retention(&self) -> Retention {
        Retention {
            max_events: u64::from(self.max_events),
            max_age: Duration::from_secs(self.max_age_secs),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max_events: u64,
    pub max_age: Duration,
}

/// The first rule whose pattern matches `channel`, as its retention.
pub fn retention_for(rules: &[HistoryRule], channel: &str) -> Option<Retention> {
    rules
        .iter()
        .find(|r| glob_match(&r.pattern, channel))
        .map(HistoryRule::retention)
}

/// `*` matches any run of characters (including none); everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

/// Checks a rule as the API receives it.
pub fn validate_rule(rule: &HistoryRule) -> Result<(), String> {
    if rule.pattern.is_empty() || rule.pattern.len() > 164 {
        return Err("pattern must be 1 to 164 characters".into());
    }
    if rule.max_events == 0 || rule.max_events > 100_000 {
        return Err("maxEvents must be 1 to 100000".into());
    }
    if rule.max_age_secs == 0 || rule.max_age_secs > 30 * 24 * 3600 {
        return Err("maxAgeSecs must be 1 to 2592000 (30 days)".into());
    }
    Ok(())
}

/// A fresh epoch: 16 hex digits.
pub fn new_epoch() -> String {
    let mut bytes = [0u8; 8];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// One event kept in a channel's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub app_id: crate::id::AppId,
    pub channel: String,
    pub epoch: String,
    pub offset: u64,
    pub event: String,
    /// The event's data: for server events the string's content; for client events
    /// (`raw_json`) the JSON the client sent.
    pub data: String,
    pub raw_json: bool,
    /// The sender's user id, for client events on presence channels.
    pub user_id: Option<String>,
    pub created_at: DateTime<Utc>,
    /// The socket that must not receive the event live ([`NewHistoryEntry::except`]), kept so
    /// that an event read back from the store for a live subscriber (a node's catch-up, a
    /// gap filled at a join) still leaves its sender out.
    pub except: Option<String>,
}

/// An event to append to a channel's history. The store assigns its epoch and offset in the
/// commit that keeps it, so a channel's offsets are gap-free and in commit order whichever
/// task (or, with a shared store, whichever node) appends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewHistoryEntry {
    pub app_id: crate::id::AppId,
    pub channel: String,
    pub event: String,
    /// As [`HistoryEntry::data`].
    pub data: String,
    pub raw_json: bool,
    pub user_id: Option<String>,
    pub created_at: DateTime<Utc>,
    /// What the channel keeps: the append trims it to this.
    pub retention: Retention,
    /// The epoch the channel starts under if the store has no position for it yet: the one
    /// its subscribers were told before its first event. `None`: a new random one.
    pub first_epoch: Option<String>,
    /// A socket that must not receive the event live (a client event's sender, a Pusher
    /// trigger's `socket_id`). Kept with the entry, and announced with it by a store shared by
    /// several nodes, so whichever node holds the socket leaves it out.
    pub except: Option<String>,
}

/// Where a kept event landed: its channel's epoch and its offset.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    pub epoch: String,
    pub offset: u64,
}

/// Where a channel's history stands: its epoch and the offset the next event gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelPosition {
    pub epoch: String,
    pub next_offset: u64,
}

/// What a client asking to resume after `(epoch, offset)` gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// Everything after the offset follows, in order.
    Complete { missed: u64 },
    /// It cannot be resumed; the client should reload the current state.
    Impossible(Unrecoverable),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrecoverable {
    /// The history was reset or lost since.
    EpochChanged,
    /// Events after the offset are no longer retained.
    OffsetTooOld,
    /// The offset is beyond the newest event: not a position of this history.
    OffsetAhead,
    /// More were missed than one resubscription may replay; page through the history API.
    TooMany,
}

impl Unrecoverable {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EpochChanged => "epoch_changed",
            Self::OffsetTooOld => "offset_too_old",
            Self::OffsetAhead => "offset_ahead",
            Self::TooMany => "too_many_missed",
        }
    }
}

/// Decides a resumption: `oldest` is the oldest retained offset (if any is), `position` the
/// channel's current one, `max_replay` how many events one resubscription may replay.
pub fn recovery(
    position: &ChannelPosition,
    oldest: Option<u64>,
    epoch: &str,
    offset: u64,
    max_replay: u64,
) -> Recovery {
    let newest = position.next_offset.saturating_sub(1);
    // A client at offset 0 saw nothing, so no epoch either: a channel nothing was appended to
    // has no durable epoch (its position is stored at the first append) and may show another
    // after a restart. Such a client missed exactly what is kept, if that starts at offset 1.
    if offset != 0 && epoch != position.epoch {
        return Recovery::Impossible(Unrecoverable::EpochChanged);
    }
    if offset > newest {
        return Recovery::Impossible(Unrecoverable::OffsetAhead);
    }
    let missed = newest - offset;
    if missed == 0 {
        return Recovery::Complete { missed: 0 };
    }
    // The first missed event (offset + 1) must still be retained.
    if oldest.is_none_or(|oldest| oldest > offset + 1) {
        return Recovery::Impossible(Unrecoverable::OffsetTooOld);
    }
    if missed > max_replay {
        return Recovery::Impossible(Unrecoverable::TooMany);
    }
    Recovery::Complete { missed }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_that_saw_nothing_of_a_channel_never_appended_to_has_missed_nothing() {
        let empty = ChannelPosition {
            epoch: "fresh".into(),
            next_offset: 1,
        };
        assert_eq!(
            recovery(&empty, None, "minted-before-a-restart", 0, 100),
            Recovery::Complete { missed: 0 }
        );
        let used = ChannelPosition {
            epoch: "fresh".into(),
            next_offset: 3,
        };
        assert_eq!(
            recovery(&used, Some(1), "minted-before-a-restart", 0, 100),
            Recovery::Complete { missed: 2 },
            "everything since offset 1 is kept: all of it is replayed"
        );
        assert_eq!(
            recovery(&used, Some(2), "minted-before-a-restart", 0, 100),
            Recovery::Impossible(Unrecoverable::OffsetTooOld)
        );
        assert_eq!(
            recovery(&used, Some(1), "minted-before-a-restart", 1, 100),
            Recovery::Impossible(Unrecoverable::EpochChanged),
            "a client that saw an event of another epoch cannot be caught up"
        );
    }

    #[test]
    fn globs() {
        assert!(glob_match("history-*", "history-room"));
        assert!(glob_match("*-log", "private-audit-log"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("history-*", "private-history-x"));
        assert!(!glob_match("a*b*c", "axxc"));
        assert!(glob_match("*", "anything"));
    }

    #[test]
    fn first_matching_rule_wins() {
        let rules = vec![
            HistoryRule {
                pattern: "chat-*".into(),
                max_events: 10,
                max_age_secs: 60,
            },
            HistoryRule {
                pattern: "*".into(),
                max_events: 5,
                max_age_secs: 1,
            },
        ];
        assert_eq!(
            retention_for(&rules, "chat-1").map(|r| r.max_events),
            Some(10)
        );
        assert_eq!(
            retention_for(&rules, "other").map(|r| r.max_events),
            Some(5)
        );
        assert_eq!(retention_for(&rules[..1], "other"), None);
    }

    #[test]
    fn recovery_decisions() {
        let at = |next| ChannelPosition {
            epoch: "e1".into(),
            next_offset: next,
        };
        // Events 1..=10 exist, 4..=10 retained.
        let pos = at(11);
        assert_eq!(
            recovery(&pos, Some(4), "e1", 10, 100),
            Recovery::Complete { missed: 0 }
        );
        assert_eq!(
            recovery(&pos, Some(4), "e1", 3, 100),
            Recovery::Complete { missed: 7 }
        );
        assert_eq!(
            recovery(&pos, Some(4), "e1", 2, 100),
            Recovery::Impossible(Unrecoverable::OffsetTooOld)
        );
        assert_eq!(
            recovery(&pos, Some(4), "e0", 9, 100),
            Recovery::Impossible(Unrecoverable::EpochChanged)
        );
        assert_eq!(
            recovery(&pos, Some(4), "e1", 11, 100),
            Recovery::Impossible(Unrecoverable::OffsetAhead)
        );
        assert_eq!(
            recovery(&pos, Some(4), "e1", 3, 5),
            Recovery::Impossible(Unrecoverable::TooMany)
        );
        // A fresh channel: offset 0 means "from the start", nothing missed.
        assert_eq!(
            recovery(&at(1), None, "e1", 0, 100),
            Recovery::Complete { missed: 0 }
        );
        // Everything expired by age.
        assert_eq!(
            recovery(&pos, None, "e1", 5, 100),
            Recovery::Impossible(Unrecoverable::OffsetTooOld)
        );
    }
}
