//! The resolved configuration, shared by the master (which loads and validates it) and the
//! workers (which receive it serialized). This module only defines the shape and the defaults;
//! reading files, environment and command line lives in the binary's `config_loader` module.
//!
//! A key written as text that has a meaning beyond its text (`server.unix_mode`,
//! `server.forwarded_allow_ips`, `limits.rate`, `limits.key`, `app.upstream`, the sizes and
//! durations) is held as its own type, parsed when the configuration is read: a bad value is
//! refused there with what is wrong, and the master and the workers use the parsed value,
//! never the text. Each type writes itself back the way it parses, so the serialized form
//! (`supervisor check`, what a worker is handed) reads like the file.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The whole configuration. Every field has a default, so an empty file is a valid config.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub worker: WorkerConfig,
    pub limits: LimitsConfig,
    pub app: AppConfig,
    pub redis: RedisConfig,
    pub sentinel: SentinelConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
}

/// `[metrics]`: the Prometheus exposition the master serves.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `IP:PORT` to serve `/metrics` on; empty: no metrics.
    pub bind: String,
}

/// `[redis]`: the Redis that hosts share for cluster-wide limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://`, `rediss://` or `unix://`; empty: no Redis (env `REDIS_URL`).
    pub url: String,
    /// Deadline of one call on a request's path.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Connections to Redis from this host in total (one per worker and one for the master).
    pub max_connections: u32,
    /// Start of every key supervisor uses, so that clusters can share a Redis.
    pub prefix: String,
    /// How long a cluster-wide permit outlives a host that stopped renewing it.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// PEM file of the certificate authorities that sign the server's certificate
    /// (`rediss://`); empty: the system's.
    pub tls_ca_file: String,
    /// PEM client certificate, for a Redis that asks for one; with `tls_key_file`.
    pub tls_cert_file: String,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: String,
}

impl RedisConfig {
    /// Whether a Redis is configured at all: directly (`url`) or through Sentinel.
    pub fn enabled(&self, sentinel: &SentinelConfig) -> bool {
        !self.url.is_empty() || sentinel.enabled()
    }
}

/// `[sentinel]`: find the Redis of `[redis]` through Redis Sentinel.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SentinelConfig {
    /// The name the Sentinels know the master by; empty: no Sentinel.
    pub master: String,
    /// URLs of the Sentinels to ask (`redis://host:26379`, with a password if they need one).
    pub nodes: Vec<String>,
}

impl SentinelConfig {
    pub fn enabled(&self) -> bool {
        !self.master.is_empty()
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: String::new(),
            timeout: Duration::from_millis(20),
            max_connections: 50,
            prefix: "supervisor".to_string(),
            lease_ttl: Duration::from_secs(30),
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
        }
    }
}

/// `limits.on_redis_error`: what cluster-wide limits become while Redis does not answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnRedisError {
    /// This host's own limits only (`max_concurrent_requests`, the local rate table).
    Local,
    /// No cluster-wide cap (this host's own limits still apply).
    Open,
    /// Refuse (503) what needs a cluster-wide permit.
    Closed,
}

impl OnRedisError {
    pub fn as_str(self) -> &'static str {
        match self {
            OnRedisError::Local => "local",
            OnRedisError::Open => "open",
            OnRedisError::Closed => "closed",
        }
    }
}

