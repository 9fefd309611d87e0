//! Standard Webhooks signatures (`webhook-signature: v1,<base64 HMAC-SHA256>`).
//!
//! The signed content is `"{webhook-id}.{webhook-timestamp}.{body}"` over the exact bytes sent.
//! Secrets are serialized as `whsec_` + base64; the HMAC key is the *decoded* bytes, as the
//! reference libraries do.

use base64::{Engine, engine::general_purpose::STANDARD};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

const PREFIX: &str = "whsec_";
/// Svix generates 24-byte secrets; the spec allows 24 to 64.
const GENERATED_LEN: usize = 24;
const MIN_LEN: usize = 24;
const MAX_LEN: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("the secret must start with `whsec_`")]
    MissingPrefix,
    #[error("the secret after `whsec_` is not valid base64")]
    NotBase64,
    #[error("the secret must decode to between 24 and 64 bytes, got {0}")]
    BadLength(usize),
}

/// An endpoint's signing secret, kept as its decoded key bytes. Two secrets compare in
/// constant time.
#[derive(Clone)]
pub struct EndpointSecret {
    key: Vec<u8>,
}

impl PartialEq for EndpointSecret {
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq;
        self.key.ct_eq(&other.key).into()
    }
}

impl Eq for EndpointSecret {}

impl std::fmt::Debug for EndpointSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EndpointSecret(<redacted>)")
    }
}

impl EndpointSecret {
    pub fn generate() -> Self {
        let mut key = vec![0u8; GENERATED_LEN];
        rand::rng().fill_bytes(&mut key);
        Self { key }
    }

    pub fn parse(serialized: &str) -> Result<Self, SecretError> {
        let encoded = serialized
            .strip_prefix(PREFIX)
            .ok_or(SecretError::MissingPrefix)?;
        let key = STANDARD
            .decode(encoded)
            .map_err(|_| SecretError::NotBase64)?;
        if !(MIN_LEN..=MAX_LEN).contains(&key.len()) {
            return Err(SecretError::BadLength(key.len()));
        }
        Ok(Self { key })
    }

    /// The `whsec_...` form shown to users and stored.
    pub fn serialize(&self) -> String {
        format!("{PREFIX}{}", STANDARD.encode(&self.key))
    }

    /// The base64 signature (without the `v1,` version tag) of one delivery.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        STANDARD.encode(self.mac(msg_id, timestamp, body))
    }

    /// Constant-time check of one base64 signature.
    pub fn verify(&self, msg_id: &str, timestamp: i64, body: &[u8], signature_b64: &str) -> bool {
        let Ok(expected) = STANDARD.decode(signature_b64) else {
            return false;
        };
        self.hmac(msg_id, timestamp, body)
            .verify_slice(&expected)
            .is_ok()
    }

    /// The raw MAC of one delivery, for a verifier that compares it with several signatures.
    pub fn mac(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> [u8; 32] {
        self.hmac(msg_id, timestamp, body)
            .finalize()
            .into_bytes()
            .into()
    }

    fn hmac(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }
}

/// The `webhook-signature` header value: one `v1,<sig>` entry per secret, space separated, so
/// receivers that still hold a rotated-out secret keep verifying during the grace period.
pub fn signature_header<'a>(
    secrets: impl IntoIterator<Item = &'a EndpointSecret>,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    let mut header = String::new();
    for secret in secrets {
        if !header.is_empty() {
            header.push(' ');
        }
        header.push_str("v1,");
        header.push_str(&secret.sign(msg_id, timestamp, body));
    }
    header
}

/// The names of the headers Herald sets on the webhook requests it sends, in lower case (the
/// form `HeaderName::from_static` takes and HTTP/2 sends). An endpoint's own headers may not
/// override them.
pub mod headers {
    /// Standard Webhooks: the message id, the same on every attempt.
    pub const WEBHOOK_ID: &str = "webhook-id";
    /// Standard Webhooks: Unix seconds when the attempt was signed.
    pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
    /// Standard Webhooks: one `v1,<base64>` entry per live secret
    /// ([`super::signature_header`]).
    pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";
    /// Pusher channel webhooks: the app key.
    pub const PUSHER_KEY: &str = "x-pusher-key";
    /// Pusher channel webhooks: hex HMAC-SHA256 of the body with the app secret
    /// ([`crate::pusher::webhook_signature`]).
    pub const PUSHER_SIGNATURE: &str = "x-pusher-signature";
    /// Every header above.
    pub const ALL: [&str; 5] = [
        WEBHOOK_ID,
        WEBHOOK_TIMESTAMP,
        WEBHOOK_SIGNATURE,
        PUSHER_KEY,
        PUSHER_SIGNATURE,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_are_lower_case_http_tokens() {
        for name in headers::ALL {
            assert!(
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
                "{name}"
            );
        }
    }

    // Vector from the Standard Webhooks reference libraries' test suites.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const MSG_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: i64 = 1614265330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const EXPECTED: &str = "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn signs_the_reference_vector() {
        let secret = EndpointSecret::parse(SECRET).expect("valid secret");
        assert_eq!(secret.sign(MSG_ID, TIMESTAMP, BODY), EXPECTED);
        assert!(secret.verify(MSG_ID, TIMESTAMP, BODY, EXPECTED));
        assert!(!secret.verify(MSG_ID, TIMESTAMP + 1, BODY, EXPECTED));
        assert!(!secret.verify(MSG_ID, TIMESTAMP, b"{}", EXPECTED));
    }

    #[test]
    fn header_lists_every_secret() {
        let a = EndpointSecret::generate();
        let b = EndpointSecret::generate();
        let header = signature_header([&a, &b], "msg_1", 1, b"x");
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert!(a.verify("msg_1", 1, b"x", parts[0].trim_start_matches("v1,")));
        assert!(b.verify("msg_1", 1, b"x", parts[1].trim_start_matches("v1,")));
    }

    #[test]
    fn rejects_malformed_secrets() {
        assert_eq!(
            EndpointSecret::parse("abc").expect_err("must be refused"),
            SecretError::MissingPrefix
        );
        assert_eq!(
            EndpointSecret::parse("whsec_!!!").expect_err("must be refused"),
            SecretError::NotBase64
        );
        assert_eq!(
            EndpointSecret::parse("whsec_AAAA").expect_err("must be refused"),
            SecretError::BadLength(3)
        );
        let generated = EndpointSecret::generate();
        assert_eq!(
            EndpointSecret::parse(&generated.serialize()).expect("round trip"),
            generated
        );
    }
}
