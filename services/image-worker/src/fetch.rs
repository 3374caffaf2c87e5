//! Downloading source images safely: http(s) only, bounded time, bounded redirects, bounded bytes, and
//! never to a private, loopback, link-local or otherwise internal address (SSRF), checked on the
//! resolved address of every hop.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect;

use crate::job::Failure;

/// An IP network in CIDR notation, e.g. `127.0.0.1/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s.trim().split_once('/').unwrap_or((s.trim(), ""));
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if prefix.is_empty() {
            max
        } else {
            prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?} has a bad prefix length"))?
        };
        Ok(Self { addr, prefix })
    }
}

impl Cidr {
    /// Whether `ip` is inside this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Addresses no image URL may reach unless explicitly allowed: loopback, private, link-local,
/// unspecified, shared (CGNAT), benchmarking, multicast, broadcast and reserved ranges, in IPv4 and IPv6,
/// and every IPv6 range that embeds or tunnels to an IPv4 address (mapped, compatible, NAT64, 6to4,
/// Teredo), since those can lead to an internal IPv4 host.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal_v4(v4);
            }
            let [first, second, third, ..] = v6.segments();
            let leading_zeros = v6.segments()[..6].iter().all(|&s| s == 0);
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || leading_zeros // IPv4-compatible ::/96 (deprecated)
                || (first & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (first & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (first & 0xffc0) == 0xfec0 // site-local fec0::/10 (deprecated)
                || (first == 0x2001 && second == 0x0db8) // documentation
                || (first == 0x2001 && second == 0) // Teredo 2001::/32
                || first == 0x2002 // 6to4 2002::/16
                || (first == 0x0064 && second == 0xff9b && (third == 0 || third == 1)) // NAT64 64:ff9b::/96, 64:ff9b:1::/48
                || v6 == Ipv6Addr::from([0, 0, 0, 0, 0, 0xffff, 0, 0])
        }
    }
}

fn is_internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space 100.64/10
        || (a == 198 && (b == 18 || b == 19)) // benchmarking 198.18/15
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || a >= 240 // reserved
}

/// Which addresses may be fetched.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    /// Networks allowed even though they are internal (tests serve images from 127.0.0.1).
    pub allow: Vec<Cidr>,
}

impl AddressPolicy {
    /// Whether fetching from `ip` is allowed.
    pub fn permits(&self, ip: IpAddr) -> bool {
        !is_internal(ip) || self.allow.iter().any(|n| n.contains(ip))
    }
}

/// The error a refused address produces inside reqwest, recognised again when classifying. Its text
/// (which becomes the image's public `reason`) does not name the address: that would let anyone map
/// internal names to addresses. The address goes to the worker's log only.
#[derive(Debug, thiserror::Error)]
#[error("the URL leads to an internal or reserved address, which is never fetched")]
struct ForbiddenAddress(IpAddr);

impl ForbiddenAddress {
    fn failure(&self) -> Failure {
        tracing::warn!(address = %self.0, "image URL refused: internal or reserved address");
        Failure::permanent("forbidden_address", self.to_string())
    }
}

/// DNS resolution that drops nothing silently: if any address of a name is internal and not allowed,
/// the whole name is refused (a name must not be a way into the internal network).
struct GuardedResolver {
    policy: Arc<AddressPolicy>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if let Some(bad) = addrs.iter().find(|a| !policy.permits(a.ip())) {
                return Err(Box::new(ForbiddenAddress(bad.ip()))
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

use platform::breaker::CircuitBreaker;

/// Download limits.
#[derive(Debug, Clone)]
pub struct FetchLimits {
    /// Time to establish a connection.
    pub connect_timeout: Duration,
    /// Time for the whole download, redirects included.
    pub total_timeout: Duration,
    /// Most redirects followed.
    pub max_redirects: usize,
    /// Most bytes read; larger bodies are refused while streaming.
    pub max_bytes: usize,
    /// Failures in a row from one origin that open its circuit.
    pub origin_breaker_failures: u32,
    /// How long an origin's open circuit skips downloads.
    pub origin_breaker_cool_down: Duration,
}

/// Most origins whose breakers are remembered; beyond it, closed ones are forgotten (a closed breaker
/// with no failures is the same as a new one).
const MAX_ORIGINS: usize = 10_000;

/// One circuit breaker per origin (`scheme://host:port`): an image server that hangs or refuses costs
/// one timeout per cool-down, not one per image, and never delays images from other origins.
#[derive(Default)]
struct Origins {
    breakers: std::sync::Mutex<std::collections::HashMap<String, Arc<CircuitBreaker>>>,
}

impl Origins {
    fn breaker(&self, origin: &str, limits: &FetchLimits) -> Arc<CircuitBreaker> {
        let mut breakers = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = breakers.get(origin) {
            return b.clone();
        }
        if breakers.len() >= MAX_ORIGINS {
            breakers.retain(|_, b| b.is_open());
        }
        let breaker = Arc::new(CircuitBreaker::new(
            format!("image origin {origin}"),
            limits.origin_breaker_failures,
            limits.origin_breaker_cool_down,
        ));
        breakers.insert(origin.to_owned(), breaker.clone());
        breaker
    }
}

/// An HTTP client that enforces [`FetchLimits`] and an [`AddressPolicy`] on every hop.
#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    policy: Arc<AddressPolicy>,
    limits: FetchLimits,
    origins: Arc<Origins>,
}

impl Fetcher {
    /// A fetcher with these limits and policy.
    pub fn new(limits: FetchLimits, policy: AddressPolicy) -> Result<Self, reqwest::Error> {
        let policy = Arc::new(policy);
        let redirect_policy = policy.clone();
        let max_redirects = limits.max_redirects;
        let client = reqwest::Client::builder()
            // A proxy from HTTP_PROXY/HTTPS_PROXY/ALL_PROXY would connect on our behalf to an address
            // the resolver never checks: image fetches never use one.
            .no_proxy()
            .user_agent("catalog-image-worker/0.1")
            .connect_timeout(limits.connect_timeout)
            .timeout(limits.total_timeout)
            .dns_resolver(Arc::new(GuardedResolver {
                policy: policy.clone(),
            }))
            .redirect(redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() > max_redirects {
                    return attempt.error(format!("more than {max_redirects} redirects"));
                }
                // Names are checked by the resolver; IP literals never reach it, so check them here.
                if let Some(ip) = literal_ip(attempt.url()) {
                    if !redirect_policy.permits(ip) {
                        return attempt.error(ForbiddenAddress(ip));
                    }
                }
                attempt.follow()
            }))
            .build()?;
        Ok(Self {
            client,
            policy,
            limits,
            origins: Arc::default(),
        })
    }

