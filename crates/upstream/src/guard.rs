//! The SSRF guard: which addresses Latchkey's outbound HTTP may reach.
//!
//! Every URL Latchkey fetches comes from configuration or from an operator (a connection's
//! token, revocation, user-info and API URLs, an OpenID issuer, the webhook URL), so a
//! mistaken or hostile setting could point the vault at the machine it runs on or at the
//! network behind it: a cloud metadata service, an admin port on loopback, a database on the
//! private network. The guard refuses those destinations unless the operator allows them:
//!
//! - [`blocked_range`] names the ranges that are refused: loopback, private, shared (CGNAT),
//!   link-local (where the cloud metadata services live), multicast, reserved, and the IPv6
//!   forms that embed one of these IPv4 addresses (IPv4-mapped, IPv4-compatible, NAT64, 6to4);
//! - [`OutboundPolicy`] is that list with the operator's exceptions (`outbound_allow`,
//!   `outbound_allow_private`) and Latchkey's own public origin (the issuer: it is Latchkey
//!   itself, where the built-in demo provider lives, and every client can reach it anyway);
//! - [`GuardedClient`] holds the HTTP clients that enforce it. Names are resolved by
//!   [`GuardedResolver`], which drops refused addresses and fails when none is left; the
//!   connection then goes to exactly the addresses it returned (no second lookup, so a DNS
//!   answer that changes between a check and the connection cannot slip through). A URL with
//!   an IP literal never reaches a resolver, so [`GuardedClient::for_url`] checks it before
//!   the request is built. Environment proxies (`HTTPS_PROXY`) are ignored: a proxy would
//!   resolve the name itself, out of the guard's sight.
//!
//! Redirects, size caps and deadlines are set by the callers (`HttpUpstream` follows no
//! redirect; the API proxy follows only same-origin ones, which reach the same guarded host).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// The configuration keys an operator sets to allow a refused address (named in errors).
pub const ALLOW_KEYS: &str = "outbound_allow (or outbound_allow_private)";

/// An IPv4 or IPv6 network, `10.0.0.0/8` or a single address (`10.1.2.3`, `fd00::1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parse `ADDR/PREFIX` or a bare address (all of its bits). Host bits below the prefix
    /// must be zero (`10.0.0.1/8` is refused as a likely typo).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or network (`10.0.0.0/8`)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: the prefix length must be 0 to {max}"))?,
        };
        let cidr = Cidr { addr, prefix };
        if bits(addr) & !cidr.mask() != 0 {
            return Err(format!(
                "`{s}` has bits set below its /{prefix} prefix; write the network address"
            ));
        }
        Ok(cidr)
    }

    const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Self {
        Cidr {
            addr: IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
            prefix,
        }
    }

    fn mask(&self) -> u128 {
        let width = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.prefix == 0 {
            0
        } else {
            (u128::MAX << (width - u32::from(self.prefix))) & width_mask(width)
        }
    }

    /// Whether `ip` is in this network (an IPv4-mapped IPv6 address counts as its IPv4
    /// address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        ip.is_ipv4() == self.addr.is_ipv4() && bits(ip) & self.mask() == bits(self.addr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn width_mask(width: u32) -> u128 {
    if width == 128 {
        u128::MAX
    } else {
        (1u128 << width) - 1
    }
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// `::ffff:a.b.c.d` is `a.b.c.d` (a socket to it reaches the IPv4 host).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Refused IPv4 networks, with what they are.
const DENIED_V4: &[(Cidr, &str)] = &[
    (Cidr::v4(0, 0, 0, 0, 8), "\"this network\""),
    (Cidr::v4(10, 0, 0, 0, 8), "private"),
    (
        Cidr::v4(100, 64, 0, 0, 10),
        "shared address space (carrier-grade NAT)",
    ),
    (Cidr::v4(127, 0, 0, 0, 8), "loopback"),
    (Cidr::v4(169, 254, 0, 0, 16), "link-local (cloud metadata)"),
    (Cidr::v4(172, 16, 0, 0, 12), "private"),
    (Cidr::v4(192, 0, 0, 0, 24), "IETF protocol assignments"),
    (Cidr::v4(192, 168, 0, 0, 16), "private"),
    (Cidr::v4(198, 18, 0, 0, 15), "benchmarking"),
    (Cidr::v4(224, 0, 0, 0, 4), "multicast"),
    (Cidr::v4(240, 0, 0, 0, 4), "reserved (and broadcast)"),
];

