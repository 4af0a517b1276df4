//! Loading the configuration: `supervisor.toml`, then the environment, then the command line,
//! each layer over the one before and all over the defaults of [`worker::config::Config`].
//!
//! This module owns the syntax of every layer, their precedence, the validation of every value
//! and the wording of every configuration error. It does not define the shape of the config
//! (that is `worker::config`, from which the set of known keys is derived) and it does not act
//! on the result: binding, forking and logging belong to the master.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::de::{DeTable, DeValue};
use toml::{Table, Value};
use worker::config::{default_workers, ByteSize, Config};
use worker::ratelimit::{MAX_RATE_PER_SECOND, MAX_REFILL};

/// Read when no `--config` is given, relative to the current directory.
const DEFAULT_PATH: &str = "supervisor.toml";

/// What the command line says, already split by clap.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `-b/--bind`, repeatable; non-empty replaces `server.bind`.
    pub bind: Vec<String>,
    /// `-w/--workers`, as typed: `auto` or a number.
    pub workers: Option<String>,
    /// `--log-level`, case-insensitive.
    pub log_level: Option<String>,
    /// `--set section.key=value`, repeatable, applied in order after the flags above.
    pub set: Vec<String>,
    /// `start -- COMMAND...`: `app.command`, applied last.
    pub app_command: Vec<String>,
}

/// The resolved configuration and the file it came from, if any.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub source: Option<PathBuf>,
}

/// Everything wrong with the configuration: one line per problem, each naming where the value
/// came from, the key, the value and what is allowed; in the order the layers are read, and in
/// file order within the file.
#[derive(Debug)]
pub struct ConfigError {
    problems: Vec<String>,
}

impl ConfigError {
    fn new(problem: String) -> Self {
        ConfigError {
            problems: vec![problem],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A bad value is quoted in its message: a Redis password in one must not be.
        f.write_str(&worker::cluster::redacted(&self.problems.join("\n")))
    }
}

impl std::error::Error for ConfigError {}

/// The environment variables kept from the seed, the key each one sets, and how its text becomes
/// a value for that key.
struct EnvVar {
    name: &'static str,
    key: &'static str,
    value: fn(&str) -> Result<Value, String>,
}

const ENV_VARS: &[EnvVar] = &[
    EnvVar {
        name: "PORT",
        key: "server.bind",
        value: |raw| match raw.parse::<u16>() {
            Ok(port) => Ok(Value::Array(vec![Value::String(format!("0.0.0.0:{port}"))])),
            Err(_) => Err("expected a port number 0..=65535".to_string()),
        },
    },
    // Heroku's and Render's name for the number of app processes; WORKERS, after it, wins.
    EnvVar {
        name: "WEB_CONCURRENCY",
        key: "server.workers",
        value: |raw| Ok(scalar(raw)),
    },
    EnvVar {
        name: "WORKERS",
        key: "server.workers",
        value: |raw| Ok(scalar(raw)),
    },
    // gunicorn's and uvicorn's name: the proxies whose X-Forwarded-* are believed, comma-separated
    // (or "*").
    EnvVar {
        name: "FORWARDED_ALLOW_IPS",
        key: "server.forwarded_allow_ips",
        value: |raw| {
            Ok(Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| Value::String(s.to_string()))
                    .collect(),
            ))
        },
    },
    EnvVar {
        name: "LOG_LEVEL",
        key: "log.level",
        value: |raw| Ok(Value::String(raw.to_ascii_lowercase())),
    },
    EnvVar {
        name: "MAX_CONCURRENT_REQUESTS",
        key: "limits.max_concurrent_requests",
        value: |raw| Ok(scalar(raw)),
    },
    EnvVar {
        name: "REDIS_URL",
        key: "redis.url",
        value: |raw| Ok(Value::String(raw.to_string())),
    },
    EnvVar {
        name: "MAX_ACTIVE_INSTANCES",
        key: "limits.max_active_instances",
        value: |raw| Ok(scalar(raw)),
    },
];

/// Checks that the types cannot express, and the words used to say what a key allows (also when
/// the type is wrong, because serde's "expected u32" means nothing to an operator).
struct Rule {
    key: &'static str,
    allowed: &'static str,
    /// `Err(detail)`, where an empty detail means "the value is outside `allowed`".
    check: fn(&Config) -> Result<(), String>,
}

const DURATION_GT_0: &str = "a duration > 0 and at most 3650d, like \"30s\", \"2m\" or \"1500ms\"";
const INTEGER_GE_1: &str = "an integer 1..=4294967295";
const LOG_LEVELS: &str = "\"error\", \"warn\", \"info\", \"debug\" or \"trace\" (or Python's and \
                          gunicorn's \"critical\", \"fatal\", \"warning\")";
const DATA_RATE: &str =
    "bytes per second up to 1PiB/s, like 240, \"240B/s\" or \"1KiB/s\" (0: no minimum)";

/// The longest duration any key takes: ten years is "never" in practice, and far enough from
/// the limits of `Instant` and of timers that no deadline computed from a key can overflow
/// (`u64::MAX` seconds made the master panic).
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 86_400);

/// The largest size any key takes (1 PiB), for the same reason.
pub const MAX_SIZE: ByteSize = ByteSize(1 << 50);

/// The most clients the per-client rate table holds (8 bytes each).
const MAX_ACTIVE_INSTANCES: u32 = 10_000_000;

