//! Which network addresses outbound webhooks may reach (SSRF protection).
//!
//! Judged on the resolved IP address, never on the host name, so a public name that resolves to
//! 127.0.0.1 is refused as surely as the literal.
//!
//! IPv4 is judged against the special-purpose ranges (loopback, private, link-local, shared,
//! benchmarking, documentation, reserved, ...). IPv6 must be global unicast (`2000::/3`), with
//! one exception below, and not one of the special ranges inside it. IPv6 forms that carry an
//! IPv4 address are judged by what they can reach:
//!
//! - IPv4-mapped `::ffff:a.b.c.d` is judged as the IPv4 address it carries (it *is* that
//!   address to the socket layer).
//! - IPv4-compatible `::a.b.c.d` (`::/96`, deprecated) and SIIT `::ffff:0:a.b.c.d`
//!   (`::ffff:0:0/96`) are refused whatever they embed: nothing legitimate is addressed that
//!   way, and a stack that tunnels them would reach the embedded IPv4 address.
//! - Teredo (`2001::/32`) is refused entirely: it embeds the Teredo server's IPv4 address and
//!   the client's (obfuscated) IPv4 address, either of which may be internal.
//! - 6to4 (`2002::/16`) is allowed only when its embedded IPv4 (bits 16..48) is public: it then
//!   reaches nothing its IPv4 address would not.
//! - NAT64 with the well-known prefix (`64:ff9b::/96`) is allowed only when its embedded IPv4
//!   (the last 32 bits) is public: on an IPv6-only host behind DNS64 every public IPv4 target
//!   resolves to such an address, and a private one would be translated into the local network.
//!   The local-use NAT64 prefix (`64:ff9b:1::/48`) is refused entirely: it is translated by a
//!   network's own gateway into whatever that network routes. The rest of `64:ff9b::/32` is
//!   refused as outside global unicast.
//!
//! An operator can allow refused addresses with `allow_private` or `allowed_subnets`; a subnet
//! is matched against the address as resolved, an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`)
//! as the IPv4 address it maps (so `10.0.0.0/8` allows `::ffff:10.1.2.3`, and a subnet written
//! in the mapped form matches nothing).

