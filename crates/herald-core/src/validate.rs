//! Svix's rules for user-chosen identifiers. Each check returns the message shown to the caller.

fn id_like(value: &str, max: usize, extra: &[char]) -> bool {
    !value.is_empty()
        && value.len() <= max
        && value.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') || extra.contains(&c)
        })
}

/// Whether `value` could name an app: an id Herald mints or a uid ([`uid`]'s characters and
/// length, the rules since the first release). A key that cannot is refused before any lookup.
pub fn could_be_app_key(value: &str) -> bool {
    id_like(value, 256, &[])
}

/// `uid` of applications, endpoints and sources, and a message's `eventId`. Anything that could
/// be read as an id Herald minted (`app_...`, `ep_...`, `msg_...`) is refused: lookups accept an
/// id or a uid in one place, and a uid equal to another resource's id would misroute.
pub fn uid(value: &str) -> Result<(), &'static str> {
    if !id_like(value, 256, &[]) {
        return Err("must be 1 to 256 characters of letters, digits, '-', '_' or '.'");
    }
    if crate::id::PREFIXES
        .iter()
        .any(|prefix| value.starts_with(prefix))
    {
        return Err(
            "must not start with an id prefix (app_, ep_, msg_, atmpt_, qtask_, src_, inev_, tok_): ids and uids are looked up in the same place",
        );
    }
    Ok(())
}

pub fn event_type_name(value: &str) -> Result<(), &'static str> {
    if id_like(value, 256, &[]) {
        Ok(())
    } else {
        Err("must be 1 to 256 characters of letters, digits, '-', '_' or '.'")
    }
}

/// Longest channel name: Pusher's documented limit, prefixes (`private-`, `presence-`) counted.
pub const MAX_CHANNEL_NAME: usize = 164;

/// The longest name of an event a client sends (a Pusher client event, a relayed Socket.IO
/// event), in bytes.
pub const MAX_CLIENT_EVENT_NAME: usize = 200;

/// What [`channel`] answers for any name it refuses.
pub const CHANNEL_RULE: &str = "a channel name must be 1 to 164 characters of letters, digits and _ - = @ , . ; (or #server-to-user- and a user id of those)";

/// The prefix of a signed-in user's own channel, Pusher's: `#server-to-user-<user id>`. What
/// the server sends there (the server SDKs' `sendToUser`) reaches that user's connections.
pub const USER_CHANNEL_PREFIX: &str = "#server-to-user-";

/// A presence member's user id, on every face: 1 to 128 bytes, none a control character. It is
/// stored as text (channel occupancy for the channel webhooks, a cluster's presence record),
/// and PostgreSQL refuses NUL in text: one such id would fail every batch it rides in.
pub fn user_id(value: &str) -> Result<(), &'static str> {
    if value.is_empty() || value.len() > 128 {
        return Err("must be 1 to 128 characters");
    }
    if value.chars().any(char::is_control) {
        return Err("must not hold a control character");
    }
    Ok(())
}

/// The one channel-name rule, Pusher's: 1 to [`MAX_CHANNEL_NAME`] characters of
/// `[A-Za-z0-9_\-=@,.;]`, or [`USER_CHANNEL_PREFIX`] and a user id of those. Every channel a
/// name can arrive by (a message's `channels`, an endpoint's `channels` filter, a source's
/// default channel and rendered templates, a WebSocket or SSE subscription, the Pusher HTTP
/// API) is checked here, so a name accepted anywhere can be subscribed to (`#` only in the
/// user channels' prefix; `:` never).
pub fn channel(value: &str) -> Result<(), &'static str> {
    let name = value.strip_prefix(USER_CHANNEL_PREFIX).unwrap_or(value);
    if value.len() <= MAX_CHANNEL_NAME && id_like(name, MAX_CHANNEL_NAME, &['=', '@', ',', ';']) {
        Ok(())
    } else {
        Err(CHANNEL_RULE)
    }
}

/// Whether JSON text holds the escape `\u0000` (a NUL in a string; raw control characters are
/// not valid JSON): escapes are read pairwise, so an escaped backslash followed by `u0000` is
/// not one. The stores keep text without NUL (PostgreSQL's text and JSONB refuse it), so
/// input holding one is refused where it comes in, on either store, rather than failing there.
pub fn json_holds_escaped_nul(bytes: &[u8]) -> bool {
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if bytes.get(i + 1..i + 6) == Some(b"u0000".as_slice()) {
                return true;
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_refuses() {
        assert!(uid("order-42_a.b").is_ok());
        assert!(uid("").is_err());
        assert!(uid("has space").is_err());
        assert!(uid(&"x".repeat(257)).is_err());
        for prefix in crate::id::PREFIXES {
            assert!(uid(&format!("{prefix}2Ld0")).is_err(), "{prefix}");
        }
        assert!(uid("app-1").is_ok() && uid("application_1").is_ok());
        assert!(event_type_name("invoice/paid").is_err());
    }

    #[test]
    fn channel_names_follow_pushers_rule() {
        assert_eq!(channel("private-order-42;x=1@a,b.c_D"), Ok(()));
        assert_eq!(channel(&"a".repeat(MAX_CHANNEL_NAME)), Ok(()));
        assert_eq!(channel("#server-to-user-u1@example.com"), Ok(()));
        assert_eq!(
            channel(&format!(
                "#server-to-user-{}",
                "u".repeat(MAX_CHANNEL_NAME - 16)
            )),
            Ok(())
        );
        assert_eq!(
            channel(&format!(
                "#server-to-user-{}",
                "u".repeat(MAX_CHANNEL_NAME - 15)
            )),
            Err(CHANNEL_RULE),
            "the prefix counts in the length"
        );
        for refused in [
            "",
            "a:b",
            "private-order:42",
            "has space",
            "#server-to-user-",
            "#server-to-user-a#b",
            "#other-1",
            "caf\u{e9}",
            "a/b",
            "a*",
        ] {
            assert_eq!(channel(refused), Err(CHANNEL_RULE), "{refused:?}");
        }
        assert_eq!(
            channel(&"a".repeat(MAX_CHANNEL_NAME + 1)),
            Err(CHANNEL_RULE)
        );
        assert!(
            CHANNEL_RULE.contains(&format!(" {MAX_CHANNEL_NAME} ")),
            "{CHANNEL_RULE}"
        );
    }

    #[test]
    fn a_nul_escape_is_found_and_an_escaped_backslash_before_u0000_is_not_one() {
        assert!(json_holds_escaped_nul(br#"{"name":"a\u0000b"}"#));
        assert!(
            json_holds_escaped_nul(br#"["\\\u0000"]"#),
            "a backslash, then a NUL"
        );
        assert!(
            !json_holds_escaped_nul(br#"{"name":"a\\u0000b"}"#),
            "backslash, u0000"
        );
        assert!(
            !json_holds_escaped_nul(br#"{"name":"\u0001"}"#),
            "another control character"
        );
        assert!(!json_holds_escaped_nul(br#"{"name":"plain"}"#));
        assert!(!json_holds_escaped_nul(b"\\"), "a trailing backslash");
    }
}