    /// Downloads `url`, or says why not (classified for the retry ladder).
    pub async fn fetch(&self, url: &str) -> Result<Bytes, Failure> {
        let parsed =
            url::Url::parse(url).map_err(|e| Failure::permanent("invalid_url", e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(Failure::permanent(
                "invalid_url",
                "only http and https URLs are fetched",
            ));
        }
        if let Some(ip) = literal_ip(&parsed) {
            if !self.policy.permits(ip) {
                return Err(ForbiddenAddress(ip).failure());
            }
        }
        let origin = parsed.origin().ascii_serialization();
        let breaker = self.origins.breaker(&origin, &self.limits);
        let Some(attempt) = breaker.attempt() else {
            return Err(Failure::retryable(
                "origin_unavailable",
                "the image server failed repeatedly; downloads from it are paused for a while",
            ));
        };
        let result = self.download(parsed).await;
        // The origin is at fault only when it did not answer properly (timeouts, refused
        // connections, 5xx, 429); a 404 or a body that is not an image is the image's fault.
        attempt.record(!matches!(&result, Err(f) if f.retryable));
        result
    }

    async fn download(&self, parsed: url::Url) -> Result<Bytes, Failure> {
        let mut response = self.client.get(parsed).send().await.map_err(classify)?;
        let status = response.status();
        if !status.is_success() {
            let reason = format!("the image server answered {status}");
            return Err(match status.as_u16() {
                408 | 425 | 429 => Failure::retryable("http_4xx", reason),
                s if s >= 500 => Failure::retryable("http_5xx", reason),
                _ => Failure::permanent("http_4xx", reason),
            });
        }
        let cap = self.limits.max_bytes;
        if response.content_length().is_some_and(|n| n > cap as u64) {
            return Err(Failure::permanent(
                "too_large",
                format!("the image is larger than {cap} bytes"),
            ));
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = response.chunk().await.map_err(classify)? {
            if body.len() + chunk.len() > cap {
                return Err(Failure::permanent(
                    "too_large",
                    format!("the image is larger than {cap} bytes"),
                ));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }
}

fn literal_ip(url: &url::Url) -> Option<IpAddr> {
    match url.host()? {
        url::Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
        url::Host::Ipv6(ip) => Some(IpAddr::V6(ip)),
        url::Host::Domain(_) => None,
    }
}

/// Sorts a transport error into the retry ladder's classes.
fn classify(error: reqwest::Error) -> Failure {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(e) = source {
        if let Some(forbidden) = e.downcast_ref::<ForbiddenAddress>() {
            return forbidden.failure();
        }
        source = e.source();
    }
    if error.is_redirect() {
        Failure::permanent("redirect", error.to_string())
    } else if error.is_timeout() {
        Failure::retryable("timeout", "the image server did not answer in time")
    } else if error.is_connect() {
        Failure::retryable(
            "connect",
            format!("cannot connect to the image server: {error}"),
        )
    } else {
        Failure::retryable("transport", error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn internal_addresses_are_recognised() {
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "198.18.0.1",
            "198.19.255.254",
            "64:ff9b::a00:1",
            "64:ff9b:1::1",
            "2002:a00:1::1",
            "::a00:1",
            "fec0::1",
            "2001:0:4136:e378::1",
        ] {
            assert!(is_internal(ip(internal)), "{internal} is internal");
        }
        for public in ["93.184.216.34", "8.8.8.8", "172.32.0.1", "2606:4700::1111"] {
            assert!(!is_internal(ip(public)), "{public} is public");
        }
    }

    #[test]
    fn an_allow_list_opens_exactly_its_networks() {
        let policy = AddressPolicy {
            allow: vec!["127.0.0.1/32".parse().unwrap()],
        };
        assert!(policy.permits(ip("127.0.0.1")));
        assert!(!policy.permits(ip("127.0.0.2")));
        assert!(!policy.permits(ip("10.0.0.1")));
        assert!(policy.permits(ip("8.8.8.8")));
        let wide: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(wide.contains(ip("10.255.0.1")));
        assert!(!wide.contains(ip("11.0.0.1")));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
    }
}
