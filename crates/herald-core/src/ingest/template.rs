//! Templates that read an event type or a channel name out of a verified request:
//! `private-order-{data.object.metadata.order_id}`, `{header:x-github-event}.{action}`.
//!
//! `{a.b.0.c}` is a path into the JSON payload (object keys, array indices); `{header:Name}`
//! is a request header. Strings are used as they are, numbers and booleans as their JSON text.
//! A template renders only if every placeholder has a value.

use serde_json::Value;

/// A message carries at most this many channels.
pub const MAX_CHANNELS: usize = 5;
const MAX_EVENT_TYPE: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part<'a> {
    Text(&'a str),
    Field(Vec<&'a str>),
    Header(&'a str),
}

fn parse(template: &str) -> Result<Vec<Part<'_>>, String> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        if rest[..open].contains('}') {
            return Err(format!("unbalanced '}}' in {template:?}"));
        }
        if open > 0 {
            parts.push(Part::Text(&rest[..open]));
        }
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("unclosed '{{' in {template:?}"))?;
        let inner = after[..close].trim();
        if inner.is_empty() || inner.contains('{') {
            return Err(format!("empty or nested placeholder in {template:?}"));
        }
        parts.push(match inner.strip_prefix("header:") {
            Some(name) if !name.trim().is_empty() => Part::Header(name.trim()),
            Some(_) => return Err(format!("{{header:}} needs a header name in {template:?}")),
            None => Part::Field(inner.split('.').collect()),
        });
        rest = &after[close + 1..];
    }
    if rest.contains('}') {
        return Err(format!("unbalanced '}}' in {template:?}"));
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest));
    }
    Ok(parts)
}

/// Whether the template has a `{header:...}` placeholder (spaces inside the braces
/// included, as it is read).
pub fn reads_headers(template: &str) -> bool {
    parse(template).is_ok_and(|parts| parts.iter().any(|part| matches!(part, Part::Header(_))))
}

/// Checks a template's syntax.
pub fn validate(template: &str) -> Result<(), String> {
    if template.is_empty() || template.len() > 512 {
        return Err("a template must be 1 to 512 characters".into());
    }
    parse(template).map(|_| ())
}

/// The template's text with every placeholder filled, or `None` if one has no value.
pub fn render<'a>(
    template: &str,
    payload: Option<&Value>,
    header: &dyn Fn(&str) -> Option<&'a str>,
) -> Option<String> {
    let mut out = String::new();
    for part in parse(template).ok()? {
        match part {
            Part::Text(text) => out.push_str(text),
            Part::Header(name) => out.push_str(header(name)?.trim()),
            Part::Field(path) => {
                let mut value = payload?;
                for key in path {
                    value = match value {
                        Value::Array(items) => items.get(key.parse::<usize>().ok()?)?,
                        other => other.get(key)?,
                    };
                }
                match value {
                    Value::String(s) => out.push_str(s),
                    Value::Number(n) => out.push_str(&n.to_string()),
                    Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
                    _ => return None,
                }
            }
        }
    }
    Some(out)
}

/// The first template that renders, made a valid event type name: characters outside
/// letters, digits, `-`, `_` and `.` become `.` (Shopify's `orders/create` becomes
/// `orders.create`), cut at 256.
pub fn event_type<'a>(
    templates: &[impl AsRef<str>],
    payload: Option<&Value>,
    header: &dyn Fn(&str) -> Option<&'a str>,
) -> Option<String> {
    templates
        .iter()
        .filter_map(|t| render(t.as_ref(), payload, header))
        .find(|s| !s.is_empty())
        .map(|s| {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                        c
                    } else {
                        '.'
                    }
                })
                .take(MAX_EVENT_TYPE)
                .collect()
        })
}

