//! What Herald's fuzz targets run: one function per parser of untrusted bytes, each taking
//! the raw input and asserting what must hold for *any* input (nothing panics, a forged
//! signature never verifies, a genuine one always does, outputs stay within their bounds).
//!
//! Two callers share these bodies, so a crash found once is replayed forever:
//! - `fuzz/` (outside the workspace): coverage-guided targets for cargo-fuzz/libFuzzer, one
//!   line each. `cargo fuzz run --sanitizer none TARGET` runs them on the stable toolchain.
//! - `tests/corpus.rs`: replays every file under `fuzz/corpus/TARGET/` and
//!   `fuzz/regressions/TARGET/` through the same function in the ordinary test run.
//!
//! Inputs are split into fields at newlines (`\n`), the body being whatever is left, so
//! seeds stay readable and the fuzzer finds the separators quickly.

use std::collections::VecDeque;

use bytes::Bytes;
use engineioxide_core::Str;
use herald_core::{
    ingest::{self, Encoding, HmacScheme, Request, SourceKind, template},
    pusher,
    signing::{EndpointSecret, signature_header},
};
use herald_socketio::{binary, token};
use herald_ws::protocol::client::{self, ClientMessage};
use socketioxide_core::parser::{Parse, ParseConfig, ParseError, ParserState};
use socketioxide_parser_common::CommonParser;

/// The clock every target reads: signatures are checked against it.
const NOW: i64 = 1_800_000_000;
const KEY: &str = "278d425bdf160c739803";
const SECRET: &str = "7ad3773142a6692b25b8";
/// A Standard Webhooks secret: a valid secret for every inbound scheme.
const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A target's body: it panics on what must not happen.
pub type Target = fn(&[u8]);

/// Every target, by the name its cargo-fuzz binary and corpus folder have.
pub const TARGETS: &[(&str, Target)] = &[
    ("pusher_frame", pusher_frame),
    ("pusher_signatures", pusher_signatures),
    ("ingest_signatures", ingest_signatures),
    ("templates", templates),
    ("socketio_packet", socketio_packet),
];

/// Splits `data` into `n` newline-terminated fields and the rest (missing fields are empty).
fn fields(data: &[u8], n: usize) -> (Vec<String>, &[u8]) {
    let mut rest = data;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (field, after) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        out.push(String::from_utf8_lossy(field).into_owned());
        rest = after;
    }
    (out, rest)
}

/// The Pusher client frame parser (every WebSocket text message reaches it first), and the
/// presence `channel_data` and sign-in `user_data` readers.
pub fn pusher_frame(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match client::parse(&text) {
        ClientMessage::Malformed { reason } => assert!(!reason.is_empty()),
        ClientMessage::ClientEvent { event, .. } => assert!(event.starts_with("client-")),
        ClientMessage::Unknown { event } => assert!(
            !event.starts_with("client-")
                && ![
                    "pusher:ping",
                    "pusher:pong",
                    "pusher:subscribe",
                    "pusher:unsubscribe",
                    "pusher:signin"
                ]
                .contains(&event.as_str())
        ),
        _ => {}
    }
    if let Ok(member) = client::presence_member(&text, 1024) {
        assert!(!member.user_id.is_empty());
        assert!(member.info.is_none_or(|info| info.get().len() <= 1024));
    }
    if let Some(user) = client::signed_in_user(&text) {
        assert!(!user.is_empty());
    }
}