use std::borrow::Cow;
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
    pub kind: Cow<'static, str>,
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
fn non_public_kind(addr: IpAddr) -> Option<Cow<'static, str>> {
    match addr {
        IpAddr::V4(v4) => v4_kind(v4).map(Cow::Borrowed),
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

/// The IPv4 address in the 32 bits starting at segment `first` of `seg`.
fn embedded_v4(seg: &[u16; 8], first: usize) -> Ipv4Addr {
    let hi = seg[first].to_be_bytes();
    let lo = seg[first + 1].to_be_bytes();
    Ipv4Addr::new(hi[0], hi[1], lo[0], lo[1])
}

/// `form` embedding `v4`: refused, naming what `v4` is when it is not public.
fn embedding(form: &'static str, v4: Ipv4Addr) -> Cow<'static, str> {
    match v4_kind(v4) {
        Some(kind) => Cow::Owned(format!("{form} embedding a {kind} address ({v4})")),
        None => Cow::Owned(format!("{form} embedding {v4}")),
    }
}

fn v6_kind(ip: Ipv6Addr) -> Option<Cow<'static, str>> {
    let seg = ip.segments();
    let kind = match () {
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_multicast() => "multicast",
        // IPv4-compatible (::/96, deprecated): refused whatever it embeds.
        _ if seg[..6] == [0; 6] => {
            return Some(embedding(
                "IPv4-compatible IPv6 (::/96)",
                embedded_v4(&seg, 6),
            ));
        }
        // SIIT, IPv4-translated (::ffff:0:0/96): refused whatever it embeds.
        _ if seg[..4] == [0; 4] && seg[4] == 0xffff && seg[5] == 0 => {
            return Some(embedding(
                "IPv4-translated (SIIT, ::ffff:0:0/96)",
                embedded_v4(&seg, 6),
            ));
        }
        // NAT64, well-known prefix: judged by the IPv4 address it translates to.
        _ if seg[..6] == [0x0064, 0xff9b, 0, 0, 0, 0] => {
            let v4 = embedded_v4(&seg, 6);
            return v4_kind(v4).map(|_| embedding("NAT64 (64:ff9b::/96)", v4));
        }
        _ if seg[..3] == [0x0064, 0xff9b, 0x0001] => "local-use NAT64 (64:ff9b:1::/48)",
        _ if (seg[0] & 0xfe00) == 0xfc00 => "unique local (fc00::/7)",
        _ if (seg[0] & 0xffc0) == 0xfe80 => "link-local",
        _ if (seg[0] & 0xffc0) == 0xfec0 => "site-local (fec0::/10, deprecated)",
        _ if seg[0] == 0x0100 && seg[1..4] == [0; 3] => "discard (100::/64)",
        _ if (seg[0] & 0xe000) != 0x2000 => "outside global unicast (2000::/3)",
        _ if seg[0] == 0x2001 && seg[1] == 0 => {
            "Teredo (2001::/32, embeds a Teredo server's and a client's IPv4 address)"
        }
        _ if seg[0] == 0x2001 && seg[1] == 0x0002 && seg[2] == 0 => "benchmarking (2001:2::/48)",
        _ if seg[0] == 0x2001 && seg[1] == 0x0db8 => "reserved for documentation",
        _ if seg[0] == 0x3fff && seg[1] < 0x1000 => "reserved for documentation (3fff::/20)",
        // 6to4: judged by the IPv4 address of the relay router it embeds.
        _ if seg[0] == 0x2002 => {
            let v4 = embedded_v4(&seg, 1);
            return v4_kind(v4).map(|_| embedding("6to4 (2002::/16)", v4));
        }
        _ => return None,
    };
    Some(Cow::Borrowed(kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("valid ip")
    }

    /// Checks `addr` against the default policy, expecting refusal whose kind mentions each of
    /// `words`.
    fn assert_refused(addr: &str, words: &[&str]) {
        let err = AddressPolicy::default()
            .check(ip(addr))
            .expect_err("address should be refused");
        for word in words {
            assert!(
                err.kind.contains(word),
                "{addr}: kind {:?} should mention {word:?}",
                err.kind
            );
        }
    }

    fn assert_allowed(addr: &str) {
        let result = AddressPolicy::default().check(ip(addr));
        assert!(result.is_ok(), "{addr} should pass: {result:?}");
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
    fn refuses_ipv4_compatible_ipv6_whatever_it_embeds() {
        assert_refused("::127.0.0.1", &["IPv4-compatible", "loopback", "127.0.0.1"]);
        assert_refused("::10.0.0.1", &["IPv4-compatible", "private"]);
        assert_refused("::169.254.169.254", &["IPv4-compatible", "link-local"]);
        assert_refused("::7f00:1", &["IPv4-compatible", "loopback"]);
        // Deprecated form: refused even around a public address.
        assert_refused("::8.8.8.8", &["IPv4-compatible", "8.8.8.8"]);
    }

    #[test]
    fn refuses_siit_ipv4_translated_whatever_it_embeds() {
        assert_refused("::ffff:0:127.0.0.1", &["SIIT", "loopback"]);
        assert_refused("::ffff:0:192.168.0.1", &["SIIT", "private"]);
        assert_refused("::ffff:0:8.8.8.8", &["SIIT", "8.8.8.8"]);
    }

    #[test]
    fn refuses_the_whole_teredo_range() {
        assert_refused("2001::1", &["Teredo"]);
        // Server 65.54.227.120, client 192.168.0.1 obfuscated (every bit inverted).
        assert_refused("2001:0:4136:e378:8000:63bf:3f57:fffe", &["Teredo"]);
        assert_refused("2001:0:ffff:ffff:ffff:ffff:ffff:ffff", &["Teredo"]);
        // Next door to Teredo is ordinary global unicast.
        assert_allowed("2001:4860:4860::8888");
    }

    #[test]
    fn refuses_6to4_embedding_a_non_public_ipv4_and_allows_a_public_one() {
        assert_refused("2002:7f00:1::1", &["6to4", "loopback", "127.0.0.1"]);
        assert_refused("2002:a00:1::", &["6to4", "private", "10.0.0.1"]);
        assert_refused("2002:c0a8:101::1", &["6to4", "private", "192.168.1.1"]);
        assert_refused("2002:a9fe:a9fe::", &["6to4", "link-local"]);
        assert_refused("2002::", &["6to4", "unspecified"]);
        assert_allowed("2002:808:808::1");
    }

    #[test]
    fn refuses_nat64_embedding_a_non_public_ipv4_and_allows_a_public_one() {
        assert_refused("64:ff9b::127.0.0.1", &["NAT64", "loopback"]);
        assert_refused("64:ff9b::10.0.0.1", &["NAT64", "private"]);
        assert_refused(
            "64:ff9b::a9fe:a9fe",
            &["NAT64", "link-local", "169.254.169.254"],
        );
        assert_allowed("64:ff9b::8.8.8.8");
        assert_allowed("64:ff9b::5db8:d822");
    }

    #[test]
    fn refuses_the_whole_local_use_nat64_prefix() {
        assert_refused("64:ff9b:1::8.8.8.8", &["local-use NAT64"]);
        assert_refused("64:ff9b:1::10.0.0.1", &["local-use NAT64"]);
        assert_refused("64:ff9b:1:ffff::1", &["local-use NAT64"]);
        // The rest of 64:ff9b::/32 is not assigned for NAT64 and not global unicast.
        assert_refused("64:ff9b:2::8.8.8.8", &["2000::/3"]);
    }

    #[test]
    fn refuses_site_local_ipv6() {
        assert_refused("fec0::1", &["site-local"]);
        assert_refused("feff:ffff::1", &["site-local"]);
    }

    #[test]
    fn refuses_ipv6_outside_global_unicast_and_special_ranges_inside_it() {
        assert_refused("100::1", &["discard"]);
        assert_refused("4000::1", &["2000::/3"]);
        assert_refused("2001:db8::1", &["documentation"]);
        assert_refused("3fff::1", &["documentation"]);
        assert_refused("2001:2::1", &["benchmarking"]);
        assert_allowed("3ffe:1000::1");
        assert_allowed("2a00:1450:4001::200e");
    }

    #[test]
    fn ipv4_mapped_ipv6_is_judged_as_its_ipv4_address() {
        assert_refused("::ffff:127.0.0.1", &["loopback"]);
        assert_allowed("::ffff:8.8.8.8");
    }

    #[test]
    fn refused_embedded_forms_name_their_kind_in_the_error() {
        let err = AddressPolicy::default()
            .check(ip("::127.0.0.1"))
            .expect_err("IPv4-compatible loopback is refused");
        assert_eq!(
            err.to_string(),
            "address ::7f00:1 is IPv4-compatible IPv6 (::/96) embedding a loopback address \
             (127.0.0.1); outbound webhooks to it are refused (allow it with \
             delivery.allow_private_targets or delivery.allowed_subnets)"
        );
    }

    #[test]
    fn operator_can_allow_private_or_subnets() {
        let open = AddressPolicy {
            allow_private: true,
            ..Default::default()
        };
        assert!(open.check(ip("127.0.0.1")).is_ok());
        assert!(open.check(ip("::127.0.0.1")).is_ok());

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

        let nat64 = AddressPolicy {
            allow_private: false,
            allowed_subnets: vec!["64:ff9b::10.0.0.0/104".parse().expect("net")],
        };
        assert!(nat64.check(ip("64:ff9b::10.1.2.3")).is_ok());
    }
}
