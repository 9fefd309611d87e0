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
pub const TOKEN: &str = "tok_";

/// Every prefix Herald mints ids with. User-chosen identifiers (uids, `eventId`) may not start
/// with one, so a uid can never be mistaken for an id.
pub const PREFIXES: [&str; 8] = [
    APP,
    ENDPOINT,
    MESSAGE,
    ATTEMPT,
    TASK,
    SOURCE,
    INGEST_EVENT,
    TOKEN,
];

/// A fresh id with `prefix`, ordered after every id made more than ~4 ms earlier.
///
/// Ids this process makes in the same 4 ms tick are strictly increasing (the random part
/// continues from the previous id), so "newest first" holds even for a burst; an id for an
/// earlier time keeps its time.
pub fn new_id(prefix: &str, now: DateTime<Utc>) -> String {
    static LAST: Mutex<InTick> = Mutex::new(InTick { last: [0; 20] });
    // The random part from the thread's generator (a CSPRNG seeded from the OS): left to the
    // ksuid crate, it is a `getrandom` system call per id, 1% of the server's CPU at a few
    // thousand webhooks a second.
    let mut payload = [0u8; <KsuidMs as KsuidLike>::PAYLOAD_BYTES];
    rand::Rng::fill(&mut rand::rng(), &mut payload[..]);
    let fresh = *KsuidMs::from_millis(Some(now.timestamp_millis()), Some(&payload)).bytes();
    let bytes = LAST.lock().unwrap_or_else(|p| p.into_inner()).order(fresh);
    let mut id = String::with_capacity(prefix.len() + BASE62_WIDTH);
    id.push_str(prefix);
    id.extend(base62(&bytes).iter().map(|&digit| char::from(digit)));
    id
}

/// KSUID's base62 digits, in ASCII order, so the fixed-width strings sort as the numbers do.
const BASE62_DIGITS: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Digits of a 160-bit KSUID in base62 (62^27 is the first power above 2^160).
const BASE62_WIDTH: usize = 27;