/// The Pusher signature checks: channel auth, user (sign-in) auth, SSE tokens and signed
/// HTTP API requests. Fields: socket id, channel, channel data (empty: none), auth, query
/// (`k=v&k=v`), then the body.
pub fn pusher_signatures(data: &[u8]) {
    let (f, body) = fields(data, 5);
    let (socket_id, channel, auth, query) = (&f[0], &f[1], &f[3], &f[4]);
    let channel_data = (!f[2].is_empty()).then_some(f[2].as_str());

    // A forged auth never verifies (a random match is a 2^-256 event)...
    let signed = match channel_data {
        Some(data) => format!("{socket_id}:{channel}:{data}"),
        None => format!("{socket_id}:{channel}"),
    };
    let genuine = format!("{KEY}:{}", pusher::sign(SECRET, &signed));
    let verdict = pusher::verify_channel_auth(KEY, SECRET, socket_id, channel, channel_data, auth);
    assert_eq!(verdict.is_ok(), *auth == genuine, "{verdict:?}");
    // ...and the genuine one always does, with the right secret only.
    assert!(
        pusher::verify_channel_auth(KEY, SECRET, socket_id, channel, channel_data, &genuine)
            .is_ok()
    );
    assert!(
        pusher::verify_channel_auth(KEY, "other", socket_id, channel, channel_data, &genuine)
            .is_err()
    );
    let user_data = channel_data.unwrap_or_default();
    let genuine_user = format!(
        "{KEY}:{}",
        pusher::sign(SECRET, &format!("{socket_id}::user::{user_data}"))
    );
    let verdict = pusher::verify_user_auth(KEY, SECRET, socket_id, user_data, auth);
    assert_eq!(verdict.is_ok(), *auth == genuine_user, "{verdict:?}");
    assert!(pusher::verify_user_auth(KEY, SECRET, socket_id, user_data, &genuine_user).is_ok());

    assert!(pusher::verify_sse_token(SECRET, channel, auth, NOW).is_err());
    let token = pusher::sse_token(SECRET, channel, NOW + 60);
    assert!(pusher::verify_sse_token(SECRET, channel, &token, NOW).is_ok());

    // Arbitrary query parameters never authenticate a request...
    let params: Vec<(String, String)> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (pair.to_owned(), String::new()),
        })
        .collect();
    let path = "/apps/1/events";
    assert!(pusher::verify_request(KEY, SECRET, "POST", path, &params, body, NOW).is_err());
    // ...while the same parameters signed as the SDKs sign them do, for this body only. The
    // SDKs send each key once and never one of the `auth_*`/`body_md5` keys they add.
    let mut own: Vec<(String, String)> = Vec::new();
    for (k, v) in params {
        let lower = k.to_ascii_lowercase();
        if !lower.starts_with("auth_")
            && lower != "body_md5"
            && !own.iter().any(|(seen, _)| seen.eq_ignore_ascii_case(&k))
        {
            own.push((k, v));
        }
    }
    let signed = pusher::sign_request(KEY, SECRET, "POST", path, &own, body, NOW);
    let verdict = pusher::verify_request(KEY, SECRET, "POST", path, &signed, body, NOW);
    assert!(verdict.is_ok(), "{verdict:?} for {signed:?}");
    let mut other_body = body.to_vec();
    other_body.push(b'!');
    assert!(pusher::verify_request(KEY, SECRET, "POST", path, &signed, &other_body, NOW).is_err());
}