/// `[server]`: sockets and the process tree.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Addresses to listen on: `HOST:PORT`, `[V6]:PORT` or `unix:/path`. A config file may write
    /// a single string for a one-element list.
    #[serde(deserialize_with = "one_or_many")]
    pub bind: Vec<String>,
    /// Number of worker processes; `None` means 2 x CPU + 1 ([`default_workers`]), written
    /// `"auto"` in a config file. With `app.command`, the number of app processes (copies of
    /// the app, as gunicorn's `-w`); see [`Config::processes`].
    #[serde(with = "workers_serde")]
    pub workers: Option<u32>,
    /// With `app.command`: the number of HTTP workers in front of the app processes; `None`
    /// (`"auto"`) is the number of CPUs the process may use, never more than the app
    /// processes. Without `app.command` it is not used.
    #[serde(with = "workers_serde")]
    pub http_workers: Option<u32>,
    /// How workers share the listening sockets.
    pub accept: AcceptMode,
    /// Listen backlog of every socket.
    pub backlog: u32,
    /// How long a graceful stop waits for in-flight requests before killing workers.
    #[serde(with = "humantime_serde")]
    pub graceful_timeout: Duration,
    /// Permission bits of `unix:` sockets, written as an octal string like `"660"`.
    #[serde(with = "as_text")]
    pub unix_mode: UnixMode,
    /// Peers whose `X-Forwarded-*` and `Forwarded` headers are believed: IP addresses, CIDR
    /// networks, or `"*"`. Clients on a `unix:` listener are always believed.
    pub forwarded_allow_ips: Trusted,
    /// Where the private runtime directory (app sockets) is created; empty: `$RUNTIME_DIRECTORY`,
    /// else `$XDG_RUNTIME_DIR`, else the system temporary directory.
    pub runtime_dir: String,
    /// Run workers and their apps as this user (a name or a uid); empty: as the master. The
    /// master must be root (see `worker::privileges`).
    pub user: String,
    /// ... and this group (a name or a gid); empty: the user's primary group.
    pub group: String,
    /// File the master writes its pid to once its sockets are bound; empty: none.
    pub pidfile: String,
    /// The master's control socket (`supervisor status`, `reload`, ...); empty: a name derived
    /// from `bind` in the runtime directory (see `supervisor check`).
    pub control_socket: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind: vec!["0.0.0.0:8000".to_string()],
            workers: None,
            http_workers: None,
            accept: AcceptMode::Reuseport,
            backlog: 2048,
            graceful_timeout: Duration::from_secs(30),
            unix_mode: UnixMode(0o660),
            forwarded_allow_ips: Trusted::Networks(vec![
                ipnet::IpNet::from(std::net::IpAddr::from([127, 0, 0, 1])),
                ipnet::IpNet::from(std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
            ]),
            runtime_dir: String::new(),
            user: String::new(),
            group: String::new(),
            pidfile: String::new(),
            control_socket: String::new(),
        }
    }
}

/// `server.accept`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AcceptMode {
    /// One SO_REUSEPORT socket per worker slot, kept open by the master across respawns.
    Reuseport,
    /// One socket shared by every worker.
    Shared,
}