const RULES: &[Rule] = &[
    Rule {
        key: "server.bind",
        allowed: "an address or a non-empty array of addresses, each IP:PORT, [V6]:PORT, \
                  HOST:PORT or unix:PATH",
        check: |c| check_bind(&c.server.bind),
    },
    Rule {
        key: "server.workers",
        allowed: "\"auto\" or an integer 1..=1024",
        check: |c| {
            c.server
                .workers
                .map_or(Ok(()), |n| within(n, 1..=MAX_WORKERS))
        },
    },
    Rule {
        key: "server.http_workers",
        allowed: "\"auto\" or an integer 1..=1024",
        check: |c| {
            c.server
                .http_workers
                .map_or(Ok(()), |n| within(n, 1..=MAX_WORKERS))
        },
    },
    Rule {
        key: "server.accept",
        allowed: "\"reuseport\" or \"shared\"",
        check: |_| Ok(()),
    },
    Rule {
        key: "server.backlog",
        allowed: "an integer 1..=65535",
        check: |c| within(c.server.backlog, 1..=65535),
    },
    Rule {
        key: "server.graceful_timeout",
        allowed: "a duration 0s..=3650d, like \"30s\", \"2m\" or \"0s\"",
        check: |c| within(c.server.graceful_timeout, Duration::ZERO..=MAX_DURATION),
    },
    Rule {
        key: "server.unix_mode",
        allowed: "an octal string up to \"777\", like \"660\"",
        // Read by its type (`UnixMode`).
        check: |_| Ok(()),
    },
    Rule {
        key: "server.forwarded_allow_ips",
        allowed: "an array of IP addresses, CIDR networks (like \"10.0.0.0/8\") or \"*\"",
        // Read by its type (`Trusted`).
        check: |_| Ok(()),
    },
    Rule {
        key: "server.runtime_dir",
        allowed: "an absolute directory path, or \"\" (automatic)",
        check: |c| {
            let d = &c.server.runtime_dir;
            if d.is_empty() || d.starts_with('/') {
                Ok(())
            } else {
                Err(String::new())
            }
        },
    },
    Rule {
        key: "server.user",
        allowed: "\"\" (workers run as the master), a user name or a numeric uid",
        check: |c| worker::privileges::check_user(&c.server.user),
    },
    Rule {
        key: "server.group",
        allowed: "\"\" (the user's primary group), a group name or a numeric gid",
        check: |c| worker::privileges::check_group(&c.server.group),
    },
    Rule {
        key: "server.pidfile",
        allowed: "a file path, or \"\" (no pidfile)",
        check: |c| {
            if c.server.pidfile.ends_with('/') {
                Err(String::new())
            } else {
                Ok(())
            }
        },
    },
    Rule {
        key: "server.control_socket",
        allowed: "an absolute path of at most 107 bytes, or \"\" (automatic)",
        check: |c| {
            let p = &c.server.control_socket;
            if p.is_empty() || (p.starts_with('/') && !p.ends_with('/') && p.len() <= 107) {
                Ok(())
            } else {
                Err(String::new())
            }
        },
    },
    Rule {
        key: "worker.max_connections",
        allowed: INTEGER_GE_1,
        check: |c| within(c.worker.max_connections, 1..=u32::MAX),
    },
    Rule {
        key: "worker.max_concurrent",
        allowed: INTEGER_GE_1,
        check: |c| within(c.worker.max_concurrent, 1..=u32::MAX),
    },
    Rule {
        key: "worker.header_timeout",
        allowed: DURATION_GT_0,
        check: |c| positive_duration(c.worker.header_timeout),
    },
    Rule {
        key: "worker.keepalive_timeout",
        allowed: DURATION_GT_0,
        check: |c| positive_duration(c.worker.keepalive_timeout),
    },
    Rule {
        key: "worker.request_timeout",
        allowed: DURATION_GT_0,
        check: |c| positive_duration(c.worker.request_timeout),
    },
    Rule {
        key: "worker.client_timeout",
        allowed: DURATION_GT_0,
        check: |c| positive_duration(c.worker.client_timeout),
    },
    Rule {
        key: "worker.min_request_rate",
        allowed: DATA_RATE,
        check: |c| {
            within(
                c.worker.min_request_rate.bytes_per_second(),
                0..=MAX_SIZE.bytes(),
            )
        },
    },
    Rule {
        key: "worker.min_response_rate",
        allowed: DATA_RATE,
        check: |c| {
            within(
                c.worker.min_response_rate.bytes_per_second(),
                0..=MAX_SIZE.bytes(),
            )
        },
    },
    Rule {
        key: "worker.min_rate_grace",
        // Zero would judge a body on its first wait, before any byte could come.
        allowed: "a duration 100ms..=1h, like \"5s\"",
        check: |c| {
            within(
                c.worker.min_rate_grace,
                Duration::from_millis(100)..=Duration::from_secs(3600),
            )
        },
    },
    Rule {
        key: "worker.max_header_bytes",
        // hyper refuses a read buffer under 8 KiB, and the head must fit in it.
        allowed: "a size 8KiB..=1MiB, like \"16KiB\"",
        check: |c| {
            within(
                c.worker.max_header_bytes,
                ByteSize(8 << 10)..=ByteSize(1 << 20),
            )
        },
    },
    Rule {
        key: "worker.max_headers",
        allowed: "an integer 1..=1000",
        check: |c| within(c.worker.max_headers, 1..=1000),
    },
    Rule {
        key: "worker.max_body_bytes",
        allowed: "a size up to 1PiB, like \"10MiB\" or 1048576",
        check: |c| within(c.worker.max_body_bytes, ByteSize(0)..=MAX_SIZE),
    },
    Rule {
        key: "worker.timeout",
        // Heartbeats come every second: anything shorter than two would kill healthy workers.
        allowed: "a duration 2s..=3650d, like \"2m\"",
        check: |c| within(c.worker.timeout, Duration::from_secs(2)..=MAX_DURATION),
    },
    Rule {
        key: "worker.max_requests",
        allowed: "an integer >= 0 (0: never)",
        check: |_| Ok(()),
    },
    Rule {
        key: "worker.max_requests_jitter",
        allowed: "an integer >= 0",
        check: |_| Ok(()),
    },
    Rule {
        key: "worker.max_requests_preboot",
        allowed: "true or false",
        check: |_| Ok(()),
    },
    Rule {
        key: "worker.max_rss",
        allowed: "a size up to 1PiB, like \"512MiB\" (0: no limit)",
        check: |c| within(c.worker.max_rss, ByteSize(0)..=MAX_SIZE),
    },
    Rule {
        key: "worker.rss_interval",
        allowed: "a duration 100ms..=1h, like \"1s\"",
        check: |c| {
            within(
                c.worker.rss_interval,
                Duration::from_millis(100)..=Duration::from_secs(3600),
            )
        },
    },
    Rule {
        key: "worker.rss_samples",
        allowed: "an integer 1..=1000",
        check: |c| within(c.worker.rss_samples, 1..=1000),
    },
    Rule {
        key: "worker.max_lifetime",
        allowed: "a duration 0s..=3650d, like \"6h\" (0s: never)",
        check: |c| within(c.worker.max_lifetime, Duration::ZERO..=MAX_DURATION),
    },
    Rule {
        key: "worker.max_lifetime_jitter",
        allowed: "a duration 0s..=3650d, like \"10m\"",
        check: |c| within(c.worker.max_lifetime_jitter, Duration::ZERO..=MAX_DURATION),
    },
    Rule {
        key: "worker.min_lifetime",
        allowed: "a duration 0s..=3650d, like \"10s\"",
        check: |c| within(c.worker.min_lifetime, Duration::ZERO..=MAX_DURATION),
    },
    Rule {
        key: "worker.max_recycling",
        allowed: "an integer 1..=1024",
        check: |c| within(c.worker.max_recycling, 1..=1024),
    },
    Rule {
        key: "app.command",
        allowed: "an array of strings: a program and its arguments, one of them containing \
                  {socket} or {port} (empty: no app process)",
        check: |c| worker::config::check_app_command(&c.app.command),
    },
    Rule {
        key: "app.upstream",
        allowed: "\"http://HOST:PORT\" or \"unix:/PATH\" (empty: none)",
        // Read by its type (`Upstream`).
        check: |_| Ok(()),
    },
    Rule {
        key: "app.ready_timeout",
        allowed: DURATION_GT_0,
        check: |c| positive_duration(c.app.ready_timeout),
    },
    Rule {
        key: "app.concurrency",
        allowed: "an integer >= 0 (0: only worker.max_concurrent applies)",
        check: |_| Ok(()),
    },
    Rule {
        key: "app.pack_window",
        allowed: "a duration 0s..=1s, like \"0s\" (off) or \"500us\"",
        check: |c| within(c.app.pack_window, Duration::ZERO..=Duration::from_secs(1)),
    },
    Rule {
        key: "app.buffer_requests",
        allowed: "true or false",
        check: |_| Ok(()),
    },
    Rule {
        key: "app.kill_on_timeout",
        allowed: "true or false",
        check: |_| Ok(()),
    },
    Rule {
        key: "app.upgrades",
        allowed: "an array of Upgrade protocol names (tokens, like \"websocket\"), not \"h2c\"",
        check: |c| {
            for p in &c.app.upgrades {
                let token = !p.is_empty()
                    && p.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
                if !token {
                    return Err(format!("{p:?} is not a protocol name"));
                }
                if p.eq_ignore_ascii_case("h2c") {
                    return Err("h2c upgrades are never forwarded".to_string());
                }
            }
            Ok(())
        },
    },
    Rule {
        key: "app.upgrade_idle_timeout",
        allowed: DURATION_GT_0,
        check: |c| positive_duration(c.app.upgrade_idle_timeout),
    },
    Rule {
        key: "limits.max_concurrent_requests",
        allowed: INTEGER_GE_1,
        check: |c| within(c.limits.max_concurrent_requests, 1..=u32::MAX),
    },
    Rule {
        key: "limits.max_active_instances",
        // 80 MB of table at most: the master sweeps it whole, and u32::MAX (32 GiB, touched
        // page by page) took the master and `status` minutes and the host's memory.
        allowed: "an integer 1..=10000000",
        check: |c| within(c.limits.max_active_instances, 1..=MAX_ACTIVE_INSTANCES),
    },
    Rule {
        key: "limits.health_paths",
        allowed: "an array of at most 64 paths, each starting with \"/\", without \"?\" or \
                  spaces, like [\"/healthz\"] ([] for none)",
        check: |c| {
            let paths = &c.limits.health_paths;
            let bad = |p: &String| {
                !p.starts_with('/') || p.contains(['?', '#']) || p.contains(char::is_whitespace)
            };
            if paths.len() > 64 || paths.iter().any(bad) {
                return Err(String::new());
            }
            Ok(())
        },
    },
    Rule {
        key: "limits.rate",
        allowed:
            "\"\" (no limit) or COUNT/UNIT with UNIT s, min or h, like \"100/s\" or \"600/min\", \
                  at most 100000/s",
        check: |c| check_rate(&c.limits),
    },
    Rule {
        key: "limits.burst",
        allowed: "an integer >= 0 (0: the rate's count), at most what refills within 31 days",
        check: |c| check_burst(&c.limits),
    },
    Rule {
        key: "limits.key",
        allowed: "\"ip\" or \"header:NAME\"",
        // Read by its type (`RateKey`).
        check: |_| Ok(()),
    },
    Rule {
        key: "limits.idle_ttl",
        allowed: "a duration > 0 and at most 31 days, like \"30m\"",
        check: |c| {
            positive(c.limits.idle_ttl)?;
            within(c.limits.idle_ttl, Duration::ZERO..=MAX_REFILL)
        },
    },
    Rule {
        key: "limits.queue",
        allowed: "an integer 0..=100000 (0: no queue)",
        check: |c| within(c.limits.queue, 0..=100_000),
    },
    Rule {
        key: "limits.queue_timeout",
        allowed: DURATION_GT_0,
        check: |c| positive_duration(c.limits.queue_timeout),
    },
    Rule {
        key: "limits.cluster_max_concurrent_requests",
        allowed: "an integer >= 0 (0: no cluster-wide cap)",
        check: |_| Ok(()),
    },
    Rule {
        key: "limits.on_redis_error",
        allowed: "\"local\", \"open\" or \"closed\"",
        check: |_| Ok(()),
    },
    Rule {
        key: "redis.url",
        allowed: "\"\" (no Redis) or a redis://, rediss:// or unix:// URL",
        check: |c| {
            if c.redis.url.is_empty() {
                Ok(())
            } else {
                worker::cluster::check_url(&c.redis.url)
                    .map_err(|e| format!("{}: {e}", worker::cluster::redacted(&c.redis.url)))
            }
        },
    },
    Rule {
        key: "redis.timeout",
        allowed: "a duration 1ms..=10s, like \"20ms\"",
        check: |c| {
            within(
                c.redis.timeout,
                Duration::from_millis(1)..=Duration::from_secs(10),
            )
        },
    },
    Rule {
        key: "redis.max_connections",
        allowed: "an integer >= 2",
        check: |c| within(c.redis.max_connections, 2..=u32::MAX),
    },
    Rule {
        key: "redis.prefix",
        allowed: "a non-empty string",
        check: |c| {
            if c.redis.prefix.is_empty() {
                Err(String::new())
            } else {
                Ok(())
            }
        },
    },
    Rule {
        key: "redis.lease_ttl",
        allowed: "a duration 1s..=3650d, like \"30s\"",
        check: |c| within(c.redis.lease_ttl, Duration::from_secs(1)..=MAX_DURATION),
    },
    Rule {
        key: "redis.tls_ca_file",
        allowed: "\"\" (the system's certificate authorities) or the path of a PEM file",
        check: |c| readable(&c.redis.tls_ca_file),
    },
    Rule {
        key: "redis.tls_cert_file",
        allowed: "\"\" or the path of a PEM certificate",
        check: |c| readable(&c.redis.tls_cert_file),
    },
    Rule {
        key: "redis.tls_key_file",
        allowed: "\"\" or the path of a PEM private key",
        check: |c| readable(&c.redis.tls_key_file),
    },
    Rule {
        key: "sentinel.master",
        allowed: "\"\" (no Sentinel) or the name the Sentinels know the master by",
        check: |_| Ok(()),
    },
    Rule {
        key: "sentinel.nodes",
        allowed: "an array of redis:// or rediss:// URLs of Sentinels",
        check: |c| {
            for node in &c.sentinel.nodes {
                worker::cluster::check_url(node)
                    .map_err(|e| format!("{}: {e}", worker::cluster::redacted(node)))?;
            }
            Ok(())
        },
    },
    Rule {
        key: "log.level",
        allowed: LOG_LEVELS,
        check: |_| Ok(()),
    },
    Rule {
        key: "app.cwd",
        allowed: "an existing directory, or \"\" (the master's working directory)",
        check: |c| match c.app.cwd.as_str() {
            "" => Ok(()),
            dir if Path::new(dir).is_dir() => Ok(()),
            _ => Err(String::new()),
        },
    },
    Rule {
        key: "log.app_level",
        allowed: LOG_LEVELS,
        check: |_| Ok(()),
    },
    Rule {
        key: "log.app_output",
        allowed: "\"events\" or \"raw\"",
        check: |_| Ok(()),
    },
    Rule {
        key: "log.format",
        allowed: "\"text\" or \"json\"",
        check: |_| Ok(()),
    },
    Rule {
        key: "log.file",
        allowed: "a file path, or \"\" for standard error",
        check: |_| Ok(()),
    },
    Rule {
        key: "log.access",
        allowed: "true or false",
        check: |_| Ok(()),
    },
    Rule {
        key: "log.access_file",
        allowed: "a file path, or \"\" for standard error",
        check: |_| Ok(()),
    },
    Rule {
        key: "metrics.bind",
        allowed: "\"\" (no metrics) or IP:PORT, like \"127.0.0.1:9100\"",
        check: |c| {
            let bind = &c.metrics.bind;
            if bind.is_empty() || bind.parse::<SocketAddr>().is_ok() {
                Ok(())
            } else {
                Err(String::new())
            }
        },
    },
];

