//! Cluster-wide limits through a Redis shared by every host (`[redis] url`): the cap
//! (`limits.cluster_max_concurrent_requests`) and each client's rate (`limits.rate`), and what
//! happens when Redis is slow or gone.
//!
//! Owns the connection (one multiplexed connection per worker, redialled in the background,
//! never on a request's path), the per-call deadline (`redis.timeout`, enforced here with a
//! timer, whatever the client library does), the circuit breaker, and the leases: a request
//! admitted cluster-wide holds one member of a sorted set (`PREFIX:leases`), named
//! `host:instance:pid:seq` and scored with its expiry on Redis's clock. One script call checks
//! each request's client rate and takes its lease (after dropping expired ones) while there is
//! room: one call per request when requests are far apart; under load, the requests that
//! arrive while a worker's call is out share its next call. While at least half the cap is
//! free, a lease a request gives back is kept by its worker for `POOL_KEEP_MS`, and its next
//! request takes it without a call while Redis answered within `POOL_TRUST_MS`: under steady
//! load a worker calls Redis a few times a second, and Redis counts it at about its busiest
//! moment of the last `POOL_KEEP_MS` (never fewer leases than requests in flight); nearer the
//! cap a lease goes back at once, for any worker. Release is a `ZREM` (one for all the leases
//! given back meanwhile), off the request's path, retried; the worker renews
//! the leases of its requests in flight every third of `redis.lease_ttl`, and the master
//! removes a dead worker's leases when it reaps it (`PURGE`); the TTL covers a lost host.
//!
//! Why the worker renews its own leases (the design first had the master do it): the worker is
//! the one that knows which are live, and a worker whose event loop hangs stops renewing, so its
//! leases lapse while the master replaces it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError, Script};
use tracing::{debug, info, warn};

use crate::config::{OnRedisError, RedisConfig, SentinelConfig};
/// For the binary's errors and `supervisor check` (`redis_target` is private).
pub use crate::limits::redis_target::redacted;
use crate::limits::redis_target::Target;
use crate::shm::ratelimit::{Decision, Gcra};
use crate::shm::scoreboard::{coarse_monotonic_ms, Slot};

