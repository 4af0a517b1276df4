//! Where connections to Redis go: one server (`redis.url`: `redis://`, `rediss://`,
//! `unix://`), or the master that a set of Sentinels names (`[sentinel]`), found afresh at each
//! dial so that a failover is followed. Also the TLS material (`redis.tls_*`), read once.
//!
//! Each dial through Sentinel asks the Sentinels for the master's address and checks that the
//! server there calls itself master (the `redis` crate's `SentinelClient` does both); the
//! caller bounds the whole dial with its own timeout.
//!
//! Also [`redacted`]: a Redis URL (or a message that quotes one) with its passwords hidden, for
//! every log line, error and `supervisor check` that shows one.

use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    Client, ClientTlsConfig, ConnectionAddr, IntoConnectionInfo, RedisResult, TlsCertificates,
    TlsMode,
};

use crate::config::{RedisConfig, SentinelConfig};

pub(crate) struct Target {
    kind: Kind,
    /// For logs: the URL(s), passwords scrubbed.
    pub(crate) described: String,
}

enum Kind {
    Direct(Box<Client>),
    Sentinel(Box<SentinelClient>),
}

impl Target {
    /// Reads the TLS files and checks the URLs; `Err` names the key at fault.
    pub(crate) fn open(redis: &RedisConfig, sentinel: &SentinelConfig) -> Result<Target, String> {
        let certs = certificates(redis)?;
        if sentinel.enabled() {
            return via_sentinel(redis, sentinel, certs);
        }
        let described = redacted(&redis.url);
        let client = match certs {
            Some(certs) => {
                if !redis.url.starts_with("rediss://") {
                    return Err(format!(
                        "redis.tls_* files are set but redis.url {described} is not rediss://"
                    ));
                }
                Client::build_with_tls(redis.url.as_str(), certs)
            }
            None => Client::open(redis.url.as_str()),
        }
        .map_err(|e| format!("redis.url {described}: {e}"))?;
        Ok(Target {
            kind: Kind::Direct(Box::new(client)),
            described,
        })
    }

    /// A client for the server to use now (for Sentinel: the current master).
    pub(crate) async fn client(&mut self) -> RedisResult<Client> {
        match &mut self.kind {
            Kind::Direct(c) => Ok((**c).clone()),
            Kind::Sentinel(s) => s.async_get_client().await,
        }
    }
}

