//! Resource identifiers in Svix's style: a type prefix and a KSUID (`msg_2Ld...`).
//!
//! KSUIDs start with a timestamp and encode to fixed-width base62, so sorting ids as strings
//! sorts them by creation time. Pagination relies on that: an id doubles as a cursor.

use chrono::{DateTime, Utc};
use svix_ksuid::KsuidMs;

pub const APP: &str = "app_";
pub const ENDPOINT: &str = "ep_";
pub const MESSAGE: &str = "msg_";
pub const ATTEMPT: &str = "atmpt_";
pub const TASK: &str = "qtask_";
pub const SOURCE: &str = "src_";
pub const INGEST_EVENT: &str = "inev_";

/// A fresh id with `prefix`, ordered after every id made more than ~4 ms earlier.
pub fn new_id(prefix: &str, now: DateTime<Utc>) -> String {
    let ksuid = KsuidMs::from_millis(Some(now.timestamp_millis()), None);
    format!("{prefix}{ksuid}")
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
