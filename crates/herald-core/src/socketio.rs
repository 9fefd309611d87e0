//! Socket.IO clients' rules per app: which browser origins may connect, which channel is the
//! namespace's own (where `io.emit`-style relays go), and what happens to each event a client
//! emits (relayed to whom, forwarded to the app's webhooks, or refused).
//!
//! The face (`herald-socketio`) reads them when a socket connects; the API validates them with
//! [`validate_settings`] before they are stored.

/// The namespace channel when an app names none.
pub const DEFAULT_NAMESPACE_CHANNEL: &str = "socket.io";

/// Events Herald itself handles; no rule can claim them.
pub const RESERVED_EVENTS: [&str; 2] = ["join", "leave"];

/// Names a client may never have relayed: Socket.IO's own events (a client receiving them
/// would run its lifecycle handlers), and the server's own prefixes (`herald:` notices, the
/// Pusher protocol's `pusher:` and `pusher_internal:` frames), which other clients must be
/// able to trust.
pub fn is_reserved_name(event: &str) -> bool {
    const SOCKET_IO: [&str; 6] = [
        "connect",
        "connect_error",
        "disconnect",
        "disconnecting",
        "newListener",
        "removeListener",
    ];
    SOCKET_IO.contains(&event)
        || ["herald:", "pusher:", "pusher_internal:"]
            .iter()
            .any(|prefix| event.starts_with(prefix))
}

/// An app's Socket.IO settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SocketIoSettings {
    /// Browser origins allowed to connect (`scheme://host[:port]`, or `*` for any). Clients
    /// that send no `Origin` (servers, Node) are not checked.
    pub allowed_origins: Vec<String>,
    /// Every socket of the namespace is in this channel; `None`: [`DEFAULT_NAMESPACE_CHANNEL`].
    pub namespace_channel: Option<String>,
    /// The first rule whose event matches decides.
    pub events: Vec<EventRule>,
}

/// What happens to one event a client emits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRule {
    /// An event name, or `*` for any.
    pub event: String,
    pub relay: Relay,
    /// Also forward it to the app's webhook endpoints (event type = the event's name).
    pub webhook: bool,
}

/// To whom a client's event is relayed, in Socket.IO's own terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relay {
    /// `io.emit`: the namespace channel, the sender included.
    Everyone,
    /// `socket.broadcast.emit`: the namespace channel, the sender excluded.
    Others,
    /// `socket.to(room).emit`: each room the sender joined (not the namespace channel), the
    /// sender excluded.
    Rooms,
    /// Not relayed (a webhook-only event).
    None,
    /// Refused with an error.
    Refuse,
}

impl Relay {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Everyone => "everyone",
            Self::Others => "others",
            Self::Rooms => "rooms",
            Self::None => "none",
            Self::Refuse => "refuse",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "everyone" => Self::Everyone,
            "others" => Self::Others,
            "rooms" => Self::Rooms,
            "none" => Self::None,
            "refuse" => Self::Refuse,
            _ => return None,
        })
    }
}

impl SocketIoSettings {
    /// The rule that decides `event`, if any.
    pub fn rule_for(&self, event: &str) -> Option<&EventRule> {
        self.events
            .iter()
            .find(|rule| rule.event == event || rule.event == "*")
    }

    /// The channel every socket of the namespace is in.
    pub fn namespace_channel(&self) -> &str {
        self.namespace_channel
            .as_deref()
            .unwrap_or(DEFAULT_NAMESPACE_CHANNEL)
    }

    /// Whether a browser page from `origin` may connect.
    pub fn allows_origin(&self, origin: &str) -> bool {
        self.allowed_origins
            .iter()
            .any(|allowed| allowed == "*" || allowed.eq_ignore_ascii_case(origin))
    }
}

/// At most this many rules and origins per app.
pub const MAX_RULES: usize = 100;
pub const MAX_ORIGINS: usize = 50;