/// The TLS files of `[redis]`, read; `None` when none is set.
fn certificates(redis: &RedisConfig) -> Result<Option<TlsCertificates>, String> {
    let read = |key: &str, path: &str| -> Result<Option<Vec<u8>>, String> {
        if path.is_empty() {
            return Ok(None);
        }
        std::fs::read(path)
            .map(Some)
            .map_err(|e| format!("redis.{key} {path}: {e}"))
    };
    let root_cert = read("tls_ca_file", &redis.tls_ca_file)?;
    let cert = read("tls_cert_file", &redis.tls_cert_file)?;
    let key = read("tls_key_file", &redis.tls_key_file)?;
    let client_tls = match (cert, key) {
        (Some(client_cert), Some(client_key)) => Some(ClientTlsConfig {
            client_cert,
            client_key,
        }),
        (None, None) => None,
        _ => {
            return Err(
                "redis.tls_cert_file and redis.tls_key_file go together: set both or neither"
                    .to_string(),
            )
        }
    };
    if root_cert.is_none() && client_tls.is_none() {
        return Ok(None);
    }
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// What `sentinel.nodes` says: the addresses, and the user and password.
type SentinelNodes = (Vec<ConnectionAddr>, Option<String>, Option<String>);

/// The Sentinels' addresses (TCP only), and the user and password to give them (the first
/// node that names them).
fn sentinel_nodes(sentinel: &SentinelConfig) -> Result<SentinelNodes, String> {
    let mut addrs = Vec::new();
    let mut user = None;
    let mut password = None;
    for node in &sentinel.nodes {
        let info = node
            .as_str()
            .into_connection_info()
            .map_err(|e| format!("sentinel.nodes {}: {e}", redacted(node)))?;
        if user.is_none() {
            user = info.redis_settings().username().map(str::to_string);
        }
        if password.is_none() {
            password = info.redis_settings().password().map(str::to_string);
        }
        if matches!(info.addr(), ConnectionAddr::Unix(_)) {
            return Err(format!(
                "sentinel.nodes {}: a Sentinel is reached over TCP (redis:// or rediss://)",
                redacted(node)
            ));
        }
        addrs.push(info.addr().clone());
    }
    Ok((addrs, user, password))
}

/// `[sentinel]`: the Sentinels' own addresses and credentials come from `sentinel.nodes`; what
/// to use on the master once found (user, password, database, TLS) from `redis.url`, if set.
fn via_sentinel(
    redis: &RedisConfig,
    sentinel: &SentinelConfig,
    certs: Option<TlsCertificates>,
) -> Result<Target, String> {
    let (addrs, user, password) = sentinel_nodes(sentinel)?;
    if addrs.is_empty() {
        return Err(format!(
            "sentinel.master = {:?} needs sentinel.nodes (the Sentinels to ask)",
            sentinel.master
        ));
    }
    let tls_nodes = addrs
        .iter()
        .filter(|a| matches!(a, ConnectionAddr::TcpTls { .. }))
        .count();
    if tls_nodes != 0 && tls_nodes != addrs.len() {
        return Err(
            "sentinel.nodes mixes redis:// and rediss://: all Sentinels or none over TLS"
                .to_string(),
        );
    }
    let sentinels_tls = tls_nodes != 0;
    let mut builder =
        SentinelClientBuilder::new(addrs, sentinel.master.as_str(), SentinelServerType::Master)
            .map_err(|e| format!("sentinel.nodes: {e}"))?;
    if let Some(user) = user {
        builder = builder.set_client_to_sentinel_username(user);
    }
    if let Some(password) = password {
        builder = builder.set_client_to_sentinel_password(password);
    }
    let mut master_tls = false;
    if !redis.url.is_empty() {
        let info = redis
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| format!("redis.url {}: {e}", redacted(&redis.url)))?;
        let settings = info.redis_settings();
        if let Some(user) = settings.username() {
            builder = builder.set_client_to_redis_username(user);
        }
        if let Some(password) = settings.password() {
            builder = builder.set_client_to_redis_password(password);
        }
        builder = builder.set_client_to_redis_db(settings.db());
        match info.addr() {
            ConnectionAddr::TcpTls { .. } => {
                master_tls = true;
                builder = builder.set_client_to_redis_tls_mode(TlsMode::Secure);
            }
            ConnectionAddr::Unix(_) => {
                return Err(format!(
                    "redis.url {}: with Sentinel, a redis:// or rediss:// URL (for the master's \
                     password, database and TLS; its host is not used)",
                    redacted(&redis.url)
                ))
            }
            _ => {}
        }
    }
    if let Some(certs) = certs {
        if !master_tls && !sentinels_tls {
            return Err(
                "redis.tls_* files are set but neither redis.url nor sentinel.nodes is rediss://"
                    .to_string(),
            );
        }
        if master_tls {
            builder = builder.set_client_to_redis_certificates(certs.clone());
        }
        if sentinels_tls {
            builder = builder.set_client_to_sentinel_certificates(certs);
        }
    }
    let client = builder
        .build()
        .map_err(|e| format!("sentinel.nodes: {e}"))?;
    let nodes: Vec<String> = sentinel.nodes.iter().map(|n| redacted(n)).collect();
    Ok(Target {
        kind: Kind::Sentinel(Box::new(client)),
        described: format!(
            "sentinel master {:?} via {}",
            sentinel.master,
            nodes.join(",")
        ),
    })
}

/// `text` (a Redis URL, or a message that quotes one) with every password it holds replaced by
/// `***`: the user-info of a URL (`redis://user:PASSWORD@host`, `redis://PASSWORD@host`) and
/// `pass=`/`password=` parameters. For logs, errors and `supervisor check`.
pub fn redacted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("://") {
        let (head, tail) = rest.split_at(start + 3);
        out.push_str(head);
        // The authority ends at the first of these; a password is what precedes an `@` in it.
        let end = tail
            .find(|c: char| c == '/' || c == '?' || c == '"' || c.is_whitespace())
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => {
                let userinfo = &tail[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..=colon]);
                        out.push_str("***");
                    }
                    None => out.push_str("***"),
                }
                rest = &tail[at..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    let mut scrubbed = String::with_capacity(out.len());
    let mut rest = out.as_str();
    loop {
        let found = ["password=", "pass="]
            .iter()
            .filter_map(|k| rest.find(k).map(|i| (i, k.len())))
            .min();
        let Some((i, len)) = found else { break };
        scrubbed.push_str(&rest[..i + len]);
        scrubbed.push_str("***");
        let tail = &rest[i + len..];
        let end = tail
            .find(|c: char| c == '&' || c == '"' || c.is_whitespace())
            .unwrap_or(tail.len());
        rest = &tail[end..];
    }
    scrubbed.push_str(rest);
    scrubbed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_the_logs() {
        assert_eq!(
            redacted("redis://user:s3cret@db:6379/0"),
            "redis://user:***@db:6379/0"
        );
        assert_eq!(redacted("rediss://:s3cret@db"), "rediss://:***@db");
        assert_eq!(redacted("redis://tok@db"), "redis://***@db");
        assert_eq!(redacted("unix:///run/redis.sock"), "unix:///run/redis.sock");
        assert_eq!(
            redacted("unix:///run/redis.sock?db=1&pass=s3cret&x=1"),
            "unix:///run/redis.sock?db=1&pass=***&x=1"
        );
        assert_eq!(
            redacted(
                "environment variable REDIS_URL=\"redis://:s3cret@db\": bad; also password=pw"
            ),
            "environment variable REDIS_URL=\"redis://:***@db\": bad; also password=***"
        );
    }
}
