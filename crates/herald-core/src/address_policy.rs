//! Which network addresses outbound webhooks may reach (SSRF protection).
//!
//! Judged on the resolved IP address, never on the host name, so a public name that resolves to
//! 127.0.0.1 is refused as surely as the literal. IPv4-mapped IPv6 addresses are judged as the
//! IPv4 address they carry.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    /// Allow every non-public address (the `--dev` default).
    pub allow_private: bool,
    /// Subnets allowed even though they are not public (e.g. an internal service range).
    pub allowed_subnets: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "address {addr} is {kind}; outbound webhooks to it are refused (allow it with delivery.allow_private_targets or delivery.allowed_subnets)"
)]
pub struct BlockedAddress {
    pub addr: IpAddr,
    pub kind: &'static str,
}

impl AddressPolicy {
    pub fn check(&self, addr: IpAddr) -> Result<(), BlockedAddress> {
        let addr = addr.to_canonical();
        let Some(kind) = non_public_kind(addr) else {
            return Ok(());
        };
        if self.allow_private || self.allowed_subnets.iter().any(|net| net.contains(&addr)) {
            return Ok(());
        }
        Err(BlockedAddress { addr, kind })
    }
}

/// Why an address is not a public unicast address, or `None` if it is one.
fn non_public_kind(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(v4) => v4_kind(v4),
        IpAddr::V6(v6) => v6_kind(v6),
    }
}

fn v4_kind(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match () {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_private() => "private",
        _ if ip.is_link_local() => "link-local",
        _ if ip.is_multicast() => "multicast",
        _ if ip.is_broadcast() => "broadcast",
        _ if ip.is_unspecified() || a == 0 => "unspecified (0.0.0.0/8)",
        _ if ip.is_documentation() => "reserved for documentation",
        _ if a == 100 && (64..128).contains(&b) => "shared address space (100.64.0.0/10)",
        _ if a == 192 && b == 0 && c == 0 => "IETF protocol assignment (192.0.0.0/24)",
        _ if a == 198 && (b == 18 || b == 19) => "benchmarking (198.18.0.0/15)",
        _ if a >= 240 => "reserved (240.0.0.0/4)",
        _ => return None,
    })
}

fn v6_kind(ip: Ipv6Addr) -> Option<&'static str> {
    let seg = ip.segments();
    Some(match () {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_multicast() => "multicast",
        _ if (seg[0] & 0xfe00) == 0xfc00 => "unique local (fc00::/7)",
        _ if (seg[0] & 0xffc0) == 0xfe80 => "link-local",
        _ if seg[0] == 0x2001 && seg[1] == 0x0db8 => "reserved for documentation",
        _ if seg[0] == 0x0064 && seg[1] == 0xff9b => "NAT64 (64:ff9b::/96)",
        _ if seg[0] == 0x2002 => "6to4 (2002::/16)",
        _ if seg[0] == 0x0100 && seg[1] == 0 && seg[2] == 0 && seg[3] == 0 => "discard (100::/64)",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("valid ip")
    }

    #[test]
    fn refuses_non_public_addresses_by_default() {
        let policy = AddressPolicy::default();
        for blocked in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "224.0.0.1",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:10.0.0.1",
            "ff02::1",
        ] {
            assert!(
                policy.check(ip(blocked)).is_err(),
                "{blocked} should be refused"
            );
        }
        for allowed in ["93.184.216.34", "8.8.8.8", "2606:4700::1111"] {
            assert!(policy.check(ip(allowed)).is_ok(), "{allowed} should pass");
        }
    }

    #[test]
    fn operator_can_allow_private_or_subnets() {
        let open = AddressPolicy {
            allow_private: true,
            ..Default::default()
        };
        assert!(open.check(ip("127.0.0.1")).is_ok());

        let subnet = AddressPolicy {
            allow_private: false,
            allowed_subnets: vec!["10.0.0.0/8".parse().expect("net")],
        };
        assert!(subnet.check(ip("10.9.9.9")).is_ok());
        let err = subnet
            .check(ip("127.0.0.1"))
            .expect_err("loopback stays refused");
        assert_eq!(err.kind, "loopback");
        assert!(err.to_string().contains("127.0.0.1 is loopback"));
    }
}