/// `limits.rate`: a rate the table can count (one request per 10 µs at most).
fn check_rate(limits: &worker::config::LimitsConfig) -> Result<(), String> {
    let Some(rate) = limits.rate else {
        return Ok(());
    };
    if rate.interval() < Duration::from_nanos(1_000_000_000 / MAX_RATE_PER_SECOND) {
        return Err(format!("\"{rate}\" is faster than {MAX_RATE_PER_SECOND}/s"));
    }
    Ok(())
}

/// `limits.burst`: refills, at `limits.rate`, within the table's range. (A bad rate is the rate's
/// rule's to report.)
fn check_burst(limits: &worker::config::LimitsConfig) -> Result<(), String> {
    let Some(rate) = limits.rate else {
        return Ok(());
    };
    let burst = if limits.burst == 0 {
        rate.count
    } else {
        limits.burst
    };
    if rate.interval().saturating_mul(burst) > MAX_REFILL {
        return Err(format!(
            "a burst of {burst} at \"{rate}\" takes longer than {} days to refill",
            MAX_REFILL.as_secs() / 86_400
        ));
    }
    Ok(())
}

fn within<T: PartialOrd>(value: T, range: RangeInclusive<T>) -> Result<(), String> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(String::new())
    }
}

/// A file the server can read, or none (`""`).
fn readable(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Ok(());
    }
    std::fs::File::open(path)
        .map(|_| ())
        .map_err(|e| format!("cannot read {path}: {e}"))
}

fn positive(d: Duration) -> Result<(), String> {
    if d.is_zero() {
        Err(String::new())
    } else {
        Ok(())
    }
}

/// `> 0` and at most `MAX_DURATION`.
fn positive_duration(d: Duration) -> Result<(), String> {
    positive(d)?;
    within(d, Duration::ZERO..=MAX_DURATION)
}

fn check_bind(bind: &[String]) -> Result<(), String> {
    if bind.is_empty() {
        return Err("no address".to_string());
    }
    for address in bind {
        check_address(address).map_err(|why| format!("{address:?}: {why}"))?;
    }
    Ok(())
}

fn check_address(address: &str) -> Result<(), String> {
    if let Some(path) = address.strip_prefix("unix:") {
        // sockaddr_un holds 108 bytes including the terminating NUL.
        return match path.len() {
            0 => Err("no path after unix:".to_string()),
            n if n > 107 || path.contains('\0') => {
                Err("a Unix socket path must be at most 107 bytes, without NUL".to_string())
            }
            _ => Ok(()),
        };
    }
    if address.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err("no port".to_string());
    };
    if host.is_empty() {
        return Err("no host (0.0.0.0 means every IPv4 address, [::] every IPv6 one)".to_string());
    }
    if host.starts_with('[') {
        return Err("invalid IPv6 address".to_string());
    }
    if host.contains(':') {
        return Err("an IPv6 address needs brackets, like [::1]:8000".to_string());
    }
    let Ok(port) = port.parse::<u16>() else {
        return Err(format!("port {port:?} is not 0..=65535"));
    };
    match (host, port).to_socket_addrs().map(|mut addrs| addrs.next()) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(format!("host {host:?} has no address")),
        Err(e) => Err(format!("cannot resolve host {host:?}: {e}")),
    }
}

/// Every section and its keys, from the serialized defaults: a field added to `Config` is known
/// (and must be documented, see the tests) without touching this module. JSON rather than TOML
/// because TOML drops a `None`, which would hide an `Option` field.
fn known_keys() -> BTreeMap<String, BTreeSet<String>> {
    let defaults = serde_json::to_value(Config::default()).expect("Config serializes to JSON");
    let serde_json::Value::Object(sections) = defaults else {
        unreachable!("Config is a struct")
    };
    sections
        .into_iter()
        .map(|(section, keys)| {
            let keys = match keys {
                serde_json::Value::Object(keys) => keys.into_iter().map(|(k, _)| k).collect(),
                _ => BTreeSet::new(),
            };
            (section, keys)
        })
        .collect()
}

/// A value as typed in the environment or after `--set k=`: TOML if it is a TOML value
/// (`10`, `["a", "b"]`, `"x"`), else the text itself, so that `2s` or `127.0.0.1:0` need no quotes.
fn scalar(raw: &str) -> Value {
    raw.parse::<Value>()
        .unwrap_or_else(|_| Value::String(raw.to_string()))
}

/// Where a value came from, for the start of its error message.
enum Origin<'a> {
    File {
        name: &'a str,
        key_at: (usize, usize),
        value_at: (usize, usize),
    },
    Env {
        var: &'a str,
        raw: &'a str,
    },
    Set {
        arg: &'a str,
    },
    Flag {
        flag: &'a str,
        raw: &'a str,
    },
}

impl Origin<'_> {
    /// A problem that is not about a value of a known key.
    fn plain(&self, what: &str) -> String {
        match self {
            Origin::File {
                name,
                key_at: (line, col),
                ..
            } => format!("{name}:{line}:{col}: {what}"),
            Origin::Env { var, raw } => format!("environment variable {var}={raw:?}: {what}"),
            Origin::Set { arg } => format!("--set {arg}: {what}"),
            Origin::Flag { flag, raw } => format!("{flag} {raw}: {what}"),
        }
    }

    /// A bad value of a known key.
    fn bad_value(&self, key: &str, value: &Value, problem: &str) -> String {
        match self {
            Origin::File {
                name,
                value_at: (line, col),
                ..
            } => format!("{name}:{line}:{col}: {key} = {value}: {problem}"),
            Origin::Env { var, raw } => {
                format!("environment variable {var}={raw:?}: {key}: {problem}")
            }
            Origin::Set { arg } => format!("--set {arg}: {problem}"),
            Origin::Flag { flag, raw } => format!("{flag} {raw}: {key}: {problem}"),
        }
    }
}

/// The layers read so far: each key holds the value of the last layer that set it. Every value is
/// checked when it is set, against the defaults, because only then is its origin still known.
struct Layers {
    known: BTreeMap<String, BTreeSet<String>>,
    values: BTreeMap<String, Table>,
    problems: Vec<String>,
}

impl Layers {
    fn new() -> Self {
        Layers {
            known: known_keys(),
            values: BTreeMap::new(),
            problems: Vec::new(),
        }
    }