/// The channels the templates render to that are valid channel names (duplicates dropped,
/// at most [`MAX_CHANNELS`]); `default` if none does.
pub fn channels<'a>(
    templates: &[impl AsRef<str>],
    default: Option<&str>,
    payload: Option<&Value>,
    header: &dyn Fn(&str) -> Option<&'a str>,
) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for template in templates {
        if let Some(channel) = render(template.as_ref(), payload, header)
            && crate::validate::channel(&channel).is_ok()
            && !found.contains(&channel)
            && found.len() < MAX_CHANNELS
        {
            found.push(channel);
        }
    }
    if found.is_empty()
        && let Some(default) = default
    {
        found.push(default.to_owned());
    }
    found
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn headers(name: &str) -> Option<&'static str> {
        (name.eq_ignore_ascii_case("x-github-event")).then_some("issues")
    }

    #[test]
    fn renders_payload_paths_headers_and_refuses_missing_values() {
        let payload = json!({"type": "payment_intent.succeeded", "data": {"object": {
            "metadata": {"order_id": 42}, "items": [{"sku": "a-1"}]}}});
        let p = Some(&payload);
        assert_eq!(
            render("private-order-{data.object.metadata.order_id}", p, &headers).as_deref(),
            Some("private-order-42")
        );
        assert_eq!(
            render("{data.object.items.0.sku}", p, &headers).as_deref(),
            Some("a-1")
        );
        assert_eq!(
            render("{header:X-GitHub-Event}.x", p, &headers).as_deref(),
            Some("issues.x")
        );
        assert_eq!(render("{data.missing}", p, &headers), None);
        assert_eq!(
            render("{data.object}", p, &headers),
            None,
            "objects are not text"
        );
        assert_eq!(render("{type}", None, &headers), None);
    }

    #[test]
    fn validates_syntax() {
        assert!(validate("orders-{id}").is_ok());
        assert!(validate("{header:x-a}").is_ok());
        for bad in ["", "{", "a}", "{}", "{a{b}}", "{header:}"] {
            assert!(validate(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn a_header_placeholder_is_found_as_it_is_read() {
        for reads in [
            "{header:x-a}",
            "{ header:x-a}",
            "a-{\theader:x}-b",
            "{header: x }",
        ] {
            assert!(reads_headers(reads), "{reads:?} reads a header");
        }
        for other in ["{id}", "header:x", "{headers}", "{", "{header:}"] {
            assert!(!reads_headers(other), "{other:?} reads no header");
        }
    }

    #[test]
    fn event_type_tries_templates_in_order_and_sanitizes() {
        let with_action = json!({"action": "opened"});
        let without = json!({"ref": "main"});
        let github = [
            "{header:x-github-event}.{action}",
            "{header:x-github-event}",
        ];
        assert_eq!(
            event_type(&github, Some(&with_action), &headers).as_deref(),
            Some("issues.opened")
        );
        assert_eq!(
            event_type(&github, Some(&without), &headers).as_deref(),
            Some("issues")
        );
        let topic = |_: &str| Some("orders/create");
        assert_eq!(
            event_type(&["{header:x-shopify-topic}"], None, &topic).as_deref(),
            Some("orders.create")
        );
    }

    #[test]
    fn channels_skip_invalid_names_and_fall_back_to_the_default() {
        let payload = json!({"order": 7, "bad": "has space"});
        let p = Some(&payload);
        assert_eq!(
            channels(
                &["private-order-{order}", "x-{bad}", "{missing}"],
                Some("orders"),
                p,
                &headers
            ),
            ["private-order-7"]
        );
        assert_eq!(
            channels(&["x-{bad}"], Some("orders"), p, &headers),
            ["orders"]
        );
        assert!(channels(&["{missing}"], None, p, &headers).is_empty());
    }

    #[test]
    fn rendered_channels_follow_the_one_channel_rule() {
        let payload = json!({"id": "a:b", "long": "x".repeat(161)});
        let p = Some(&payload);
        // `:` is not a channel character anywhere, so a name no socket could subscribe to is
        // never published to; 164 characters is the longest name.
        assert_eq!(
            channels(&["order-{id}", "ok-{long}"], None, p, &headers),
            [format!("ok-{}", "x".repeat(161))]
        );
        assert!(channels(&["okay-{long}"], None, p, &headers).is_empty());
    }
}