/// `[worker]`: limits each worker enforces on its own connections and requests.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Open connections per worker; past it the worker stops accepting until one closes.
    pub max_connections: u32,
    /// Requests in flight per worker; past it -> 503.
    pub max_concurrent: u32,
    /// A client must send a complete request head within this time.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// An idle keep-alive connection is closed after this time.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// A request (head to end of response head) taking longer gets 504.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A client that leaves the worker waiting this long in the middle of a request (no byte of
    /// a body it announced, or none of the response read) is cut off.
    #[serde(with = "humantime_serde")]
    pub client_timeout: Duration,
    /// The slowest a client may send a request body, averaged over the time the worker waits
    /// for it, once `min_rate_grace` has passed (0: no minimum). Below it: 408 (or the
    /// connection is cut when the response has started), permits back.
    pub min_request_rate: DataRate,
    /// The slowest a client may take a response, averaged over the time the worker's writes
    /// wait for it, once `min_rate_grace` has passed (0: no minimum). Below it: connection cut.
    pub min_response_rate: DataRate,
    /// How long a body or response may run below its minimum rate before the rate counts.
    #[serde(with = "humantime_serde")]
    pub min_rate_grace: Duration,
    /// Size of the request line plus headers; past it -> 431.
    pub max_header_bytes: ByteSize,
    /// Number of request headers; past it -> 431.
    pub max_headers: u32,
    /// Request body size; past it -> 413.
    pub max_body_bytes: ByteSize,
    /// A worker whose event loop has not stamped its heartbeat for this long is hung: logged
    /// with what it was doing, killed and replaced.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Recycle a worker after this many requests (0: never), plus a per-worker random extra of
    /// up to `max_requests_jitter`.
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    /// Boot the replacement of a process nearing `max_requests` ahead of time and hold it ready
    /// (see `protocol::prepare_at`); false: boot it at the limit, the old one serving meanwhile.
    pub max_requests_preboot: bool,
    /// Recycle a worker whose memory (RSS of the worker and all its descendants) stays above
    /// this for `rss_samples` consecutive samples taken every `rss_interval` (0: no limit).
    pub max_rss: ByteSize,
    #[serde(with = "humantime_serde")]
    pub rss_interval: Duration,
    pub rss_samples: u32,
    /// Recycle a worker after this long (0: never), plus a per-worker random extra of up to
    /// `max_lifetime_jitter`.
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Duration,
    #[serde(with = "humantime_serde")]
    pub max_lifetime_jitter: Duration,
    /// No worker is recycled (by requests, memory or lifetime) before it is this old.
    #[serde(with = "humantime_serde")]
    pub min_lifetime: Duration,
    /// Workers being replaced at once, by recycling or reload.
    pub max_recycling: u32,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            max_connections: 1000,
            max_concurrent: 100,
            header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(120),
            client_timeout: Duration::from_secs(30),
            min_request_rate: DataRate(240),
            min_response_rate: DataRate(240),
            min_rate_grace: Duration::from_secs(5),
            max_header_bytes: ByteSize(16 * 1024),
            max_headers: 100,
            max_body_bytes: ByteSize(10 * 1024 * 1024),
            timeout: Duration::from_secs(120),
            max_requests: 0,
            max_requests_jitter: 0,
            max_requests_preboot: true,
            max_rss: ByteSize(0),
            rss_interval: Duration::from_secs(1),
            rss_samples: 3,
            max_lifetime: Duration::ZERO,
            max_lifetime_jitter: Duration::ZERO,
            min_lifetime: Duration::ZERO,
            max_recycling: 1,
        }
    }
}

/// `[limits]`: limits that span workers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Host-wide cap on requests in flight across all workers (env `MAX_CONCURRENT_REQUESTS`).
    pub max_concurrent_requests: u32,
    /// Most clients whose rate-limit state is tracked at once (env `MAX_ACTIVE_INSTANCES`).
    pub max_active_instances: u32,
    /// Per-client rate limit, `COUNT/UNIT` (`"100/s"`, `"600/min"`); empty: none.
    #[serde(with = "as_optional_text")]
    pub rate: Option<Rate>,
    /// Requests a client may send at once (its whole budget); 0: the rate's count.
    pub burst: u32,
    /// What identifies a client: `"ip"` or `"header:NAME"`.
    #[serde(with = "as_text")]
    pub key: RateKey,
    /// A client unseen this long is forgotten.
    #[serde(with = "humantime_serde")]
    pub idle_ttl: Duration,
    /// Requests a worker keeps waiting, first come first served, when over `worker.max_concurrent`
    /// or `max_concurrent_requests`; 0: refuse them at once.
    pub queue: u32,
    /// The longest a request waits in the queue before it gets 503.
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// Cap on requests in flight across every host sharing `redis.url`; 0: none.
    pub cluster_max_concurrent_requests: u32,
    /// What the cluster-wide cap becomes while Redis does not answer.
    pub on_redis_error: OnRedisError,
    /// Paths whose `GET` and `HEAD` (health checks) skip the rate limit and the caps.
    pub health_paths: Vec<String>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_concurrent_requests: 50,
            max_active_instances: 1000,
            rate: None,
            burst: 0,
            key: RateKey::Ip,
            idle_ttl: Duration::from_secs(30 * 60),
            queue: 0,
            queue_timeout: Duration::from_secs(1),
            cluster_max_concurrent_requests: 0,
            on_redis_error: OnRedisError::Local,
            health_paths: ["/healthz", "/health", "/livez", "/readyz"]
                .map(String::from)
                .to_vec(),
        }
    }
}

/// `limits.rate`, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub period: Duration,
}

