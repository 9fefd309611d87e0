//! Webhooks in: each provider's signature scheme, checked on the raw bytes before any parsing,
//! the provider's delivery id for deduplication, and how an event type and channels are read
//! from a verified request.
//!
//! | kind | signature | signed content | timestamp | delivery id |
//! | --- | --- | --- | --- | --- |
//! | `stripe` | `Stripe-Signature: t=..,v1=<hex>[,v1=..]` | `{t}.{body}`, secret as-is | `t`, tolerance | payload `id` |
//! | `github` | `X-Hub-Signature-256: sha256=<hex>` | body | none | body hash |
//! | `shopify` | `X-Shopify-Hmac-Sha256: <base64>` | body | none (unsigned) | body hash |
//! | `slack` | `X-Slack-Signature: v0=<hex>` | `v0:{ts}:{body}` | `X-Slack-Request-Timestamp` | payload `event_id` |
//! | `standard-webhooks` | `webhook-signature` (or `svix-signature`): `v1,<base64>` list | `{id}.{ts}.{body}`, `whsec_` decoded | `webhook-timestamp` | `webhook-id` |
//! | `hmac-sha256` | configured header, hex or base64, optional prefix | body | none | body hash |
//!
//! The delivery id deduplicates, so it is taken only from signed content; where the provider's
//! id is in an unsigned header, the SHA-256 of the signed body stands in (a provider's retry
//! sends the same bytes, so it is still recognised).

pub mod template;

use base64::{Engine, engine::general_purpose::STANDARD};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::signing::EndpointSecret;

/// The default tolerance for signed timestamps (Stripe, Slack, Standard Webhooks).
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;

/// The largest signature header accepted. Real ones are under 300 bytes (a few signatures
/// during a rotation); refusing larger ones bounds the work an unauthenticated sender causes.
pub const MAX_SIGNATURE_HEADER_BYTES: usize = 4096;

/// The most signatures one header may carry (Stripe's `v1=`, Standard Webhooks' `v1,` entries).
/// Each is compared with MACs computed once per secret, never hashed on its own, so this only
/// bounds the comparisons.
pub const MAX_SIGNATURES: usize = 16;

/// The length of an HMAC-SHA256 signature: entries of any other length are skipped unhashed.
const MAC_LEN: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Stripe,
    Github,
    Shopify,
    Slack,
    StandardWebhooks,
    HmacSha256,
}

impl SourceKind {
    pub const ALL: [Self; 6] = [
        Self::Stripe,
        Self::Github,
        Self::Shopify,
        Self::Slack,
        Self::StandardWebhooks,
        Self::HmacSha256,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stripe => "stripe",
            Self::Github => "github",
            Self::Shopify => "shopify",
            Self::Slack => "slack",
            Self::StandardWebhooks => "standard-webhooks",
            Self::HmacSha256 => "hmac-sha256",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }

    /// Where the event type comes from unless the source says otherwise: templates tried in
    /// order, the first that renders wins. GitHub and Shopify name the event only in a header
    /// their signature does not cover, so those defaults apply only to sources that trust
    /// unsigned headers; otherwise the event type is the kind's name.
    pub fn default_event_type(self, trust_unsigned_headers: bool) -> &'static [&'static str] {
        match self {
            Self::Stripe | Self::StandardWebhooks | Self::HmacSha256 => &["{type}"],
            Self::Github if trust_unsigned_headers => &[
                "{header:x-github-event}.{action}",
                "{header:x-github-event}",
            ],
            Self::Shopify if trust_unsigned_headers => &["{header:x-shopify-topic}"],
            Self::Github | Self::Shopify => &[],
            Self::Slack => &["{event.type}", "{type}"],
        }
    }

    /// Whether this scheme signs a timestamp (so stale requests can be refused).
    pub fn signs_timestamp(self) -> bool {
        matches!(self, Self::Stripe | Self::Slack | Self::StandardWebhooks)
    }
}

/// The `hmac-sha256` kind's settings. A domain value: the API and the store each read and
/// write it through their own types (the API's refuses unknown fields, since a setting that is
/// silently dropped would change what is verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HmacScheme {
    /// The header carrying the signature, e.g. `X-Signature`.
    pub header: String,
    pub encoding: Encoding,
    /// Text before the signature in the header, e.g. `sha256=` (empty: none).
    pub prefix: String,
    /// A header carrying the sender's delivery id. It is not signed, so it deduplicates only on
    /// a source that trusts unsigned headers; otherwise the body hash does.
    pub id_header: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Hex,
    Base64,
}