    /// Sets `section.key`, or says why not. `raw` is the text the value was parsed from, if it was
    /// guessed to be TOML: a string field given `660` then gets the string `"660"`.
    fn set(
        &mut self,
        section: &str,
        key: &str,
        value: Value,
        raw: Option<&str>,
        origin: &Origin,
    ) -> Result<(), String> {
        if !self
            .known
            .get(section)
            .is_some_and(|keys| keys.contains(key))
        {
            let hint = self.suggest_key(section, key);
            return Err(origin.plain(&format!("unknown key {section}.{key}{hint}")));
        }
        let value = match (check_value(section, key, &value), raw) {
            (Ok(()), _) => value,
            (Err(_), Some(raw))
                if !value.is_str()
                    && check_value(section, key, &Value::String(raw.to_string())).is_ok() =>
            {
                Value::String(raw.to_string())
            }
            (Err(problem), _) => {
                return Err(origin.bad_value(&format!("{section}.{key}"), &value, &problem))
            }
        };
        self.values
            .entry(section.to_string())
            .or_default()
            .insert(key.to_string(), value);
        Ok(())
    }

    /// A syntax error ends the reading; other problems are collected, in file order.
    fn file(&mut self, text: &str, name: &str) -> Result<(), ConfigError> {
        let syntax = |e: toml::de::Error| {
            let span = e.span().unwrap_or(0..0);
            let (line, col) = line_col(text, span.start);
            let mut message = e.message().trim_end().to_string();
            // The parser does not say which key; the span does.
            if message == "duplicate key" {
                if let Some(key) = text.get(span) {
                    message = format!("duplicate key {}", key.trim());
                }
            }
            ConfigError::new(format!("{name}:{line}:{col}: {message}"))
        };
        let doc = DeTable::parse(text).map_err(syntax)?;
        let values: Table = toml::from_str(text).map_err(syntax)?;
        let mut problems: Vec<(usize, String)> = Vec::new();
        for (section_key, section_value) in doc.get_ref() {
            let section = section_key.get_ref().as_ref();
            let at = section_key.span().start;
            let (line, col) = line_col(text, at);
            let here = format!("{name}:{line}:{col}");
            if !self.known.contains_key(section) {
                let problem = if section_value.get_ref().is_table() {
                    format!(
                        "{here}: unknown section [{section}]{}",
                        self.suggest_section(section)
                    )
                } else {
                    let hint = self.suggest_key("", section);
                    format!(
                        "{here}: unknown key {section}: keys go in a section, like [server]{hint}"
                    )
                };
                problems.push((at, problem));
                continue;
            }
            let (DeValue::Table(items), Some(Value::Table(item_values))) =
                (section_value.get_ref(), values.get(section))
            else {
                problems.push((
                    at,
                    format!("{here}: {section} must be a table, like [{section}]"),
                ));
                continue;
            };
            for (key, value) in items {
                let key_name = key.get_ref().as_ref();
                let origin = Origin::File {
                    name,
                    key_at: line_col(text, key.span().start),
                    value_at: line_col(text, value.span().start),
                };
                let v = item_values[key_name].clone();
                if let Err(problem) = self.set(section, key_name, v, None, &origin) {
                    problems.push((key.span().start, problem));
                }
            }
        }
        problems.sort();
        self.problems.extend(problems.into_iter().map(|(_, p)| p));
        Ok(())
    }

    fn environment(&mut self, env: &dyn Fn(&str) -> Option<String>) {
        for var in ENV_VARS {
            let Some(raw) = env(var.name) else { continue };
            let raw = raw.trim();
            if raw.is_empty() {
                continue;
            }
            let origin = Origin::Env { var: var.name, raw };
            let (section, key) = var.key.split_once('.').expect("ENV_VARS keys are dotted");
            let result = match (var.value)(raw) {
                Ok(value) => self.set(section, key, value, Some(raw), &origin),
                Err(problem) => Err(origin.plain(&problem)),
            };
            self.problems.extend(result.err());
        }
    }

    fn command_line(&mut self, overrides: &Overrides) {
        // Each -b is checked alone so that the error names the bad one.
        let bind_ok = overrides.bind.iter().all(|b| {
            let origin = Origin::Flag {
                flag: "--bind",
                raw: b,
            };
            let one = Value::Array(vec![Value::String(b.clone())]);
            match check_value("server", "bind", &one) {
                Ok(()) => true,
                Err(problem) => {
                    self.problems.push(origin.bad_value(
                        "server.bind",
                        &Value::String(b.clone()),
                        &problem,
                    ));
                    false
                }
            }
        });
        if bind_ok && !overrides.bind.is_empty() {
            let all = overrides.bind.iter().cloned().map(Value::String).collect();
            let origin = Origin::Flag {
                flag: "--bind",
                raw: &overrides.bind.join(","),
            };
            let result = self.set("server", "bind", Value::Array(all), None, &origin);
            self.problems.extend(result.err());
        }
        if let Some(raw) = &overrides.workers {
            let raw = raw.trim();
            let origin = Origin::Flag {
                flag: "--workers",
                raw,
            };
            let result = self.set("server", "workers", scalar(raw), Some(raw), &origin);
            self.problems.extend(result.err());
        }
        if let Some(raw) = &overrides.log_level {
            let origin = Origin::Flag {
                flag: "--log-level",
                raw,
            };
            let value = Value::String(raw.trim().to_ascii_lowercase());
            let result = self.set("log", "level", value, None, &origin);
            self.problems.extend(result.err());
        }
        for arg in &overrides.set {
            let origin = Origin::Set { arg };
            let result = match arg.split_once('=') {
                None => Err(origin.plain("expected section.key=value, found no '='")),
                Some((path, raw)) => match path.trim().split_once('.') {
                    None => {
                        let hint = self.suggest_key("", path.trim());
                        Err(origin.plain(&format!(
                            "expected section.key=value, found no '.' in {:?}{hint}",
                            path.trim()
                        )))
                    }
                    Some((section, key)) => {
                        let raw = raw.trim();
                        self.set(section.trim(), key.trim(), scalar(raw), Some(raw), &origin)
                    }
                },
            };
            self.problems.extend(result.err());
        }
        if !overrides.app_command.is_empty() {
            let raw = overrides.app_command.join(" ");
            let origin = Origin::Flag {
                flag: "--",
                raw: &raw,
            };
            let all = overrides
                .app_command
                .iter()
                .cloned()
                .map(Value::String)
                .collect();
            let result = self.set("app", "command", Value::Array(all), None, &origin);
            self.problems.extend(result.err());
        }
    }

    fn finish(self) -> Result<Config, ConfigError> {
        if !self.problems.is_empty() {
            return Err(ConfigError {
                problems: self.problems,
            });
        }
        let root: Table = self
            .values
            .into_iter()
            .map(|(section, keys)| (section, Value::Table(keys)))
            .collect();
        // Every value was accepted on its own above, so this only fails on a bug here.
        let config: Config = root.try_into().map_err(|e: toml::de::Error| {
            ConfigError::new(format!("invalid configuration: {e}"))
        })?;
        check_together(&config).map_err(ConfigError::new)?;
        Ok(config)
    }

    /// `"; did you mean s.k?"` or nothing. `section` may be unknown or empty.
    fn suggest_key(&self, section: &str, key: &str) -> String {
        // A known key in the wrong section is the likeliest mistake.
        let elsewhere = self
            .known
            .iter()
            .find(|(_, keys)| keys.contains(key))
            .map(|(s, _)| s.as_str());
        let fallback_section = self.closest(section, self.known.keys()).unwrap_or(section);
        let best = match elsewhere {
            Some(s) => Some((s, key)),
            None => self
                .known
                .get(section)
                .or_else(|| self.known.get(fallback_section))
                .and_then(|keys| self.closest(key, keys.iter()))
                .map(|k| (self.section_of(k), k)),
        };
        match best {
            Some((s, k)) => format!("; did you mean {s}.{k}?"),
            None => String::new(),
        }
    }

    fn suggest_section(&self, section: &str) -> String {
        match self.closest(section, self.known.keys()) {
            Some(s) => format!("; did you mean [{s}]?"),
            None => String::new(),
        }
    }

    fn section_of(&self, key: &str) -> &str {
        self.known
            .iter()
            .find(|(_, keys)| keys.contains(key))
            .map_or("", |(s, _)| s.as_str())
    }

    fn closest<'k>(
        &self,
        word: &str,
        candidates: impl Iterator<Item = &'k String>,
    ) -> Option<&'k str> {
        candidates
            .map(|c| (strsim::jaro_winkler(word, c), c))
            .filter(|(score, _)| *score >= 0.8)
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, c)| c.as_str())
    }
}

/// Checks that span keys, on the assembled configuration (each key alone was checked already).
fn check_together(config: &Config) -> Result<(), String> {
    if let (false, Some(upstream)) = (config.app.command.is_empty(), &config.app.upstream) {
        return Err(format!(
            "app.command ({}) and app.upstream ({:?}) are both set; keep one",
            config.app.command.join(" "),
            upstream.as_written()
        ));
    }
    worker::privileges::resolve(&config.server)?;
    let cap = config.limits.cluster_max_concurrent_requests;
    let redis = config.redis.enabled(&config.sentinel);
    if cap > 0 && !redis {
        return Err(format!(
            "limits.cluster_max_concurrent_requests = {cap} needs redis.url (or REDIS_URL) or \
             sentinel.master"
        ));
    }
    if !config.sentinel.nodes.is_empty() && !config.sentinel.enabled() {
        return Err(
            "sentinel.nodes is set but sentinel.master is not: name the master".to_string(),
        );
    }
    if redis {
        worker::cluster::check_target(&config.redis, &config.sentinel)?;
    } else if !(config.redis.tls_ca_file.is_empty()
        && config.redis.tls_cert_file.is_empty()
        && config.redis.tls_key_file.is_empty())
    {
        return Err(
            "redis.tls_* files are set but there is no Redis (redis.url or \
                    sentinel.master)"
                .to_string(),
        );
    }
    redis_budget_fits(
        config,
        config.server.workers.unwrap_or_else(default_workers),
    )
}

