//! The Pusher Channels protocol's rules that need no I/O: channel names and kinds, socket ids,
//! subscription and sign-in signatures, and HTTP API request signing.
//!
//! Signatures are HMAC-SHA256 in lower-case hex, keyed with the app secret, and every
//! comparison is constant-time (`Mac::verify_slice`).

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use rand::Rng;
use sha2::Sha256;

/// Longest channel name accepted (Pusher's documented limit); the rule is
/// [`crate::validate::channel`].
pub use crate::validate::MAX_CHANNEL_NAME;
/// How far an HTTP API request's `auth_timestamp` may be from the server's clock.
pub const REQUEST_TIMESTAMP_TOLERANCE_SECS: i64 = 600;
/// Longest an SSE token may live: one whose expiry is further from now is refused (24 hours).
pub const SSE_TOKEN_MAX_LIFETIME_SECS: i64 = 24 * 60 * 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    Public,
    /// `private-`: subscription needs a signature over `socket_id:channel`.
    Private,
    /// `private-encrypted-`: like private; payloads are end-to-end encrypted, Herald passes
    /// them through untouched.
    PrivateEncrypted,
    /// `presence-`: signature over `socket_id:channel:channel_data`, with a member list.
    Presence,
    /// `#server-to-user-<id>`: a signed-in user's own channel, which only that user's
    /// WebSocket connections (after `pusher:signin`) may subscribe to.
    User,
}

impl ChannelKind {
    pub fn of(channel: &str) -> Self {
        if channel.starts_with(crate::validate::USER_CHANNEL_PREFIX) {
            Self::User
        } else if channel.starts_with("private-encrypted-") {
            Self::PrivateEncrypted
        } else if channel.starts_with("private-") {
            Self::Private
        } else if channel.starts_with("presence-") {
            Self::Presence
        } else {
            Self::Public
        }
    }

    pub fn needs_auth(self) -> bool {
        self != Self::Public
    }

    /// Client events (`client-*`) are allowed on private and presence channels only; the
    /// client libraries cannot encrypt them.
    pub fn allows_client_events(self) -> bool {
        matches!(self, Self::Private | Self::Presence)
    }
}

/// [`crate::validate::channel`], the one channel-name rule, with the `String` error the
/// WebSocket, SSE and Pusher HTTP API callers build their answers from.
pub fn validate_channel_name(name: &str) -> Result<(), String> {
    crate::validate::channel(name).map_err(String::from)
}

/// A fresh socket id, `"<digits>.<digits>"`.
pub fn new_socket_id(rng: &mut impl Rng) -> String {
    format!(
        "{}.{}",
        rng.random_range(1..=u32::MAX),
        rng.random_range(1..=u32::MAX)
    )
}

/// Whether `value` has the socket id format (`socket_id` in HTTP API calls is checked too).
pub fn is_socket_id(value: &str) -> bool {
    let Some((a, b)) = value.split_once('.') else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    digits(a) && digits(b)
}

/// Hex HMAC-SHA256 of `data` with `secret`: what app servers put after `key:` in an auth.
pub fn sign(secret: &str, data: &str) -> String {
    hex::encode(mac(secret, data.as_bytes()).finalize().into_bytes())
}

/// `X-Pusher-Signature` of a channel webhook: HMAC-SHA256 of the raw body with the app
/// secret, in hex.
pub fn webhook_signature(secret: &str, body: &[u8]) -> String {
    hex::encode(mac(secret, body).finalize().into_bytes())
}

fn mac(secret: &str, data: &[u8]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(data);
    mac
}

/// Constant-time check of a hex signature over `data`.
fn signature_matches(secret: &str, data: &str, hex_signature: &str) -> bool {
    let Ok(signature) = hex::decode(hex_signature) else {
        return false;
    };
    mac(secret, data.as_bytes())
        .verify_slice(&signature)
        .is_ok()
}

