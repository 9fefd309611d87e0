//! `herald listen`: print an app's events as they are published, and optionally forward each
//! to a local server as a signed webhook, as `stripe listen --forward-to` does.
//!
//! It reads the server's live tail (`GET /api/v1/app/{app}/tail`, Server-Sent Events), one
//! stream per app. The tail is a window, not a queue: events published while the stream is
//! down are not shown (the message log keeps them), and the command says so when it
//! reconnects.

use std::{io::Write, sync::Arc, time::Duration};

use clap::Args;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use herald_core::{MessageId, signing::EndpointSecret};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{Api, Remote, encode, segment};

#[derive(Debug, Args)]
pub struct ListenArgs {
    #[command(flatten)]
    pub remote: Remote,
    /// Watch this app (id or uid; repeat the flag) [default: every app the token sees].
    #[arg(long = "app", value_name = "APP")]
    pub apps: Vec<String>,
    /// Only events of these types (repeat the flag).
    #[arg(long = "event-type", value_name = "TYPE")]
    pub event_types: Vec<String>,
    /// Only events on these channels (repeat the flag).
    #[arg(long = "channel", value_name = "CHANNEL")]
    pub channels: Vec<String>,
    /// POST each event to this URL, signed as Herald signs webhooks (Standard Webhooks).
    #[arg(long, value_name = "URL")]
    pub forward_to: Option<url::Url>,
    /// The secret forwarded events are signed with (`whsec_...`) [env: HERALD_LISTEN_SECRET]
    /// [default: a new one, printed at start].
    #[arg(long, value_name = "SECRET", requires = "forward_to")]
    pub secret: Option<String>,
    /// Stop after this many events.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
}

/// One event off an app's tail, or what happened to the stream.
enum Heard {
    /// `raw` is the event's JSON as the server sent it (its `data` bytes are the producer's).
    Event {
        app: String,
        event: Value,
        raw: String,
    },
    Skipped {
        app: String,
        skipped: u64,
    },
    Lost {
        app: String,
        error: String,
    },
    /// The server refused the stream for good (the token, or the app deleted).
    Refused {
        app: String,
        error: String,
    },
}

