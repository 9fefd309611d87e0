//! Svix's rules for user-chosen identifiers. Each check returns the message shown to the caller.

fn id_like(value: &str, max: usize, extra: &[char]) -> bool {
    !value.is_empty()
        && value.len() <= max
        && value.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') || extra.contains(&c)
        })
}

/// `uid` of applications and endpoints, and a message's `eventId`.
pub fn uid(value: &str) -> Result<(), &'static str> {
    if id_like(value, 256, &[]) {
        Ok(())
    } else {
        Err("must be 1 to 256 characters of letters, digits, '-', '_' or '.'")
    }
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
        assert!(channel("private-order:42").is_ok());
        assert!(event_type_name("invoice/paid").is_err());
    }
}