/// What [`VerifyError::Stale`] says: how old the timestamp is, or how far ahead (a sender
/// whose clock runs ahead of the server's).
fn stale_message(age: i64, tolerance: i64) -> String {
    if age < 0 {
        format!(
            "timestamp is {} s in the future by the server's clock; at most {tolerance} s is accepted (check the sender's clock)",
            age.unsigned_abs()
        )
    } else {
        format!(
            "timestamp is {age} s old by the server's clock; at most {tolerance} s is accepted (stale or replayed request)"
        )
    }
}

/// Why a request was refused; the message names what failed, never a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("missing header {0}")]
    MissingHeader(String),
    #[error("malformed {header} header: {reason}")]
    Malformed { header: String, reason: String },
    #[error("{}", stale_message(*age, *tolerance))]
    Stale { age: i64, tolerance: i64 },
    #[error("signature does not match the body with any of the source's {secrets} secret(s)")]
    NoMatch { secrets: usize },
    #[error("the source has no usable secret: {0}")]
    BadSecret(String),
}

/// A request as the verifier sees it: a header lookup (case-insensitive) and the raw body.
pub struct Request<'a> {
    pub header: &'a dyn Fn(&str) -> Option<&'a str>,
    pub body: &'a [u8],
}

impl<'a> Request<'a> {
    fn required(&self, name: &str) -> Result<&'a str, VerifyError> {
        (self.header)(name).ok_or_else(|| VerifyError::MissingHeader(name.to_owned()))
    }

    /// A header that carries signatures, refused unread when it is larger than any sender
    /// makes one.
    fn signature(&self, name: &str) -> Result<&'a str, VerifyError> {
        let value = self.required(name)?;
        if value.len() > MAX_SIGNATURE_HEADER_BYTES {
            return Err(malformed(
                name,
                &format!(
                    "it is {} bytes; at most {MAX_SIGNATURE_HEADER_BYTES} are accepted",
                    value.len()
                ),
            ));
        }
        Ok(value)
    }
}

/// Checks the request's signature against every secret (any may match, so rotations work)
/// and, where the scheme signs one, its timestamp against `tolerance_secs` around `now_unix`.
pub fn verify(
    kind: SourceKind,
    hmac: Option<&HmacScheme>,
    secrets: &[String],
    request: &Request<'_>,
    now_unix: i64,
    tolerance_secs: i64,
) -> Result<(), VerifyError> {
    let fresh = |timestamp: i64| {
        // The timestamp is the sender's: saturate so `i64::MIN` is merely very stale.
        let age = now_unix.saturating_sub(timestamp);
        if age.saturating_abs() > tolerance_secs {
            Err(VerifyError::Stale {
                age,
                tolerance: tolerance_secs,
            })
        } else {
            Ok(())
        }
    };
    let no_match = VerifyError::NoMatch {
        secrets: secrets.len(),
    };
    let body = request.body;
    match kind {
        SourceKind::Stripe => {
            let header = request.signature("stripe-signature")?;
            let (timestamp, signatures) = parse_stripe(header)?;
            fresh(timestamp)?;
            let signed = [timestamp.to_string().as_bytes(), b".", body].concat();
            any_secret(secrets, &signatures, |secret| {
                hmac_sha256(secret.as_bytes(), &signed)
            })
            .ok_or(no_match)
        }
        SourceKind::Github => {
            let name = "x-hub-signature-256";
            let header = request.signature(name)?;
            let hex_sig = header
                .strip_prefix("sha256=")
                .ok_or_else(|| malformed(name, "expected sha256=<hex>"))?;
            let sig = hex::decode(hex_sig).map_err(|_| malformed(name, "not hex"))?;
            any_secret(secrets, &[sig], |secret| {
                hmac_sha256(secret.as_bytes(), body)
            })
            .ok_or(no_match)
        }
        SourceKind::Shopify => {
            let name = "x-shopify-hmac-sha256";
            let sig = STANDARD
                .decode(request.signature(name)?.trim())
                .map_err(|_| malformed(name, "not base64"))?;
            any_secret(secrets, &[sig], |secret| {
                hmac_sha256(secret.as_bytes(), body)
            })
            .ok_or(no_match)
        }
        SourceKind::Slack => {
            let ts_name = "x-slack-request-timestamp";
            let ts_text = request.required(ts_name)?;
            let timestamp: i64 = ts_text
                .trim()
                .parse()
                .map_err(|_| malformed(ts_name, "not a Unix time"))?;
            let name = "x-slack-signature";
            let hex_sig = request
                .signature(name)?
                .strip_prefix("v0=")
                .ok_or_else(|| malformed(name, "expected v0=<hex>"))?;
            let sig = hex::decode(hex_sig).map_err(|_| malformed(name, "not hex"))?;
            fresh(timestamp)?;
            let signed = [b"v0:", ts_text.trim().as_bytes(), b":", body].concat();
            any_secret(secrets, &[sig], |secret| {
                hmac_sha256(secret.as_bytes(), &signed)
            })
            .ok_or(no_match)
        }
        SourceKind::StandardWebhooks => {
            // Named as the standard names it, not as the fallback: a sender whose
            // `webhook-signature` a proxy stripped is not sent looking for `svix-id`.
            if (request.header)("webhook-signature").is_none()
                && (request.header)("svix-signature").is_none()
            {
                return Err(VerifyError::MissingHeader(
                    "webhook-signature (or svix-signature)".into(),
                ));
            }
            let prefix = standard_header_prefix(request);
            let id = request.required(&format!("{prefix}-id"))?;
            let ts_name = format!("{prefix}-timestamp");
            let timestamp = signed_unix_time(request.required(&ts_name)?.trim())
                .ok_or_else(|| malformed(&ts_name, "not a Unix time (digits, no leading zero)"))?;
            let sig_name = format!("{prefix}-signature");
            let signatures = standard_signatures(&sig_name, request.signature(&sig_name)?)?;
            fresh(timestamp)?;
            let keys: Vec<EndpointSecret> = secrets
                .iter()
                .map(|s| EndpointSecret::parse(s))
                .collect::<Result<_, _>>()
                .map_err(|e| VerifyError::BadSecret(e.to_string()))?;
            // One MAC per secret, whatever the number of entries.
            any_secret(&keys, &signatures, |key| key.mac(id, timestamp, body)).ok_or(no_match)
        }
        SourceKind::HmacSha256 => {
            let scheme = hmac.ok_or_else(|| {
                VerifyError::BadSecret("hmac-sha256 sources need a header and encoding".into())
            })?;
            let header = request.signature(&scheme.header)?;
            let encoded = header
                .trim()
                .strip_prefix(scheme.prefix.as_str())
                .ok_or_else(|| {
                    malformed(
                        &scheme.header,
                        &format!("expected {}<signature>", scheme.prefix),
                    )
                })?;
            let sig = match scheme.encoding {
                Encoding::Hex => {
                    hex::decode(encoded).map_err(|_| malformed(&scheme.header, "not hex"))?
                }
                Encoding::Base64 => STANDARD
                    .decode(encoded)
                    .map_err(|_| malformed(&scheme.header, "not base64"))?,
            };
            any_secret(secrets, &[sig], |secret| {
                hmac_sha256(secret.as_bytes(), body)
            })
            .ok_or(no_match)
        }
    }
}