/// The range `ip` falls in when Latchkey refuses to call it, e.g. `"loopback"`; `None` for
/// an address on the public internet. IPv6 addresses that carry an IPv4 address (mapped,
/// compatible, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) are judged by that IPv4 address.
pub fn blocked_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => DENIED_V4
            .iter()
            .find(|(net, _)| net.contains(IpAddr::V4(v4)))
            .map(|(_, what)| *what),
        IpAddr::V6(v6) => blocked_v6(v6),
    }
}

fn blocked_v6(v6: Ipv6Addr) -> Option<&'static str> {
    let s = v6.segments();
    let embedded = |v4: Ipv4Addr| blocked_range(IpAddr::V4(v4));
    if v6.is_unspecified() {
        return Some("unspecified");
    }
    if v6.is_loopback() {
        return Some("loopback");
    }
    if let Some(v4) = v6.to_ipv4_mapped() {
        return embedded(v4);
    }
    let low_v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        // IPv4-compatible (deprecated, ::a.b.c.d) and the rest of ::/96.
        [0, 0, 0, 0, 0, 0, _, _] => embedded(low_v4).or(Some("IPv4-compatible")),
        // NAT64 well-known prefix: reaches the embedded IPv4 address through a translator.
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => embedded(low_v4),
        // NAT64 local-use prefix (RFC 8215): a private translator.
        [0x64, 0xff9b, 1, ..] => Some("NAT64 local use"),
        // 6to4: the IPv4 address in bits 16..48.
        [0x2002, hi, lo, ..] => embedded(Ipv4Addr::new(
            (hi >> 8) as u8,
            hi as u8,
            (lo >> 8) as u8,
            lo as u8,
        )),
        // Discard-only (RFC 6666).
        [0x100, 0, 0, 0, ..] => Some("discard-only"),
        [a, ..] if a & 0xfe00 == 0xfc00 => {
            Some("unique local (private; fd00:ec2::254 is metadata)")
        }
        [a, ..] if a & 0xffc0 == 0xfe80 => Some("link-local"),
        [a, ..] if a & 0xffc0 == 0xfec0 => Some("site-local"),
        [a, ..] if a & 0xff00 == 0xff00 => Some("multicast"),
        _ => None,
    }
}

/// What outbound HTTP may reach: every public address, the operator's exceptions, and
/// Latchkey's own public origin. The default refuses every range of [`blocked_range`].
#[derive(Clone, Debug, Default)]
pub struct OutboundPolicy {
    allow_private: bool,
    allow: Vec<Cidr>,
    trusted_origins: Vec<url::Origin>,
}

