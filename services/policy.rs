//! Destination policy: which remote addresses hoptrace traces, and why it refuses the others.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::RwLock,
};

use ipnet::IpNet;

/// Why a destination is not traced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// 0.0.0.0, `::`.
    Unspecified,
    /// 127.0.0.0/8, `::1`.
    Loopback,
    /// RFC 1918.
    Private,
    /// 100.64.0.0/10 (RFC 6598).
    SharedCgnat,
    /// fc00::/7.
    UniqueLocal,
    /// 169.254.0.0/16, fe80::/10.
    LinkLocal,
    /// 224.0.0.0/4, ff00::/8.
    Multicast,
    /// 255.255.255.255.
    Broadcast,
    /// 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32, 3fff::/20.
    Documentation,
    /// 198.18.0.0/15, 2001:2::/48.
    Benchmarking,
    /// Any other special-purpose or unallocated range (240.0.0.0/4, 0.0.0.0/8, 192.0.0.0/24,
    /// IPv4-compatible IPv6, discard-only, outside 2000::/3, …).
    Reserved,
    /// One of this host's own addresses.
    OwnAddress,
    /// Inside a configured deny-list prefix.
    Denied,
    /// The trace queue is full (not a property of the address, but refused all the same).
    QueueFull,
}

impl Refusal {
    /// Every reason, for metrics and status.
    pub const ALL: [Refusal; 14] = [
        Refusal::Unspecified,
        Refusal::Loopback,
        Refusal::Private,
        Refusal::SharedCgnat,
        Refusal::UniqueLocal,
        Refusal::LinkLocal,
        Refusal::Multicast,
        Refusal::Broadcast,
        Refusal::Documentation,
        Refusal::Benchmarking,
        Refusal::Reserved,
        Refusal::OwnAddress,
        Refusal::Denied,
        Refusal::QueueFull,
    ];

    /// The label used in metrics and status.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Unspecified => "unspecified",
            Refusal::Loopback => "loopback",
            Refusal::Private => "private",
            Refusal::SharedCgnat => "shared_cgnat",
            Refusal::UniqueLocal => "unique_local",
            Refusal::LinkLocal => "link_local",
            Refusal::Multicast => "multicast",
            Refusal::Broadcast => "broadcast",
            Refusal::Documentation => "documentation",
            Refusal::Benchmarking => "benchmarking",
            Refusal::Reserved => "reserved",
            Refusal::OwnAddress => "own_address",
            Refusal::Denied => "denied",
            Refusal::QueueFull => "queue_full",
        }
    }

    /// Ranges a lab may opt into with `--allow-private`.
    fn is_private_class(self) -> bool {
        matches!(
            self,
            Refusal::Private | Refusal::SharedCgnat | Refusal::UniqueLocal
        )
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Refusal::Unspecified => "unspecified address",
            Refusal::Loopback => "loopback address",
            Refusal::Private => "private address (RFC 1918); --allow-private traces it",
            Refusal::SharedCgnat => "shared CGNAT address (RFC 6598); --allow-private traces it",
            Refusal::UniqueLocal => "unique local address (fc00::/7); --allow-private traces it",
            Refusal::LinkLocal => "link-local address",
            Refusal::Multicast => "multicast address",
            Refusal::Broadcast => "broadcast address",
            Refusal::Documentation => "documentation address",
            Refusal::Benchmarking => "benchmarking address",
            Refusal::Reserved => "reserved or special-purpose address",
            Refusal::OwnAddress => "one of this host's own addresses",
            Refusal::Denied => "inside a denied prefix",
            Refusal::QueueFull => "trace queue is full",
        };
        f.write_str(text)
    }
}

/// `::ffff:a.b.c.d` is `a.b.c.d`: one key per destination in the cache and the policy.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The class of an IPv4 address that is not globally routable, if it is one.
fn classify_v4(ip: Ipv4Addr) -> Option<Refusal> {
    let [a, b, c, _] = ip.octets();
    let class = match (a, b, c) {
        _ if ip.is_unspecified() => Refusal::Unspecified,
        _ if ip.is_broadcast() => Refusal::Broadcast,
        (0, _, _) => Refusal::Reserved,
        (127, _, _) => Refusal::Loopback,
        (10, _, _) | (172, 16..=31, _) | (192, 168, _) => Refusal::Private,
        (100, 64..=127, _) => Refusal::SharedCgnat,
        (169, 254, _) => Refusal::LinkLocal,
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => Refusal::Documentation,
        (198, 18..=19, _) => Refusal::Benchmarking,
        (192, 0, 0) | (192, 88, 99) => Refusal::Reserved,
        (224..=239, _, _) => Refusal::Multicast,
        (240..=255, _, _) => Refusal::Reserved,
        _ => return None,
    };
    Some(class)
}