/// Every inbound webhook scheme and its header parsers. The first byte picks the scheme;
/// then `name: value` header lines up to an empty line, then the body.
pub fn ingest_signatures(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let kind = SourceKind::ALL[usize::from(pick) % SourceKind::ALL.len()];
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut rest = rest;
    loop {
        let (line, after) = fields(rest, 1);
        rest = after;
        let Some((name, value)) = line[0].split_once(':') else {
            break;
        };
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let body = rest;
    let scheme = HmacScheme {
        header: "x-signature".into(),
        encoding: if pick & 0x80 == 0 {
            Encoding::Hex
        } else {
            Encoding::Base64
        },
        prefix: "sha256=".into(),
        id_header: Some("x-delivery".into()),
    };
    let verify = |kind: SourceKind, headers: &[(String, String)], body: &[u8]| {
        let lookup = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let hmac = (kind == SourceKind::HmacSha256).then_some(&scheme);
        let request = Request {
            header: &lookup,
            body,
        };
        ingest::verify(kind, hmac, &[WHSEC.to_owned()], &request, NOW, 300)
    };
    // Headers the fuzzer wrote never carry a valid HMAC of the body.
    let verdict = verify(kind, &headers, body);
    assert!(verdict.is_err(), "{kind:?} accepted {headers:?}");
    // A Standard Webhooks signature made by Herald's outbound signer verifies, and a changed
    // body does not.
    let secret = EndpointSecret::parse(WHSEC).expect("the constant secret parses");
    let msg_id = headers.first().map_or("msg_1", |(_, v)| v.as_str());
    let signed = vec![
        ("webhook-id".to_owned(), msg_id.to_owned()),
        ("webhook-timestamp".to_owned(), NOW.to_string()),
        (
            "webhook-signature".to_owned(),
            signature_header([&secret], msg_id, NOW, body),
        ),
    ];
    let verdict = verify(SourceKind::StandardWebhooks, &signed, body);
    // A message id is one header line: one with a newline is not a request a sender can make.
    if !msg_id.is_empty() && !msg_id.contains(['\r', '\n']) {
        assert!(verdict.is_ok(), "{verdict:?}");
    }
    let mut changed = body.to_vec();
    changed.push(b'\n');
    assert!(verify(SourceKind::StandardWebhooks, &signed, &changed).is_err());
}

/// The template engine that reads event types and channels from inbound payloads. Fields:
/// the template, a header value, then the payload (JSON, or none when it does not parse).
pub fn templates(data: &[u8]) {
    let (f, payload) = fields(data, 2);
    let (template_text, header) = (&f[0], &f[1]);
    let payload: Option<serde_json::Value> = serde_json::from_slice(payload).ok();
    let lookup = |_: &str| Some(header.as_str());
    let valid = template::validate(template_text).is_ok();
    let rendered = template::render(template_text, payload.as_ref(), &lookup);
    if !valid {
        // What validation refuses is never rendered (an over-long template is refused by
        // validation alone: it may still render).
        assert!(rendered.is_none() || template_text.is_empty() || template_text.len() > 512);
    }
    if valid && !template_text.contains(['{', '}']) {
        // Text without a placeholder renders as itself.
        assert_eq!(rendered.as_deref(), Some(template_text.as_str()));
    }
    if let Some(event_type) = template::event_type(&[template_text], payload.as_ref(), &lookup) {
        assert!(!event_type.is_empty() && event_type.len() <= 256);
    }
    let channels = template::channels(
        &[template_text],
        Some("fallback"),
        payload.as_ref(),
        &lookup,
    );
    assert!(!channels.is_empty() && channels.len() <= template::MAX_CHANNELS);
}

/// The Socket.IO packet parser the server runs (socketioxide's common parser), Herald's
/// reader of event payloads with binary attachments, and its handshake token check. The
/// input is the packet text, then attachments separated by `0xFF` bytes (never UTF-8).
pub fn socketio_packet(data: &[u8]) {
    let mut parts = data.split(|&b| b == 0xFF);
    let text = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let attachments: VecDeque<Bytes> = parts.map(Bytes::copy_from_slice).collect();

    let config = ParseConfig::default();
    let state = ParserState::default();
    let mut decoded = CommonParser.decode_str(&config, &state, Str::from(text.clone()));
    for attachment in &attachments {
        match decoded {
            Err(ParseError::NeedsMoreBinaryData) => {
                decoded = CommonParser.decode_bin(&config, &state, attachment.clone());
            }
            _ => break,
        }
    }

    if let Ok(event) = binary::read_event(&text, Some(&attachments)) {
        for arg in &event.args {
            serde_json::to_string(&binary::Outbound::of(arg, true))
                .expect("a parsed argument serializes");
        }
    }
    // Whatever the text is, it is not a token signed with the room secret.
    assert!(token::verify(&text, SECRET, NOW).is_err());
}
