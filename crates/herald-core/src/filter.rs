//! Which endpoints a message goes to.
//!
//! Svix's semantics: an endpoint with an event-type list receives only those types; an endpoint
//! with a channel list receives only messages sharing at least one channel with it (so a message
//! without channels skips it). No list means no restriction.

/// An endpoint's lists, borrowed: every message is matched against each of its app's
/// endpoints, which should not copy the endpoints' lists to do it (`Endpoint::filter`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointFilter<'a> {
    pub event_types: Option<&'a [String]>,
    pub channels: Option<&'a [String]>,
}

impl EndpointFilter<'_> {
    pub fn matches(&self, event_type: &str, channels: Option<&[String]>) -> bool {
        let type_ok = match self.event_types {
            Some(types) if !types.is_empty() => types.iter().any(|t| t == event_type),
            _ => true,
        };
        let channel_ok = match self.channels {
            Some(wanted) if !wanted.is_empty() => {
                channels.is_some_and(|have| have.iter().any(|c| wanted.contains(c)))
            }
            _ => true,
        };
        type_ok && channel_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn unrestricted_endpoint_takes_everything() {
        assert!(EndpointFilter::default().matches("a.b", None));
    }

    #[test]
    fn event_types_restrict() {
        let types = strings(&["invoice.paid"]);
        let f = EndpointFilter {
            event_types: Some(&types),
            channels: None,
        };
        assert!(f.matches("invoice.paid", None));
        assert!(!f.matches("invoice.failed", None));
    }

    #[test]
    fn channels_need_an_overlap() {
        let wanted = strings(&["project_1", "group_2"]);
        let f = EndpointFilter {
            event_types: None,
            channels: Some(&wanted),
        };
        assert!(f.matches("x", Some(&strings(&["group_2", "other"]))));
        assert!(!f.matches("x", Some(&strings(&["other"]))));
        assert!(!f.matches("x", None));
    }
}
