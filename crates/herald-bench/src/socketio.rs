//! The Socket.IO face of `pusher-bench`: a hand-written Socket.IO v4 client (Engine.IO 4,
//! Socket.IO protocol 5) over the WebSocket transport only, no long-polling.
//!
//! Over WebSocket every Engine.IO packet is one text frame: `0{...}` OPEN, `1` CLOSE, `2` PING
//! (answered `3` PONG at once, or the server drops the connection), `4...` MESSAGE carrying a
//! Socket.IO packet: `0` CONNECT, `1` DISCONNECT, `2` EVENT, `3` ACK, `4` CONNECT_ERROR, each
//! followed by `/{namespace},` (omitted for the root namespace `/`), an optional ack id and the
//! JSON payload. A socket connects to its namespace (`40/demo,`), joins its room with an ack
//! (`42/demo,1["join","bench-3"]`, answered `43/demo,1[{"ok":true}]`) and then receives each
//! publication as `42/demo,["bench","<µs>:<padding>",{"channel":"bench-3"}]`.

use std::borrow::Cow;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use tokio_tungstenite::{connect_async, tungstenite::Message};

use crate::{EVENT, Inbound, REPLY_TIMEOUT, Socket};

/// The ack id of the `join` event; a socket sends nothing else that wants an answer.
const JOIN_ACK: u32 = 1;
/// Engine.IO's PONG, the answer to its PING `2`.
const PONG: &str = "3";

/// The endpoint a Socket.IO v4 client opens when it skips long-polling.
pub fn url(host: &str, port: u16) -> String {
    format!("ws://{host}:{port}/socket.io/?EIO=4&transport=websocket")
}

/// One namespace's packet framing: what precedes the payload of its packets.
#[derive(Debug, Clone)]
pub struct Namespace {
    /// The namespace as Socket.IO names it: `/demo`.
    name: String,
    /// `/demo,` as it follows a packet type, or empty for the root namespace `/`.
    prefix: String,
    /// `42/demo,`: an EVENT on this namespace inside an Engine.IO MESSAGE.
    event: String,
    /// `["bench","`: how a bench event's arguments begin, up to the data string's first char.
    bench_args: String,
}