/// Without rate limits: drops expired leases, then takes one for each listed member, in order,
/// while fewer than the cap are held. KEYS[1] leases; ARGV: cap, ttl ms, members. Returns how
/// many were taken (the first ones listed) and the room left under the cap.
const ACQUIRE_CAP: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local room = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1])
local take = math.min(math.max(room, 0), #ARGV - 2)
if take == 0 then
  return {0, room}
end
local expiry = now + tonumber(ARGV[2])
local add = {}
for i = 1, take do
  add[#add + 1] = expiry
  add[#add + 1] = ARGV[2 + i]
end
redis.call('ZADD', KEYS[1], unpack(add))
return {take, room - take}
";

/// For each request of a batch, in order: its client's rate (GCRA, on Redis's clock, in µs),
/// then a lease if the cap has room. A request refused either way takes nothing: its rate state
/// is written only when it is admitted. KEYS[1] leases; ARGV: cap, lease ttl ms, interval µs,
/// tolerance µs, then per request its member and its client's rate key ("-": none). Returns,
/// per request: rate passed (0/1), lease taken or not wanted (0/1), and how far ahead of now the
/// client's TAT is, in µs (after this request if it passed, before it if not); then the room
/// left under the cap (`ROOM_UNKNOWN`: not looked at, no request wanted a lease).
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now_us = t[1] * 1000000 + t[2]
local now_ms = math.floor(now_us / 1000)
local cap = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local interval = tonumber(ARGV[3])
local tolerance = tonumber(ARGV[4])
local room = nil
local out = {}
for i = 5, #ARGV, 2 do
  local member, rate_key = ARGV[i], ARGV[i + 1]
  local rate_ok, ahead, tat = 1, 0, now_us
  if rate_key ~= '-' then
    tat = tonumber(redis.call('GET', rate_key) or now_us)
    if tat < now_us then tat = now_us end
    ahead = tat - now_us
    if ahead > tolerance then rate_ok = 0 end
  end
  local lease = 0
  if rate_ok == 1 then
    if member == '-' then
      lease = 1
    else
      if room == nil then
        redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
        room = cap - redis.call('ZCARD', KEYS[1])
      end
      if room > 0 then
        redis.call('ZADD', KEYS[1], now_ms + ttl, member)
        room = room - 1
        lease = 1
      end
    end
    if lease == 1 and rate_key ~= '-' then
      local new = tat + interval
      redis.call('SET', rate_key, new, 'PX', math.floor((new - now_us) / 1000) + 1)
      ahead = new - now_us
    end
  end
  out[#out + 1] = rate_ok
  out[#out + 1] = lease
  out[#out + 1] = ahead
end
out[#out + 1] = room or -4503599627370496
return out
";

/// A probe: drops expired leases, then adds and removes a member of its own (so that a server
/// that cannot take a lease, a replica or one out of memory, fails it). KEYS[1] leases; ARGV:
/// cap, the probe's member. Returns the room left under the cap.
const PROBE: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], 0, ARGV[2])
redis.call('ZREM', KEYS[1], ARGV[2])
return tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1])
";

/// Pushes the expiry of the listed leases that still exist. KEYS[1] leases; ARGV: ttl ms,
/// members. Returns the members that no longer exist (expired, or Redis lost its data).
const RENEW: &str = r"
local t = redis.call('TIME')
local expiry = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[1])
local missing = {}
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
  else
    missing[#missing + 1] = ARGV[i]
  end
end
return missing
";

/// Removes every lease whose member starts with ARGV[1] (a dead worker's `host:boot:pid:`).
/// KEYS[1] leases. Returns how many.
pub const PURGE: &str = r"
local n = 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if string.sub(m, 1, #ARGV[1]) == ARGV[1] then
    redis.call('ZREM', KEYS[1], m)
    n = n + 1
  end
end
return n
";

/// Consecutive failed calls that open the breaker.
const OPEN_AFTER: u32 = 3;
/// How long the breaker stays open before one call probes Redis again.
const PROBE_EVERY_MS: u64 = 1000;
/// Bound of one dial, a Sentinel lookup included (the crate gives each Sentinel 1 s to connect
/// and 0.5 s to answer, and waits for them in order; dials are never on a request's path).
const DIAL_TIMEOUT: Duration = Duration::from_secs(3);
/// What `ACQUIRE` answers for the room when no request of the batch wanted a lease (-2^52: no
/// real room is that low).
const ROOM_UNKNOWN: i64 = -4_503_599_627_370_496;
/// How long a worker keeps a lease its request gave back, for its next request, before it
/// gives it back to Redis.
pub const POOL_KEEP_MS: u64 = 50;
/// A worker reuses pooled leases only while Redis took a call of its within this long, so
/// that under load it still asks Redis (and finds out that Redis is gone) this often.
const POOL_TRUST_MS: u64 = 100;

/// The sorted set of leases under `prefix`.
pub fn leases_key(prefix: &str) -> String {
    format!("{prefix}:leases")
}

/// The start of every lease member of worker `pid` of the master whose scoreboard holds
/// `instance`: `host:instance:pid:`. The random instance keeps apart masters whose workers
/// could share a pid (containers on one host); the host name is for people reading the set.
pub fn member_prefix(instance: u64, pid: u32) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".to_string());
    format!("{host}:{instance:016x}:{pid}:")
}

/// Whether `url` is a Redis URL the client accepts (for the config check).
pub fn check_url(url: &str) -> Result<(), String> {
    Client::open(url).map(|_| ()).map_err(|e| e.to_string())
}

/// Whether `[redis]` and `[sentinel]` together say where Redis is and the TLS files they name
/// can be read (for the config check). `Err` names the key at fault.
pub fn check_target(redis: &RedisConfig, sentinel: &SentinelConfig) -> Result<(), String> {
    Target::open(redis, sentinel).map(|_| ())
}

/// A READONLY answer: the server is a replica now (a failover moved the master elsewhere).
fn is_read_only(e: &RedisError) -> bool {
    // Redis 7 answers READONLY; Redis 6 wraps a script's error in ERR.
    e.code() == Some("READONLY") || e.detail().is_some_and(|d| d.contains("READONLY"))
}

/// A request's wait for its answer. Dropped before the answer was read (the request went away
/// at that very moment), it gives back a lease the answer granted.
struct Waiting {
    cluster: &'static Cluster,
    seq: u64,
    /// Whether the call asks for a lease (not when the request has one from the pool).
    lease: bool,
    rx: Option<tokio::sync::oneshot::Receiver<Result<Answer, ()>>>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            if let Ok(Ok(a)) = rx.try_recv() {
                if self.lease && a.rate_ok && a.lease_ok {
                    self.cluster.give_back(self.seq);
                }
            }
        }
    }
}

/// One request waiting for the acquiring task.
struct Wanted {
    seq: u64,
    lease: bool,
    rate_key: Option<String>,
    answer: tokio::sync::oneshot::Sender<Result<Answer, ()>>,
}

/// The script's answer for one request.
#[derive(Clone, Copy)]
struct Answer {
    rate_ok: bool,
    lease_ok: bool,
    ahead_us: u64,
}

/// The Redis key of a client's rate state: a 128-bit SipHash of its key, the same on every
/// host (so the budget is cluster-wide), which keeps API keys out of Redis's keyspace.
pub(crate) fn rate_key(prefix: &str, client: &[u8]) -> String {
    let mut h = siphasher::sip128::SipHasher13::new();
    std::hash::Hasher::write(&mut h, client);
    let v = siphasher::sip128::Hasher128::finish128(&h).as_u128();
    format!("{prefix}:rate:{v:032x}")
}

/// What the cluster said about one request.
pub(crate) enum Verdict {
    /// Through: with its lease (when there is a cap) and its client's rate decision (when
    /// `limits.rate` is set).
    Admitted(Option<Lease>, Option<Decision>),
    /// The client's rate is spent (cluster-wide).
    Limited(Decision),
    /// The cluster-wide cap is reached.
    Full,
    /// Redis did not answer in time, failed, or the breaker is open: `limits.on_redis_error`.
    Unavailable,
}

/// Redis state as the scoreboard records it, for `supervisor status`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedisState {
    Off = 0,
    Connected = 1,
    Degraded = 2,
}