/// The class of an IPv6 address that is not globally routable, if it is one. Forms that embed
/// an IPv4 address (mapped, 6to4, NAT64) are judged by the address they embed.
fn classify_v6(ip: Ipv6Addr) -> Option<Refusal> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    let s = ip.segments();
    let embedded_low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    let class = match s {
        _ if ip.is_unspecified() => Refusal::Unspecified,
        _ if ip.is_loopback() => Refusal::Loopback,
        // IPv4-compatible (::a.b.c.d), deprecated by RFC 4291: never routed.
        [0, 0, 0, 0, 0, 0, _, _] => Refusal::Reserved,
        // NAT64 well-known prefix: the embedded IPv4 address is the real destination.
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => return classify_v4(embedded_low),
        // Local-use NAT64 (RFC 8215).
        [0x64, 0xff9b, 1, ..] => Refusal::Reserved,
        // 6to4: 2002:AABB:CCDD::/48 embeds AA.BB.CC.DD.
        [0x2002, hi, lo, ..] => {
            let v4 = Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
            return classify_v4(v4);
        }
        [0x2001, 0xdb8, ..] => Refusal::Documentation,
        [0x3fff, b, ..] if b < 0x1000 => Refusal::Documentation,
        [0x2001, 2, 0, ..] => Refusal::Benchmarking,
        // IETF protocol assignments 2001::/23 (Teredo, ORCHID, …).
        [0x2001, b, ..] if b < 0x200 => Refusal::Reserved,
        [0x100, 0, 0, 0, ..] => Refusal::Reserved,
        [a, ..] if a & 0xfe00 == 0xfc00 => Refusal::UniqueLocal,
        [a, ..] if a & 0xffc0 == 0xfe80 => Refusal::LinkLocal,
        [a, ..] if a & 0xff00 == 0xff00 => Refusal::Multicast,
        // Global unicast is 2000::/3; everything else is unallocated or special.
        [a, ..] if a & 0xe000 != 0x2000 => Refusal::Reserved,
        _ => return None,
    };
    Some(class)
}