impl Rate {
    /// `""` (no limit) or `COUNT/UNIT`, UNIT one of `s`, `sec`, `second`, `m`, `min`,
    /// `minute`, `h`, `hour`; COUNT >= 1.
    pub fn parse(text: &str) -> Result<Option<Rate>, String> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(None);
        }
        let (count, unit) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not COUNT/UNIT"))?;
        let count: u32 = count
            .trim()
            .parse()
            .ok()
            .filter(|&n| n >= 1)
            .ok_or_else(|| format!("{text:?}: the count must be an integer >= 1"))?;
        let period = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => return Err(format!("{text:?}: unknown unit {other:?}")),
        };
        Ok(Some(Rate { count, period }))
    }

    /// Time between two requests at this rate.
    pub fn interval(&self) -> Duration {
        self.period / self.count
    }
}

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Rate, String> {
        Rate::parse(text)?.ok_or_else(|| "no rate".to_string())
    }
}

impl std::fmt::Display for Rate {
    /// `COUNT/s`, `COUNT/min` or `COUNT/h`, which parses back to the same rate.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.period.as_secs() {
            3600 => "h",
            60 => "min",
            _ => "s",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// `limits.key`, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RateKey {
    /// The client's IP address (taken from `X-Forwarded-For` behind a trusted proxy).
    Ip,
    /// The value of this request header; requests without it count by IP address.
    Header(hyper::header::HeaderName),
}

impl RateKey {
    pub fn parse(text: &str) -> Result<RateKey, String> {
        match text.trim() {
            "ip" => Ok(RateKey::Ip),
            other => match other.strip_prefix("header:") {
                Some(name) => hyper::header::HeaderName::from_bytes(name.trim().as_bytes())
                    .map(RateKey::Header)
                    .map_err(|_| format!("{name:?} is not a header name")),
                None => Err(format!("{other:?} is neither \"ip\" nor \"header:NAME\"")),
            },
        }
    }
}

impl std::str::FromStr for RateKey {
    type Err = String;

    fn from_str(text: &str) -> Result<RateKey, String> {
        RateKey::parse(text)
    }
}

impl std::fmt::Display for RateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RateKey::Ip => f.write_str("ip"),
            RateKey::Header(name) => write!(f, "header:{name}"),
        }
    }
}

/// `server.unix_mode`: the permission bits of `unix:` sockets (written in octal, at most
/// `"777"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixMode(pub u32);

impl std::str::FromStr for UnixMode {
    type Err = String;

    fn from_str(mode: &str) -> Result<UnixMode, String> {
        let octal =
            !mode.is_empty() && mode.len() <= 4 && mode.bytes().all(|b| (b'0'..=b'7').contains(&b));
        match u32::from_str_radix(mode, 8) {
            Ok(bits) if octal && bits <= 0o777 => Ok(UnixMode(bits)),
            _ => Err(format!("{mode:?} is not an octal mode")),
        }
    }
}

impl std::fmt::Display for UnixMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:o}", self.0)
    }
}

/// Serde for a key written as text and kept parsed (`FromStr`, and `Display` to write it back
/// the way it parses): the text is read once, when the configuration is loaded or handed to a
/// worker, and nothing downstream parses it again.
mod as_text {
    use serde::Deserialize;