impl RedisState {
    pub fn from_u32(v: u32) -> RedisState {
        match v {
            1 => RedisState::Connected,
            2 => RedisState::Degraded,
            _ => RedisState::Off,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RedisState::Off => "off",
            RedisState::Connected => "connected",
            RedisState::Degraded => "degraded",
        }
    }
}

pub(crate) struct Cluster {
    target: tokio::sync::Mutex<Target>,
    described: String,
    conn: Mutex<Option<MultiplexedConnection>>,
    dialling: AtomicBool,
    timeout: Duration,
    pub(crate) cap: u32,
    pub(crate) policy: OnRedisError,
    /// `limits.rate`, counted in Redis for every host.
    rate: Option<Gcra>,
    /// `redis.prefix`, for the rate keys.
    key_prefix: String,
    ttl_ms: u64,
    key: String,
    prefix: String,
    seq: AtomicU64,
    /// Every lease this worker holds in Redis (its requests' and its pool's), with the
    /// `generation` it was taken in.
    held: Mutex<HashMap<u64, u64>>,
    /// Bumped by every failed call: a lease taken before a failure may be gone from Redis (a
    /// restart, a failover), so it is given back after its request, never pooled.
    generation: AtomicU64,
    /// Leases its requests gave back lately, with when (coarse ms), newest last: the next
    /// requests take them instead of asking Redis (`POOL_KEEP_MS`).
    pool: Mutex<Vec<(u64, u64)>>,
    pooled: tokio::sync::Notify,
    /// When Redis last answered a call (coarse ms).
    answered: AtomicU64,
    /// Room left under the cap at the last call that looked: leases are pooled only while at
    /// least half the cap is free, so that near the cap each request takes and gives back its
    /// own (a lease idle in one worker's pool would refuse another worker's request).
    room: std::sync::atomic::AtomicI64,
    /// Requests waiting for the acquiring task, with where to send its answer.
    to_acquire: Mutex<Vec<Wanted>>,
    wanted: tokio::sync::Notify,
    /// Leases given back and not yet sent to Redis.
    to_release: Mutex<Vec<u64>>,
    released: tokio::sync::Notify,
    acquire: Script,
    acquire_cap: Script,
    probe: Script,
    renew: Script,
    /// Consecutive failed calls.
    failures: AtomicU32,
    /// While open: when the next probe may go (coarse ms); 0 while closed.
    open_until: AtomicU64,
    probing: AtomicBool,
    /// The worker's scoreboard record, for `supervisor status` (set by `start`).
    slot: std::sync::OnceLock<&'static Slot>,
}

impl Cluster {
    pub(crate) fn new(
        config: &RedisConfig,
        sentinel: &SentinelConfig,
        cap: u32,
        policy: OnRedisError,
        rate: Option<Gcra>,
        instance: u64,
    ) -> Result<Cluster, String> {
        let target = Target::open(config, sentinel)?;
        Ok(Cluster {
            described: target.described.clone(),
            target: tokio::sync::Mutex::new(target),
            conn: Mutex::new(None),
            dialling: AtomicBool::new(false),
            timeout: config.timeout,
            cap,
            policy,
            rate,
            key_prefix: config.prefix.clone(),
            ttl_ms: config.lease_ttl.as_millis() as u64,
            key: leases_key(&config.prefix),
            prefix: member_prefix(instance, std::process::id()),
            seq: AtomicU64::new(0),
            held: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            pool: Mutex::new(Vec::new()),
            pooled: tokio::sync::Notify::new(),
            answered: AtomicU64::new(0),
            room: std::sync::atomic::AtomicI64::new(0),
            to_acquire: Mutex::new(Vec::new()),
            wanted: tokio::sync::Notify::new(),
            to_release: Mutex::new(Vec::new()),
            released: tokio::sync::Notify::new(),
            acquire: Script::new(ACQUIRE),
            acquire_cap: Script::new(ACQUIRE_CAP),
            probe: Script::new(PROBE),
            renew: Script::new(RENEW),
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            slot: std::sync::OnceLock::new(),
        })
    }