pub async fn run(args: ListenArgs) -> anyhow::Result<()> {
    let remote = &args.remote;
    let api = remote.connect()?;
    // The secret forwarded events are signed with, and whether Herald made it up.
    let (secret, generated_secret) = match (&args.forward_to, &args.secret) {
        (None, _) => (None, false),
        (Some(_), Some(secret)) => (
            Some(EndpointSecret::parse(secret).map_err(|e| {
                anyhow::anyhow!(
                    "--secret must be a Standard Webhooks secret (whsec_ + base64): {e}"
                )
            })?),
            false,
        ),
        (Some(_), None) => match std::env::var("HERALD_LISTEN_SECRET") {
            Ok(secret) if !secret.is_empty() => (
                Some(EndpointSecret::parse(&secret).map_err(|e| {
                    anyhow::anyhow!("HERALD_LISTEN_SECRET must be a whsec_ secret: {e}")
                })?),
                false,
            ),
            _ => (Some(EndpointSecret::generate()), true),
        },
    };
    let apps = if args.apps.is_empty() {
        let apps = api.list_all("/api/v1/app").await?;
        apps.iter()
            .filter_map(|app| app.get("id").and_then(Value::as_str).map(str::to_owned))
            .collect()
    } else {
        args.apps.clone()
    };
    if apps.is_empty() {
        anyhow::bail!("there is no app to listen to: create one (`herald app create NAME`)");
    }
    // One tail per app, and a node serves 64 at most (`MAX_TAILS`): every app of a large
    // install would take the tails of the console and of other listeners, or fail.
    if args.apps.is_empty() && apps.len() > MAX_APPS_UNNAMED {
        anyhow::bail!(
            "there are {} apps: listening to every one would take as many of the server's live tails (64 at most); name the ones to listen to with --app",
            apps.len()
        );
    }
    let mut query = Vec::new();
    for t in &args.event_types {
        query.push(format!("event_types={}", encode(t)));
    }
    for c in &args.channels {
        query.push(format!("channels={}", encode(c)));
    }
    let query = query.join("&");

    // Every stream open before "ready": an event sent after it is seen.
    let (heard, mut hearing) = mpsc::channel::<Heard>(1024);
    for app in &apps {
        let path = format!("/api/v1/app/{}/tail?{query}", segment("app", app)?);
        let response = api.open_stream(&path).await?;
        tokio::spawn(follow(
            api.clone(),
            app.clone(),
            path,
            response,
            heard.clone(),
        ));
    }
    drop(heard);

    let forward = match (&args.forward_to, secret) {
        (Some(url), Some(secret)) => {
            // A secret the user gave is not printed: it would end up in terminal and CI logs.
            if generated_secret {
                eprintln!(
                    "forwarding to {url}, signed with {} (verify it as any Standard Webhooks secret)",
                    secret.serialize()
                );
            } else {
                eprintln!("forwarding to {url}, signed with the secret given");
            }
            Some(Forward {
                url: url.clone(),
                secret,
                http: reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()?,
            })
        }
        _ => None,
    };
    eprintln!(
        "ready: listening to {} on {} (Ctrl-C to stop)",
        apps.join(", "),
        api.base()
    );

    let mut seen = 0u64;
    // One Ctrl-C listener for the whole run: one made per turn would miss a Ctrl-C pressed
    // while an event is printed or forwarded (tokio drops a signal nobody waits for).
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        if args.count.is_some_and(|count| seen >= count) {
            return Ok(());
        }
        let heard = tokio::select! {
            heard = hearing.recv() => heard,
            _ = &mut ctrl_c => return Ok(()),
        };
        match heard {
            None => anyhow::bail!("every stream ended"),
            Some(Heard::Event { app, event, raw }) => {
                seen += 1;
                show(&app, &event, remote.json);
                if let Some(forward) = &forward {
                    tokio::select! {
                        () = forward.send(&api, &app, &event, &raw) => {}
                        _ = &mut ctrl_c => return Ok(()),
                    }
                }
            }
            Some(Heard::Skipped { app, skipped }) => {
                eprintln!(
                    "{app}: {skipped} event(s) not shown: this listener fell behind (the message log has them)"
                );
            }
            Some(Heard::Lost { app, error }) => {
                eprintln!(
                    "{app}: lost the stream ({error}); reconnecting. Events published meanwhile are not shown (the message log has them)"
                );
            }
            // Asking again would be refused again, every 10 s for ever: a script waiting for
            // `--count` events gets an exit code instead.
            Some(Heard::Refused { app, error }) => {
                anyhow::bail!("{app}: the stream was refused ({error}); not reconnecting")
            }
        }
    }
}

/// The most apps `herald listen` follows when none is named: a quarter of a node's tails.
const MAX_APPS_UNNAMED: usize = 16;

/// How long a tail may stay silent before it is taken for lost: three of the server's
/// keep-alives (15 s apart).
const SILENT_FOR: Duration = Duration::from_secs(45);