/// A token that lets a Server-Sent Events stream read private channels: `<expires>:<hex>`,
/// the HMAC-SHA256 with the app secret of `sse:<expires>:<channels>` (the `channels` query
/// value exactly as sent). The app's backend mints it, as it signs channel auths, with an
/// expiry at most [`SSE_TOKEN_MAX_LIFETIME_SECS`] ahead.
pub fn sse_token(secret: &str, channels: &str, expires_unix: i64) -> String {
    format!(
        "{expires_unix}:{}",
        sign(secret, &format!("sse:{expires_unix}:{channels}"))
    )
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseTokenError {
    #[error("token must be \"<expires unix time>:<hex signature>\"")]
    Malformed,
    #[error("token expired {0} s ago")]
    Expired(u64),
    #[error(
        "token expires {0} s from now; tokens may live at most {SSE_TOKEN_MAX_LIFETIME_SECS} s (24 hours)"
    )]
    TooLong(u64),
    #[error("token signature does not match the channels with the app secret")]
    BadSignature,
}

/// Checks an SSE token against the `channels` value as sent, at `now_unix`. The expiry is the
/// client's text, so the arithmetic on it cannot overflow whatever it says.
pub fn verify_sse_token(
    secret: &str,
    channels: &str,
    token: &str,
    now_unix: i64,
) -> Result<(), SseTokenError> {
    let (expires, signature) = token.split_once(':').ok_or(SseTokenError::Malformed)?;
    let expires: i64 = expires.parse().map_err(|_| SseTokenError::Malformed)?;
    if !signature_matches(secret, &format!("sse:{expires}:{channels}"), signature) {
        return Err(SseTokenError::BadSignature);
    }
    let distance = expires.abs_diff(now_unix);
    if expires < now_unix {
        return Err(SseTokenError::Expired(distance));
    }
    if distance > SSE_TOKEN_MAX_LIFETIME_SECS.unsigned_abs() {
        return Err(SseTokenError::TooLong(distance));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("auth must be \"<app key>:<signature>\"")]
    Malformed,
    #[error("auth is signed for another app key")]
    WrongKey,
    #[error("invalid signature")]
    BadSignature,
}

fn check_auth(key: &str, secret: &str, signed: &str, auth: &str) -> Result<(), AuthError> {
    let (auth_key, signature) = auth.split_once(':').ok_or(AuthError::Malformed)?;
    if auth_key != key {
        return Err(AuthError::WrongKey);
    }
    if signature_matches(secret, signed, signature) {
        Ok(())
    } else {
        Err(AuthError::BadSignature)
    }
}

/// A `pusher:subscribe` auth for a private, encrypted or presence channel. `channel_data` is
/// the presence member's JSON exactly as the client sent it.
pub fn verify_channel_auth(
    key: &str,
    secret: &str,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
    auth: &str,
) -> Result<(), AuthError> {
    let signed = match channel_data {
        Some(data) => format!("{socket_id}:{channel}:{data}"),
        None => format!("{socket_id}:{channel}"),
    };
    check_auth(key, secret, &signed, auth)
}

/// A `pusher:signin` auth over `socket_id::user::user_data`.
pub fn verify_user_auth(
    key: &str,
    secret: &str,
    socket_id: &str,
    user_data: &str,
    auth: &str,
) -> Result<(), AuthError> {
    check_auth(
        key,
        secret,
        &format!("{socket_id}::user::{user_data}"),
        auth,
    )
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestAuthError {
    #[error("missing query parameter {0}")]
    Missing(&'static str),
    #[error("unknown auth_key")]
    UnknownKey,
    #[error("auth_version must be 1.0")]
    Version,
    #[error("auth_timestamp is not a number")]
    BadTimestamp,
    #[error(
        "auth_timestamp is {0} s from the server's time; at most {REQUEST_TIMESTAMP_TOLERANCE_SECS} s is accepted"
    )]
    Expired(u64),
    #[error("body_md5 does not match the body")]
    BodyMd5,
    #[error("invalid auth_signature")]
    BadSignature,
}

