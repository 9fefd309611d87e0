//! Resource identifiers in Svix's style: a type prefix and a KSUID (`msg_2Ld...`).
//!
//! KSUIDs start with a timestamp and encode to fixed-width base62, so sorting ids as strings
//! sorts them by creation time. Pagination relies on that: an id doubles as a cursor.

use chrono::{DateTime, Utc};
use std::sync::Mutex;

use svix_ksuid::{KsuidLike, KsuidMs};

pub const APP: &str = "app_";
pub const ENDPOINT: &str = "ep_";
pub const MESSAGE: &str = "msg_";
pub const ATTEMPT: &str = "atmpt_";
pub const TASK: &str = "qtask_";
pub const SOURCE: &str = "src_";
pub const INGEST_EVENT: &str = "inev_";

/// Every prefix Herald mints ids with. User-chosen identifiers (uids, `eventId`) may not start
/// with one, so a uid can never be mistaken for an id.
pub const PREFIXES: [&str; 7] = [APP, ENDPOINT, MESSAGE, ATTEMPT, TASK, SOURCE, INGEST_EVENT];

/// A fresh id with `prefix`, ordered after every id made more than ~4 ms earlier.
///
/// Ids this process makes in the same 4 ms tick are strictly increasing (the random part
/// continues from the previous id), so "newest first" holds even for a burst; an id for an
/// earlier time keeps its time.
pub fn new_id(prefix: &str, now: DateTime<Utc>) -> String {
    static LAST: Mutex<InTick> = Mutex::new(InTick { last: [0; 20] });
    let fresh = *KsuidMs::from_millis(Some(now.timestamp_millis()), None).bytes();
    let bytes = LAST.lock().unwrap_or_else(|p| p.into_inner()).order(fresh);
    format!("{prefix}{}", KsuidMs::from_bytes(bytes))
}

/// Orders ids made in the same tick after the one made before.
struct InTick {
    last: [u8; 20],
}

impl InTick {
    fn order(&mut self, mut fresh: [u8; 20]) -> [u8; 20] {
        // The first 5 bytes are the time (seconds, then 1/256 s).
        if fresh[..5] == self.last[..5] && fresh <= self.last {
            fresh = self.last;
            increment(&mut fresh);
        }
        self.last = fresh;
        fresh
    }
}

/// Adds one to a big-endian number (wrapping only if all 160 bits are set).
fn increment(bytes: &mut [u8; 20]) {
    for byte in bytes.iter_mut().rev() {
        let (next, carry) = byte.overflowing_add(1);
        *byte = next;
        if !carry {
            return;
        }
    }
}

/// Whether `value` looks like an id Herald minted with `prefix` (as opposed to a user's uid).
pub fn has_prefix(value: &str, prefix: &str) -> bool {
    value.len() == prefix.len() + 27 && value.starts_with(prefix)
}

/// The creation time encoded in an id with `prefix`, if it is one.
pub fn timestamp_of(value: &str, prefix: &str) -> Option<DateTime<Utc>> {
    let ksuid: KsuidMs = value.strip_prefix(prefix)?.parse().ok()?;
    DateTime::from_timestamp_millis(ksuid.timestamp_millis())
}

/// The smallest id with `prefix` made at `at`: a cursor for "everything since `at`".
pub fn lower_bound(prefix: &str, at: DateTime<Utc>) -> String {
    let ksuid = KsuidMs::from_millis(Some(at.timestamp_millis()), Some(&[0u8; 15]));
    format!("{prefix}{ksuid}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn ids_sort_by_creation_time() {
        let t0 = Utc::now();
        let a = new_id(MESSAGE, t0);
        // KsuidMs keeps time in 1/256 s steps (about 4 ms).
        let b = new_id(MESSAGE, t0 + Duration::milliseconds(8));
        let c = new_id(MESSAGE, t0 + Duration::seconds(3600));
        assert!(a < b && b < c, "{a} {b} {c}");
        assert!(has_prefix(&a, MESSAGE));
        assert!(!has_prefix("my-uid", MESSAGE));
    }

    #[test]
    fn ids_made_in_one_tick_still_increase() {
        let mut order = InTick { last: [0; 20] };
        let tick = *KsuidMs::from_millis(Some(1_700_000_000_000), None).bytes();
        let mut previous = [0u8; 20];
        for _ in 0..1000 {
            // Same time, random payload, as a burst of creations produces.
            let fresh = *KsuidMs::from_millis(Some(1_700_000_000_001), None).bytes();
            assert_eq!(fresh[..5], tick[..5], "one tick");
            let id = order.order(fresh);
            assert!(id > previous, "strictly increasing");
            previous = id;
        }
        // An id for an earlier time keeps its time.
        let earlier = *KsuidMs::from_millis(Some(1_600_000_000_000), None).bytes();
        assert_eq!(order.order(earlier), earlier);
        let mut edge = [0xff; 20];
        edge[0] = 0;
        increment(&mut edge);
        assert_eq!(edge[0], 1);
        assert!(edge[1..].iter().all(|b| *b == 0));
    }

    #[test]
    fn timestamp_round_trips_and_bounds_precede() {
        let t0 = DateTime::from_timestamp_millis(1_700_000_000_123).expect("valid");
        let id = new_id(ENDPOINT, t0);
        let decoded = timestamp_of(&id, ENDPOINT).expect("decodes");
        assert!(
            (t0 - decoded).num_milliseconds().abs() <= 4,
            "{decoded} vs {t0}"
        );
        assert!(lower_bound(ENDPOINT, t0) <= id);
    }
}
