//! The channel positions the last committed batch left, kept by the group commit so a batch of
//! appends to channels it has seen needs no read before it writes.
//!
//! It was made when every statement was a round trip to sqlx's connection thread and reading
//! the positions of the channels a batch touches was one more in every batch of history
//! appends; the batch now runs its statements itself (see `locked`), and the cache still saves
//! a B-tree seek per channel per batch.
//!
//! The cache is exact because the writer connection is the only way to `channel_positions`,
//! and it changes them only in three ways:
//! - a batch: the cache takes the batch's positions after its `COMMIT`, before the connection
//!   goes back to the pool; a batch that fails or falls back to one write at a time (whose
//!   savepoints this does not follow) empties it instead;
//! - `reset_history` and `forget_unused_channel_positions`: they empty it while they hold the
//!   connection, so no batch runs between their write and the emptying;
//! - deleting an app, whose positions go by cascade: the store empties the cache after the
//!   delete. A batch in between can only write for the deleted app with a stale position,
//!   which its foreign key refuses; the batch falls back and that empties the cache too.

use std::{collections::HashMap, sync::Mutex};

/// Beyond this many channels, the cache starts again empty rather than grow: a channel it lost
/// costs one read the next time, as before it existed.
const MAX_CHANNELS: usize = 10_000;

/// A channel's epoch and the offset its next event gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KnownPosition {
    pub epoch: String,
    pub next_offset: i64,
}

/// An app id and a channel name.
pub(crate) type ChannelKey = (String, String);

#[derive(Default)]
pub(crate) struct PositionCache {
    positions: Mutex<HashMap<ChannelKey, KnownPosition>>,
}

impl PositionCache {
    /// The cached position of each channel, in the order given; `None` where unknown.
    pub(crate) fn lookup(&self, channels: &[(&str, &str)]) -> Vec<Option<KnownPosition>> {
        let positions = self.lock();
        if positions.is_empty() {
            return vec![None; channels.len()];
        }
        channels
            .iter()
            .map(|(app_id, channel)| {
                positions
                    .get(&((*app_id).to_owned(), (*channel).to_owned()))
                    .cloned()
            })
            .collect()
    }

    /// Takes the positions a batch committed.
    pub(crate) fn remember(&self, written: Vec<(ChannelKey, KnownPosition)>) {
        let mut positions = self.lock();
        if positions.len() + written.len() > MAX_CHANNELS {
            positions.clear();
        }
        positions.extend(written);
    }

    /// Forgets every position: the next batch reads what it needs from the database.
    pub(crate) fn forget_all(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChannelKey, KnownPosition>> {
        // A panic while holding the lock cannot leave the map half-updated in a way that
        // matters more than any other stale state: forget everything and go on.
        self.positions.lock().unwrap_or_else(|poisoned| {
            self.positions.clear_poison();
            let mut positions = poisoned.into_inner();
            positions.clear();
            positions
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position(epoch: &str, next_offset: i64) -> KnownPosition {
        KnownPosition {
            epoch: epoch.to_owned(),
            next_offset,
        }
    }

    fn key(channel: &str) -> ChannelKey {
        ("app".to_owned(), channel.to_owned())
    }

    #[test]
    fn lookups_answer_what_was_remembered_and_nothing_else() {
        let cache = PositionCache::default();
        assert_eq!(cache.lookup(&[("app", "a")]), [None]);
        cache.remember(vec![(key("a"), position("e", 4))]);
        cache.remember(vec![
            (key("a"), position("e", 6)),
            (key("b"), position("f", 2)),
        ]);
        assert_eq!(
            cache.lookup(&[("app", "b"), ("other", "a"), ("app", "a")]),
            [Some(position("f", 2)), None, Some(position("e", 6))]
        );
        cache.forget_all();
        assert_eq!(cache.lookup(&[("app", "a"), ("app", "b")]), [None, None]);
    }

    #[test]
    fn the_cache_starts_again_rather_than_grow_past_its_bound() {
        let cache = PositionCache::default();
        let many = (0..MAX_CHANNELS)
            .map(|n| (key(&n.to_string()), position("e", 2)))
            .collect();
        cache.remember(many);
        assert_eq!(cache.lookup(&[("app", "0")]), [Some(position("e", 2))]);
        cache.remember(vec![(key("new"), position("e", 3))]);
        assert_eq!(
            cache.lookup(&[("app", "0"), ("app", "new")]),
            [None, Some(position("e", 3))]
        );
    }
}