/// Checks settings as the API receives them; each error names the field (`events[2].event`).
pub fn validate_settings(settings: &SocketIoSettings) -> Result<(), (String, String)> {
    if settings.allowed_origins.len() > MAX_ORIGINS {
        return Err((
            "allowedOrigins".into(),
            format!("at most {MAX_ORIGINS} origins"),
        ));
    }
    for (i, origin) in settings.allowed_origins.iter().enumerate() {
        if origin != "*" && !is_origin(origin) {
            return Err((
                format!("allowedOrigins[{i}]"),
                "an origin is scheme://host[:port] (no path), or *".into(),
            ));
        }
    }
    if let Some(channel) = &settings.namespace_channel {
        crate::validate::channel(channel)
            .map_err(|e| ("namespaceChannel".to_owned(), e.to_owned()))?;
        if crate::pusher::ChannelKind::of(channel) != crate::pusher::ChannelKind::Public {
            return Err((
                "namespaceChannel".into(),
                "the namespace channel must be a public channel (every socket joins it)".into(),
            ));
        }
    }
    if settings.events.len() > MAX_RULES {
        return Err(("events".into(), format!("at most {MAX_RULES} rules")));
    }
    for (i, rule) in settings.events.iter().enumerate() {
        let field = format!("events[{i}].event");
        if rule.event.is_empty() || rule.event.len() > 200 {
            return Err((field, "an event name is 1 to 200 characters".into()));
        }
        if RESERVED_EVENTS.contains(&rule.event.as_str()) {
            return Err((
                field,
                format!(
                    "`{}` is handled by Herald and cannot have a rule",
                    rule.event
                ),
            ));
        }
        if is_reserved_name(&rule.event) {
            return Err((
                field,
                format!(
                    "`{}` is reserved (Socket.IO's own events and the herald:, pusher: and \
                     pusher_internal: prefixes are never relayed)",
                    rule.event
                ),
            ));
        }
        if rule.webhook
            && rule.event != "*"
            && crate::validate::event_type_name(&rule.event).is_err()
        {
            return Err((
                format!("events[{i}].webhook"),
                format!(
                    "`{}` is not a valid event type name, so it cannot be forwarded to webhooks \
                     (letters, digits, `-`, `_` and `.`)",
                    rule.event
                ),
            ));
        }
        if rule.webhook && rule.relay == Relay::Refuse {
            return Err((
                format!("events[{i}].webhook"),
                "a refused event cannot be forwarded".into(),
            ));
        }
    }
    Ok(())
}

/// `scheme://host[:port]`, as browsers send `Origin`.
fn is_origin(text: &str) -> bool {
    let Some((scheme, rest)) = text.split_once("://") else {
        return false;
    };
    !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        && !rest.is_empty()
        && !rest.contains(['/', '?', '#', ' ', '@'])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(event: &str, relay: Relay) -> EventRule {
        EventRule {
            event: event.into(),
            relay,
            webhook: false,
        }
    }

    #[test]
    fn the_first_matching_rule_decides_and_a_star_matches_any_event() {
        let settings = SocketIoSettings {
            events: vec![
                rule("chat message", Relay::Everyone),
                rule("secret", Relay::Refuse),
                rule("*", Relay::Rooms),
            ],
            ..Default::default()
        };
        assert_eq!(
            settings.rule_for("chat message").map(|r| r.relay),
            Some(Relay::Everyone)
        );
        assert_eq!(
            settings.rule_for("secret").map(|r| r.relay),
            Some(Relay::Refuse)
        );
        assert_eq!(
            settings.rule_for("typing").map(|r| r.relay),
            Some(Relay::Rooms)
        );
        assert_eq!(SocketIoSettings::default().rule_for("typing"), None);
    }

    #[test]
    fn origins_match_exactly_or_by_star() {
        let settings = SocketIoSettings {
            allowed_origins: vec!["https://shop.example".into()],
            ..Default::default()
        };
        assert!(settings.allows_origin("https://shop.example"));
        assert!(!settings.allows_origin("https://evil.example"));
        assert!(!SocketIoSettings::default().allows_origin("https://shop.example"));
        let any = SocketIoSettings {
            allowed_origins: vec!["*".into()],
            ..Default::default()
        };
        assert!(any.allows_origin("http://127.0.0.1:8080"));
    }

    #[test]
    fn validation_names_the_field_that_is_wrong() {
        let bad_origin = SocketIoSettings {
            allowed_origins: vec!["https://shop.example/path".into()],
            ..Default::default()
        };
        assert_eq!(
            validate_settings(&bad_origin).map_err(|e| e.0),
            Err("allowedOrigins[0]".to_owned())
        );
        let reserved = SocketIoSettings {
            events: vec![rule("join", Relay::Everyone)],
            ..Default::default()
        };
        assert_eq!(
            validate_settings(&reserved).map_err(|e| e.0),
            Err("events[0].event".to_owned())
        );
        let webhook_with_space = SocketIoSettings {
            events: vec![EventRule {
                webhook: true,
                ..rule("chat message", Relay::Everyone)
            }],
            ..Default::default()
        };
        assert_eq!(
            validate_settings(&webhook_with_space).map_err(|e| e.0),
            Err("events[0].webhook".to_owned())
        );
        let private_namespace = SocketIoSettings {
            namespace_channel: Some("private-all".into()),
            ..Default::default()
        };
        assert_eq!(
            validate_settings(&private_namespace).map_err(|e| e.0),
            Err("namespaceChannel".to_owned())
        );
        let reserved_name = SocketIoSettings {
            events: vec![rule("pusher_internal:member_added", Relay::Rooms)],
            ..Default::default()
        };
        assert_eq!(
            validate_settings(&reserved_name).map_err(|e| e.0),
            Err("events[0].event".to_owned())
        );
        assert!(is_reserved_name("disconnect") && is_reserved_name("herald:error"));
        assert!(!is_reserved_name("chat message"));
        let fine = SocketIoSettings {
            allowed_origins: vec!["http://127.0.0.1:8080".into(), "*".into()],
            namespace_channel: Some("lobby".into()),
            events: vec![
                rule("chat message", Relay::Everyone),
                EventRule {
                    webhook: true,
                    ..rule("order.placed", Relay::None)
                },
            ],
        };
        assert_eq!(validate_settings(&fine), Ok(()));
    }
}