    pub fn serialize<T: std::fmt::Display, S: serde::Serializer>(
        v: &T,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: std::str::FromStr<Err = String>,
        D: serde::Deserializer<'de>,
    {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// `as_text` for a key that may be empty (`""`: none).
mod as_optional_text {
    use serde::Deserialize;

    pub fn serialize<T: std::fmt::Display, S: serde::Serializer>(
        v: &Option<T>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
    where
        T: std::str::FromStr<Err = String>,
        D: serde::Deserializer<'de>,
    {
        let text = String::deserialize(d)?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        text.parse().map(Some).map_err(serde::de::Error::custom)
    }
}

/// `app.upstream`: `http://HOST:PORT` or `unix:/PATH`, or `""` (none).
mod upstream_serde {
    use serde::Deserialize;

    use super::Upstream;

    pub fn serialize<S: serde::Serializer>(v: &Option<Upstream>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(upstream) => s.serialize_str(&upstream.as_written()),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Upstream>, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(None);
        }
        Upstream::parse(&text)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}

/// `[app]`: what the workers serve. Neither `command` nor `upstream`: the built-in app.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AppConfig {
    /// One app process per worker: program and arguments, with `{socket}`, `{port}` and
    /// `{worker}` replaced (also everything after `--` on the command line).
    pub command: Vec<String>,
    /// Proxy to a server the supervisor does not start: `http://host:port` or `unix:/path`;
    /// empty: none.
    #[serde(with = "upstream_serde")]
    pub upstream: Option<Upstream>,
    /// The app processes' working directory (gunicorn's `chdir`), resolved when each app process
    /// starts (so a reload follows a symlink switched to a new release); empty: the master's.
    pub cwd: String,
    /// How long a worker waits for its app to accept connections before giving up.
    #[serde(with = "humantime_serde")]
    pub ready_timeout: Duration,
    /// Requests in flight to one app process (0: only `worker.max_concurrent` bounds them);
    /// more wait in the worker, in order, within `worker.request_timeout`.
    pub concurrency: u32,
    /// Prefer an app process that took or ended a request this recently, even while busy
    /// (fewer wake-ups, less CPU), over an idle one; zero: never (no head-of-line blocking).
    #[serde(with = "humantime_serde")]
    pub pack_window: Duration,
    /// Read each request body whole (up to `worker.max_body_bytes`) before passing it on.
    pub buffer_requests: bool,
    /// Kill and restart the app process when one of its requests passes
    /// `worker.request_timeout`.
    pub kill_on_timeout: bool,
    /// The `Upgrade` protocols passed to the app (lower case, names without versions); others
    /// are removed and the request goes on as a plain one. `h2c` never passes.
    pub upgrades: Vec<String>,
    /// An upgraded connection (WebSocket) with no byte either way for this long is closed.
    #[serde(with = "humantime_serde")]
    pub upgrade_idle_timeout: Duration,
}

impl Default for AppConfig {
    fn default() -> Self {
        AppConfig {
            command: Vec::new(),
            upstream: None,
            cwd: String::new(),
            ready_timeout: Duration::from_secs(30),
            concurrency: 0,
            pack_window: Duration::ZERO,
            buffer_requests: false,
            kill_on_timeout: false,
            upgrades: vec!["websocket".to_string()],
            upgrade_idle_timeout: Duration::from_secs(60),
        }
    }
}

/// `[log]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug` or `trace`, or Python's and gunicorn's `critical`,
    /// `warning` (env `LOG_LEVEL`).
    pub level: LogLevel,
    /// `text` or `json`.
    pub format: LogFormat,
    /// Append logs to this file instead of stderr (empty: stderr); reopened on USR1.
    pub file: String,
    /// Write an access log line for every answered request.
    pub access: bool,
    /// Where access log lines go: empty, stderr (with the log); else this file, appended to by
    /// every worker and reopened on USR1.
    pub access_file: String,
    /// The least severe level of the app's own output logged (`level` does not apply to it);
    /// `trace`, the default, keeps every line.
    pub app_level: LogLevel,
    /// `events` (each line or traceback one event at its own level) or `raw` (each line as
    /// the app wrote it).
    pub app_output: AppOutput,
}

/// How the app's output goes to the log (`log.app_output`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppOutput {
    Events,
    Raw,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: LogLevel::Info,
            format: LogFormat::Text,
            file: String::new(),
            access: false,
            access_file: String::new(),
            app_level: LogLevel::Trace,
            app_output: AppOutput::Events,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Also `critical` and `fatal` (Python's and gunicorn's names): nothing is more severe here.
    #[serde(alias = "critical", alias = "fatal")]
    Error,
    /// Also `warning` (Python's and gunicorn's name).
    #[serde(alias = "warning")]
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A size in bytes, written in config as an integer or a string like `"512MiB"`, `"16KiB"`, `"10MB"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for ByteSize {
    /// Exact binary units where they fit (`16KiB`), plain bytes otherwise, so that the printed
    /// value parses back to the same number.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const UNITS: [(u64, &str); 4] = [
            (1 << 40, "TiB"),
            (1 << 30, "GiB"),
            (1 << 20, "MiB"),
            (1 << 10, "KiB"),
        ];
        for (factor, unit) in UNITS {
            if self.0 >= factor && self.0.is_multiple_of(factor) {
                return write!(f, "{}{unit}", self.0 / factor);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let valid = s.starts_with(|c: char| c.is_ascii_digit());
        match s.parse::<bytesize::ByteSize>() {
            Ok(b) if valid => Ok(ByteSize(b.as_u64())),
            _ => Err(format!(
                "invalid size {s:?}: expected bytes as an integer or a number with a unit \
                 (B, KiB, MiB, GiB, KB, MB, GB), like \"512MiB\""
            )),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size in bytes, like 1048576 or \"512MiB\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("invalid size {v}: must not be negative")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A data rate in bytes per second: `240`, `"240B/s"` or `"1KiB/s"` (0: no minimum).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DataRate(pub u64);

impl DataRate {
    pub fn bytes_per_second(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for DataRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/s", ByteSize(self.0))
    }
}

impl std::str::FromStr for DataRate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let size = s.strip_suffix("/s").unwrap_or(s);
        size.parse::<ByteSize>()
            .map(|b| DataRate(b.bytes()))
            .map_err(|_| {
                format!(
                    "invalid rate {s:?}: expected bytes per second as an integer or a size per \
                 second, like \"240B/s\" or \"1KiB/s\""
                )
            })
    }
}

impl Serialize for DataRate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DataRate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match ByteSizeOrText::deserialize(d)? {
            ByteSizeOrText::Number(n) => Ok(DataRate(n)),
            ByteSizeOrText::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ByteSizeOrText {
    Number(u64),
    Text(String),
}

/// `server.bind` written as `"a"` is read as `["a"]`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// `server.workers`: `"auto"` is `None`, so that the serialized form (also what workers receive)
/// says the same as the config file.
mod workers_serde {
    pub fn serialize<S: serde::Serializer>(v: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            None => s.serialize_str("auto"),
            Some(n) => s.serialize_u32(*n),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Option<u32>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("\"auto\" or a number of workers")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Option<u32>, E> {
                u32::try_from(v)
                    .map(Some)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Option<u32>, E> {
                u32::try_from(v)
                    .map(Some)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Option<u32>, E> {
                if v == "auto" {
                    Ok(None)
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Str(v), &self))
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `server.forwarded_allow_ips`, parsed: whose forwarding headers are believed. Written as an
/// array (or one string) of addresses, CIDR networks or `"*"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trusted {
    Any,
    Networks(Vec<ipnet::IpNet>),
}

impl Trusted {
    /// Parses the list: addresses (`10.0.0.1`, `::1`), networks (`10.0.0.0/8`) or `"*"`.
    pub fn parse(list: &[String]) -> Result<Trusted, String> {
        let mut nets = Vec::with_capacity(list.len());
        for item in list {
            let item = item.trim();
            if item == "*" {
                return Ok(Trusted::Any);
            }
            let net = match item.parse::<std::net::IpAddr>() {
                Ok(ip) => ipnet::IpNet::from(ip),
                Err(_) => item.parse::<ipnet::IpNet>().map_err(|_| {
                    format!("{item:?} is not an IP address, a CIDR network or \"*\"")
                })?,
            };
            nets.push(net);
        }
        Ok(Trusted::Networks(nets))
    }

    /// The list as written: an address alone for a single host, `"*"` for any.
    pub fn to_list(&self) -> Vec<String> {
        match self {
            Trusted::Any => vec!["*".to_string()],
            Trusted::Networks(nets) => nets
                .iter()
                .map(|n| {
                    if n.prefix_len() == n.max_prefix_len() {
                        n.addr().to_string()
                    } else {
                        n.to_string()
                    }
                })
                .collect(),
        }
    }

    /// Whether `ip` is trusted. An IPv4 client seen on an IPv6 socket (`::ffff:a.b.c.d`)
    /// matches its IPv4 form.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        match self {
            Trusted::Any => true,
            Trusted::Networks(nets) => {
                let ip = ip.to_canonical();
                nets.iter().any(|n| n.contains(&ip))
            }
        }
    }
}