/// A KSUID's 20 bytes as its 27 base62 digits, the encoding `svix_ksuid` gives (the test
/// `base62_is_the_ksuid_encoding` holds the two together). That crate's encoder divides by 62
/// once per digit, in vectors it allocates, and was 1.4% of the server's CPU at 15,000 inbound
/// webhooks a second (three ids each: the request's, the record's and the message's). This
/// one divides the number, as five 32-bit limbs on the stack, by 62^5 per round and takes
/// five digits from each remainder.
fn base62(bytes: &[u8; 20]) -> [u8; BASE62_WIDTH] {
    const FIVE_DIGITS: u64 = 62 * 62 * 62 * 62 * 62;
    let mut limbs = [0u32; 5];
    for (limb, chunk) in limbs.iter_mut().zip(bytes.chunks_exact(4)) {
        *limb = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    let mut digits = [BASE62_DIGITS[0]; BASE62_WIDTH];
    let mut next = BASE62_WIDTH;
    while next > 0 {
        // The number divided by 62^5 in place, most significant limb first; each step's
        // dividend stays below 62^5 * 2^32, within a u64.
        let mut remainder = 0u64;
        for limb in &mut limbs {
            let dividend = (remainder << 32) | u64::from(*limb);
            *limb = u32::try_from(dividend / FIVE_DIGITS).unwrap_or(u32::MAX);
            remainder = dividend % FIVE_DIGITS;
        }
        for _ in 0..5 {
            if next == 0 {
                break;
            }
            next -= 1;
            digits[next] = BASE62_DIGITS[(remainder % 62) as usize];
            remainder /= 62;
        }
    }
    digits
}

/// Orders ids made in the same tick after the one made before.
struct InTick {
    last: [u8; 20],
}

impl InTick {
    fn order(&mut self, mut fresh: [u8; 20]) -> [u8; 20] {
        // The first 5 bytes are the time (seconds, then steps of 4 ms).
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
///
/// An id holds its time as 32 bits of seconds since the KSUID epoch (2014-05-13), so it can
/// name 2014-05-13 to 2150 only; a time outside is held to that range (no id was made before
/// it), where the id's own arithmetic would wrap it around (1970 became 2106, and a window
/// from then matched nothing).
pub fn lower_bound(prefix: &str, at: DateTime<Utc>) -> String {
    const FIRST_MS: i64 = svix_ksuid::KSUID_EPOCH * 1_000;
    const LAST_MS: i64 = (svix_ksuid::KSUID_EPOCH + u32::MAX as i64) * 1_000 + 999;
    let millis = at.timestamp_millis().clamp(FIRST_MS, LAST_MS);
    let ksuid = KsuidMs::from_millis(Some(millis), Some(&[0u8; 15]));
    format!("{prefix}{ksuid}")
}

/// An id string that does not have the prefix its type requires.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid id {value:?}: expected a non-empty id starting with {expected:?}")]
pub struct IdError {
    /// The prefix the id's type requires.
    pub expected: &'static str,
    /// The string that was refused.
    pub value: String,
}

/// Defines a typed id: a `String` newtype that always carries its prefix.
macro_rules! typed_id {
    ($(#[$meta:meta])* $name:ident, $prefix:expr) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// A fresh id made at `now` (see [`new_id`]).
            pub fn new(now: DateTime<Utc>) -> Self {
                Self(new_id(Self::PREFIX, now))
            }

            /// Accepts a string that starts with [`Self::PREFIX`] and has something after it.
            /// Ids are otherwise opaque.
            pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                if s.len() > Self::PREFIX.len() && s.starts_with(Self::PREFIX) {
                    Ok(Self(s))
                } else {
                    Err(IdError {
                        expected: Self::PREFIX,
                        value: s,
                    })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl PartialEq<$name> for str {
            fn eq(&self, other: &$name) -> bool {
                self == other.0
            }
        }

        impl PartialEq<$name> for &str {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }
    };
}

typed_id!(
    /// An app's id, `app_...`.
    AppId,
    APP
);
typed_id!(
    /// An endpoint's id, `ep_...`.
    EndpointId,
    ENDPOINT
);
typed_id!(
    /// A message's id, `msg_...`.
    MessageId,
    MESSAGE
);
typed_id!(
    /// A delivery attempt's id, `atmpt_...`.
    AttemptId,
    ATTEMPT
);
typed_id!(
    /// A background task's id, `qtask_...` (the recover and replay answers name one).
    TaskId,
    TASK
);
typed_id!(
    /// An ingest source's id, `src_...`.
    SourceId,
    SOURCE
);
typed_id!(
    /// A received inbound webhook's id, `inev_...`.
    IngestEventId,
    INGEST_EVENT
);
typed_id!(
    /// An API token's id, `tok_...`: names the token in lists and revocations, never opens
    /// anything itself.
    TokenId,
    TOKEN
);

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    #[test]
    fn base62_is_the_ksuid_encoding() {
        let mut cases = vec![[0u8; 20], [0xff; 20], {
            let mut one = [0u8; 20];
            one[19] = 1;
            one
        }];
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..10_000 {
            let mut bytes = [0u8; 20];
            for byte in &mut bytes {
                // xorshift: deterministic, spread over every bit.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *byte = state.to_le_bytes()[0];
            }
            cases.push(bytes);
        }
        for bytes in cases {
            let ours = base62(&bytes);
            assert_eq!(
                std::str::from_utf8(&ours).expect("ASCII"),
                KsuidMs::from_bytes(bytes).to_base62(),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn ids_sort_by_creation_time() {
        let t0 = Utc::now();
        let a = new_id(MESSAGE, t0);
        // KsuidMs keeps time in steps of 4 ms.
        let b = new_id(MESSAGE, t0 + Duration::milliseconds(8));
        let c = new_id(MESSAGE, t0 + Duration::seconds(3600));
        assert!(a < b && b < c, "{a} {b} {c}");
        assert!(has_prefix(&a, MESSAGE));
        assert!(!has_prefix("my-uid", MESSAGE));
    }

    #[test]
    fn a_burst_of_ids_is_distinct_and_fixed_width_base62_of_its_time() {
        let now = Utc::now();
        let ids: Vec<String> = (0..10_000).map(|_| new_id(MESSAGE, now)).collect();
        for id in &ids {
            let encoded = id.strip_prefix(MESSAGE).expect("prefix");
            assert_eq!(encoded.len(), 27, "{id}");
            assert!(encoded.bytes().all(|b| b.is_ascii_alphanumeric()), "{id}");
            let parsed = KsuidMs::from_base62(encoded).expect("a KSUID");
            assert_eq!(
                parsed.timestamp_millis() / 4,
                now.timestamp_millis() / 4,
                "{id}"
            );
        }
        // Distinct; their order is `ids_made_in_one_tick_still_increase`'s (other tests make
        // ids for other times at once, through the same process-wide tick).
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
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

    /// Times an id cannot hold are held to the range it can: a window from 1970 or to 2200
    /// still holds today's ids, where the ids' own arithmetic wrapped such times around.
    #[test]
    fn bounds_outside_the_ids_range_hold_to_it() {
        let id = new_id(ENDPOINT, Utc::now());
        let at = |s: &str| s.parse::<DateTime<Utc>>().expect("a time");
        for early in [
            "1970-01-01T00:00:00Z",
            "1900-06-01T00:00:00Z",
            "2014-05-13T00:00:00Z",
        ] {
            let bound = lower_bound(ENDPOINT, at(early));
            assert!(bound <= id, "{early}: {bound} > {id}");
            assert_eq!(
                bound,
                lower_bound(ENDPOINT, at("2014-05-13T16:53:20Z")),
                "{early}"
            );
        }
        for late in ["2106-03-01T00:00:00Z", "2200-01-01T00:00:00Z"] {
            let bound = lower_bound(ENDPOINT, at(late));
            assert!(bound > id, "{late}: {bound} <= {id}");
        }
    }

    #[test]
    fn typed_ids_check_their_prefix() {
        let t0 = Utc::now();
        let app = AppId::new(t0);
        assert!(has_prefix(app.as_str(), AppId::PREFIX));
        assert_eq!(AppId::parse(app.to_string()), Ok(app.clone()));
        // Readable ids (the `--dev` seed, tests) are accepted: ids are opaque after the prefix.
        assert_eq!(
            AppId::parse("app_positions").expect("valid"),
            "app_positions"
        );
        assert!(EndpointId::parse(new_id(ENDPOINT, t0)).is_ok());
        assert!(MessageId::parse("msg_1").is_ok());
        assert!(AttemptId::parse("atmpt_1").is_ok());
        assert!(TaskId::parse("qtask_1").is_ok());
        assert!(SourceId::parse("src_1").is_ok());
        assert!(IngestEventId::parse("inev_1").is_ok());
    }

    #[test]
    fn typed_id_parse_errors_name_the_prefix() {
        for bad in ["", "app_", "ep_1", "my-uid", "APP_1", "xapp_1"] {
            let error = AppId::parse(bad).expect_err(bad);
            assert_eq!(error.expected, "app_");
            assert_eq!(error.value, bad);
            assert!(error.to_string().contains("\"app_\""), "{error}");
        }
        // An endpoint id is not an app id, nor the other way round.
        let endpoint = new_id(ENDPOINT, Utc::now());
        assert!(AppId::parse(endpoint.clone()).is_err());
        assert!(MessageId::parse(endpoint).is_err());
    }

    #[test]
    fn typed_ids_order_as_their_strings() {
        let t0 = Utc::now();
        let ids: Vec<MessageId> = (0..50)
            .map(|i| MessageId::new(t0 + Duration::milliseconds(i * 5)))
            .collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(sorted, ids);
        for pair in ids.windows(2) {
            assert_eq!(
                pair[0].cmp(&pair[1]),
                pair[0].as_str().cmp(pair[1].as_str())
            );
        }
        let (a, b) = (
            MessageId::parse("msg_b").expect("valid"),
            MessageId::parse("msg_ab").expect("valid"),
        );
        assert_eq!(a.cmp(&b), "msg_b".cmp("msg_ab"));
    }

    #[test]
    fn typed_ids_display_and_borrow_as_strings() {
        use std::collections::HashMap;
        let id = SourceId::parse("src_github").expect("valid");
        assert_eq!(id.to_string(), "src_github");
        assert_eq!(format!("{id}"), "src_github");
        assert_eq!(id, "src_github");
        assert_eq!(&*id, "src_github");
        let mut map = HashMap::new();
        map.insert(id.clone(), 1);
        assert_eq!(map.get("src_github"), Some(&1));
        assert_eq!(String::from(id.clone()), "src_github");
        assert_eq!(id.into_string(), "src_github");
    }
}