/// Reads one app's tail for as long as the command runs, reconnecting when it drops.
async fn follow(
    api: Api,
    app: String,
    path: String,
    first: reqwest::Response,
    heard: mpsc::Sender<Heard>,
) {
    let mut response = Some(first);
    let mut backoff = Duration::from_millis(250);
    loop {
        let stream = match response.take() {
            Some(stream) => stream,
            None => match api.open_stream(&path).await {
                Ok(stream) => {
                    backoff = Duration::from_millis(250);
                    stream
                }
                Err(e) => {
                    let error = format!("{e:#}");
                    let refused = e
                        .downcast_ref::<super::api::StreamRefused>()
                        .is_some_and(super::api::StreamRefused::is_final);
                    let lost = if refused {
                        Heard::Refused {
                            app: app.clone(),
                            error,
                        }
                    } else {
                        Heard::Lost {
                            app: app.clone(),
                            error,
                        }
                    };
                    if heard.send(lost).await.is_err() || refused {
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            },
        };
        // The server sends a keep-alive comment while idle, which the event parser swallows:
        // the bytes say whether the stream is alive. One silent for much longer is half-open
        // (a network change, a dropped VPN) and would never say so.
        let heard_at = Arc::new(std::sync::Mutex::new(tokio::time::Instant::now()));
        let seen = Arc::clone(&heard_at);
        let mut events = stream
            .bytes_stream()
            .inspect(move |_| {
                *seen.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
            })
            .eventsource();
        let error = loop {
            let next = match tokio::time::timeout(SILENT_FOR, events.next()).await {
                Ok(next) => next,
                Err(_) => {
                    let silent = heard_at.lock().unwrap_or_else(|p| p.into_inner()).elapsed();
                    if silent < SILENT_FOR {
                        continue;
                    }
                    break format!(
                        "nothing, not even a keep-alive, for {} s",
                        SILENT_FOR.as_secs()
                    );
                }
            };
            match next {
                Some(Ok(event)) if event.event == "publication" => {
                    let raw = event.data;
                    let event = match serde_json::from_str(&raw) {
                        Ok(event) => event,
                        Err(e) => break format!("an event that is not JSON ({e})"),
                    };
                    let app = app.clone();
                    if heard.send(Heard::Event { app, event, raw }).await.is_err() {
                        return;
                    }
                }
                Some(Ok(event)) if event.event == "lagged" => {
                    let skipped = serde_json::from_str::<Value>(&event.data)
                        .ok()
                        .and_then(|v| v.get("skipped").and_then(Value::as_u64))
                        .unwrap_or(0);
                    let app = app.clone();
                    if heard.send(Heard::Skipped { app, skipped }).await.is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => break e.to_string(),
                None => break "the server closed it".to_owned(),
            }
        };
        let lost = Heard::Lost {
            app: app.clone(),
            error,
        };
        if heard.send(lost).await.is_err() {
            return;
        }
        tokio::time::sleep(backoff).await;
    }
}

/// One event on standard output: a line of text, or of JSON.
fn show(app: &str, event: &Value, json: bool) {
    let text = |name: &str| event.get(name).and_then(Value::as_str).unwrap_or("");
    let line = if json {
        let mut out = event.clone();
        out["app"] = Value::String(app.to_owned());
        out.to_string()
    } else {
        let channels = event
            .get("channels")
            .and_then(Value::as_array)
            .map(|cs| {
                cs.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        let data = match (event.get("data"), event.get("dataOmittedBytes")) {
            (Some(data), _) => data.to_string(),
            (None, Some(bytes)) => format!("({bytes} bytes of data: too large for the live tail)"),
            (None, None) => String::new(),
        };
        let time = text("timestamp").get(11..23).unwrap_or("").to_owned();
        format!(
            "{time}  {app}  {:<6}  {}  [{channels}]  {}  {}",
            text("source"),
            text("event"),
            text("messageId"),
            shorten(&data, 120)
        )
    };
    let mut stdout = std::io::stdout().lock();
    // A closed pipe (`| head`) ends nothing but the output.
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}

/// Where and how events are forwarded.
struct Forward {
    url: url::Url,
    secret: EndpointSecret,
    http: reqwest::Client,
}

impl Forward {
    /// POSTs one event as the webhook Herald would send for it, and says how it went. Data the
    /// tail left out (too large) is read from the message log, where the event became a
    /// message; an event that became none is not forwarded, and that is said.
    async fn send(&self, api: &Api, app: &str, event: &Value, raw: &str) {
        let message_id = event.get("messageId").and_then(Value::as_str);
        let body = match (event.get("dataOmittedBytes"), message_id) {
            (None, _) => webhook_body(raw),
            (Some(_), Some(message_id)) => match full_payload(api, app, message_id).await {
                Ok(body) => body,
                Err(e) => {
                    eprintln!(
                        "  -> not forwarded: reading message {message_id}'s payload failed: {e:#}"
                    );
                    return;
                }
            },
            (Some(bytes), None) => {
                eprintln!(
                    "  -> not forwarded: its data ({bytes} bytes) is too large for the live tail, and it became no message to read it from"
                );
                return;
            }
        };
        let id = message_id.map_or_else(
            || MessageId::new(chrono::Utc::now()).to_string(),
            str::to_owned,
        );
        let timestamp = chrono::Utc::now().timestamp();
        let signature =
            herald_core::signing::signature_header([&self.secret], &id, timestamp, body.as_bytes());
        let started = std::time::Instant::now();
        let sent = self
            .http
            .post(self.url.clone())
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        let took = started.elapsed().as_millis();
        match sent {
            Ok(response) => eprintln!("  -> {} {} ({took} ms)", self.url, response.status()),
            Err(e) => eprintln!("  -> {} failed: {e} ({took} ms)", self.url),
        }
    }
}

/// A message's payload from the message log, byte for byte as the server keeps it, for an
/// event whose data the tail left out.
async fn full_payload(api: &Api, app: &str, message_id: &str) -> anyhow::Result<String> {
    #[derive(serde::Deserialize)]
    struct Message<'a> {
        #[serde(borrow)]
        payload: &'a serde_json::value::RawValue,
    }
    let path = format!(
        "/api/v1/app/{}/msg/{}",
        segment("app", app)?,
        segment("message", message_id)?
    );
    let bytes = api.get_bytes(&path).await?;
    let message: Message<'_> = serde_json::from_slice(&bytes)
        .map_err(|e| anyhow::anyhow!("the message's JSON could not be read: {e}"))?;
    // An expunged payload reads as `{"expired": true}`, which is not what was published.
    if serde_json::from_str::<Value>(message.payload.get())
        .is_ok_and(|payload| payload == json!({"expired": true}))
    {
        anyhow::bail!("its payload has expired (payload retention)");
    }
    Ok(message.payload.get().to_owned())
}

/// The body of the webhook an event (`raw`, the tail's JSON) becomes: a message's payload
/// byte for byte, or (for a channel event no endpoint wanted) its data when that is a JSON
/// object, else `{"data": ...}`, as Herald builds the message of a Pusher event.
fn webhook_body(raw: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Raw<'a> {
        #[serde(borrow)]
        data: Option<&'a serde_json::value::RawValue>,
    }
    let Some(data) = serde_json::from_str::<Raw<'_>>(raw)
        .ok()
        .and_then(|r| r.data)
    else {
        return "{}".to_owned();
    };
    match serde_json::from_str::<Value>(data.get()) {
        Ok(Value::Object(_)) => data.get().to_owned(),
        Ok(Value::String(text)) => json!({ "data": text }).to_string(),
        _ => json!({ "data": data.get() }).to_string(),
    }
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forwarded_body_is_the_payload_or_the_wrapped_data() {
        let message = r#"{"messageId":"msg_1","data":{"z": 1,  "a": [2]}}"#;
        assert_eq!(
            webhook_body(message),
            r#"{"z": 1,  "a": [2]}"#,
            "byte for byte"
        );
        let text = r#"{"data":"hello"}"#;
        assert_eq!(webhook_body(text), r#"{"data":"hello"}"#);
        let array = r#"{"data":[1, 2]}"#;
        assert_eq!(webhook_body(array), r#"{"data":"[1, 2]"}"#);
    }

    #[test]
    fn long_data_is_shortened_on_a_character_boundary() {
        assert_eq!(shorten("héllo", 3), "hél…");
        assert_eq!(shorten("abc", 3), "abc");
    }
}
