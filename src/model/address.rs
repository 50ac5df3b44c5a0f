//! What an IP address really is (pure): the one place that canonicalises addresses and judges
//! them against IANA's special-purpose registries, for the validation of the state and for the
//! API's address policy. An IPv6 address that embeds an IPv4 one (`::ffff:a.b.c.d`, NAT64
//! `64:ff9b::/96`, 6to4 `2002::/16`) is judged as the IPv4 address it carries, before any
//! public/private/loopback decision or equality check.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The address a connection to `ip` really reaches: `::ffff:a.b.c.d` (IPv4-mapped),
/// `::a.b.c.d` (the deprecated IPv4-compatible form) and NAT64 `64:ff9b::a.b.c.d` are that
/// IPv4 address; anything else is itself. Two addresses are the same host when their
/// canonical forms are equal.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => embedded_v4(v6)
            .filter(|(how, _)| *how != Embedding::SixToFour)
            .map(|(_, v4)| IpAddr::V4(v4))
            .unwrap_or(ip),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Embedding {
    Mapped,
    Compatible,
    Nat64,
    SixToFour,
}

/// The IPv4 address an IPv6 address carries, and how.
fn embedded_v4(v6: Ipv6Addr) -> Option<(Embedding, Ipv4Addr)> {
    let bits = u128::from(v6);
    let low = Ipv4Addr::from(bits as u32);
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some((Embedding::Mapped, v4));
    }
    // ::a.b.c.d (RFC 4291 §2.5.5.1, deprecated); :: and ::1 are themselves.
    if bits >> 32 == 0 && bits > 1 {
        return Some((Embedding::Compatible, low));
    }
    if bits >> 32 == u128::from(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0)) >> 32 {
        return Some((Embedding::Nat64, low));
    }
    if bits >> 112 == 0x2002 {
        return Some((Embedding::SixToFour, Ipv4Addr::from((bits >> 80) as u32)));
    }
    None
}

/// A network: an address and a prefix length, such as `10.0.0.0/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Cidr {
        Cidr {
            addr: IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
            prefix,
        }
    }

    const fn v6(segments: [u16; 8], prefix: u8) -> Cidr {
        let [a, b, c, d, e, f, g, h] = segments;
        Cidr {
            addr: IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h)),
            prefix,
        }
    }

    /// Parses `address/prefix`; the prefix fits the family and no host bit is set (a network
    /// written with host bits, `10.0.0.1/8`, is almost always a typo for something else).
    pub fn parse(text: &str) -> Result<Cidr, String> {
        // Quoted: a hostile value cannot carry control characters into a message.
        let quote = crate::spec::diagnostics::quote;
        let Some((addr, prefix)) = text.split_once('/') else {
            return Err(format!(
                "{} is not a network: write address/prefix, such as 10.0.0.0/8 or fd00::/8",
                quote(text)
            ));
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{} is not an IP address", quote(addr)))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= max).ok_or_else(|| {
            format!(
                "the prefix {} is not 0 to {max}",
                quote(&format!("/{prefix}"))
            )
        })?;
        let cidr = Cidr { addr, prefix };
        let network = cidr.network();
        if network != addr {
            return Err(format!(
                "{} has host bits set: the network is {network}/{prefix}",
                quote(text)
            ));
        }
        Ok(cidr)
    }

    fn mask(&self) -> u128 {
        let width = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.prefix == 0 {
            0
        } else {
            (u128::MAX << (width - self.prefix as u32)) & (u128::MAX >> (128 - width))
        }
    }

    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                IpAddr::V4(Ipv4Addr::from((u32::from(a) as u128 & self.mask()) as u32))
            }
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & self.mask())),
        }
    }

    /// Whether the network holds `ip`, judged on the canonical addresses of both: an IPv4
    /// network holds `::ffff:` and NAT64 forms of its addresses.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let mask = self.mask();
        match (canonical(ip), canonical(self.addr)) {
            (IpAddr::V4(a), IpAddr::V4(n)) => {
                u32::from(a) as u128 & mask == u32::from(n) as u128 & mask
            }
            (IpAddr::V6(a), IpAddr::V6(n)) => u128::from(a) & mask == u128::from(n) & mask,
            _ => false,
        }
    }
}