/// The deduplication key of this delivery: the provider's id where the signature covers it
/// (Stripe's and Slack's in the signed body, Standard Webhooks' `webhook-id` in the signed
/// content), otherwise `sha256:<hex>` of the body. GitHub's, Shopify's and a generic source's
/// delivery ids travel in headers the signature does not cover: trusting them would let one
/// captured request be published again under a new id, so the signed body is the key.
///
/// `trusted` is given for a source that trusts unsigned headers: its event type then joins the
/// body hash in the key (Shopify sends one body under several topics, `orders/create` then
/// `orders/updated`, which are distinct deliveries), and an `hmac-sha256` source's `idHeader`
/// is the key when the request carries it.
pub fn delivery_id(
    kind: SourceKind,
    request: &Request<'_>,
    payload: Option<&Value>,
    trusted: Option<Trusted<'_>>,
) -> String {
    let from_payload = |field: &str| {
        payload
            .and_then(|p| p.get(field))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let from_header = |name: &str| (request.header)(name).map(str::to_owned);
    let id = match kind {
        SourceKind::Stripe => from_payload("id"),
        SourceKind::Slack => from_payload("event_id"),
        // The id the signature covered: the one under the names that were verified.
        SourceKind::StandardWebhooks => {
            from_header(&format!("{}-id", standard_header_prefix(request)))
        }
        SourceKind::HmacSha256 => trusted.and_then(|t| t.id_header).and_then(from_header),
        SourceKind::Github | SourceKind::Shopify => None,
    };
    // An id longer than the key's column is stored by its hash: two deliveries with long ids
    // and one body are still two. So is one holding NUL (a JSON `\u0000` in a signed body),
    // which PostgreSQL's text refuses: the sender would get a 500 for the same bytes forever.
    let id = id.filter(|id| !id.is_empty()).map(|id| {
        if id.len() <= 256 && !id.contains('\0') {
            id
        } else {
            format!("id-sha256:{}", hex::encode(Sha256::digest(id.as_bytes())))
        }
    });
    id.unwrap_or_else(|| {
        let hash = hex::encode(Sha256::digest(request.body));
        match trusted {
            Some(t) => format!("sha256:{hash}:{}", t.event_type),
            None => format!("sha256:{hash}"),
        }
    })
}

/// What a source that trusts unsigned headers read from them, for [`delivery_id`].
#[derive(Debug, Clone, Copy)]
pub struct Trusted<'a> {
    pub event_type: &'a str,
    /// An `hmac-sha256` source's `idHeader`.
    pub id_header: Option<&'a str>,
}