impl OutboundPolicy {
    /// `allow_private` lifts the guard entirely; `allow` lists networks or addresses
    /// (`10.20.0.0/16`, `192.168.1.7`, `fd12::/16`) reachable despite it.
    pub fn new(allow_private: bool, allow: &[String]) -> Result<Self, String> {
        let allow = allow
            .iter()
            .map(|s| Cidr::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            allow_private,
            allow,
            trusted_origins: Vec::new(),
        })
    }

    /// Also reach `url`'s origin (scheme, host and port) whatever it resolves to: for
    /// Latchkey's own issuer, where the built-in demo provider is served.
    pub fn trust_origin(mut self, url: &str) -> Result<Self, String> {
        let parsed = url::Url::parse(url).map_err(|_| format!("`{url}` is not a URL"))?;
        self.trusted_origins.push(parsed.origin());
        Ok(self)
    }

    /// `Err` with the range when the policy refuses `ip`.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), &'static str> {
        match blocked_range(ip) {
            None => Ok(()),
            Some(_) if self.allow_private => Ok(()),
            Some(_) if self.allow.iter().any(|net| net.contains(ip)) => Ok(()),
            Some(range) => Err(range),
        }
    }

    /// Check a URL before anything is sent: http(s) only, and an IP-literal host must be
    /// allowed (a name is checked when it is resolved).
    pub fn check_url(&self, url: &url::Url) -> Result<Route, Blocked> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Blocked(format!(
                "`{}:` URLs are never fetched: only http and https",
                url.scheme()
            )));
        }
        if self.trusted_origins.contains(&url.origin()) {
            return Ok(Route::Trusted);
        }
        let ip = match url.host() {
            None => return Err(Blocked("a URL without a host is never fetched".into())),
            Some(url::Host::Domain(_)) => return Ok(Route::Guarded),
            Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
        };
        self.check_ip(ip).map(|()| Route::Guarded).map_err(|range| {
            Blocked(format!(
                "`{ip}` is a blocked address ({range}); set {ALLOW_KEYS} to allow it"
            ))
        })
    }
}

/// Which client a checked URL goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Resolved and connected under the guard.
    Guarded,
    /// Latchkey's own origin: resolved normally.
    Trusted,
}

/// Why a destination was refused, for the operator: names the host or address and the
/// range, never the URL's path or query (which may carry a secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocked(String);

impl fmt::Display for Blocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Blocked {}

impl Blocked {
    /// The refusal in a failed request's chain of causes, if that is why it failed.
    pub fn in_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Blocked> {
        let mut cause = Some(e);
        while let Some(c) = cause {
            if let Some(b) = c.downcast_ref::<Blocked>() {
                return Some(b);
            }
            cause = c.source();
        }
        None
    }
}

/// Resolves names with the system resolver, then keeps only the addresses the policy allows.
#[derive(Clone, Debug)]
pub struct GuardedResolver {
    policy: Arc<OutboundPolicy>,
}

impl GuardedResolver {
    pub fn new(policy: Arc<OutboundPolicy>) -> Self {
        Self { policy }
    }