/// A special-purpose range an address falls in: its name and the range, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Special {
    pub name: &'static str,
    pub range: Cidr,
}

impl fmt::Display for Special {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.range)
    }
}

/// IANA IPv4 Special-Purpose Address Registry (RFC 6890 and updates), multicast and the
/// reserved class E, most specific first. Every entry is refused as an agent's address unless
/// the administrator allows its network: even the few marked globally reachable there (AS112,
/// AMT, anycast relays) are infrastructure, never a tenant's server.
const SPECIAL_V4: &[(&str, Cidr)] = &[
    ("limited broadcast", Cidr::v4(255, 255, 255, 255, 32)),
    ("NAT64/DNS64 discovery", Cidr::v4(192, 0, 0, 170, 31)),
    ("DS-Lite", Cidr::v4(192, 0, 0, 0, 29)),
    ("\"this network\"", Cidr::v4(0, 0, 0, 0, 8)),
    ("private-use", Cidr::v4(10, 0, 0, 0, 8)),
    ("shared address space (CGN)", Cidr::v4(100, 64, 0, 0, 10)),
    ("loopback", Cidr::v4(127, 0, 0, 0, 8)),
    ("link-local", Cidr::v4(169, 254, 0, 0, 16)),
    ("private-use", Cidr::v4(172, 16, 0, 0, 12)),
    ("IETF protocol assignments", Cidr::v4(192, 0, 0, 0, 24)),
    ("documentation (TEST-NET-1)", Cidr::v4(192, 0, 2, 0, 24)),
    ("AS112-v4", Cidr::v4(192, 31, 196, 0, 24)),
    ("AMT", Cidr::v4(192, 52, 193, 0, 24)),
    (
        "6to4 relay anycast (deprecated)",
        Cidr::v4(192, 88, 99, 0, 24),
    ),
    ("private-use", Cidr::v4(192, 168, 0, 0, 16)),
    ("direct delegation AS112", Cidr::v4(192, 175, 48, 0, 24)),
    ("benchmarking", Cidr::v4(198, 18, 0, 0, 15)),
    ("documentation (TEST-NET-2)", Cidr::v4(198, 51, 100, 0, 24)),
    ("documentation (TEST-NET-3)", Cidr::v4(203, 0, 113, 0, 24)),
    ("multicast", Cidr::v4(224, 0, 0, 0, 4)),
    ("reserved (class E)", Cidr::v4(240, 0, 0, 0, 4)),
];

/// IANA IPv6 Special-Purpose Address Registry, multicast and the deprecated site-local
/// range, most specific first. The IPv4-embedding ranges are judged by the IPv4 address they
/// carry (see `special`), except for the parts of them that are special in themselves.
const SPECIAL_V6: &[(&str, Cidr)] = &[
    ("unspecified", Cidr::v6([0, 0, 0, 0, 0, 0, 0, 0], 128)),
    ("loopback", Cidr::v6([0, 0, 0, 0, 0, 0, 0, 1], 128)),
    ("PCP anycast", Cidr::v6([0x2001, 1, 0, 0, 0, 0, 0, 1], 128)),
    ("TURN anycast", Cidr::v6([0x2001, 1, 0, 0, 0, 0, 0, 2], 128)),
    (
        "IPv4-IPv6 translation (local use)",
        Cidr::v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48),
    ),
    ("discard-only", Cidr::v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64)),
    ("benchmarking", Cidr::v6([0x2001, 2, 0, 0, 0, 0, 0, 0], 48)),
    ("AS112-v6", Cidr::v6([0x2001, 4, 0x112, 0, 0, 0, 0, 0], 48)),
    (
        "direct delegation AS112",
        Cidr::v6([0x2620, 0x4f, 0x8000, 0, 0, 0, 0, 0], 48),
    ),
    ("TEREDO", Cidr::v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32)),
    ("AMT", Cidr::v6([0x2001, 3, 0, 0, 0, 0, 0, 0], 32)),
    (
        "documentation",
        Cidr::v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32),
    ),
    (
        "ORCHID (deprecated)",
        Cidr::v6([0x2001, 0x10, 0, 0, 0, 0, 0, 0], 28),
    ),
    ("ORCHIDv2", Cidr::v6([0x2001, 0x20, 0, 0, 0, 0, 0, 0], 28)),
    (
        "drone remote ID",
        Cidr::v6([0x2001, 0x30, 0, 0, 0, 0, 0, 0], 28),
    ),
    (
        "IETF protocol assignments",
        Cidr::v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23),
    ),
    ("documentation", Cidr::v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20)),
    (
        "segment routing (SRv6) SIDs",
        Cidr::v6([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16),
    ),
    ("unique-local", Cidr::v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7)),
    ("link-local", Cidr::v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10)),
    (
        "site-local (deprecated)",
        Cidr::v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10),
    ),
    ("multicast", Cidr::v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8)),
];