/// Checks an HTTP API request signed the Pusher way: `auth_signature` is the HMAC of
/// `METHOD\nPATH\n` plus every other query parameter, keys lower-cased, sorted, joined as
/// `k=v&k=v` (values unescaped). `params` are the decoded query pairs as received.
pub fn verify_request(
    key: &str,
    secret: &str,
    method: &str,
    path: &str,
    params: &[(String, String)],
    body: &[u8],
    now_unix: i64,
) -> Result<(), RequestAuthError> {
    let get = |name: &'static str| {
        params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .ok_or(RequestAuthError::Missing(name))
    };
    if get("auth_key")? != key {
        return Err(RequestAuthError::UnknownKey);
    }
    if get("auth_version")? != "1.0" {
        return Err(RequestAuthError::Version);
    }
    let timestamp: i64 = get("auth_timestamp")?
        .parse()
        .map_err(|_| RequestAuthError::BadTimestamp)?;
    // Exact distance as a u64: `now - timestamp` overflows for timestamps near i64::MIN/MAX.
    let skew = now_unix.abs_diff(timestamp);
    if skew > REQUEST_TIMESTAMP_TOLERANCE_SECS.unsigned_abs() {
        return Err(RequestAuthError::Expired(skew));
    }
    // The signature first: it covers `body_md5`, and hashing the body (up to the request
    // limit) is then work done only for a caller who holds the secret.
    let signature = get("auth_signature")?;
    if !signature_matches(secret, &request_string(method, path, params), signature) {
        return Err(RequestAuthError::BadSignature);
    }
    // A body needs its hash; a hash signed for a body needs that body, empty or not (a
    // signed POST replayed without its body is not the request that was signed).
    let md5_given = params
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("body_md5"));
    if (!body.is_empty() || md5_given) && get("body_md5")? != hex::encode(Md5::digest(body)) {
        return Err(RequestAuthError::BodyMd5);
    }
    Ok(())
}

/// A refusal of a signed thing that says whether the secret tried is not the one that signed
/// it, so that [`with_any_secret`] can report what is wrong with it under the secret that did.
pub trait SecretRefusal {
    /// The signature does not match with the secret tried.
    fn wrong_secret(&self) -> bool;
}

impl SecretRefusal for SseTokenError {
    fn wrong_secret(&self) -> bool {
        matches!(self, Self::BadSignature)
    }
}

impl SecretRefusal for AuthError {
    fn wrong_secret(&self) -> bool {
        matches!(self, Self::BadSignature)
    }
}

impl SecretRefusal for RequestAuthError {
    fn wrong_secret(&self) -> bool {
        matches!(self, Self::BadSignature)
    }
}

/// Runs `check` with the app's current secret, then with the ones it replaced while their
/// rotation grace lasts: accepted if one accepts. Otherwise the refusal under the secret that
/// signed it, if one did (a token signed with a retired secret that has expired is refused
/// as expired, not as a bad signature, which counts as a guess), else the current secret's.
pub fn with_any_secret<E: SecretRefusal>(
    credentials: &crate::model::PusherCredentials,
    now: chrono::DateTime<chrono::Utc>,
    check: impl Fn(&str) -> Result<(), E>,
) -> Result<(), E> {
    let refusal = match check(&credentials.secret) {
        Ok(()) => return Ok(()),
        // Signed with the current secret (or refused before any signature was looked at):
        // no other secret can do better.
        Err(refusal) if !refusal.wrong_secret() => return Err(refusal),
        Err(refusal) => refusal,
    };
    for retired in credentials.verifying_secrets(now).skip(1) {
        match check(retired) {
            Ok(()) => return Ok(()),
            Err(signed_by_it) if !signed_by_it.wrong_secret() => return Err(signed_by_it),
            Err(_) => {}
        }
    }
    Err(refusal)
}

/// The query parameters that sign an HTTP API request as the Pusher server SDKs do:
/// `params` plus `auth_key`, `auth_timestamp`, `auth_version`, `body_md5` (for a body) and
/// `auth_signature`. For clients of any Pusher-compatible server (benchmarks, tests).
pub fn sign_request(
    key: &str,
    secret: &str,
    method: &str,
    path: &str,
    params: &[(String, String)],
    body: &[u8],
    now_unix: i64,
) -> Vec<(String, String)> {
    let mut signed: Vec<(String, String)> = params.to_vec();
    signed.extend([
        ("auth_key".to_owned(), key.to_owned()),
        ("auth_timestamp".to_owned(), now_unix.to_string()),
        ("auth_version".to_owned(), "1.0".to_owned()),
    ]);
    if !body.is_empty() {
        signed.push(("body_md5".to_owned(), hex::encode(Md5::digest(body))));
    }
    let signature = sign(secret, &request_string(method, path, &signed));
    signed.push(("auth_signature".to_owned(), signature));
    signed
}