/// The most workers `server.workers`, `supervisor scale` and TTIN allow.
pub const MAX_WORKERS: u32 = 1024;

/// Whether this configuration allows `workers` workers: at most `MAX_WORKERS`, and, when
/// limits go through Redis, few enough that they and the master fit `redis.max_connections`
/// (one connection each). `Err` says why not.
pub fn workers_fit(config: &Config, workers: u32) -> Result<(), String> {
    if !(1..=MAX_WORKERS).contains(&workers) {
        return Err(format!("1..={MAX_WORKERS} workers allowed"));
    }
    redis_budget_fits(config, workers)
}

fn redis_budget_fits(config: &Config, workers: u32) -> Result<(), String> {
    // Only HTTP workers talk to Redis (app hosts do not).
    let workers = config.processes(workers).http;
    let uses_redis =
        config.limits.cluster_max_concurrent_requests > 0 || config.limits.rate.is_some();
    if uses_redis
        && config.redis.enabled(&config.sentinel)
        && workers + 1 > config.redis.max_connections
    {
        return Err(format!(
            "redis.max_connections = {} is fewer than the {workers} workers plus the master \
             need (one connection each)",
            config.redis.max_connections
        ));
    }
    Ok(())
}

/// Checks one value as if it were the only one set: its type by deserializing a config holding
/// just it, then its range. `Err` is the problem, without the origin.
fn check_value(section: &str, key: &str, value: &Value) -> Result<(), String> {
    let full = format!("{section}.{key}");
    let rule = RULES.iter().find(|r| r.key == full);
    let mut keys = Table::new();
    keys.insert(key.to_string(), value.clone());
    let mut root = Table::new();
    root.insert(section.to_string(), Value::Table(keys));
    let config: Config = root.try_into().map_err(|e: toml::de::Error| {
        let message = e.message();
        match rule {
            // serde's own wording names Rust types (`u32`, `untagged enum`); say what the key
            // allows instead. Messages written for the type (like ByteSize's) are kept.
            Some(rule)
                if [
                    "invalid type",
                    "invalid value",
                    "unknown variant",
                    "data did not match",
                ]
                .iter()
                .any(|generic| message.starts_with(generic)) =>
            {
                format!("expected {}", rule.allowed)
            }
            // A key read by its type (`UnixMode`, `Trusted`, `Rate`, ...) says what is wrong;
            // what is allowed follows, as for a rule's own check. Messages that already say
            // what they expect (ByteSize's) are kept.
            Some(rule) if !message.contains("expected") => {
                format!("{message}; expected {}", rule.allowed)
            }
            _ => message.to_string(),
        }
    })?;
    match rule {
        Some(rule) => (rule.check)(&config).map_err(|detail| {
            if detail.is_empty() {
                format!("expected {}", rule.allowed)
            } else {
                format!("{detail}; expected {}", rule.allowed)
            }
        }),
        None => Ok(()),
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Loads the configuration: `path` (or `./supervisor.toml` if it exists), then the environment
/// read through `env`, then `overrides`, over the defaults; then checks every value.
pub fn load(
    path: Option<&Path>,
    overrides: &Overrides,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded, ConfigError> {
    load_with_default(path, Path::new(DEFAULT_PATH), overrides, env)
}

fn load_with_default(
    path: Option<&Path>,
    default_path: &Path,
    overrides: &Overrides,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded, ConfigError> {
    let source = match path {
        Some(path) => Some(path.to_path_buf()),
        None => Some(default_path.to_path_buf()).filter(|p| p.exists()),
    };
    if let Some(path) = source
        .as_ref()
        .filter(|p| p.extension().is_some_and(|e| e == "py"))
    {
        return Err(ConfigError::new(format!(
            "{} is a Python file (a gunicorn configuration?); supervisor reads TOML. \
             `supervisor migrate -c {} main:app` (your app in place of main:app) writes the \
             equivalent supervisor.toml",
            path.display(),
            path.display()
        )));
    }
    let file = match &source {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(format!("cannot read config file {}: {e}", path.display()))
            })?;
            Some((text, path.display().to_string()))
        }
        None => None,
    };
    let file = file
        .as_ref()
        .map(|(text, name)| (text.as_str(), name.as_str()));
    let config = resolve(file, overrides, env)?;
    Ok(Loaded { config, source })
}

/// Checks a configuration file's text alone (no environment, no command line), as `supervisor
/// migrate` checks what it writes.
pub fn check_text(text: &str) -> Result<Config, ConfigError> {
    resolve(
        Some((text, "the configuration written")),
        &Overrides::default(),
        &|_| None,
    )
}

/// `file` is `(text, name for messages)`.
fn resolve(
    file: Option<(&str, &str)>,
    overrides: &Overrides,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let mut layers = Layers::new();
    if let Some((text, name)) = file {
        layers.file(text, name)?;
    }
    layers.environment(env);
    layers.command_line(overrides);
    layers.finish()
}

/// The resolved configuration as TOML, every key present, in declaration order; `workers` is the
/// number `"auto"` resolves to on this machine. Loading it back gives the same config.
pub fn to_toml(config: &Config) -> String {
    let mut resolved = config.clone();
    resolved.server.workers.get_or_insert_with(default_workers);
    toml::to_string(&resolved).expect("Config serializes to TOML")
}

#[cfg(test)]
mod tests {
    use super::*;
    use worker::config::{AcceptMode, LogFormat, LogLevel};

    const REFERENCE: &str = include_str!("../supervisor.toml");
    const MAN_PAGE: &str = include_str!("../man/supervisor.toml.5");

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn env_of<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    }

    fn file(text: &str) -> Result<Config, ConfigError> {
        resolve(
            Some((text, "supervisor.toml")),
            &Overrides::default(),
            &no_env,
        )
    }

    fn file_err(text: &str) -> String {
        file(text).unwrap_err().to_string()
    }

    fn set(args: &[&str]) -> Result<Config, ConfigError> {
        let overrides = Overrides {
            set: args.iter().map(|s| s.to_string()).collect(),
            ..Overrides::default()
        };
        resolve(None, &overrides, &no_env)
    }

    fn set_err(arg: &str) -> String {
        set(&[arg]).unwrap_err().to_string()
    }

    fn env(vars: &[(&'static str, &'static str)]) -> Result<Config, ConfigError> {
        resolve(None, &Overrides::default(), &env_of(vars))
    }

    /// (section, key) pairs of a TOML document, and each key's line number.
    fn keys_of(text: &str) -> BTreeMap<(String, String), usize> {
        let doc = DeTable::parse(text).unwrap();
        let mut keys = BTreeMap::new();
        for (section, items) in doc.get_ref() {
            for (key, _) in items.get_ref().as_table().unwrap() {
                let (line, _) = line_col(text, key.span().start);
                keys.insert(
                    (section.get_ref().to_string(), key.get_ref().to_string()),
                    line,
                );
            }
        }
        keys
    }

    fn known_pairs() -> BTreeSet<(String, String)> {
        known_keys()
            .into_iter()
            .flat_map(|(s, keys)| keys.into_iter().map(move |k| (s.clone(), k)))
            .collect()
    }

    #[test]
    fn known_keys_come_from_the_config_type() {
        let known = known_pairs();
        assert_eq!(known.len(), 75);
        for (section, key) in [
            ("server", "workers"),
            ("server", "unix_mode"),
            ("worker", "max_body_bytes"),
            ("limits", "max_active_instances"),
            ("log", "format"),
        ] {
            assert!(
                known.contains(&(section.into(), key.into())),
                "{section}.{key}"
            );
        }
    }

    #[test]
    fn every_known_key_has_a_rule_and_every_rule_a_key() {
        let known: BTreeSet<String> = known_pairs()
            .into_iter()
            .map(|(s, k)| format!("{s}.{k}"))
            .collect();
        let ruled: BTreeSet<String> = RULES.iter().map(|r| r.key.to_string()).collect();
        assert_eq!(known, ruled);
        for var in ENV_VARS {
            assert!(
                known.contains(var.key),
                "{} sets unknown {}",
                var.name,
                var.key
            );
        }
    }

    #[test]
    fn defaults_pass_every_rule() {
        for rule in RULES {
            assert_eq!((rule.check)(&Config::default()), Ok(()), "{}", rule.key);
        }
        assert_eq!(
            resolve(None, &Overrides::default(), &no_env).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn reference_file_is_exactly_the_defaults() {
        assert_eq!(file(REFERENCE).unwrap(), Config::default());
        assert!(REFERENCE.contains("workers = \"auto\""));
    }

    #[test]
    fn reference_file_documents_every_key_and_only_those() {
        let keys = keys_of(REFERENCE);
        let documented: BTreeSet<_> = keys.keys().cloned().collect();
        assert_eq!(documented, known_pairs());
        let lines: Vec<&str> = REFERENCE.lines().collect();
        for ((section, key), line) in &keys {
            let comment = lines[line - 2];
            assert!(
                comment.starts_with("# "),
                "{section}.{key} has no comment above"
            );
            let var = ENV_VARS
                .iter()
                .find(|v| v.key == format!("{section}.{key}"));
            if let Some(var) = var {
                assert!(
                    comment.contains(var.name),
                    "{section}.{key}: mention {}",
                    var.name
                );
            }
        }
    }

    #[test]
    fn man_page_documents_every_key_and_only_those() {
        // Keys are `.TP` items of the form `\fBkey\fR = default` under `.SS [section]`.
        let mut documented = BTreeSet::new();
        let mut section = None;
        let mut lines = MAN_PAGE.lines().peekable();
        while let Some(line) = lines.next() {
            if let Some(s) = line.strip_prefix(".SS [") {
                section = Some(s.trim_end_matches(']').to_string());
            } else if line.starts_with(".SH") {
                section = None;
            } else if let (".TP", Some(s)) = (line, &section) {
                let item = lines.next().unwrap();
                let key = item.strip_prefix("\\fB").and_then(|i| i.split_once("\\fR"));
                let (key, default) = key.unwrap_or_else(|| panic!("bad key item {item:?}"));
                documented.insert((s.clone(), key.to_string()));
                // The default shown must be the real one.
                let default = default.trim_start_matches(" = ");
                let one = format!("[{s}]\n{key} = {default}\n");
                assert_eq!(file(&one).unwrap(), Config::default(), "{s}.{key}");
            }
        }
        assert_eq!(documented, known_pairs());
        for var in ENV_VARS {
            assert!(
                MAN_PAGE.contains(&format!(".B {}\n", var.name)),
                "{}",
                var.name
            );
        }
    }

    #[test]
    fn command_man_page_lists_every_environment_variable() {
        let man = include_str!("../man/supervisor.1");
        for var in ENV_VARS {
            assert!(
                man.contains(&format!(".B {}\n", var.name)),
                "man/supervisor.1 ENVIRONMENT lacks {}",
                var.name
            );
        }
    }

    #[test]
    fn precedence_is_command_line_then_environment_then_file_then_defaults() {
        let text = "[server]\nworkers = 3\nbind = \"127.0.0.1:1\"\n[log]\nlevel = \"warn\"\n";
        let vars = [("WORKERS", "5"), ("PORT", "2"), ("LOG_LEVEL", "DEBUG")];
        let cli = Overrides {
            bind: vec!["127.0.0.1:3".into(), "[::1]:3".into()],
            workers: Some("7".into()),
            log_level: Some("Trace".into()),
            set: vec![],
            app_command: vec![],
        };
        let c = resolve(Some((text, "f")), &cli, &env_of(&vars)).unwrap();
        assert_eq!(c.server.workers, Some(7));
        assert_eq!(c.server.bind, ["127.0.0.1:3", "[::1]:3"]);
        assert_eq!(c.log.level, LogLevel::Trace);

        let c = resolve(Some((text, "f")), &Overrides::default(), &env_of(&vars)).unwrap();
        assert_eq!(c.server.workers, Some(5));
        assert_eq!(c.server.bind, ["0.0.0.0:2"]);
        assert_eq!(c.log.level, LogLevel::Debug);

        let c = resolve(Some((text, "f")), &Overrides::default(), &no_env).unwrap();
        assert_eq!(c.server.workers, Some(3));
        assert_eq!(c.server.bind, ["127.0.0.1:1"]);
        assert_eq!(c.log.level, LogLevel::Warn);
        // Keys the file does not set keep their defaults.
        assert_eq!(c.worker, Config::default().worker);
    }

    #[test]
    fn set_applies_after_the_flags_and_in_order() {
        let cli = Overrides {
            workers: Some("7".into()),
            set: vec!["server.workers=8".into(), "server.workers=9".into()],
            ..Overrides::default()
        };
        let c = resolve(None, &cli, &no_env).unwrap();
        assert_eq!(c.server.workers, Some(9));
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("supervisor-config-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn file_path_explicit_default_or_none() {
        let dir = temp_dir("paths");
        let present = dir.join("supervisor.toml");
        std::fs::write(&present, "[server]\nworkers = 2\n").unwrap();
        let absent = dir.join("absent.toml");
        let none = Overrides::default();

        let l = load_with_default(None, &absent, &none, &no_env).unwrap();
        assert_eq!(l.source, None);
        assert_eq!(l.config, Config::default());

        let l = load_with_default(None, &present, &none, &no_env).unwrap();
        assert_eq!(l.source.as_deref(), Some(present.as_path()));
        assert_eq!(l.config.server.workers, Some(2));

        let l = load(Some(&present), &none, &no_env).unwrap();
        assert_eq!(l.source.as_deref(), Some(present.as_path()));
        assert_eq!(l.config.server.workers, Some(2));

        let e = load(Some(&absent), &none, &no_env).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("cannot read config file {}: ", absent.display())),
            "{e}"
        );

        std::fs::write(&present, "[server]\nworkers = 0\n").unwrap();
        let e = load(Some(&present), &none, &no_env)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("{}:2:11: server.workers = 0", present.display())),
            "{e}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn environment_sets_its_keys() {
        let c = env(&[
            ("PORT", "9000"),
            ("WORKERS", "auto"),
            ("LOG_LEVEL", "INFO"),
            ("MAX_CONCURRENT_REQUESTS", "7"),
            ("MAX_ACTIVE_INSTANCES", "8"),
        ])
        .unwrap();
        assert_eq!(c.server.bind, ["0.0.0.0:9000"]);
        assert_eq!(c.server.workers, None);
        assert_eq!(c.log.level, LogLevel::Info);
        assert_eq!(c.limits.max_concurrent_requests, 7);
        assert_eq!(c.limits.max_active_instances, 8);
        assert_eq!(env(&[("WORKERS", "12")]).unwrap().server.workers, Some(12));
        // Heroku's and Render's name, unless WORKERS says otherwise.
        assert_eq!(
            env(&[("WEB_CONCURRENCY", "4")]).unwrap().server.workers,
            Some(4)
        );
        assert_eq!(
            env(&[("WEB_CONCURRENCY", "4"), ("WORKERS", "6")])
                .unwrap()
                .server
                .workers,
            Some(6)
        );
        assert_eq!(
            env(&[("LOG_LEVEL", "Warn")]).unwrap().log.level,
            LogLevel::Warn
        );
        // gunicorn's and uvicorn's variable, comma-separated.
        let trusted = |v| {
            env(&[("FORWARDED_ALLOW_IPS", v)])
                .unwrap()
                .server
                .forwarded_allow_ips
        };
        assert_eq!(
            trusted("10.0.0.0/8, 192.168.1.1").to_list(),
            ["10.0.0.0/8", "192.168.1.1"]
        );
        assert_eq!(trusted("*").to_list(), ["*"]);
        // The names Python's logging and gunicorn use, as a PaaS or a Procfile sets them.
        for (name, level) in [
            ("warning", LogLevel::Warn),
            ("WARNING", LogLevel::Warn),
            ("critical", LogLevel::Error),
            ("CRITICAL", LogLevel::Error),
            ("fatal", LogLevel::Error),
        ] {
            assert_eq!(env(&[("LOG_LEVEL", name)]).unwrap().log.level, level);
        }
    }

    #[test]
    fn empty_environment_variables_are_unset() {
        let vars = [("PORT", ""), ("WORKERS", " "), ("LOG_LEVEL", "")];
        assert_eq!(env(&vars).unwrap(), Config::default());
    }

    #[test]
    fn bad_environment_values_name_the_variable_the_value_and_what_is_allowed() {
        let err = |name, value| env(&[(name, value)]).unwrap_err().to_string();
        assert_eq!(
            err("WORKERS", "abc"),
            "environment variable WORKERS=\"abc\": server.workers: \
             expected \"auto\" or an integer 1..=1024"
        );
        assert_eq!(
            err("PORT", "http"),
            "environment variable PORT=\"http\": expected a port number 0..=65535"
        );
        assert_eq!(
            err("PORT", "70000"),
            "environment variable PORT=\"70000\": expected a port number 0..=65535"
        );
        assert_eq!(
            err("LOG_LEVEL", "loud"),
            "environment variable LOG_LEVEL=\"loud\": log.level: \
             expected \"error\", \"warn\", \"info\", \"debug\" or \"trace\" \
             (or Python's and gunicorn's \"critical\", \"fatal\", \"warning\")"
        );
        assert_eq!(
            err("MAX_CONCURRENT_REQUESTS", "0"),
            "environment variable MAX_CONCURRENT_REQUESTS=\"0\": \
             limits.max_concurrent_requests: expected an integer 1..=4294967295"
        );
        assert_eq!(
            err("MAX_ACTIVE_INSTANCES", "-3"),
            "environment variable MAX_ACTIVE_INSTANCES=\"-3\": \
             limits.max_active_instances: expected an integer 1..=10000000"
        );
    }

    #[test]
    fn set_parses_toml_values_and_falls_back_to_text() {
        let c = set(&[
            r#"server.bind=["127.0.0.1:0","[::1]:0"]"#,
            "worker.max_connections=10",
            "worker.header_timeout=2s",
            "worker.max_body_bytes=1MiB",
            "server.unix_mode=600",
            "server.accept=shared",
            "log.format=\"json\"",
        ])
        .unwrap();
        assert_eq!(c.server.bind, ["127.0.0.1:0", "[::1]:0"]);
        assert_eq!(c.worker.max_connections, 10);
        assert_eq!(c.worker.header_timeout, Duration::from_secs(2));
        assert_eq!(c.worker.max_body_bytes, ByteSize(1 << 20));
        assert_eq!(c.server.unix_mode, worker::config::UnixMode(0o600));
        assert_eq!(c.server.accept, AcceptMode::Shared);
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(
            set(&["server.bind=127.0.0.1:0"]).unwrap().server.bind,
            ["127.0.0.1:0"]
        );
        assert_eq!(set(&["server.workers=auto"]).unwrap().server.workers, None);
        assert_eq!(
            set(&[" worker.max_headers = 5 "])
                .unwrap()
                .worker
                .max_headers,
            5
        );
    }

    #[test]
    fn set_errors_say_what_is_wrong() {
        assert_eq!(
            set_err("worker.max_connections=x"),
            "--set worker.max_connections=x: expected an integer 1..=4294967295"
        );
        assert_eq!(
            set_err("server.wokers=4"),
            "--set server.wokers=4: unknown key server.wokers; did you mean server.workers?"
        );
        assert_eq!(
            set_err("server.max_headers=4"),
            "--set server.max_headers=4: unknown key server.max_headers; \
             did you mean worker.max_headers?"
        );
        assert_eq!(
            set_err("sever.workers=4"),
            "--set sever.workers=4: unknown key sever.workers; did you mean server.workers?"
        );
        assert_eq!(
            set_err("nothing.like_this=4"),
            "--set nothing.like_this=4: unknown key nothing.like_this"
        );
        assert_eq!(
            set_err("worker.max_connections"),
            "--set worker.max_connections: expected section.key=value, found no '='"
        );
        assert_eq!(
            set_err("workers=4"),
            "--set workers=4: expected section.key=value, found no '.' in \"workers\"; \
             did you mean server.workers?"
        );
    }

    #[test]
    fn all_problems_are_reported_together() {
        let cli = Overrides {
            workers: Some("0".into()),
            set: vec!["log.level=loud".into()],
            ..Overrides::default()
        };
        let text = "[worker]\nmax_headers = 0\nmax_connections = 0\n";
        let e = resolve(Some((text, "f")), &cli, &env_of(&[("PORT", "x")])).unwrap_err();
        let lines: Vec<String> = e.to_string().lines().map(String::from).collect();
        assert_eq!(lines.len(), 5, "{e}");
        assert!(
            lines[0].starts_with("f:2:15: worker.max_headers = 0"),
            "{e}"
        );
        assert!(
            lines[1].starts_with("f:3:19: worker.max_connections = 0"),
            "{e}"
        );
        assert!(
            lines[2].starts_with("environment variable PORT=\"x\""),
            "{e}"
        );
        assert!(lines[3].starts_with("--workers 0: server.workers"), "{e}");
        assert!(lines[4].starts_with("--set log.level=loud"), "{e}");
    }

    #[test]
    fn file_errors_carry_the_position_key_value_and_what_is_allowed() {
        let text = "[server]\nworkers = 2\n\n[worker]\nmax_body_bytes = \"lots\"\n";
        assert_eq!(
            file_err(text),
            "supervisor.toml:5:18: worker.max_body_bytes = \"lots\": invalid size \"lots\": \
             expected bytes as an integer or a number with a unit (B, KiB, MiB, GiB, KB, MB, GB), \
             like \"512MiB\""
        );
        assert_eq!(
            file_err("[server]\nwokers = 4\n"),
            "supervisor.toml:2:1: unknown key server.wokers; did you mean server.workers?"
        );
        assert_eq!(
            file_err("[sever]\nworkers = 4\n"),
            "supervisor.toml:1:2: unknown section [sever]; did you mean [server]?"
        );
        assert_eq!(
            file_err("workers = 4\n"),
            "supervisor.toml:1:1: unknown key workers: keys go in a section, like [server]; \
             did you mean server.workers?"
        );
        assert_eq!(
            file_err("server = 4\n"),
            "supervisor.toml:1:1: server must be a table, like [server]"
        );
        assert_eq!(
            file_err("[server.tls]\ncert = \"x\"\n"),
            "supervisor.toml:1:9: unknown key server.tls"
        );
        assert_eq!(
            file_err("[log]\n  level = \"loud\"\n"),
            "supervisor.toml:2:11: log.level = \"loud\": \
             expected \"error\", \"warn\", \"info\", \"debug\" or \"trace\" \
             (or Python's and gunicorn's \"critical\", \"fatal\", \"warning\")"
        );
        assert_eq!(
            file_err("[server]\n# é\nbind = 8000 # é\n"),
            "supervisor.toml:3:8: server.bind = 8000: expected an address or a non-empty array \
             of addresses, each IP:PORT, [V6]:PORT, HOST:PORT or unix:PATH"
        );
    }

    #[test]
    fn toml_syntax_errors_keep_their_position() {
        assert_eq!(
            file_err("[server\n"),
            "supervisor.toml:1:8: unclosed table, expected `]`"
        );
        assert_eq!(
            file_err("[server]\nbind = 'a:1'\nbind = 'b:1'\n"),
            "supervisor.toml:3:1: duplicate key bind"
        );
        let e = file_err("[worker]\nmax_headers = = 3\n");
        assert!(e.starts_with("supervisor.toml:2:"), "{e}");
    }

    #[test]
    fn dotted_and_inline_tables_are_read_like_sections() {
        let c = file("server.workers = 4\nworker = { max_headers = 9 }\n").unwrap();
        assert_eq!(c.server.workers, Some(4));
        assert_eq!(c.worker.max_headers, 9);
        assert_eq!(
            file_err("worker = { max_headers = 0 }\n"),
            "supervisor.toml:1:26: worker.max_headers = 0: expected an integer 1..=1000"
        );
    }

    #[test]
    fn bind_accepts_every_address_form() {
        for bind in [
            "\"127.0.0.1:0\"",
            "[\"0.0.0.0:8000\", \"[::1]:0\"]",
            "\"[::]:80\"",
            "\"localhost:0\"",
            "\"unix:/run/app.sock\"",
            "\"unix:relative.sock\"",
        ] {
            let c = file(&format!("[server]\nbind = {bind}\n"));
            assert!(c.is_ok(), "{bind}: {}", c.unwrap_err());
        }
        let c = file("[server]\nbind = \"127.0.0.1:0\"\n").unwrap();
        assert_eq!(c.server.bind, ["127.0.0.1:0"]);
    }

    #[test]
    fn bind_rejects_bad_addresses_and_says_why() {
        let why = |bind: &str| {
            let e = file_err(&format!("[server]\nbind = {bind}\n"));
            let (_, why) = e.split_once(": ").unwrap();
            why.split_once("; expected")
                .map_or(why.to_string(), |(w, _)| w.to_string())
        };
        assert_eq!(why("[]"), "server.bind = []: no address");
        assert_eq!(
            why("\"1.2.3.4\""),
            "server.bind = \"1.2.3.4\": \"1.2.3.4\": no port"
        );
        assert_eq!(
            why("\"::1:80\""),
            "server.bind = \"::1:80\": \"::1:80\": an IPv6 address needs brackets, like [::1]:8000"
        );
        assert_eq!(
            why("\"[::g]:80\""),
            "server.bind = \"[::g]:80\": \"[::g]:80\": invalid IPv6 address"
        );
        assert_eq!(
            why("\"host:99999\""),
            "server.bind = \"host:99999\": \"host:99999\": port \"99999\" is not 0..=65535"
        );
        assert_eq!(
            why("\"unix:\""),
            "server.bind = \"unix:\": \"unix:\": no path after unix:"
        );
        let long = format!("\"unix:/{}\"", "x".repeat(107));
        assert!(why(&long).ends_with("at most 107 bytes, without NUL"));
        assert!(why("\":80\"").contains("no host"));
        let e = why("[\"127.0.0.1:0\", \"no-such-host.invalid:80\"]");
        assert!(
            e.contains("cannot resolve host \"no-such-host.invalid\""),
            "{e}"
        );
        assert!(file_err("[server]\nbind = \"x\"\n").ends_with(
            "expected an address or a non-empty array of addresses, each IP:PORT, [V6]:PORT, \
             HOST:PORT or unix:PATH"
        ));
    }

    #[test]
    fn bad_bind_flag_names_the_bad_entry() {
        let cli = Overrides {
            bind: vec!["127.0.0.1:0".into(), "nowhere".into()],
            ..Overrides::default()
        };
        let e = resolve(None, &cli, &no_env).unwrap_err().to_string();
        assert!(
            e.starts_with("--bind nowhere: server.bind: \"nowhere\": no port; expected "),
            "{e}"
        );
    }

    #[test]
    fn workers_is_auto_or_1_to_1024() {
        let w = |v: &str| set(&[&format!("server.workers={v}")]).map(|c| c.server.workers);
        assert_eq!(w("auto").unwrap(), None);
        assert_eq!(w("\"auto\"").unwrap(), None);
        assert_eq!(w("1").unwrap(), Some(1));
        assert_eq!(w("1024").unwrap(), Some(1024));
        for bad in ["0", "1025", "-1", "many", "2.5", "99999999999"] {
            let e = w(bad).unwrap_err().to_string();
            assert!(
                e.ends_with(": expected \"auto\" or an integer 1..=1024"),
                "{bad}: {e}"
            );
        }
        let cli = |w: &str| Overrides {
            workers: Some(w.into()),
            ..Overrides::default()
        };
        assert_eq!(
            resolve(None, &cli("auto"), &no_env).unwrap().server.workers,
            None
        );
        assert_eq!(
            resolve(None, &cli("3"), &no_env).unwrap().server.workers,
            Some(3)
        );
        assert_eq!(
            resolve(None, &cli("0"), &no_env).unwrap_err().to_string(),
            "--workers 0: server.workers: expected \"auto\" or an integer 1..=1024"
        );
        assert_eq!(
            file("[server]\nworkers = \"auto\"\n")
                .unwrap()
                .server
                .workers,
            None
        );
    }

    #[test]
    fn log_level_flag_is_case_insensitive() {
        let cli = Overrides {
            log_level: Some("DEBUG".into()),
            ..Overrides::default()
        };
        assert_eq!(
            resolve(None, &cli, &no_env).unwrap().log.level,
            LogLevel::Debug
        );
    }

    #[test]
    fn durations_and_sizes_parse() {
        let c = set(&[
            "worker.request_timeout=1500ms",
            "worker.keepalive_timeout=2m",
            "server.graceful_timeout=0s",
            "worker.max_header_bytes=8KiB",
            "worker.max_body_bytes=0",
        ])
        .unwrap();
        assert_eq!(c.worker.request_timeout, Duration::from_millis(1500));
        assert_eq!(c.worker.keepalive_timeout, Duration::from_secs(120));
        assert_eq!(c.server.graceful_timeout, Duration::ZERO);
        assert_eq!(c.worker.max_header_bytes, ByteSize(8192));
        assert_eq!(c.worker.max_body_bytes, ByteSize(0));
        let c = file("[worker]\nmax_header_bytes = 20000\n").unwrap();
        assert_eq!(c.worker.max_header_bytes, ByteSize(20000));
    }

    /// Each range rule, just outside and just inside its bounds.
    /// Each key, values refused, values accepted at the edges, and what the error says is
    /// expected.
    const RANGES: &[(&str, &[&str], &[&str], &str)] = &[
        (
            "server.workers",
            &["0", "1025"],
            &["1", "1024"],
            "\"auto\" or an integer 1..=1024",
        ),
        (
            "server.backlog",
            &["0", "65536"],
            &["1", "65535"],
            "an integer 1..=65535",
        ),
        (
            "server.unix_mode",
            &["\"800\"", "\"1777\"", "\"abc\"", "\"\"", "600"],
            &["\"0\"", "\"777\"", "\"0600\""],
            "an octal string up to \"777\", like \"660\"",
        ),
        (
            "server.accept",
            &["\"both\""],
            &["\"shared\""],
            "\"reuseport\" or \"shared\"",
        ),
        (
            "server.graceful_timeout",
            &["\"soon\"", "30", "\"3651d\"", "\"18446744073709551615s\""],
            &["\"0s\"", "\"3650d\""],
            "a duration 0s..=3650d, like \"30s\", \"2m\" or \"0s\"",
        ),
        (
            "worker.max_lifetime",
            &["\"18446744073709551615s\"", "\"3650d 1s\""],
            &["\"0s\"", "\"3650d\""],
            "a duration 0s..=3650d, like \"6h\" (0s: never)",
        ),
        (
            "worker.max_lifetime_jitter",
            &["\"3651d\""],
            &["\"3650d\""],
            "a duration 0s..=3650d, like \"10m\"",
        ),
        (
            "worker.min_lifetime",
            &["\"3651d\""],
            &["\"3650d\""],
            "a duration 0s..=3650d, like \"10s\"",
        ),
        (
            "worker.timeout",
            &["\"1s\"", "\"3651d\""],
            &["\"2s\"", "\"3650d\""],
            "a duration 2s..=3650d, like \"2m\"",
        ),
        (
            "redis.lease_ttl",
            &["\"999ms\"", "\"3651d\""],
            &["\"1s\"", "\"3650d\""],
            "a duration 1s..=3650d, like \"30s\"",
        ),
        (
            "app.ready_timeout",
            &["\"0s\"", "\"3651d\""],
            &["\"1ns\"", "\"3650d\""],
            DURATION_GT_0,
        ),
        (
            "worker.max_rss",
            &["\"1025TiB\"", "1125899906842625"],
            &["0", "\"1PiB\""],
            "a size up to 1PiB, like \"512MiB\" (0: no limit)",
        ),
        ("worker.max_connections", &["0"], &["1"], INTEGER_GE_1),
        ("worker.max_concurrent", &["0"], &["1"], INTEGER_GE_1),
        (
            "worker.header_timeout",
            &["\"0s\"", "5"],
            &["\"1ms\""],
            DURATION_GT_0,
        ),
        (
            "worker.client_timeout",
            &["\"0s\""],
            &["\"1ms\""],
            DURATION_GT_0,
        ),
        (
            "app.upgrade_idle_timeout",
            &["\"0s\""],
            &["\"1ms\""],
            DURATION_GT_0,
        ),
        (
            "app.upgrades",
            &[
                "[\"h2c\"]",
                "[\"websocket\", \"H2C\"]",
                "[\"\"]",
                "[\"web socket\"]",
            ],
            &["[]", "[\"websocket\", \"TLS\"]"],
            "an array of Upgrade protocol names (tokens, like \"websocket\"), not \"h2c\"",
        ),
        (
            "worker.min_request_rate",
            &["-1"],
            &["0", "\"240B/s\"", "\"1KiB/s\"", "100"],
            DATA_RATE,
        ),
        (
            "worker.min_rate_grace",
            &["\"0s\"", "\"2h\""],
            &["\"100ms\"", "\"1h\""],
            "a duration 100ms..=1h, like \"5s\"",
        ),
        (
            "worker.keepalive_timeout",
            &["\"0s\""],
            &["\"1ms\""],
            DURATION_GT_0,
        ),
        (
            "worker.request_timeout",
            &["\"0ms\"", "\"3651d\""],
            &["\"1ms\""],
            DURATION_GT_0,
        ),
        (
            "worker.max_header_bytes",
            &["8191", "\"1025KiB\""],
            &["8192", "\"1MiB\""],
            "a size 8KiB..=1MiB, like \"16KiB\"",
        ),
        (
            "worker.max_headers",
            &["0", "1001"],
            &["1", "1000"],
            "an integer 1..=1000",
        ),
        (
            "worker.max_body_bytes",
            &["-1", "true", "1125899906842625"],
            &["0", "1125899906842624"],
            "a size up to 1PiB, like \"10MiB\" or 1048576",
        ),
        (
            "limits.max_concurrent_requests",
            &["0"],
            &["1"],
            INTEGER_GE_1,
        ),
        (
            "limits.max_active_instances",
            &["0", "10000001"],
            &["1", "10000000"],
            "an integer 1..=10000000",
        ),
        (
            "limits.rate",
            &["\"10\"", "\"0/s\"", "\"5/fortnight\"", "\"200000/s\"", "5"],
            &["\"\"", "\"100000/s\"", "\"600/min\"", "\"1/h\""],
            "\"\" (no limit) or COUNT/UNIT with UNIT s, min or h, like \"100/s\" or \"600/min\", \
             at most 100000/s",
        ),
        (
            "limits.key",
            &["\"cookie\"", "\"header:bad name\""],
            &["\"ip\"", "\"header:X-Api-Key\""],
            "\"ip\" or \"header:NAME\"",
        ),
        (
            "limits.idle_ttl",
            &["\"0s\"", "\"32days\""],
            &["\"1s\"", "\"30days\""],
            "a duration > 0 and at most 31 days, like \"30m\"",
        ),
        (
            "limits.queue",
            &["-1", "100001"],
            &["0", "100000"],
            "an integer 0..=100000 (0: no queue)",
        ),
        (
            "limits.queue_timeout",
            &["\"0s\""],
            &["\"1ms\""],
            DURATION_GT_0,
        ),
        (
            "log.format",
            &["\"xml\""],
            &["\"json\""],
            "\"text\" or \"json\"",
        ),
    ];

    #[test]
    fn values_out_of_range_are_rejected() {
        let cases = RANGES;
        for (key, bad, good, allowed) in cases {
            let (section, name) = key.split_once('.').unwrap();
            for value in *bad {
                let text = format!("[{section}]\n{name} = {value}\n");
                let e = file_err(&text);
                let want = format!("supervisor.toml:2:{}: {key} = ", name.len() + 4);
                assert!(e.starts_with(&want), "{key} = {value}: {e}");
                if !e.contains("invalid size") {
                    // ": expected ..." or, with a detail, "DETAIL; expected ...".
                    assert!(
                        e.ends_with(&format!("expected {allowed}")),
                        "{key} = {value}: {e}"
                    );
                }
            }
            for value in *good {
                let text = format!("[{section}]\n{name} = {value}\n");
                assert!(file(&text).is_ok(), "{key} = {value}: {}", file_err(&text));
            }
        }
    }

    #[test]
    fn to_toml_prints_every_key_resolved_and_loads_back() {
        let mut config = Config::default();
        config.worker.request_timeout = Duration::from_millis(1500);
        let text = to_toml(&config);
        assert_eq!(
            keys_of(&text).into_keys().collect::<BTreeSet<_>>(),
            known_pairs()
        );
        assert!(
            text.contains(&format!("\nworkers = {}\n", default_workers())),
            "{text}"
        );
        assert!(text.contains("\nmax_header_bytes = \"16KiB\"\n"), "{text}");
        assert!(text.contains("\nheader_timeout = \"10s\"\n"), "{text}");
        let order: Vec<usize> = ["[server]", "[worker]", "[limits]", "[log]"]
            .iter()
            .map(|s| text.find(s).unwrap())
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
        let back = file(&text).unwrap();
        config.server.workers = Some(default_workers());
        assert_eq!(back, config);
    }
}
