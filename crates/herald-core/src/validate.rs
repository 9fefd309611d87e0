//! Svix's rules for user-chosen identifiers. Each check returns the message shown to the caller.

fn id_like(value: &str, max: usize, extra: &[char]) -> bool {
    !value.is_empty()
        && value.len() <= max
        && value.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') || extra.contains(&c)
        })
}

/// `uid` of applications, endpoints and sources, and a message's `eventId`. Anything that could
/// be read as an id Herald minted (`app_...`, `ep_...`, `msg_...`) is refused: lookups accept an
/// id or a uid in one place, and a uid equal to another resource's id would misroute.
pub fn uid(value: &str) -> Result<(), &'static str> {
    if !id_like(value, 256, &[]) {
        return Err("must be 1 to 256 characters of letters, digits, '-', '_' or '.'");
    }
    if crate::id::PREFIXES
        .iter()
        .any(|prefix| value.starts_with(prefix))
    {
        return Err(
            "must not start with an id prefix (app_, ep_, msg_, atmpt_, qtask_, src_, inev_): ids and uids are looked up in the same place",
        );
    }
    Ok(())
}

pub fn event_type_name(value: &str) -> Result<(), &'static str> {
    if id_like(value, 256, &[]) {
        Ok(())
    } else {
        Err("must be 1 to 256 characters of letters, digits, '-', '_' or '.'")
    }
}

pub fn channel(value: &str) -> Result<(), &'static str> {
    if id_like(value, 128, &[':', '=', '@', ',', ';']) {
        Ok(())
    } else {
        Err("must be 1 to 128 characters of letters, digits and -_.:=@,;")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_refuses() {
        assert!(uid("order-42_a.b").is_ok());
        assert!(uid("").is_err());
        assert!(uid("has space").is_err());
        assert!(uid(&"x".repeat(257)).is_err());
        for prefix in crate::id::PREFIXES {
            assert!(uid(&format!("{prefix}2Ld0")).is_err(), "{prefix}");
        }
        assert!(uid("app-1").is_ok() && uid("application_1").is_ok());
        assert!(channel("private-order:42").is_ok());
        assert!(event_type_name("invoice/paid").is_err());
    }
}