impl Serialize for Trusted {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_list().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Trusted {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Trusted, D::Error> {
        Trusted::parse(&one_or_many(d)?).map_err(serde::de::Error::custom)
    }
}

/// `app.upstream`, parsed; also where a worker's own app process listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// `http://HOST:PORT` (a name is resolved when connecting).
    Tcp(String),
    /// `unix:/PATH`.
    Unix(std::path::PathBuf),
}

impl Upstream {
    pub fn parse(s: &str) -> Result<Upstream, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!("{s:?}: the socket path must be absolute"));
            }
            return Ok(Upstream::Unix(path.into()));
        }
        let Some(rest) = s.strip_prefix("http://") else {
            return Err(format!(
                "{s:?}: must start with http:// or unix: (https is not supported to an upstream)"
            ));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        let valid = authority.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !valid || authority.contains('/') {
            return Err(format!(
                "{s:?}: expected http://HOST:PORT with no path, like \"http://127.0.0.1:9000\""
            ));
        }
        Ok(Upstream::Tcp(authority.to_string()))
    }
}

impl Upstream {
    /// As `app.upstream` writes it: `http://HOST:PORT` or `unix:/PATH`.
    pub fn as_written(&self) -> String {
        match self {
            Upstream::Tcp(authority) => format!("http://{authority}"),
            Upstream::Unix(path) => format!("unix:{}", path.display()),
        }
    }
}

