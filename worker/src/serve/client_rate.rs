//! `limits.rate` on the request path: who the client is, and what the answer says about its
//! budget (`RateLimit-Policy`, `RateLimit`, and a 429 with `Retry-After` when it is spent).
//! The counting itself is `ratelimit`'s.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use hyper::{Response, StatusCode};

use crate::config::{RateKey, Trusted};
use crate::http::response::{text, Body};
use crate::shm::ratelimit::{Decision, Gcra, RateTable};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

pub(crate) struct ClientRate {
    table: RateTable,
    gcra: Gcra,
    key: RateKey,
    trusted: Trusted,
    /// `RateLimit-Policy`, the same on every response.
    policy: HeaderValue,
    /// The 429's body.
    refused: Bytes,
}

/// Whole seconds, rounded up: a client told to wait must not come back early.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl ClientRate {
    /// `count` requests per `period` and up to `burst` at once, for clients told apart by
    /// `key`, counted in `table`.
    pub(crate) fn new(
        table: RateTable,
        count: u32,
        period: Duration,
        burst: u32,
        idle_ttl: Duration,
        key: RateKey,
        trusted: Trusted,
    ) -> ClientRate {
        let burst = if burst == 0 { count } else { burst };
        // The draft's quota over a window: the burst, refilled over `burst` intervals.
        let window = ceil_secs(period / count * burst).max(1);
        let policy = HeaderValue::from_str(&format!("\"client\";q={burst};w={window}"))
            .expect("digits and ASCII");
        ClientRate {
            table,
            gcra: Gcra::new(count, period, burst, idle_ttl),
            key,
            trusted,
            policy,
            refused: Bytes::from(format!(
                "rate limit of {count} requests per {} (burst {burst}) reached (limits.rate)\n",
                humantime_serde::re::humantime::format_duration(period)
            )),
        }
    }

    /// Counts this request against its client, in the host's table.
    pub(crate) fn check(&self, headers: &HeaderMap, peer: Option<IpAddr>) -> Decision {
        let hash = self.with_client_key(headers, peer, |key| self.table.hash(key));
        self.table.check(hash, self.table.now(), &self.gcra)
    }

    /// Who the client is, as bytes the same on every host (for Redis).
    pub(crate) fn client_key(&self, headers: &HeaderMap, peer: Option<IpAddr>) -> Vec<u8> {
        self.with_client_key(headers, peer, <[u8]>::to_vec)
    }

    /// Calls `f` with the client's key: `h` and the configured header's value, or (without
    /// it) the client's address (`ip_key`).
    fn with_client_key<R>(
        &self,
        headers: &HeaderMap,
        peer: Option<IpAddr>,
        f: impl FnOnce(&[u8]) -> R,
    ) -> R {
        if let RateKey::Header(name) = &self.key {
            if let Some(v) = headers.get(name) {
                let mut key = Vec::with_capacity(v.len() + 1);
                key.push(b'h');
                key.extend_from_slice(v.as_bytes());
                return f(&key);
            }
        }
        let (key, len) = self.ip_key(headers, peer);
        f(&key[..len])
    }

    /// The limit, for the cluster to count in Redis.
    pub(crate) fn gcra(&self) -> Gcra {
        self.gcra
    }

    /// Counts a refusal made elsewhere (Redis) in the host's figures.
    pub(crate) fn count_refused(&self) {
        self.table.count_limited();
    }

    fn ip_key(&self, headers: &HeaderMap, peer: Option<IpAddr>) -> ([u8; 17], usize) {
        let mut key = [0u8; 17];
        let len = match self.client_ip(headers, peer) {
            Some(IpAddr::V4(ip)) => {
                key[0] = b'4';
                key[1..5].copy_from_slice(&ip.octets());
                5
            }
            Some(IpAddr::V6(ip)) => {
                key[0] = b'6';
                key[1..17].copy_from_slice(&ip.octets());
                17
            }
            // A client of a unix: listener that no trusted proxy named.
            None => {
                key[0] = b'u';
                1
            }
        };
        (key, len)
    }

    fn client_ip(&self, headers: &HeaderMap, peer: Option<IpAddr>) -> Option<IpAddr> {
        client_ip(&self.trusted, headers, peer)
    }

    /// Adds `RateLimit-Policy` and `RateLimit` for `decision` to a response.
    pub(crate) fn stamp(&self, headers: &mut HeaderMap, decision: &Decision) {
        headers.insert(RATELIMIT_POLICY, self.policy.clone());
        let value = format!(
            "\"client\";r={};t={}",
            decision.remaining,
            ceil_secs(decision.reset)
        );
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(RATELIMIT, v);
        }
    }

    /// 429 for a refused request, with `Retry-After` and the rate headers.
    pub(crate) fn refused(&self, decision: &Decision) -> Response<Body> {
        let mut res = text(StatusCode::TOO_MANY_REQUESTS, self.refused.clone());
        let headers = res.headers_mut();
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from(ceil_secs(decision.retry_after)),
        );
        self.stamp(headers, decision);
        res
    }
}