/// `METHOD\nPATH\n` and the parameters but `auth_signature`, keys lower-cased, sorted,
/// joined as `k=v&k=v` with values unescaped.
fn request_string(method: &str, path: &str, params: &[(String, String)]) -> String {
    let mut signed_params: Vec<(String, &str)> = params
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("auth_signature"))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
        .collect();
    signed_params.sort();
    let query = signed_params
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    format!("{method}\n{path}\n{query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retired_secret_verifies_only_until_its_time() {
        use crate::model::{PusherCredentials, RetiredSecret};
        let now = chrono::Utc::now();
        let mut credentials = PusherCredentials::generate();
        credentials.previous = Some(RetiredSecret {
            secret: "old-secret".into(),
            until: now + chrono::Duration::seconds(60),
        });
        let t = now.timestamp();
        let verify = |token: &str, at: chrono::DateTime<chrono::Utc>| {
            with_any_secret(&credentials, at, |secret| {
                verify_sse_token(secret, "news", token, at.timestamp())
            })
        };
        let by_old = sse_token("old-secret", "news", t + 30);
        assert_eq!(verify(&by_old, now), Ok(()));
        assert_eq!(
            verify(&by_old, now + chrono::Duration::seconds(61)),
            Err(SseTokenError::BadSignature),
            "the retired secret's time is over: it signs nothing"
        );
        assert_eq!(
            verify(&sse_token("neither", "news", t + 30), now),
            Err(SseTokenError::BadSignature)
        );
        // Signed with the retired secret, within its time, but expired: refused as expired
        // (which does not count as a guess), not as the current secret's bad signature.
        assert_eq!(
            verify(&sse_token("old-secret", "news", t - 5), now),
            Err(SseTokenError::Expired(5))
        );
        assert_eq!(
            verify(&sse_token(&credentials.secret, "news", t - 5), now),
            Err(SseTokenError::Expired(5))
        );
    }

    // Vectors from Pusher's auth-signature and HTTP API reference docs.
    const KEY: &str = "278d425bdf160c739803";
    const SECRET: &str = "7ad3773142a6692b25b8";

    #[test]
    fn webhook_signature_is_hex_hmac_of_the_raw_body() {
        // Computed independently with Python's hmac module.
        let body = br#"{"time_ms":1327078148132,"events":[{"name":"channel_occupied","channel":"test_channel"}]}"#;
        assert_eq!(
            webhook_signature(SECRET, body),
            "709fdb84c03664445f7698120b0edf0acc1ab1c8c6e93a0368c61841d6b998aa"
        );
    }

    #[test]
    fn channel_kinds() {
        assert_eq!(ChannelKind::of("orders"), ChannelKind::Public);
        assert_eq!(ChannelKind::of("private-orders"), ChannelKind::Private);
        assert_eq!(
            ChannelKind::of("private-encrypted-x"),
            ChannelKind::PrivateEncrypted
        );
        assert_eq!(ChannelKind::of("presence-room"), ChannelKind::Presence);
        assert!(ChannelKind::Presence.allows_client_events());
        assert!(!ChannelKind::PrivateEncrypted.allows_client_events());
        assert!(!ChannelKind::Public.needs_auth());
        assert_eq!(ChannelKind::of("#server-to-user-u1"), ChannelKind::User);
        assert!(ChannelKind::User.needs_auth() && !ChannelKind::User.allows_client_events());
    }

    #[test]
    fn channel_names() {
        assert!(validate_channel_name("private-order-42;x=1@a,b.c").is_ok());
        assert!(validate_channel_name("").is_err());
        assert!(validate_channel_name("has space").is_err());
        assert!(validate_channel_name("#server-to-user-1").is_ok());
        assert!(validate_channel_name("#server-1").is_err());
        assert!(validate_channel_name(&"a".repeat(165)).is_err());
        assert!(validate_channel_name(&"a".repeat(164)).is_ok());
        assert_eq!(
            validate_channel_name("a:b"),
            Err(crate::validate::CHANNEL_RULE.to_string()),
            "the alias answers the rule's one message"
        );
    }

    #[test]
    fn socket_ids() {
        let id = new_socket_id(&mut rand::rng());
        assert!(is_socket_id(&id), "{id}");
        assert!(is_socket_id("1234.1234"));
        assert!(!is_socket_id("1234"));
        assert!(!is_socket_id("12a.4"));
        assert!(!is_socket_id("1.2.3"));
    }

    #[test]
    fn private_channel_vector() {
        let sig = "58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4";
        assert_eq!(sign(SECRET, "1234.1234:private-foobar"), sig);
        let auth = format!("{KEY}:{sig}");
        assert_eq!(
            verify_channel_auth(KEY, SECRET, "1234.1234", "private-foobar", None, &auth),
            Ok(())
        );
        assert_eq!(
            verify_channel_auth(KEY, SECRET, "1234.1235", "private-foobar", None, &auth),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify_channel_auth("other", SECRET, "1234.1234", "private-foobar", None, &auth),
            Err(AuthError::WrongKey)
        );
        assert_eq!(
            verify_channel_auth(KEY, SECRET, "1234.1234", "private-foobar", None, "nocolon"),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn presence_signs_channel_data_as_sent() {
        let data = r#"{"user_id":10,"user_info":{"name":"Mr. Channels"}}"#;
        let auth = format!(
            "{KEY}:{}",
            sign(SECRET, &format!("1234.1234:presence-foobar:{data}"))
        );
        assert!(
            verify_channel_auth(
                KEY,
                SECRET,
                "1234.1234",
                "presence-foobar",
                Some(data),
                &auth
            )
            .is_ok()
        );
        let respaced = r#"{"user_id": 10,"user_info":{"name":"Mr. Channels"}}"#;
        assert!(
            verify_channel_auth(
                KEY,
                SECRET,
                "1234.1234",
                "presence-foobar",
                Some(respaced),
                &auth
            )
            .is_err()
        );
    }

    #[test]
    fn user_signin_vector() {
        let sig = "4708d583dada6a56435fb8bc611c77c359a31eebde13337c16ab43aa6de336ba";
        let auth = format!("{KEY}:{sig}");
        assert!(verify_user_auth(KEY, SECRET, "1234.1234", r#"{"id":"12345"}"#, &auth).is_ok());
    }

    fn api_params(signature: &str) -> Vec<(String, String)> {
        [
            ("auth_key", KEY),
            ("auth_timestamp", "1353088179"),
            ("auth_version", "1.0"),
            ("body_md5", "ec365a775a4cd0599faeb73354201b6f"),
            ("auth_signature", signature),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn http_api_request_vector() {
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        let good = "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c";
        let now = 1353088179 + 30;
        let check = |params: &[(String, String)], body: &[u8], now| {
            verify_request(KEY, SECRET, "POST", "/apps/3/events", params, body, now)
        };
        assert_eq!(check(&api_params(good), body, now), Ok(()));
        assert_eq!(
            check(&api_params(&"0".repeat(64)), body, now),
            Err(RequestAuthError::BadSignature)
        );
        assert_eq!(
            check(&api_params(good), b"{}", now),
            Err(RequestAuthError::BodyMd5)
        );
        // The signed request replayed without its body is not the request that was signed.
        assert_eq!(
            check(&api_params(good), b"", now),
            Err(RequestAuthError::BodyMd5)
        );
        assert_eq!(
            check(&api_params(good), body, now + 1000),
            Err(RequestAuthError::Expired(1030))
        );
        let mut missing = api_params(good);
        missing.retain(|(k, _)| k != "auth_version");
        assert_eq!(
            check(&missing, body, now),
            Err(RequestAuthError::Missing("auth_version"))
        );
    }

    #[test]
    fn request_timestamps_at_the_ends_of_i64_are_refused_without_overflow() {
        let params = |timestamp: &str| -> Vec<(String, String)> {
            [
                ("auth_key", KEY),
                ("auth_timestamp", timestamp),
                ("auth_version", "1.0"),
                ("auth_signature", "00"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
        };
        let check = |timestamp: &str, now: i64| {
            verify_request(
                KEY,
                SECRET,
                "GET",
                "/apps/3/channels",
                &params(timestamp),
                b"",
                now,
            )
        };
        let now = 1_353_088_179_i64;
        let min = i64::MIN.to_string();
        let max = i64::MAX.to_string();
        assert_eq!(
            check(&min, now),
            Err(RequestAuthError::Expired(now.abs_diff(i64::MIN)))
        );
        assert_eq!(
            check(&max, now),
            Err(RequestAuthError::Expired(i64::MAX.abs_diff(now)))
        );
        assert_eq!(
            check(&min, i64::MAX),
            Err(RequestAuthError::Expired(u64::MAX))
        );
        assert_eq!(
            check(&max, i64::MIN),
            Err(RequestAuthError::Expired(u64::MAX))
        );
        // `now - timestamp` wraps to i64::MIN here, whose wrapping `abs()` is negative: the
        // old check let it through in release builds.
        let wraps = (i64::MIN + now).to_string();
        assert!(matches!(
            check(&wraps, now),
            Err(RequestAuthError::Expired(_))
        ));
        assert_eq!(
            check(&u64::MAX.to_string(), now),
            Err(RequestAuthError::BadTimestamp)
        );
        assert_eq!(
            check("-99999999999999999999", now),
            Err(RequestAuthError::BadTimestamp)
        );
        let message = check(&min, now).expect_err("refused").to_string();
        assert!(
            message.contains("auth_timestamp is 9223372038207863987 s"),
            "{message}"
        );
    }

    #[test]
    fn sign_request_reproduces_the_documented_vector() {
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        let signed = sign_request(KEY, SECRET, "POST", "/apps/3/events", &[], body, 1353088179);
        let mut expected =
            api_params("da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c");
        let mut got = signed.clone();
        expected.sort();
        got.sort();
        assert_eq!(got, expected);
    }

    #[test]
    fn sse_tokens() {
        let token = sse_token(SECRET, "private-a,news", 2000);
        assert_eq!(
            verify_sse_token(SECRET, "private-a,news", &token, 1999),
            Ok(())
        );
        assert_eq!(
            verify_sse_token(SECRET, "private-a,news", &token, 2010),
            Err(SseTokenError::Expired(10))
        );
        assert_eq!(
            verify_sse_token(SECRET, "private-a,news", &token, 2000),
            Ok(()),
            "a token is valid up to its expiry second"
        );
        assert_eq!(
            verify_sse_token(SECRET, "private-b,news", &token, 1999),
            Err(SseTokenError::BadSignature)
        );
        assert_eq!(
            verify_sse_token("other", "private-a,news", &token, 1999),
            Err(SseTokenError::BadSignature)
        );
        assert_eq!(
            verify_sse_token(SECRET, "x", "nonsense", 0),
            Err(SseTokenError::Malformed)
        );
    }

    #[test]
    fn sse_tokens_living_longer_than_24_hours_are_refused() {
        let now = 1_700_000_000;
        let longest = sse_token(SECRET, "private-a", now + SSE_TOKEN_MAX_LIFETIME_SECS);
        assert_eq!(verify_sse_token(SECRET, "private-a", &longest, now), Ok(()));
        let too_long = sse_token(SECRET, "private-a", now + SSE_TOKEN_MAX_LIFETIME_SECS + 1);
        let err = verify_sse_token(SECRET, "private-a", &too_long, now)
            .expect_err("a token living longer than 24 hours is refused");
        assert_eq!(err, SseTokenError::TooLong(86_401));
        assert!(err.to_string().contains("24 hours"), "{err}");
        // It becomes acceptable once less than 24 hours remain.
        assert_eq!(
            verify_sse_token(SECRET, "private-a", &too_long, now + 1),
            Ok(())
        );
    }

    #[test]
    fn sse_token_expiries_at_the_ends_of_i64_are_refused_without_overflow() {
        let now = 1_700_000_000_i64;
        let verify = |expires: i64, now: i64| {
            verify_sse_token(
                SECRET,
                "private-a",
                &sse_token(SECRET, "private-a", expires),
                now,
            )
        };
        assert_eq!(
            verify(i64::MAX, now),
            Err(SseTokenError::TooLong(i64::MAX.abs_diff(now)))
        );
        assert_eq!(
            verify(i64::MIN, now),
            Err(SseTokenError::Expired(now.abs_diff(i64::MIN)))
        );
        assert_eq!(
            verify(i64::MIN, i64::MAX),
            Err(SseTokenError::Expired(u64::MAX))
        );
        assert_eq!(
            verify(i64::MAX, i64::MIN),
            Err(SseTokenError::TooLong(u64::MAX))
        );
        assert_eq!(verify(i64::MAX, i64::MAX), Ok(()));
        let signed_u64_max = format!(
            "{}:{}",
            u64::MAX,
            sign(SECRET, &format!("sse:{}:private-a", u64::MAX))
        );
        assert_eq!(
            verify_sse_token(SECRET, "private-a", &signed_u64_max, now),
            Err(SseTokenError::Malformed)
        );
    }
}