/// The class of `ip` if it is not globally routable.
pub fn classify(ip: IpAddr) -> Option<Refusal> {
    match canonical(ip) {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// Decides whether a destination is traced.
#[derive(Debug, Default)]
pub struct Policy {
    allow_private: bool,
    deny: Vec<IpNet>,
    /// Addresses that are this host's though no interface holds them (public or
    /// load-balancer addresses), kept across refreshes.
    extra_own: Vec<IpAddr>,
    own: RwLock<HashSet<IpAddr>>,
}

impl Policy {
    /// A policy that refuses non-global addresses (private ones too unless `allow_private`),
    /// anything inside `deny`, and this host's addresses: those of its interfaces (see
    /// [`Policy::set_own_addresses`]) and `extra_own`.
    pub fn new(allow_private: bool, deny: Vec<IpNet>, extra_own: Vec<IpAddr>) -> Self {
        let extra_own: Vec<IpAddr> = extra_own.into_iter().map(canonical).collect();
        Self {
            allow_private,
            deny,
            own: RwLock::new(extra_own.iter().copied().collect()),
            extra_own,
        }
    }

    /// Replaces the interface addresses of this host (refreshed while running); the
    /// configured extra addresses stay.
    pub fn set_own_addresses(&self, addrs: impl IntoIterator<Item = IpAddr>) {
        let set = addrs
            .into_iter()
            .chain(self.extra_own.iter().copied())
            .map(canonical)
            .collect();
        *self.own.write().unwrap_or_else(|p| p.into_inner()) = set;
    }

    /// Whether `ip` is one of this host's addresses.
    pub fn is_own(&self, ip: IpAddr) -> bool {
        self.own
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&canonical(ip))
    }

    /// The canonical destination if it may be traced, otherwise why not.
    pub fn check(&self, ip: IpAddr) -> Result<IpAddr, Refusal> {
        let ip = canonical(ip);
        if let Some(class) = classify(ip)
            && !(self.allow_private && class.is_private_class())
        {
            return Err(class);
        }
        if self.deny.iter().any(|net| net.contains(&ip)) {
            return Err(Refusal::Denied);
        }
        if self.is_own(ip) {
            return Err(Refusal::OwnAddress);
        }
        Ok(ip)
    }
}

/// The addresses of every interface in the calling thread's network namespace.
pub fn interface_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|ifa| ifa.address)
        .filter_map(|sa| {
            sa.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address parses")
    }

    /// The table of address classes: every class, both families, the embedded forms.
    #[test]
    fn address_classes() {
        use Refusal::*;
        let table: &[(&str, Option<Refusal>)] = &[
            ("8.8.8.8", None),
            ("1.1.1.1", None),
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(Reserved)),
            ("127.0.0.1", Some(Loopback)),
            ("127.255.255.254", Some(Loopback)),
            ("10.1.2.3", Some(Private)),
            ("172.16.0.1", Some(Private)),
            ("172.31.255.255", Some(Private)),
            ("172.32.0.1", None),
            ("192.168.1.1", Some(Private)),
            ("100.64.0.1", Some(SharedCgnat)),
            ("100.127.255.255", Some(SharedCgnat)),
            ("100.128.0.1", None),
            ("169.254.1.1", Some(LinkLocal)),
            ("224.0.0.1", Some(Multicast)),
            ("239.255.255.255", Some(Multicast)),
            ("255.255.255.255", Some(Broadcast)),
            ("240.0.0.1", Some(Reserved)),
            ("192.0.2.1", Some(Documentation)),
            ("198.51.100.7", Some(Documentation)),
            ("203.0.113.9", Some(Documentation)),
            ("198.18.0.1", Some(Benchmarking)),
            ("198.19.255.255", Some(Benchmarking)),
            ("198.20.0.1", None),
            ("192.0.0.8", Some(Reserved)),
            ("192.88.99.1", Some(Reserved)),
            ("2606:4700::1111", None),
            ("2001:4860:4860::8888", None),
            ("::", Some(Unspecified)),
            ("::1", Some(Loopback)),
            ("fe80::1", Some(LinkLocal)),
            ("febf::1", Some(LinkLocal)),
            ("fc00::1", Some(UniqueLocal)),
            ("fd77:100::5", Some(UniqueLocal)),
            ("ff02::1", Some(Multicast)),
            ("2001:db8::1", Some(Documentation)),
            ("3fff::1", Some(Documentation)),
            ("2001:2::1", Some(Benchmarking)),
            ("2001::1", Some(Reserved)),
            ("100::1", Some(Reserved)),
            ("4000::1", Some(Reserved)),
            ("fec0::1", Some(Reserved)),
            // IPv4-mapped: judged as the IPv4 address it is.
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("::ffff:10.0.0.1", Some(Private)),
            ("::ffff:8.8.8.8", None),
            // IPv4-compatible: deprecated, never routed.
            ("::8.8.8.8", Some(Reserved)),
            ("::127.0.0.1", Some(Reserved)),
            // 6to4 and NAT64 embedding non-global IPv4 addresses.
            ("2002:7f00:1::1", Some(Loopback)),
            ("2002:c0a8:101::1", Some(Private)),
            ("2002:0808:0808::1", None),
            ("64:ff9b::7f00:1", Some(Loopback)),
            ("64:ff9b::a9fe:1", Some(LinkLocal)),
            ("64:ff9b::808:808", None),
            ("64:ff9b:1::1", Some(Reserved)),
        ];
        for (addr, want) in table {
            assert_eq!(classify(ip(addr)), *want, "{addr}");
        }
    }

    #[test]
    fn canonical_unmaps_ipv4() {
        assert_eq!(canonical(ip("::ffff:1.2.3.4")), ip("1.2.3.4"));
        assert_eq!(canonical(ip("2001:db8::1")), ip("2001:db8::1"));
    }

    #[test]
    fn allow_private_opens_only_the_private_classes() {
        let lab = Policy::new(true, vec![], vec![]);
        assert_eq!(lab.check(ip("10.77.100.5")), Ok(ip("10.77.100.5")));
        assert_eq!(lab.check(ip("fd77:100::5")), Ok(ip("fd77:100::5")));
        assert_eq!(lab.check(ip("100.64.0.1")), Ok(ip("100.64.0.1")));
        assert_eq!(lab.check(ip("127.0.0.1")), Err(Refusal::Loopback));
        assert_eq!(lab.check(ip("169.254.0.1")), Err(Refusal::LinkLocal));
        let strict = Policy::new(false, vec![], vec![]);
        assert_eq!(strict.check(ip("10.77.100.5")), Err(Refusal::Private));
    }

    #[test]
    fn deny_list_and_own_addresses() {
        let policy = Policy::new(
            false,
            vec!["8.8.0.0/16".parse().expect("net")],
            vec![ip("1.0.0.1")],
        );
        assert_eq!(policy.check(ip("1.0.0.1")), Err(Refusal::OwnAddress));
        assert_eq!(policy.check(ip("8.8.8.8")), Err(Refusal::Denied));
        assert_eq!(policy.check(ip("::ffff:8.8.4.4")), Err(Refusal::Denied));
        assert_eq!(policy.check(ip("9.9.9.9")), Ok(ip("9.9.9.9")));
        policy.set_own_addresses([ip("::ffff:9.9.9.9")]);
        assert_eq!(policy.check(ip("9.9.9.9")), Err(Refusal::OwnAddress));
        policy.set_own_addresses([]);
        assert_eq!(policy.check(ip("9.9.9.9")), Ok(ip("9.9.9.9")));
        // Configured addresses survive a refresh of the interface addresses.
        assert!(policy.is_own(ip("::ffff:1.0.0.1")));
    }

    #[test]
    fn interface_addresses_include_loopback() {
        assert!(interface_addresses().contains(&ip("127.0.0.1")));
    }
}