    /// Dials Redis once (within the dial's own timeout) so that the worker's first requests
    /// find a connection, then starts the background work: acquiring, releasing, renewing.
    /// Must run inside the worker's runtime, before the worker accepts connections. Redis
    /// unreachable: the worker starts degraded, and says so once.
    pub(crate) async fn start(&'static self, slot: &'static Slot) {
        let _ = self.slot.set(slot);
        self.dialling.store(true, Ordering::Release);
        if let Err(e) = self.dial_now().await {
            self.trip(&format!("cannot connect at start: {e}"));
        }
        tokio::spawn(self.acquire_batches());
        tokio::spawn(self.release_queued());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(
                Duration::from_millis(self.ttl_ms / 3).max(Duration::from_millis(10)),
            );
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                self.renew_held().await;
            }
        });
        tokio::spawn(self.trim_pool());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(PROBE_EVERY_MS));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                self.probe().await;
            }
        });
    }

    /// While the breaker is open, one call (when a probe is due and no request made it) that
    /// adds and removes a member of the lease set, so a server that answers but cannot take a
    /// lease (a demoted master, one out of memory) does not count as back. This is what brings an idle
    /// worker back to cluster-wide limits, and its status to "connected", without a request.
    async fn probe(&'static self) {
        if self.open_until.load(Ordering::Acquire) == 0 || !self.allowed() {
            return;
        }
        // No connection: a dial is (now) under way, and its outcome is the probe's.
        let Some(mut conn) = self.connection() else {
            return;
        };
        let mut call = self.probe.key(&self.key);
        call.arg(self.cap).arg(format!("{}probe", self.prefix));
        match tokio::time::timeout(self.timeout, call.invoke_async::<i64>(&mut conn)).await {
            Ok(Ok(room)) => {
                self.room.store(room, Ordering::Relaxed);
                self.succeeded();
            }
            Ok(Err(e)) => {
                self.call_failed(&e);
                self.failed(&e.to_string());
            }
            Err(_) => self.failed("no answer within redis.timeout"),
        }
    }

    /// Redials in the background unless a dial is already under way.
    fn dial(&'static self) {
        if self.dialling.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(async move {
            let _ = self.dial_now().await;
        });
    }

    /// One dial; `dialling` is set by the caller and cleared here. `Err`: why it did not
    /// connect (counted as a failure already).
    async fn dial_now(&'static self) -> Result<(), String> {
        // A reply that never comes (a stopped Redis) ends the call after the lease's life: by
        // then whatever it took has expired anyway. Requests never wait that long: they have
        // their own deadline.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(Duration::from_millis(self.ttl_ms)));
        let dial = async {
            let client = self.target.lock().await.client().await?;
            client
                .get_multiplexed_async_connection_with_config(&config)
                .await
        };
        let dialled = match tokio::time::timeout(DIAL_TIMEOUT, dial).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no connection within {DIAL_TIMEOUT:?}")),
        };
        let connected = match dialled {
            Ok(conn) => {
                *self.conn.lock().expect("not poisoned") = Some(conn);
                debug!(redis = %self.described, "connected to redis");
                if self.open_until.load(Ordering::Acquire) == 0 {
                    self.set_state(RedisState::Connected);
                }
                // The next request probes with a real call.
                self.probing.store(false, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                debug!(redis = %self.described, error = %e, "cannot connect to redis");
                Err(e)
            }
        };
        self.dialling.store(false, Ordering::Release);
        if let Err(e) = &connected {
            self.failed(&format!("cannot connect: {e}"));
        }
        connected
    }

    /// A call that failed with `e`: on a READONLY answer (the server was demoted to replica
    /// by a failover) the connection goes at once, so that the next call dials the master.
    fn call_failed(&'static self, e: &RedisError) {
        if is_read_only(e) {
            *self.conn.lock().expect("not poisoned") = None;
        }
    }

    /// Whether there is a connection (without cloning it); dials when there is none.
    fn connected(&'static self) -> bool {
        let connected = self.conn.lock().expect("not poisoned").is_some();
        if !connected {
            self.dial();
        }
        connected
    }

    fn connection(&'static self) -> Option<MultiplexedConnection> {
        let conn = self.conn.lock().expect("not poisoned").clone();
        if conn.is_none() {
            self.dial();
        }
        conn
    }

    /// Whether a call may go to Redis now: always while the breaker is closed; while it is
    /// open, one probe per `PROBE_EVERY_MS`.
    fn allowed(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        coarse_monotonic_ms() >= until && !self.probing.swap(true, Ordering::AcqRel)
    }

    fn succeeded(&self) {
        self.answered
            .store(coarse_monotonic_ms(), Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        self.probing.store(false, Ordering::Release);
        if self.open_until.swap(0, Ordering::AcqRel) != 0 {
            info!(redis = %self.described, "redis answers again: cluster-wide limits are back");
        }
        self.set_state(RedisState::Connected);
    }

    fn failed(&'static self, why: &str) {
        // Leases kept for reuse are only as good as Redis's word: after a failure they go back
        // (or expire), those in use are not pooled after their request, and requests ask
        // afresh.
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.answered.store(0, Ordering::Relaxed);
        self.flush_pool();
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        self.probing.store(false, Ordering::Release);
        if self.open_until.load(Ordering::Acquire) != 0 {
            // Open already (a probe or a dial failed): the next probe in a second, on a fresh
            // connection.
            self.open_until
                .store(coarse_monotonic_ms() + PROBE_EVERY_MS, Ordering::Release);
            *self.conn.lock().expect("not poisoned") = None;
        } else if failures >= OPEN_AFTER {
            self.trip(why);
        }
        // A connection that keeps failing is dropped; the next request that may go to Redis
        // dials afresh (a failover, a READONLY replica).
        if failures.is_multiple_of(OPEN_AFTER) {
            *self.conn.lock().expect("not poisoned") = None;
        }
    }

    /// Opens the breaker (once: a breaker already open stays as it is): the worker stops asking
    /// Redis until a probe a second from now.
    fn trip(&self, why: &str) {
        let next = coarse_monotonic_ms() + PROBE_EVERY_MS;
        if self
            .open_until
            .compare_exchange(0, next, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            warn!(
                redis = %self.described,
                error = why,
                limits.on_redis_error = self.policy.as_str(),
                "redis is not answering; degraded until it does"
            );
            self.set_state(RedisState::Degraded);
        }
    }

    fn set_state(&self, state: RedisState) {
        if let Some(slot) = self.slot.get() {
            slot.redis_state.store(state as u32, Ordering::Relaxed);
            slot.set_redis_degraded(state == RedisState::Degraded);
        }
    }

    /// Counts a request served or refused without a cluster-wide permit.
    pub(crate) fn degraded(&self) {
        if let Some(slot) = self.slot.get() {
            slot.redis_degraded.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a request refused at the cluster-wide cap.
    pub(crate) fn full(&self) {
        if let Some(slot) = self.slot.get() {
            slot.cluster_rejected.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether `limits.rate` is counted here (in Redis) rather than in the host's table.
    pub(crate) fn has_rate(&self) -> bool {
        self.rate.is_some()
    }

    /// One script call (shared with the requests that arrive meanwhile): the client's rate,
    /// when `limits.rate` is set (`client` is its key), and a cluster-wide permit, when there
    /// is a cap.
    pub(crate) async fn acquire(&'static self, client: Option<&[u8]>) -> Verdict {
        // A lease another request of this worker just gave back: no call at all unless the
        // client's rate is counted in Redis. (Never while the breaker is open: a failure
        // stops the pool's reuse until Redis answers again.)
        let pooled = if self.cap > 0 {
            self.take_pooled().map(|seq| Lease { cluster: self, seq })
        } else {
            None
        };
        let rate_key = match (&self.rate, client) {
            (Some(_), Some(client)) => Some(rate_key(&self.key_prefix, client)),
            _ => None,
        };
        if pooled.is_some() && rate_key.is_none() {
            return Verdict::Admitted(pooled, None);
        }
        if !self.allowed() {
            return Verdict::Unavailable;
        }
        if !self.connected() {
            // No connection: a dial is (now) under way, and its outcome is what counts.
            return Verdict::Unavailable;
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let lease = self.cap > 0 && pooled.is_none();
        let counted = rate_key.is_some();
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.to_acquire.lock().expect("not poisoned").push(Wanted {
            seq,
            lease,
            rate_key,
            answer: tx,
        });
        self.wanted.notify_one();
        let mut waiting = Waiting {
            cluster: self,
            seq,
            lease,
            rx: Some(rx),
        };
        let rx = waiting.rx.as_mut().expect("just set");
        let answer = tokio::time::timeout(self.timeout, rx).await;
        // Answered (or given up on): the guard has nothing more to give back.
        waiting.rx = None;
        match answer {
            Ok(Ok(Ok(answer))) => {
                let decision = match (&self.rate, counted) {
                    (Some(gcra), true) => Some(gcra.from_redis(answer.rate_ok, answer.ahead_us)),
                    _ => None,
                };
                if !answer.rate_ok {
                    return match decision {
                        Some(d) => Verdict::Limited(d),
                        None => Verdict::Unavailable,
                    };
                }
                if lease && !answer.lease_ok {
                    return Verdict::Full;
                }
                let lease = if lease {
                    let generation = self.generation.load(Ordering::Relaxed);
                    self.held
                        .lock()
                        .expect("not poisoned")
                        .insert(seq, generation);
                    Some(Lease { cluster: self, seq })
                } else {
                    pooled
                };
                Verdict::Admitted(lease, decision)
            }
            // The batch failed (already counted by the acquiring task).
            Ok(Ok(Err(()))) | Ok(Err(_)) => Verdict::Unavailable,
            // The call ran late (counted once, by the acquiring task); if it still takes a lease
            // for this request, it gives it back.
            Err(_) => Verdict::Unavailable,
        }
    }

    /// The acquiring task: one script call for every request that asked since the last one
    /// was sent, so that under load many requests share a call (and at c=1 each has its own).
    /// One call at a time, while calls answer within `redis.timeout`; one that does not is left
    /// to finish on its own (it gives back what it took for requests that stopped waiting).
    async fn acquire_batches(&'static self) {
        let mut previous: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            self.wanted.notified().await;
            if let Some(mut call) = previous.take() {
                let _ = tokio::time::timeout(self.timeout, &mut call).await;
            }
            let mut batch = std::mem::take(&mut *self.to_acquire.lock().expect("not poisoned"));
            batch.retain(|w| !w.answer.is_closed());
            if batch.is_empty() {
                // A probe whose request went away before its call: the next request probes.
                self.probing.store(false, Ordering::Release);
                continue;
            }
            previous = Some(tokio::spawn(self.send_batch(batch)));
        }
    }

    /// The script call for one batch: the full script (leases and per-client rates), or
    /// without rate limits the leaner one (only leases).
    fn batch_call(&self, batch: &[Wanted]) -> redis::ScriptInvocation<'_> {
        match self.rate {
            Some(gcra) => {
                let mut call = self.acquire.key(&self.key);
                call.arg(self.cap)
                    .arg(self.ttl_ms)
                    .arg(gcra.interval_us())
                    .arg(gcra.tolerance_us());
                for w in batch {
                    if w.lease {
                        call.arg(format!("{}{}", self.prefix, w.seq));
                    } else {
                        call.arg("-");
                    }
                    call.arg(w.rate_key.as_deref().unwrap_or("-"));
                }
                call
            }
            None => {
                let mut call = self.acquire_cap.key(&self.key);
                call.arg(self.cap).arg(self.ttl_ms);
                for w in batch {
                    call.arg(format!("{}{}", self.prefix, w.seq));
                }
                call
            }
        }
    }

    async fn send_batch(&'static self, batch: Vec<Wanted>) {
        let Some(mut conn) = self.connection() else {
            for w in batch {
                let _ = w.answer.send(Err(()));
            }
            return;
        };
        let call = self.batch_call(&batch);
        // The call is bounded by the connection's response timeout (`redis.lease_ttl`); past
        // `redis.timeout` it counts as one failure (its requests have stopped waiting) and is
        // still awaited, to give back what it took.
        let lean = self.rate.is_none();
        let n = batch.len();
        let reply = async {
            if lean {
                // As the full script's answer: rate passed, lease taken or not, nothing ahead;
                // then the room left.
                call.invoke_async::<(i64, i64)>(&mut conn)
                    .await
                    .map(|(granted, room)| {
                        (0..n as i64)
                            .flat_map(|i| [1, i64::from(i < granted), 0])
                            .chain([room])
                            .collect::<Vec<i64>>()
                    })
            } else {
                call.invoke_async::<Vec<i64>>(&mut conn).await
            }
        };
        tokio::pin!(reply);
        let mut late = false;
        let result = tokio::select! {
            r = &mut reply => r,
            _ = tokio::time::sleep(self.timeout) => {
                late = true;
                self.failed("no answer within redis.timeout");
                reply.await
            }
        };
        match result {
            Ok(mut out) if out.len() == batch.len() * 3 + 1 => {
                if !late {
                    self.succeeded();
                }
                let room = out.pop().expect("checked");
                if room != ROOM_UNKNOWN {
                    self.room.store(room, Ordering::Relaxed);
                }
                for (w, a) in batch.into_iter().zip(out.chunks_exact(3)) {
                    let answer = Answer {
                        rate_ok: a[0] == 1,
                        lease_ok: a[1] == 1,
                        ahead_us: a[2].max(0) as u64,
                    };
                    let took = w.lease && answer.rate_ok && answer.lease_ok;
                    if w.answer.send(Ok(answer)).is_err() && took {
                        // The request stopped waiting (deadline, client gone): its lease goes
                        // back.
                        self.give_back(w.seq);
                    }
                }
            }
            Ok(out) => {
                if !late {
                    self.failed(&format!("unexpected answer of {} values", out.len()));
                }
                for w in batch {
                    let _ = w.answer.send(Err(()));
                }
            }
            Err(e) => {
                self.call_failed(&e);
                if !late {
                    self.failed(&e.to_string());
                }
                for w in batch {
                    let _ = w.answer.send(Err(()));
                }
            }
        }
    }

    /// A request is done with lease `seq`: kept in the pool for the next request while Redis
    /// answers, else given back. A lease Redis no longer has (see `renew_held`) is forgotten.
    fn release(&'static self, seq: u64) {
        let Some(taken_in) = self.held.lock().expect("not poisoned").get(&seq).copied() else {
            return;
        };
        if self.open_until.load(Ordering::Acquire) != 0
            || taken_in != self.generation.load(Ordering::Relaxed)
            || self.room.load(Ordering::Relaxed) * 2 < i64::from(self.cap)
        {
            self.give_back(seq);
            return;
        }
        let mut pool = self.pool.lock().expect("not poisoned");
        pool.push((seq, coarse_monotonic_ms()));
        if pool.len() == 1 {
            self.pooled.notify_one();
        }
    }

    /// The newest lease in the pool, if it was given back within `POOL_KEEP_MS` and Redis
    /// answered within `POOL_TRUST_MS`.
    fn take_pooled(&'static self) -> Option<u64> {
        let now = coarse_monotonic_ms();
        if now.saturating_sub(self.answered.load(Ordering::Relaxed)) > POOL_TRUST_MS {
            return None;
        }
        // The newest stale means all are; `trim_pool` gives them back.
        let mut pool = self.pool.lock().expect("not poisoned");
        match pool.last() {
            Some(&(_, at)) if now.saturating_sub(at) <= POOL_KEEP_MS => pool.pop().map(|(s, _)| s),
            _ => None,
        }
    }

    /// The pool's task: leases unused for `POOL_KEEP_MS` go back to Redis, so that a worker
    /// holds about as many leases as its busiest moment of the last `POOL_KEEP_MS` needed.
    async fn trim_pool(&'static self) {
        loop {
            if self.pool.lock().expect("not poisoned").is_empty() {
                self.pooled.notified().await;
            }
            tokio::time::sleep(Duration::from_millis(POOL_KEEP_MS)).await;
            let stale: Vec<u64> = {
                let mut pool = self.pool.lock().expect("not poisoned");
                let now = coarse_monotonic_ms();
                let fresh = pool
                    .iter()
                    .position(|(_, at)| now.saturating_sub(*at) <= POOL_KEEP_MS)
                    .unwrap_or(pool.len());
                pool.drain(..fresh).map(|(seq, _)| seq).collect()
            };
            self.give_back_all(stale);
        }
    }

    /// Every lease in the pool back to Redis.
    fn flush_pool(&'static self) {
        let all = std::mem::take(&mut *self.pool.lock().expect("not poisoned"));
        self.give_back_all(all.into_iter().map(|(seq, _)| seq));
    }

    /// Gives lease `seq` back to Redis, off the request's path: queued for the releasing task,
    /// which sends every lease given back since its last call in one `ZREM`.
    fn give_back(&'static self, seq: u64) {
        self.give_back_all(std::iter::once(seq));
    }

    fn give_back_all(&'static self, seqs: impl IntoIterator<Item = u64>) {
        let mut held = self.held.lock().expect("not poisoned");
        let mut to_release = self.to_release.lock().expect("not poisoned");
        let before = to_release.len();
        for seq in seqs {
            held.remove(&seq);
            to_release.push(seq);
        }
        if to_release.len() > before {
            self.released.notify_one();
        }
    }

    /// The releasing task: one `ZREM` for all the leases given back meanwhile, retried; a lease
    /// that cannot be given back expires by itself.
    async fn release_queued(&'static self) {
        loop {
            self.released.notified().await;
            let seqs = std::mem::take(&mut *self.to_release.lock().expect("not poisoned"));
            if seqs.is_empty() {
                continue;
            }
            let mut zrem = redis::cmd("ZREM");
            zrem.arg(&self.key);
            for seq in &seqs {
                zrem.arg(format!("{}{seq}", self.prefix));
            }
            // Retried, each time later (up to a second apart), for as long as the leases
            // live: a lease not given back would shrink the cap (also on a new master after a
            // failover, which has them by replication) until it expires.
            let mut done = false;
            let give_up = tokio::time::Instant::now() + Duration::from_millis(self.ttl_ms);
            let mut pause = self.timeout;
            while tokio::time::Instant::now() < give_up {
                if let Some(mut conn) = self.connection() {
                    match tokio::time::timeout(self.timeout * 5, zrem.query_async::<i64>(&mut conn))
                        .await
                    {
                        Ok(Ok(_)) => {
                            done = true;
                            break;
                        }
                        Ok(Err(e)) => self.call_failed(&e),
                        Err(_) => {}
                    }
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            if !done {
                debug!(
                    leases = seqs.len(),
                    "cannot give leases back; they expire by themselves"
                );
            }
        }
    }

    async fn renew_held(&'static self) {
        let members: Vec<String> = self
            .held
            .lock()
            .expect("not poisoned")
            .keys()
            .map(|seq| format!("{}{seq}", self.prefix))
            .collect();
        if members.is_empty() {
            return;
        }
        let Some(mut conn) = self.connection() else {
            return;
        };
        let mut call = self.renew.key(&self.key);
        call.arg(self.ttl_ms);
        for m in &members {
            call.arg(m);
        }
        match tokio::time::timeout(
            self.timeout * 5,
            call.invoke_async::<Vec<String>>(&mut conn),
        )
        .await
        {
            Ok(Ok(missing)) => {
                // Gone from Redis (it lost its data, or they expired while it was away): the
                // worker no longer counts them as held, and the pool no longer offers them.
                let lost: HashSet<u64> = missing
                    .iter()
                    .filter_map(|m| m.strip_prefix(&self.prefix)?.parse().ok())
                    .collect();
                if !lost.is_empty() {
                    debug!(leases = lost.len(), "leases gone from redis; forgotten");
                    self.held
                        .lock()
                        .expect("not poisoned")
                        .retain(|s, _| !lost.contains(s));
                    self.pool
                        .lock()
                        .expect("not poisoned")
                        .retain(|(s, _)| !lost.contains(s));
                }
            }
            Ok(Err(e)) => {
                self.call_failed(&e);
                debug!(error = %e, leases = members.len(), "cannot renew leases");
            }
            Err(_) => debug!(leases = members.len(), "cannot renew leases: no answer"),
        }
    }
}

/// The master's side: removes a dead worker's leases as soon as it is reaped, on a thread of
/// its own so that a slow Redis never holds up the master's loop.
pub struct Janitor {
    tx: std::sync::mpsc::Sender<u32>,
}

impl Janitor {
    /// `None` without `redis.url` or a cluster-wide cap.
    pub fn start(config: &crate::config::Config, instance: u64) -> Option<Janitor> {
        if !config.redis.enabled(&config.sentinel)
            || config.limits.cluster_max_concurrent_requests == 0
        {
            return None;
        }
        let mut target = Target::open(&config.redis, &config.sentinel).ok()?;
        let described = target.described.clone();
        let key = leases_key(&config.redis.prefix);
        let timeout = (config.redis.timeout * 50).max(Duration::from_millis(500));
        let (tx, rx) = std::sync::mpsc::channel::<u32>();
        std::thread::Builder::new()
            .name("redis-janitor".to_string())
            .spawn(move || {
                let purge = Script::new(PURGE);
                let mut conn: Option<redis::Connection> = None;
                // Only for finding the master through Sentinel within a deadline (the crate's
                // blocking lookup has none).
                let Ok(lookup) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    warn!("cannot start the redis janitor: dead workers' leases will expire");
                    return;
                };
                for pid in rx {
                    let prefix = member_prefix(instance, pid);
                    for _ in 0..2 {
                        if conn.is_none() {
                            conn = lookup
                                .block_on(async {
                                    tokio::time::timeout(DIAL_TIMEOUT, target.client()).await
                                })
                                .ok()
                                .and_then(|c| c.ok())
                                .and_then(|c| c.get_connection_with_timeout(timeout).ok());
                            if let Some(c) = &conn {
                                let _ = c.set_read_timeout(Some(timeout));
                                let _ = c.set_write_timeout(Some(timeout));
                            }
                        }
                        let Some(c) = conn.as_mut() else { break };
                        match purge.key(&key).arg(&prefix).invoke::<i64>(c) {
                            Ok(n) => {
                                if n > 0 {
                                    info!(
                                        pid,
                                        leases = n,
                                        "returned a dead worker's cluster-wide permits"
                                    );
                                }
                                break;
                            }
                            Err(e) => {
                                debug!(redis = %described, pid, error = %e, "cannot purge leases");
                                conn = None;
                            }
                        }
                    }
                }
            })
            .ok()?;
        Some(Janitor { tx })
    }

    /// Worker `pid` is gone: its leases go too.
    pub fn purge(&self, pid: u32) {
        let _ = self.tx.send(pid);
    }
}

/// A cluster-wide permit, given back when dropped.
pub(crate) struct Lease {
    cluster: &'static Cluster,
    seq: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.cluster.release(self.seq);
    }
}