impl Namespace {
    /// `name` is the app (`demo`, `/demo` or `app_...`); `/` alone is the root namespace.
    pub fn new(name: &str) -> Self {
        let name = format!("/{}", name.trim_start_matches('/'));
        let prefix = if name == "/" {
            String::new()
        } else {
            format!("{name},")
        };
        Self {
            event: format!("42{prefix}"),
            bench_args: format!("[\"{EVENT}\",\""),
            name,
            prefix,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Opens the Engine.IO session, connects the namespace and joins `room`, waiting for the
    /// join's ack; pings that arrive meanwhile are answered.
    pub async fn subscribe(&self, url: &str, room: &str) -> anyhow::Result<Socket> {
        let (mut socket, _) = connect_async(url).await.context("connecting")?;
        let open = next_packet(&mut socket).await?;
        let Some(handshake) = open.strip_prefix('0') else {
            bail!("expected the Engine.IO OPEN packet, got {}", excerpt(&open));
        };
        let handshake: serde_json::Value =
            serde_json::from_str(handshake).context("bad Engine.IO OPEN packet")?;
        if !handshake["sid"].is_string() {
            bail!("Engine.IO OPEN packet without a sid: {}", excerpt(&open));
        }

        let connected = format!("40{}", self.prefix);
        socket
            .send(Message::text(connected.as_str()))
            .await
            .context("connecting the namespace")?;
        loop {
            let packet = next_packet(&mut socket).await?;
            self.check_refusal(&packet)?;
            if packet.starts_with(&connected) {
                break;
            }
        }

        let join = serde_json::to_string(&("join", room)).context("encoding the join")?;
        socket
            .send(Message::text(format!("{}{JOIN_ACK}{join}", self.event)))
            .await
            .context("joining")?;
        let acked = format!("43{}{JOIN_ACK}", self.prefix);
        loop {
            let packet = next_packet(&mut socket).await?;
            self.check_refusal(&packet)?;
            // `43/demo,1[{"ok":true,...}]`, not the ack of another id such as `12`.
            if let Some(args) = packet.strip_prefix(acked.as_str())
                && args.starts_with('[')
            {
                let args: Vec<serde_json::Value> =
                    serde_json::from_str(args).context("bad join ack")?;
                return match args.first() {
                    Some(answer) if answer["ok"] == true => Ok(socket),
                    _ => bail!("join of {room} refused: {}", excerpt(&packet)),
                };
            }
        }
    }

    /// Fails on the namespace's CONNECT_ERROR or DISCONNECT.
    fn check_refusal(&self, packet: &str) -> anyhow::Result<()> {
        if let Some(error) = packet.strip_prefix("44")
            && let Some(error) = error.strip_prefix(&self.prefix)
        {
            let message = serde_json::from_str::<serde_json::Value>(error)
                .ok()
                .and_then(|e| e["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| error.to_owned());
            bail!("namespace {} refused: {message}", self.name);
        }
        if packet
            .strip_prefix("41")
            .is_some_and(|rest| rest.starts_with(&self.prefix))
        {
            bail!("namespace {} disconnected by the server", self.name);
        }
        Ok(())
    }

    /// The send time of a bench event, given what follows `42/demo,`: an optional ack id,
    /// then `["bench","<µs>:<padding>",{...meta}]`. The usual compact encoding is read
    /// without a JSON parse; anything else (whitespace, another event) gets a shallow one.
    fn bench_timestamp(&self, event: &str) -> Option<u64> {
        let args = event.trim_start_matches(|c: char| c.is_ascii_digit());
        if let Some(data) = args.strip_prefix(self.bench_args.as_str()) {
            let (sent_us, _) = data.split_once(':')?;
            return sent_us.parse().ok();
        }
        let args: Vec<&RawValue> = serde_json::from_str(args).ok()?;
        let name: Cow<'_, str> = serde_json::from_str(args.first()?.get()).ok()?;
        if name != EVENT {
            return None;
        }
        let data: Cow<'_, str> = serde_json::from_str(args.get(1)?.get()).ok()?;
        data.split(':').next()?.parse().ok()
    }

    /// Classifies a text frame received once subscribed.
    pub fn read(&self, frame: &str) -> Inbound {
        if let Some(event) = frame.strip_prefix(self.event.as_str()) {
            return self
                .bench_timestamp(event)
                .map_or(Inbound::Other, Inbound::Delivery);
        }
        match frame.as_bytes().first() {
            Some(b'2') if frame.len() == 1 => Inbound::Reply(PONG),
            Some(b'1') if frame.len() == 1 => Inbound::Closed,
            Some(b'4')
                if frame[1..]
                    .strip_prefix('1')
                    .is_some_and(|rest| rest.starts_with(&self.prefix)) =>
            {
                Inbound::Closed
            }
            _ => Inbound::Other,
        }
    }
}

/// The next Engine.IO packet that is not a PING, answering PINGs on the way.
async fn next_packet(socket: &mut Socket) -> anyhow::Result<String> {
    let wait = async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => match text.as_str() {
                    "2" => socket
                        .send(Message::text(PONG))
                        .await
                        .context("answering a ping")?,
                    "1" => bail!("closed by the server (Engine.IO CLOSE)"),
                    packet => return Ok(packet.to_owned()),
                },
                Some(Ok(Message::Close(frame))) => bail!("closed by the server: {frame:?}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e).context("reading"),
                None => bail!("connection ended"),
            }
        }
    };
    tokio::time::timeout(REPLY_TIMEOUT, wait)
        .await
        .context("no reply in time")?
}

/// The head of a packet, for error messages.
fn excerpt(packet: &str) -> &str {
    let end = packet
        .char_indices()
        .nth(200)
        .map_or(packet.len(), |(at, _)| at);
    &packet[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing() {
        let demo = Namespace::new("demo");
        assert_eq!(demo.name(), "/demo");
        assert_eq!(demo.prefix, "/demo,");
        assert_eq!(Namespace::new("/demo").prefix, "/demo,");
        assert_eq!(Namespace::new("/").prefix, "");
        assert_eq!(Namespace::new("").event, "42");
    }

    #[test]
    fn reads_deliveries() {
        let demo = Namespace::new("demo");
        let read = |frame: &str| demo.read(frame);
        assert_eq!(
            read(r#"42/demo,["bench","1700000000123456:xxxx",{"channel":"bench-3"}]"#),
            Inbound::Delivery(1_700_000_000_123_456)
        );
        assert_eq!(
            read(r#"42/demo,7[ "bench" , "12:" , {"channel":"bench-3"}]"#),
            Inbound::Delivery(12)
        );
        assert_eq!(
            read(r#"42/demo,["herald:subscribed",{"room":"bench-3"}]"#),
            Inbound::Other
        );
        assert_eq!(read(r#"42/other,["bench","12:",{}]"#), Inbound::Other);
        assert_eq!(read("2"), Inbound::Reply("3"));
        assert_eq!(read("1"), Inbound::Closed);
        assert_eq!(read("41/demo,"), Inbound::Closed);
        assert_eq!(read("41/other,"), Inbound::Other);
        assert_eq!(read("6"), Inbound::Other);
        let root = Namespace::new("/");
        assert_eq!(
            root.read(r#"42["bench","5:x",{"channel":"c"}]"#),
            Inbound::Delivery(5)
        );
    }
}