/// The special-purpose range `ip` belongs to, judged on what it is: an IPv6 address that
/// carries an IPv4 address is judged as that IPv4 address. None: a globally routable unicast
/// address.
pub fn special(ip: IpAddr) -> Option<Special> {
    let find = |table: &[(&'static str, Cidr)], ip: IpAddr| {
        table
            .iter()
            .find(|(_, range)| range.contains(ip))
            .map(|(name, range)| Special {
                name,
                range: *range,
            })
    };
    match ip {
        IpAddr::V4(_) => find(SPECIAL_V4, ip),
        IpAddr::V6(v6) => find(SPECIAL_V6, ip)
            .or_else(|| embedded_v4(v6).and_then(|(_, v4)| find(SPECIAL_V4, IpAddr::V4(v4)))),
    }
}

/// Whether a connection can be made to `ip` at all (not unspecified, multicast or broadcast,
/// whatever form it is written in).
pub fn is_connectable(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(a) => !(a.is_unspecified() || a.is_multicast() || a.is_broadcast()),
        IpAddr::V6(a) => !(a.is_unspecified() || a.is_multicast()),
    }
}

/// Whether two addresses reach the same host.
pub fn same_host(a: IpAddr, b: IpAddr) -> bool {
    canonical(a) == canonical(b)
}