    /// The allowed addresses of `host`, or why there are none.
    pub async fn resolve_host(&self, host: &str) -> Result<Vec<SocketAddr>, Blocked> {
        let found: Vec<SocketAddr> = tokio::net::lookup_host((host, 0))
            .await
            .map_err(|_| Blocked(format!("`{host}` could not be resolved")))?
            .collect();
        let (allowed, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = found
            .into_iter()
            .partition(|a| self.policy.check_ip(a.ip()).is_ok());
        if allowed.is_empty() {
            let mut ranges: Vec<String> = refused
                .iter()
                .map(|a| {
                    let range = self.policy.check_ip(a.ip()).err().unwrap_or("?");
                    format!("{} {range}", a.ip())
                })
                .collect();
            ranges.dedup();
            return Err(Blocked(if ranges.is_empty() {
                format!("`{host}` has no address")
            } else {
                format!(
                    "`{host}` resolves only to blocked addresses ({}); set {ALLOW_KEYS} to allow it",
                    ranges.join(", ")
                )
            }));
        }
        Ok(allowed)
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let this = self.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs = this.resolve_host(&host).await?;
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// The two HTTP clients behind the guard: one resolving through [`GuardedResolver`], one
/// for the trusted origins. Both are built from the same caller settings (deadlines,
/// redirects, roots) and ignore environment proxies.
#[derive(Clone, Debug)]
pub struct GuardedClient {
    guarded: reqwest::Client,
    trusted: reqwest::Client,
    policy: Arc<OutboundPolicy>,
}

impl GuardedClient {
    /// `settings` configures both clients (the guard adds its resolver and `no_proxy`).
    pub fn new(
        policy: OutboundPolicy,
        settings: impl Fn() -> Result<reqwest::ClientBuilder, String>,
    ) -> Result<Self, String> {
        let policy = Arc::new(policy);
        let guarded = settings()?
            .no_proxy()
            .dns_resolver(GuardedResolver::new(policy.clone()))
            .build()
            .map_err(|e| e.to_string())?;
        let trusted = settings()?.no_proxy().build().map_err(|e| e.to_string())?;
        Ok(Self {
            guarded,
            trusted,
            policy,
        })
    }

    pub fn policy(&self) -> &OutboundPolicy {
        &self.policy
    }

    /// The client to send `url` with, and the parsed URL; `Err` if the guard refuses it
    /// before any connection (a scheme other than http(s), a blocked IP literal).
    pub fn for_url(&self, url: &str) -> Result<(&reqwest::Client, reqwest::Url), Blocked> {
        let parsed = reqwest::Url::parse(url).map_err(|_| Blocked("not a URL".into()))?;
        let client = match self.policy.check_url(&parsed)? {
            Route::Guarded => &self.guarded,
            Route::Trusted => &self.trusted,
        };
        Ok((client, parsed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn url(s: &str) -> url::Url {
        url::Url::parse(s).unwrap()
    }

    #[test]
    fn every_listed_range_is_blocked_at_both_ends() {
        for (first, last, what) in [
            ("0.0.0.0", "0.255.255.255", "this network"),
            ("10.0.0.0", "10.255.255.255", "private"),
            ("100.64.0.0", "100.127.255.255", "shared"),
            ("127.0.0.0", "127.255.255.255", "loopback"),
            ("169.254.0.0", "169.254.255.255", "link-local"),
            ("172.16.0.0", "172.31.255.255", "private"),
            ("192.0.0.0", "192.0.0.255", "IETF"),
            ("192.168.0.0", "192.168.255.255", "private"),
            ("198.18.0.0", "198.19.255.255", "benchmarking"),
            ("224.0.0.0", "239.255.255.255", "multicast"),
            ("240.0.0.0", "255.255.255.255", "reserved"),
        ] {
            for a in [first, last] {
                let range = blocked_range(ip(a)).unwrap_or_else(|| panic!("{a} passed"));
                assert!(range.contains(what), "{a}: {range}");
            }
        }
        assert!(blocked_range(ip("169.254.169.254")).is_some(), "metadata");
        assert!(blocked_range(ip("100.100.100.200")).is_some(), "metadata");
        // Just outside.
        for a in [
            "1.0.0.0",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "169.255.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.0",
            "192.167.255.255",
            "192.169.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "93.184.216.34",
            "8.8.8.8",
        ] {
            assert_eq!(blocked_range(ip(a)), None, "{a}");
        }
    }

    #[test]
    fn ipv6_ranges_and_embedded_ipv4_are_blocked() {
        for (a, what) in [
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("fc00::1", "unique local"),
            ("fdff:ffff::1", "unique local"),
            ("fd00:ec2::254", "metadata"),
            ("fe80::1", "link-local"),
            ("febf:ffff::1", "link-local"),
            ("fec0::1", "site-local"),
            ("ff02::1", "multicast"),
            ("ff0e::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "link-local"),
            ("::ffff:10.1.2.3", "private"),
            ("::127.0.0.1", "loopback"),
            ("::8.8.8.8", "IPv4-compatible"),
            ("64:ff9b::127.0.0.1", "loopback"),
            ("64:ff9b::10.0.0.1", "private"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("64:ff9b:1::8.8.8.8", "NAT64"),
            ("2002:7f00:1::", "loopback"),
            ("2002:a9fe:a9fe::1", "link-local"),
            ("100::1", "discard"),
        ] {
            let range = blocked_range(ip(a)).unwrap_or_else(|| panic!("{a} passed"));
            assert!(range.contains(what), "{a}: {range}");
        }
        for a in [
            "2606:4700::1111",
            "2001:4860:4860::8888",
            "::ffff:93.184.216.34",
            "64:ff9b::93.184.216.34",
            "2002:5db8:d822::1",
        ] {
            assert_eq!(blocked_range(ip(a)), None, "{a}");
        }
    }

    #[test]
    fn the_operator_allows_exceptions() {
        let default = OutboundPolicy::default();
        assert!(default.check_ip(ip("10.1.2.3")).is_err());
        assert!(default.check_ip(ip("93.184.216.34")).is_ok());
        assert!(default.check_ip(ip("2606:4700::1111")).is_ok());

        let some = OutboundPolicy::new(false, &["10.1.0.0/16".into(), "::1".into()]).unwrap();
        assert!(some.check_ip(ip("10.1.2.3")).is_ok());
        assert!(some.check_ip(ip("::ffff:10.1.2.3")).is_ok(), "mapped");
        assert!(some.check_ip(ip("10.2.0.1")).is_err());
        assert!(some.check_ip(ip("::1")).is_ok());
        assert!(some.check_ip(ip("127.0.0.1")).is_err(), "::1 is not 127/8");
        assert!(some.check_ip(ip("169.254.169.254")).is_err());

        let one = OutboundPolicy::new(false, &["127.0.0.1".into()]).unwrap();
        assert!(one.check_ip(ip("127.0.0.1")).is_ok());
        assert!(one.check_ip(ip("127.0.0.2")).is_err(), "one address only");

        let all = OutboundPolicy::new(true, &[]).unwrap();
        for a in ["127.0.0.1", "169.254.169.254", "fd00:ec2::254", "10.0.0.1"] {
            assert!(all.check_ip(ip(a)).is_ok(), "{a}");
        }
    }

    #[test]
    fn allow_entries_are_parsed_strictly() {
        for good in [
            "10.0.0.0/8",
            "192.168.1.7",
            "fd12::/16",
            "[::1]",
            "0.0.0.0/0",
            "::/0",
        ] {
            assert!(Cidr::parse(good).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("10.0.0.1/8", "bits set"),
            ("10.0.0.0/33", "prefix"),
            ("fd12::/129", "prefix"),
            ("localhost", "not an IP"),
            ("10.0.0.0/x", "prefix"),
            ("", "not an IP"),
        ] {
            let err = Cidr::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        assert!(OutboundPolicy::new(false, &["nope".into()]).is_err());
        assert_eq!(Cidr::parse("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(
            !Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains(ip("2606:4700::1"))
        );
    }

    #[test]
    fn urls_with_blocked_literals_are_refused_however_spelled() {
        let policy = OutboundPolicy::default();
        // The URL parser turns the odd IPv4 spellings into the address they mean.
        for u in [
            "http://127.0.0.1/",
            "https://127.0.0.1:8750/token",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://0x7f000001/",
            "http://0177.0.0.1/",
            "http://017700000001/",
            "http://127.1/",
            "http://127.0.1/",
            "http://0/",
            "http://0.0.0.0:80/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://[0:0:0:0:0:ffff:127.0.0.1]/",
            "http://[64:ff9b::7f00:1]/",
            "http://[fe80::1]/",
            "http://[fd00:ec2::254]/latest/meta-data/",
            "http://169.254.169.254/latest/meta-data/",
            "http://0xa9.0xfe.0xa9.0xfe/",
            "http://2852039166/",
            "http://10.0.0.1/",
            "http://192.168.1.1./",
            "HTTP://127.0.0.1/",
        ] {
            let err = policy.check_url(&url(u)).unwrap_err();
            assert!(err.to_string().contains("blocked address"), "{u}: {err}");
            assert!(err.to_string().contains("outbound_allow"), "{u}: {err}");
        }
        for u in [
            "file:///etc/passwd",
            "ftp://example.com/",
            "gopher://127.0.0.1/",
        ] {
            let err = policy.check_url(&url(u)).unwrap_err();
            assert!(
                err.to_string().contains("only http and https"),
                "{u}: {err}"
            );
        }
        for u in [
            "https://93.184.216.34/",
            "https://[2606:4700::1111]/",
            "https://example.com/",
            "http://localhost/",
        ] {
            assert_eq!(policy.check_url(&url(u)), Ok(Route::Guarded), "{u}");
        }
        // The refusal names the address, never the path or the query.
        let err = policy
            .check_url(&url("http://127.0.0.1/x?token=secret"))
            .unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn latchkey_s_own_origin_is_trusted_exactly() {
        let policy = OutboundPolicy::default()
            .trust_origin("https://127.0.0.1:8750/")
            .unwrap();
        let ok = policy.check_url(&url("https://127.0.0.1:8750/demo/oauth/token"));
        assert_eq!(ok, Ok(Route::Trusted));
        for other in [
            "https://127.0.0.1:8751/",
            "http://127.0.0.1:8750/",
            "https://127.0.0.2:8750/",
            "https://localhost:8750/",
        ] {
            assert_ne!(policy.check_url(&url(other)), Ok(Route::Trusted), "{other}");
        }
        let named = OutboundPolicy::default()
            .trust_origin("https://localhost:8750/")
            .unwrap();
        assert_eq!(
            named.check_url(&url("https://localhost:8750/x")),
            Ok(Route::Trusted)
        );
    }

    #[tokio::test]
    async fn names_resolving_to_blocked_addresses_are_refused() {
        let guarded = GuardedResolver::new(Arc::new(OutboundPolicy::default()));
        let err = guarded.resolve_host("localhost").await.unwrap_err();
        assert!(
            err.to_string()
                .contains("resolves only to blocked addresses"),
            "{err}"
        );
        assert!(err.to_string().contains("loopback"), "{err}");
        // An IP literal resolves to itself: the resolver refuses it as well.
        assert!(guarded.resolve_host("169.254.169.254").await.is_err());
        let allowed = GuardedResolver::new(Arc::new(
            OutboundPolicy::new(false, &["127.0.0.1".into()]).unwrap(),
        ));
        let addrs = allowed.resolve_host("localhost").await.unwrap();
        assert!(!addrs.is_empty());
        assert!(
            addrs.iter().all(|a| a.ip() == ip("127.0.0.1")),
            "only the allowed address is kept (not ::1): {addrs:?}"
        );
    }

    /// Through reqwest: no connection reaches a listener the guard refuses, whether the URL
    /// names it by address or by name, and the refusal is found in the error's causes.
    #[tokio::test]
    async fn requests_never_reach_a_refused_listener() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let seen = accepted.clone();
        tokio::spawn(async move {
            while let Ok((_s, _)) = listener.accept().await {
                seen.fetch_add(1, Ordering::SeqCst);
            }
        });
        let settings = || {
            Ok(reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(2))
                .redirect(reqwest::redirect::Policy::none()))
        };
        let client = GuardedClient::new(OutboundPolicy::default(), settings).unwrap();
        let literal = format!("http://127.0.0.1:{port}/");
        assert!(client.for_url(&literal).is_err());
        let by_name = format!("http://localhost:{port}/");
        let (http, u) = client.for_url(&by_name).unwrap();
        let err = http.get(u).send().await.unwrap_err();
        let blocked = Blocked::in_error(&err).expect("the refusal is in the causes");
        assert!(blocked.to_string().contains("localhost"), "{blocked}");
        assert_eq!(accepted.load(Ordering::SeqCst), 0, "nothing connected");

        // Allowed, the same request connects (the listener above can count).
        let open = GuardedClient::new(
            OutboundPolicy::new(false, &["127.0.0.1".into()]).unwrap(),
            settings,
        )
        .unwrap();
        let (http, u) = open.for_url(&by_name).unwrap();
        let _ = http.get(u).send().await;
        assert!(
            accepted.load(Ordering::SeqCst) >= 1,
            "the allowed call connected"
        );
    }
}