impl std::fmt::Display for Upstream {
    /// `unix:/PATH` or `HOST:PORT`, as in logs and messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Upstream::Tcp(authority) => f.write_str(authority),
            Upstream::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Checks `app.command`: a program, and `{socket}` or `{port}` somewhere so that the app
/// listens where the worker will look for it.
pub fn check_app_command(command: &[String]) -> Result<(), String> {
    let Some(program) = command.first() else {
        return Ok(());
    };
    if program.trim().is_empty() {
        return Err("the program (first element) is empty".to_string());
    }
    let socket = command.iter().any(|a| a.contains("{socket}"));
    let port = command.iter().any(|a| a.contains("{port}"));
    match (socket, port) {
        (true, true) => Err("use {socket} or {port}, not both".to_string()),
        (false, false) => Err(
            "no {socket} or {port} in the command: the app must listen where the worker \
             connects, e.g. `uvicorn main:app --uds {socket}`"
                .to_string(),
        ),
        _ => Ok(()),
    }
}

/// Number of worker processes when `server.workers` is not set: 2 x CPU + 1, where CPU is the
/// available parallelism (the standard library already honours cgroup CPU quotas and affinity).
pub fn default_workers() -> u32 {
    2 * cpus() + 1
}

/// The CPUs this process may use (affinity and cgroup quota honoured).
pub fn cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

/// How many processes of each kind the master keeps (see [`Config::processes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Processes {
    /// HTTP workers: they accept connections and run the request path.
    pub http: u32,
    /// App processes (`app.command`), each behind an app host of its own; 0 without one.
    pub apps: u32,
}

impl Config {
    /// Whether the master runs a pool of app processes (`app.command`) behind its HTTP workers.
    pub fn app_pool(&self) -> bool {
        !self.app.command.is_empty()
    }