/// Whether `ip` is a loopback address, whatever form it is written in.
pub fn is_loopback(ip: IpAddr) -> bool {
    canonical(ip).is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn embedded_ipv4_addresses_are_that_address() {
        for (text, v4) in [
            ("::ffff:127.0.0.1", "127.0.0.1"),
            ("::ffff:10.0.0.1", "10.0.0.1"),
            ("::ffff:169.254.169.254", "169.254.169.254"),
            ("64:ff9b::7f00:1", "127.0.0.1"),
            ("64:ff9b::a9fe:a9fe", "169.254.169.254"),
            ("::127.0.0.1", "127.0.0.1"),
        ] {
            assert_eq!(canonical(ip(text)), ip(v4), "{text}");
            assert_eq!(special(ip(text)), special(ip(v4)), "{text}");
            assert!(same_host(ip(text), ip(v4)), "{text}");
        }
        // A public address behind NAT64 or 6to4 is public; a special one is special.
        assert_eq!(special(ip("64:ff9b::5db8:d822")), None);
        assert_eq!(special(ip("2002:5db8:d822::1")), None);
        assert_eq!(special(ip("2002:7f00:1::1")).unwrap().name, "loopback");
        assert_eq!(special(ip("2002:a00:1::1")).unwrap().name, "private-use");
        // ::, ::1 are themselves.
        assert_eq!(canonical(ip("::1")), ip("::1"));
        assert_eq!(special(ip("::")).unwrap().name, "unspecified");
        assert!(!is_connectable(ip("::ffff:0.0.0.0")));
        assert!(!is_connectable(ip("::ffff:224.0.0.1")));
        assert!(is_loopback(ip("::ffff:127.0.0.2")));
    }

    /// One row per IANA special-purpose entry (and multicast): an address inside is special
    /// and named; the first address past the range is not (where that is public).
    #[test]
    fn every_special_purpose_range_is_judged() {
        for (text, name) in [
            ("0.1.2.3", "\"this network\""),
            ("10.255.0.1", "private-use"),
            ("100.64.0.1", "shared address space (CGN)"),
            ("100.127.255.254", "shared address space (CGN)"),
            ("127.1.2.3", "loopback"),
            ("169.254.169.254", "link-local"),
            ("172.31.0.1", "private-use"),
            ("192.0.0.1", "DS-Lite"),
            ("192.0.0.9", "IETF protocol assignments"),
            ("192.0.0.171", "NAT64/DNS64 discovery"),
            ("192.0.2.7", "documentation (TEST-NET-1)"),
            ("192.31.196.1", "AS112-v4"),
            ("192.52.193.1", "AMT"),
            ("192.88.99.1", "6to4 relay anycast (deprecated)"),
            ("192.168.1.1", "private-use"),
            ("192.175.48.1", "direct delegation AS112"),
            ("198.18.0.1", "benchmarking"),
            ("198.19.255.255", "benchmarking"),
            ("198.51.100.1", "documentation (TEST-NET-2)"),
            ("203.0.113.7", "documentation (TEST-NET-3)"),
            ("224.0.0.1", "multicast"),
            ("240.0.0.1", "reserved (class E)"),
            ("255.255.255.255", "limited broadcast"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("64:ff9b:1::1", "IPv4-IPv6 translation (local use)"),
            ("100::1", "discard-only"),
            ("2001::1", "TEREDO"),
            ("2001:1::1", "PCP anycast"),
            ("2001:1::2", "TURN anycast"),
            ("2001:1::3", "IETF protocol assignments"),
            ("2001:2::1", "benchmarking"),
            ("2001:3::1", "AMT"),
            ("2001:4:112::1", "AS112-v6"),
            ("2001:10::1", "ORCHID (deprecated)"),
            ("2001:20::1", "ORCHIDv2"),
            ("2001:30::1", "drone remote ID"),
            ("2001:db8::7", "documentation"),
            ("2620:4f:8000::1", "direct delegation AS112"),
            ("3fff::1", "documentation"),
            ("5f00::1", "segment routing (SRv6) SIDs"),
            ("fd00::1", "unique-local"),
            ("fc00::1", "unique-local"),
            ("fe80::1", "link-local"),
            ("fec0::1", "site-local (deprecated)"),
            ("ff02::1", "multicast"),
        ] {
            let found = special(ip(text)).unwrap_or_else(|| panic!("{text} judged public"));
            assert_eq!(found.name, name, "{text}");
            assert!(found.range.contains(ip(text)), "{text}");
        }
        for public in [
            "1.1.1.1",
            "100.63.255.255",
            "100.128.0.0",
            "172.32.0.1",
            "198.20.0.1",
            "93.184.216.34",
            "2a00:1450:4001:80b::200e",
            "2606:4700::1111",
        ] {
            assert_eq!(special(ip(public)), None, "{public}");
        }
    }

    #[test]
    fn networks_parse_strictly_and_match_canonical_addresses() {
        let net = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(net.contains(ip("10.1.2.3")));
        assert!(net.contains(ip("::ffff:10.1.2.3")));
        assert!(net.contains(ip("64:ff9b::a01:203")));
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("fd00::/8").unwrap().contains(ip("fd12::1")));
        for (bad, why) in [
            ("10.0.0.0/40", "not 0 to 32"),
            ("fd00::/129", "not 0 to 128"),
            ("10.0.0.1/8", "host bits"),
            ("10.0.0.0", "not a network"),
            ("ten/8", "not an IP address"),
            ("10.0.0.0/x", "not 0 to 32"),
        ] {
            let e = Cidr::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