/// Standard Webhooks headers are `webhook-*`, or Svix's `svix-*` when no `webhook-signature` is
/// present; verification and the delivery id read the same set, so an unsigned `webhook-id`
/// beside a `svix-signature` is never taken for the delivery id.
fn standard_header_prefix(request: &Request<'_>) -> &'static str {
    if (request.header)("webhook-signature").is_some() {
        "webhook"
    } else {
        "svix"
    }
}

fn malformed(header: &str, reason: &str) -> VerifyError {
    VerifyError::Malformed {
        header: header.to_owned(),
        reason: reason.to_owned(),
    }
}

/// A signed timestamp, only as a number is written (an optional `-`, no `+`, no leading zero):
/// the schemes that sign one sign it as it is formatted again, so `+1700000000` or
/// `01700000000` would otherwise verify a header the sender never sent.
fn signed_unix_time(text: &str) -> Option<i64> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
        && text != "-0";
    canonical.then(|| text.parse().ok()).flatten()
}

/// `t=<unix>,v1=<hex>,v1=<hex>,v0=...`: the timestamp and every `v1` signature that could
/// match (64 hex digits); others cannot, and are skipped as Stripe's libraries skip them, so one
/// garbled entry does not hide a good one beside it. The timestamp is read by
/// [`signed_unix_time`].
fn parse_stripe(header: &str) -> Result<(i64, Vec<Vec<u8>>), VerifyError> {
    let name = "Stripe-Signature";
    let mut timestamp = None;
    let mut signatures = Vec::new();
    let mut v1_entries = 0;
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => {
                timestamp = Some(signed_unix_time(t).ok_or_else(|| {
                    malformed(name, "t is not a Unix time (digits, no leading zero)")
                })?);
            }
            Some(("v1", sig)) => {
                v1_entries += 1;
                if v1_entries > MAX_SIGNATURES {
                    return Err(too_many_signatures(name));
                }
                if let Ok(sig) = hex::decode(sig)
                    && sig.len() == MAC_LEN
                {
                    signatures.push(sig);
                }
            }
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or_else(|| malformed(name, "no t= timestamp"))?;
    if signatures.is_empty() {
        return Err(malformed(
            name,
            "no v1= signature of 64 hex digits (an HMAC-SHA256)",
        ));
    }
    Ok((timestamp, signatures))
}

/// `v1,<base64>` entries of a Standard Webhooks signature header, decoded. Entries of other
/// versions are skipped (the spec lets senders add them); `v1` entries that are not base64 of
/// 32 bytes cannot match and are skipped without hashing anything. A header left with none is
/// malformed, not a mismatch: the sender's scheme is wrong (`v1a`, Ed25519, or `v1=`), and
/// blaming the secrets would send its operator rotating them.
fn standard_signatures(name: &str, header: &str) -> Result<Vec<Vec<u8>>, VerifyError> {
    let entries: Vec<&str> = header.split(' ').filter(|e| !e.is_empty()).collect();
    if entries.len() > MAX_SIGNATURES {
        return Err(too_many_signatures(name));
    }
    // Base64 of 32 bytes is 44 characters; check before decoding.
    let b64_len = MAC_LEN.div_ceil(3) * 4;
    let signatures: Vec<Vec<u8>> = entries
        .into_iter()
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .filter(|sig| sig.len() == b64_len)
        .filter_map(|sig| STANDARD.decode(sig).ok())
        .filter(|sig| sig.len() == MAC_LEN)
        .collect();
    if signatures.is_empty() {
        return Err(malformed(
            name,
            "no v1,<signature> entry of base64 of 32 bytes (an HMAC-SHA256); v1a (Ed25519) is not supported",
        ));
    }
    Ok(signatures)
}

fn too_many_signatures(name: &str) -> VerifyError {
    malformed(
        name,
        &format!("more than {MAX_SIGNATURES} signatures; at most {MAX_SIGNATURES} are accepted"),
    )
}

/// Whether any signature equals the MAC under any secret, compared in constant time. The MAC
/// is computed once per secret, so the work is one hash of the body per secret however many
/// signatures the sender lists.
fn any_secret<S>(
    secrets: &[S],
    signatures: &[Vec<u8>],
    mac: impl Fn(&S) -> [u8; MAC_LEN],
) -> Option<()> {
    let mut matched = false;
    for secret in secrets {
        let expected = mac(secret);
        for signature in signatures {
            matched |= bool::from(expected.as_slice().ct_eq(signature));
        }
    }
    matched.then_some(())
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(data);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests;