    /// The process counts this configuration asks for, with `workers` (`server.workers`, or the
    /// number TTIN/TTOU or `supervisor scale` set) as the count that `-w` names: app processes
    /// with `app.command`, HTTP workers otherwise.
    pub fn processes(&self, workers: u32) -> Processes {
        if !self.app_pool() {
            return Processes {
                http: workers,
                apps: 0,
            };
        }
        let http = self.server.http_workers.unwrap_or_else(cpus);
        Processes {
            http: http.clamp(1, workers.max(1)),
            apps: workers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse_and_print_back() {
        assert_eq!("512MiB".parse::<ByteSize>().unwrap(), ByteSize(512 << 20));
        assert_eq!("16 KiB".parse::<ByteSize>().unwrap(), ByteSize(16 << 10));
        assert_eq!("10MB".parse::<ByteSize>().unwrap(), ByteSize(10_000_000));
        assert_eq!("123".parse::<ByteSize>().unwrap(), ByteSize(123));
        assert!("lots".parse::<ByteSize>().is_err());
        assert!("-5MiB".parse::<ByteSize>().is_err());
        for b in [ByteSize(16 << 10), ByteSize(1000), ByteSize(3 << 30)] {
            assert_eq!(b.to_string().parse::<ByteSize>().unwrap(), b);
        }
    }

    #[test]
    fn config_round_trips_through_json() {
        let mut c = Config::default();
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains(r#""workers":"auto""#), "{json}");
        assert_eq!(serde_json::from_str::<Config>(&json).unwrap(), c);
        c.server.workers = Some(7);
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Config>(&json).unwrap(), c);
    }

    #[test]
    fn trusted_peers_parse_and_match() {
        let t = Trusted::parse(&["127.0.0.1".into(), "10.0.0.0/8".into(), "::1".into()]).unwrap();
        assert!(t.contains("127.0.0.1".parse().unwrap()));
        assert!(t.contains("10.1.2.3".parse().unwrap()));
        assert!(t.contains("::ffff:10.1.2.3".parse().unwrap()), "v4-mapped");
        assert!(t.contains("::1".parse().unwrap()));
        assert!(!t.contains("192.168.1.1".parse().unwrap()));
        assert!(!t.contains("127.0.0.2".parse().unwrap()));
        assert_eq!(Trusted::parse(&["*".into()]).unwrap(), Trusted::Any);
        assert_eq!(Trusted::parse(&[]).unwrap(), Trusted::Networks(vec![]));
        let e = Trusted::parse(&["10.0.0.0/33".into()]).unwrap_err();
        assert!(e.contains("10.0.0.0/33"), "{e}");
        assert!(Trusted::parse(&["localhost".into()]).is_err());
    }

    #[test]
    fn upstreams_parse() {
        assert_eq!(
            Upstream::parse("http://127.0.0.1:9000").unwrap(),
            Upstream::Tcp("127.0.0.1:9000".into())
        );
        assert_eq!(
            Upstream::parse("http://app.internal:80/").unwrap(),
            Upstream::Tcp("app.internal:80".into())
        );
        assert_eq!(
            Upstream::parse("http://[::1]:9000").unwrap(),
            Upstream::Tcp("[::1]:9000".into())
        );
        assert_eq!(
            Upstream::parse("unix:/run/app.sock").unwrap(),
            Upstream::Unix("/run/app.sock".into())
        );
        for bad in [
            "https://a:1",
            "http://a",
            "http://a:0",
            "http://a:1/x",
            "unix:rel",
            "a:1",
        ] {
            assert!(Upstream::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn app_commands_need_a_place_to_listen() {
        let cmd = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_app_command(&[]).is_ok());
        assert!(check_app_command(&cmd(&["uvicorn", "m:app", "--uds", "{socket}"])).is_ok());
        assert!(check_app_command(&cmd(&["app", "--bind=127.0.0.1:{port}"])).is_ok());
        assert!(check_app_command(&cmd(&["uvicorn", "m:app"]))
            .unwrap_err()
            .contains("{socket}"));
        assert!(check_app_command(&cmd(&["a", "{socket}", "{port}"])).is_err());
        assert!(check_app_command(&cmd(&["", "{socket}"])).is_err());
    }

    #[test]
    fn bind_accepts_one_string_or_a_list() {
        let one: ServerConfig = serde_json::from_str(r#"{"bind": "unix:/a"}"#).unwrap();
        assert_eq!(one.bind, ["unix:/a"]);
        let many: ServerConfig = serde_json::from_str(r#"{"bind": ["a:1", "b:2"]}"#).unwrap();
        assert_eq!(many.bind, ["a:1", "b:2"]);
        assert!(serde_json::from_str::<ServerConfig>(r#"{"bind": 5}"#).is_err());
    }
}