/// The client's address (for `limits.rate` and the access log): the peer's, or, when the peer
/// is a trusted proxy, the nearest address in `X-Forwarded-For` (read from the right) that is
/// not itself a trusted proxy.
pub(crate) fn client_ip(
    trusted: &Trusted,
    headers: &HeaderMap,
    peer: Option<IpAddr>,
) -> Option<IpAddr> {
    let peer = peer.map(|ip| ip.to_canonical());
    if peer.is_some_and(|ip| !trusted.contains(ip)) {
        return peer;
    }
    let mut client = peer;
    for value in headers.get_all(X_FORWARDED_FOR).iter().rev() {
        let Ok(value) = value.to_str() else { break };
        for item in value.rsplit(',') {
            // An address, or one with a port (`1.2.3.4:5678`, `[::1]:443`); anything else
            // (`unknown`) ends the walk at the last address read.
            let item = item.trim();
            let Some(ip) = item
                .parse::<IpAddr>()
                .ok()
                .or_else(|| item.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
            else {
                return client;
            };
            let ip = ip.to_canonical();
            client = Some(ip);
            if !trusted.contains(ip) {
                return client;
            }
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(trusted: &[&str]) -> ClientRate {
        let (table, _fd) = RateTable::create(64).unwrap();
        let trusted = Trusted::parse(&trusted.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        ClientRate::new(
            table,
            10,
            Duration::from_secs(1),
            0,
            Duration::from_secs(60),
            RateKey::Ip,
            trusted.unwrap(),
        )
    }

    fn xff(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn the_client_is_the_peer_unless_the_peer_is_a_trusted_proxy() {
        let r = limiter(&["127.0.0.1", "10.0.0.0/8"]);
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        // An untrusted peer's header is ignored.
        assert_eq!(r.client_ip(&xff("1.2.3.4"), ip("8.8.8.8")), ip("8.8.8.8"));
        // Behind trusted proxies: the nearest untrusted address, read from the right; what the
        // client itself wrote further left does not count.
        assert_eq!(
            r.client_ip(&xff("6.6.6.6, 1.2.3.4, 10.0.0.2"), ip("127.0.0.1")),
            ip("1.2.3.4")
        );
        // Everything trusted: the leftmost.
        assert_eq!(
            r.client_ip(&xff("10.0.0.3"), ip("127.0.0.1")),
            ip("10.0.0.3")
        );
        // Ports are dropped.
        assert_eq!(
            r.client_ip(&xff("[2001:db8::1]:443, 10.0.0.5:80"), ip("127.0.0.1")),
            ip("2001:db8::1")
        );
        // Garbage stops the walk at the last good address.
        assert_eq!(
            r.client_ip(&xff("junk, 10.0.0.4"), ip("127.0.0.1")),
            ip("10.0.0.4")
        );
        assert_eq!(
            r.client_ip(&HeaderMap::new(), ip("127.0.0.1")),
            ip("127.0.0.1")
        );
        // An IPv4 client on an IPv6 socket is that IPv4 address.
        assert_eq!(
            r.client_ip(&HeaderMap::new(), ip("::ffff:8.8.4.4")),
            ip("8.8.4.4")
        );
    }

    #[test]
    fn refusal_carries_retry_after_and_the_draft_headers() {
        let r = limiter(&[]);
        let peer = Some("192.0.2.1".parse().unwrap());
        let h = HeaderMap::new();
        for _ in 0..10 {
            assert!(r.check(&h, peer).allowed);
        }
        let d = r.check(&h, peer);
        assert!(!d.allowed);
        let res = r.refused(&d);
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(res.headers()[RETRY_AFTER], "1");
        assert_eq!(res.headers()[RATELIMIT_POLICY], "\"client\";q=10;w=1");
        assert_eq!(res.headers()[RATELIMIT], "\"client\";r=0;t=1");
    }
}
