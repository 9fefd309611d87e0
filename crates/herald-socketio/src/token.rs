//! The `auth.token` of a Socket.IO handshake: a JWT (RFC 7519) signed with HS256 and the
//! app's Pusher secret, the secret that already signs Pusher channel auth, so an app backend
//! mints it with any JWT library (`jsonwebtoken`, PyJWT, firebase/php-jwt) and no new secret.
//!
//! Only `HS256` is accepted: the header's `alg` is checked before anything else, so a token
//! cannot choose a weaker scheme (`none`) or another key type. The MAC is compared in constant
//! time (`hmac`'s `verify_slice`). One algorithm over crates already in the build is a few
//! dozen lines; a general JWT crate would bring every other algorithm's crates along.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::Sha256;

/// What a valid token grants.
#[derive(Debug, Clone, Default)]
pub struct Grant {
    /// `sub`: the user, needed for presence rooms.
    pub user_id: Option<String>,
    /// `info`: the presence member's `user_info`.
    pub user_info: Option<Box<RawValue>>,
    /// `rooms`: joined at connect; private and presence rooms only through a grant.
    pub rooms: Vec<String>,
    /// `exp`, seconds since the epoch.
    pub expires_at: i64,
}

/// Why a token was refused; each message says what to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token is not a JWT (three base64url parts separated by dots)")]
    Malformed,
    #[error("the token's header is not valid JSON with \"alg\": \"HS256\" ({0})")]
    Header(String),
    #[error("the token's signature does not match the app's secret")]
    BadSignature,
    #[error("the token's claims are invalid: {0}")]
    Claims(String),
    #[error("the token expired at {0} (seconds since the epoch)")]
    Expired(i64),
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

#[derive(Deserialize)]
struct Claims {
    exp: i64,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    info: Option<Box<RawValue>>,
    #[serde(default)]
    rooms: Vec<String>,
}

impl herald_core::pusher::SecretRefusal for TokenError {
    fn wrong_secret(&self) -> bool {
        matches!(self, Self::BadSignature)
    }
}

/// Checks `token` against `secret` at `now` (seconds since the epoch).
pub fn verify(token: &str, secret: &str, now: i64) -> Result<Grant, TokenError> {
    let mut parts = token.split('.');
    let (Some(header), Some(claims), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let header_json = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| TokenError::Malformed)?;
    let header: Header =
        serde_json::from_slice(&header_json).map_err(|e| TokenError::Header(e.to_string()))?;
    if header.alg != "HS256" {
        return Err(TokenError::Header(format!(
            "alg is {:?}; only HS256 is accepted",
            header.alg
        )));
    }
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| TokenError::Malformed)?;
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).map_err(|_| TokenError::BadSignature)?;
    // The signed part: `header.claims`, everything before the last dot.
    let signed = token.rsplit_once('.').map_or(token, |(signed, _)| signed);
    mac.update(signed.as_bytes());
    mac.verify_slice(&signature)
        .map_err(|_| TokenError::BadSignature)?;
    let claims_json = URL_SAFE_NO_PAD
        .decode(claims)
        .map_err(|_| TokenError::Malformed)?;
    let claims: Claims =
        serde_json::from_slice(&claims_json).map_err(|e| TokenError::Claims(e.to_string()))?;
    if claims.exp <= now {
        return Err(TokenError::Expired(claims.exp));
    }
    if let Some(info) = &claims.info
        && !info.get().starts_with('{')
    {
        return Err(TokenError::Claims("info must be a JSON object".into()));
    }
    if let Some(sub) = &claims.sub
        && let Err(why) = herald_core::validate::user_id(sub)
    {
        return Err(TokenError::Claims(format!("sub {why}")));
    }
    Ok(Grant {
        user_id: claims.sub,
        user_info: claims.info,
        rooms: claims.rooms,
        expires_at: claims.exp,
    })
}

/// Mints a token (tests and tools; app backends use their own JWT library).
pub fn sign(secret: &str, claims: &serde_json::Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{header}.{claims}");
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any size");
    mac.update(signed.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signed}.{signature}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn a_token_signed_with_the_secret_grants_its_claims() {
        let token = sign(
            "secret",
            &json!({"exp": NOW + 60, "sub": "u1", "info": {"name": "Ann"}, "rooms": ["chat", "presence-lobby"]}),
        );
        let grant = verify(&token, "secret", NOW).expect("valid");
        assert_eq!(grant.user_id.as_deref(), Some("u1"));
        assert_eq!(
            grant.user_info.as_deref().map(RawValue::get),
            Some(r#"{"name":"Ann"}"#)
        );
        assert_eq!(grant.rooms, ["chat", "presence-lobby"]);
    }

    #[test]
    fn a_wrong_secret_an_expired_token_and_other_algorithms_are_refused() {
        let token = sign("secret", &json!({"exp": NOW + 60}));
        assert_eq!(
            verify(&token, "other", NOW).err(),
            Some(TokenError::BadSignature)
        );
        let expired = sign("secret", &json!({"exp": NOW}));
        assert_eq!(
            verify(&expired, "secret", NOW).err(),
            Some(TokenError::Expired(NOW))
        );
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(br#"{"exp":9999999999}"#)
        );
        assert!(matches!(
            verify(&none, "secret", NOW),
            Err(TokenError::Header(_))
        ));
        assert_eq!(
            verify("abc", "secret", NOW).err(),
            Some(TokenError::Malformed)
        );
        let no_exp = sign("secret", &json!({"sub": "u1"}));
        assert!(matches!(
            verify(&no_exp, "secret", NOW),
            Err(TokenError::Claims(_))
        ));
        // A presence user id is stored as text, where PostgreSQL refuses NUL.
        let nul_sub = sign("secret", &json!({"exp": NOW + 60, "sub": "a\u{0}b"}));
        assert!(matches!(
            verify(&nul_sub, "secret", NOW),
            Err(TokenError::Claims(why)) if why.contains("control character")
        ));
        let tampered = {
            let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
            parts[1] = URL_SAFE_NO_PAD.encode(br#"{"exp":9999999999,"rooms":["private-x"]}"#);
            parts.join(".")
        };
        assert_eq!(
            verify(&tampered, "secret", NOW).err(),
            Some(TokenError::BadSignature)
        );
    }
}
