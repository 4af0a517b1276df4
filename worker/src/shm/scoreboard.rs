//! The scoreboard: one shared-memory region (a memfd mapped by the master and every worker) with
//! host-wide counters and one record per worker process.
//!
//! It owns the layout and the atomic operations on it, nothing else: no locks are shared across
//! processes (a process killed while holding a lock would wedge everyone), only atomics. The
//! master creates it, hands the fd to each worker, reads it for health and status, and zeroes a
//! record when it reaps that record's process, first returning what the process held to the
//! host-wide counters so a `kill -9` never shrinks capacity.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::shm::shared_region::{Region, Shared};

const MAGIC: u64 = 0x5355_5056_5342_0006; // "SUPVSB" + layout version 6

/// Name of the memfd, visible in `/proc/PID/fd` as `/memfd:supervisor-scoreboard (deleted)`;
/// `supervisor status` finds the master's scoreboard by it.
pub const MEMFD_NAME: &str = "supervisor-scoreboard";

/// Host-wide counters, at the start of the region.
#[repr(C, align(64))]
pub struct Header {
    magic: AtomicU64,
    capacity: AtomicU32,
    /// Pid of the master that created the region.
    pub master_pid: AtomicU32,
    /// Host-wide permits held right now (the sum of every record's `held_global`).
    pub global_inflight: AtomicU32,
    /// Host-wide cap (`limits.max_concurrent_requests`); written by the master.
    pub global_cap: AtomicU32,
    /// Requests answered 503 because the host-wide cap was reached.
    pub global_rejected: AtomicU64,
    /// Random, drawn by the master at start: names this master's Redis leases apart from those
    /// of any other master, on this host (another PID namespace) or elsewhere.
    pub instance: AtomicU64,
    /// One more than the highest record the master has ever given a process: HTTP workers look
    /// for app processes below it (master writes).
    pub records_used: AtomicU32,
    /// Requests waiting host-wide for an app process with a free slot (see `pool`).
    pub app_waiters: AtomicU32,
    /// Last time the master's control loop ran, in ms of CLOCK_MONOTONIC (master writes; the
    /// metrics listener's `/livez` reads it).
    pub master_heartbeat_ms: AtomicU64,
}

/// What a worker record's process is doing, in lifecycle order.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    Free = 0,
    Booting = 1,
    Serving = 2,
    Draining = 3,
}

impl SlotState {
    pub fn from_u32(v: u32) -> SlotState {
        match v {
            1 => SlotState::Booting,
            2 => SlotState::Serving,
            3 => SlotState::Draining,
            _ => SlotState::Free,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SlotState::Free => "free",
            SlotState::Booting => "booting",
            SlotState::Serving => "serving",
            SlotState::Draining => "draining",
        }
    }
}

/// One worker process's record. A record is owned by one process at a time: the master fills
/// the identity fields before the worker starts and clears the record after reaping it; the
/// worker updates the counters while it runs.
#[repr(C, align(128))]
#[derive(Default)]
pub struct Slot {
    pub pid: AtomicU32,
    /// Logical worker number (1..=workers), which survives respawns.
    pub worker_id: AtomicU32,
    /// How many processes have held this worker number before this one.
    pub generation: AtomicU32,
    pub state: AtomicU32,
    /// Last time the worker's event loop ran, in ms of CLOCK_MONOTONIC (comparable across
    /// processes on one host).
    pub heartbeat_ms: AtomicU64,
    /// When the master started the process, in ms of CLOCK_MONOTONIC.
    pub started_ms: AtomicU64,
    /// Requests completed (any status).
    pub requests: AtomicU64,
    /// Requests in flight in this worker.
    pub inflight: AtomicU32,
    /// Host-wide permits this worker holds; the master returns them if the worker dies.
    pub held_global: AtomicU32,
    /// Open client connections.
    pub connections: AtomicU32,
    /// Requests answered 503 because this worker's `max_concurrent` was reached.
    pub rejected_local: AtomicU64,
    /// Requests answered 504 because they exceeded `request_timeout`.
    pub timeouts: AtomicU64,
    /// Requests waiting in this worker's queue (`limits.queue`) right now.
    pub queued: AtomicU32,
    /// Health checks (`limits.health_paths`) in flight past the limits right now.
    pub health_inflight: AtomicU32,
    /// Requests answered 503 because the queue was full.
    pub queue_full: AtomicU64,
    /// Requests answered 503 after waiting `limits.queue_timeout` in the queue.
    pub queue_timeouts: AtomicU64,
    /// This worker's view of Redis (`cluster::RedisState`).
    pub redis_state: AtomicU32,
    /// Requests answered 503 because the cluster-wide cap was reached.
    pub cluster_rejected: AtomicU64,
    /// Requests served without a cluster-wide permit (or refused) because Redis did not answer.
    pub redis_degraded: AtomicU64,
    /// Memory of the worker and its descendants at the last sample, in bytes (master writes).
    pub rss_bytes: AtomicU64,
    /// Why the master is replacing this worker (`RecycleReason`), 0 while it is not.
    pub recycle_reason: AtomicU32,
    /// Pid of the worker's app process (`app.command`), 0 when none runs.
    pub app_pid: AtomicU32,
    /// Times the worker's app process was started after the first.
    pub app_restarts: AtomicU32,
    /// `accept` failures for want of resources (fds, socket buffers, memory).
    pub accept_errors: AtomicU64,
    /// Requests in a row that the app (or upstream) did not answer (502s); 0 after any answer
    /// from it. See [`Slot::app_healthy`].
    pub app_502_streak: AtomicU32,
    /// Requests answered, by status class: `[1xx, 2xx, 3xx, 4xx, 5xx]` (metrics).
    pub status_classes: [AtomicU64; 5],
    /// Requests answered, by duration: one counter per bucket of [`LATENCY_BUCKETS_US`], the
    /// last one for longer ones (not cumulative; the metrics exporter adds them up).
    pub latency_buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    /// Sum of the durations counted in `latency_buckets`, in µs.
    pub latency_sum_us: AtomicU64,
    /// Requests answered 429 because the client's rate (`limits.rate`) was spent.
    pub rate_limited: AtomicU64,
    /// Requests whose client left before its response was sent (logged 499); the app still
    /// finished them, with their permits held.
    pub client_gone: AtomicU64,
    /// What the record's process is ([`Kind`]); written by the master before the fork.
    pub kind: AtomicU32,
    /// App host records: the app process's load as HTTP workers see it, one word so that
    /// taking a slot, closing to new requests and a new process in the record are never seen
    /// half done: the app host's pid (high 32 bits), [`APP_OPEN`] (it takes new requests), and
    /// the requests in flight to it (low 31 bits). See [`Slot::app_take`].
    pub app_load: AtomicU64,
    /// App host records: the loopback port the app listens on (`{port}`); 0 for `{socket}`.
    pub app_port: AtomicU32,
    /// App host records: 1 while the app fails to start again and again (requests stop waiting
    /// for it).
    pub app_failing: AtomicU32,
    /// App host records: requests sent to the app process (the count `max_requests` recycles
    /// by); written by HTTP workers.
    pub app_sent: AtomicU64,
    /// App host records: when the app process last showed it is moving (µs of
    /// CLOCK_MONOTONIC): it was given a request while it had none, or one of its requests
    /// ended. See `pool::AppPool::try_take`.
    pub app_moved_us: AtomicU64,
    /// HTTP worker records: when the request at the head of this worker's queue for an app
    /// process began to wait (µs of CLOCK_MONOTONIC); 0 when none waits. The oldest head
    /// host-wide goes first.
    pub app_wait_since_us: AtomicU64,
    /// Time this worker spent with Redis degraded, in ms, up to its last recovery.
    pub redis_degraded_ms: AtomicU64,
    /// When the current degraded period began (coarse CLOCK_MONOTONIC ms); 0 when not degraded.
    pub redis_degraded_since_ms: AtomicU64,
    /// Some of the requests in flight, so that a hung worker can be reported with what it was
    /// doing: the worker cannot answer any question once its event loop is stuck.
    pub current: [RequestEntry; TRACKED_REQUESTS],
}

/// Upper bounds of the request-duration buckets, in µs (the exporter's `le` labels, in
/// seconds): 1 ms to 10 s, the usual spread for web requests.
pub const LATENCY_BUCKETS_US: [u64; 13] = [
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

/// How many in-flight requests each record describes.
pub const TRACKED_REQUESTS: usize = 4;
const REQUEST_TEXT_WORDS: usize = 12;

/// One in-flight request: when it started and `METHOD /path` (truncated to 96 bytes), packed
/// into atomics so that reading it from another process is well defined.
#[repr(C)]
#[derive(Default)]
pub struct RequestEntry {
    /// CLOCK_MONOTONIC ms when the request started; 0 when the entry is free.
    started_ms: AtomicU64,
    text: [AtomicU64; REQUEST_TEXT_WORDS],
}

/// Why a worker is being replaced, as recorded in its scoreboard record.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecycleReason {
    MaxRequests = 1,
    MaxRss = 2,
    MaxLifetime = 3,
    Reload = 4,
    Hung = 5,
}

impl RecycleReason {
    pub fn from_u32(v: u32) -> Option<RecycleReason> {
        Some(match v {
            1 => RecycleReason::MaxRequests,
            2 => RecycleReason::MaxRss,
            3 => RecycleReason::MaxLifetime,
            4 => RecycleReason::Reload,
            5 => RecycleReason::Hung,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RecycleReason::MaxRequests => "max_requests",
            RecycleReason::MaxRss => "max_rss",
            RecycleReason::MaxLifetime => "max_lifetime",
            RecycleReason::Reload => "reload",
            RecycleReason::Hung => "hung",
        }
    }
}

/// What a record's process is.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An HTTP worker (with the built-in app, an upstream, or in front of app processes).
    Http = 0,
    /// An app host: supervises one app process (`app.command`) of the pool.
    App = 1,
}

impl Kind {
    pub fn from_u32(v: u32) -> Kind {
        if v == 1 {
            Kind::App
        } else {
            Kind::Http
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Http => "http",
            Kind::App => "app",
        }
    }
}

/// The bit of [`Slot::app_load`] that says the app process takes new requests.
pub const APP_OPEN: u64 = 1 << 31;
const APP_INFLIGHT: u64 = APP_OPEN - 1;

/// An app process's load, as read from [`Slot::app_load`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppLoad {
    /// Its app host's pid; 0 for a free record.
    pub pid: u32,
    pub open: bool,
    pub inflight: u32,
}

impl AppLoad {
    pub fn of(word: u64) -> AppLoad {
        AppLoad {
            pid: (word >> 32) as u32,
            open: word & APP_OPEN != 0,
            inflight: (word & APP_INFLIGHT) as u32,
        }
    }
}

/// After this many 502s in a row, a worker's app counts as unhealthy (`status`, metrics).
pub const APP_UNHEALTHY_AFTER_502S: u32 = 3;

impl Slot {
    /// The app answered a request (any status of its own).
    #[inline]
    pub fn app_answered(&self) {
        // Read first: the common case writes nothing.
        if self.app_502_streak.load(Ordering::Relaxed) != 0 {
            self.app_502_streak.store(0, Ordering::Relaxed);
        }
    }

    /// The app did not answer a request (a 502).
    pub fn app_failed(&self) {
        self.app_502_streak.fetch_add(1, Ordering::Relaxed);
    }

    /// False while the app's last `APP_UNHEALTHY_AFTER_502S` requests or more were all 502s.
    pub fn app_healthy(&self) -> bool {
        self.app_502_streak.load(Ordering::Relaxed) < APP_UNHEALTHY_AFTER_502S
    }

    pub fn state(&self) -> SlotState {
        SlotState::from_u32(self.state.load(Ordering::Acquire))
    }

    pub fn kind(&self) -> Kind {
        Kind::from_u32(self.kind.load(Ordering::Relaxed))
    }

    pub fn app_load(&self) -> AppLoad {
        AppLoad::of(self.app_load.load(Ordering::Acquire))
    }

    /// App host side: names its process in its record, closed to requests.
    pub fn app_init(&self, pid: u32) {
        self.app_load.store(u64::from(pid) << 32, Ordering::Release);
    }

    /// App host side: opens (or closes) the app process to new requests. Requests in flight go
    /// on; a closed app whose in-flight count reaches 0 is done with.
    pub fn app_set_open(&self, open: bool) {
        if open {
            self.app_load.fetch_or(APP_OPEN, Ordering::AcqRel);
        } else {
            self.app_load.fetch_and(!APP_OPEN, Ordering::AcqRel);
        }
    }

    /// HTTP worker side: takes one request slot of the app process whose host is `pid`, if it
    /// is still that process, open, and below `limit` requests in flight (0: no limit).
    pub fn app_take(&self, pid: u32, limit: u32) -> bool {
        self.app_load
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                let l = AppLoad::of(w);
                let room = if limit == 0 {
                    u64::from(l.inflight) < APP_INFLIGHT
                } else {
                    l.inflight < limit
                };
                (l.pid == pid && l.open && room).then_some(w + 1)
            })
            .is_ok()
    }

    /// HTTP worker side: gives back a slot taken with `app_take(pid, _)`; nothing if the
    /// record has a new process since (the master cleared it when it reaped the old one).
    pub fn app_give_back(&self, pid: u32) {
        let _ = self
            .app_load
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                let l = AppLoad::of(w);
                (l.pid == pid && l.inflight > 0).then_some(w - 1)
            });
    }

    pub fn set_state(&self, state: SlotState) {
        self.state.store(state as u32, Ordering::Release);
    }

    /// Worker side: notes a request that starts now. Returns the entry to pass to
    /// `end_request`, or `None` when every entry is taken (the request is simply not described).
    /// Only the worker's own thread writes its record's entries.
    pub fn begin_request(&self, method: &str, path: &str) -> Option<usize> {
        let index = self
            .current
            .iter()
            .position(|e| e.started_ms.load(Ordering::Relaxed) == 0)?;
        let entry = &self.current[index];
        // `METHOD /path`, cut to fit, NUL-terminated when shorter: readers stop at the first
        // NUL, so only the words up to it are written (this runs on every request).
        let mut bytes = [0u8; REQUEST_TEXT_WORDS * 8];
        let m = method.len().min(bytes.len() - 1);
        bytes[..m].copy_from_slice(&method.as_bytes()[..m]);
        bytes[m] = b' ';
        let p = path.len().min(bytes.len() - m - 1);
        bytes[m + 1..m + 1 + p].copy_from_slice(&path.as_bytes()[..p]);
        let words = (m + 1 + p + 1).div_ceil(8).min(REQUEST_TEXT_WORDS);
        for (word, chunk) in entry.text[..words].iter().zip(bytes.chunks_exact(8)) {
            let v = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            word.store(v, Ordering::Relaxed);
        }
        // Published last: a reader that sees the start time sees the text.
        entry
            .started_ms
            .store(coarse_monotonic_ms().max(1), Ordering::Release);
        Some(index)
    }

    /// Worker side: the request noted by `begin_request` is over.
    pub fn end_request(&self, index: usize) {
        self.current[index].started_ms.store(0, Ordering::Release);
    }

    /// The described requests in flight: (start in CLOCK_MONOTONIC ms, `METHOD /path`).
    pub fn requests_in_flight(&self) -> Vec<(u64, String)> {
        self.current
            .iter()
            .filter_map(|e| {
                let started = e.started_ms.load(Ordering::Acquire);
                if started == 0 {
                    return None;
                }
                let mut bytes = Vec::with_capacity(REQUEST_TEXT_WORDS * 8);
                for w in &e.text {
                    bytes.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
                }
                let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
                Some((started, String::from_utf8_lossy(&bytes[..end]).into_owned()))
            })
            .collect()
    }

    /// Worker side: counts one answered request, with its status and, when it was timed, how
    /// long it took: at most three relaxed adds on the worker's own record (no other process
    /// writes it, so no contention). The duration is counted first, so that a reader who sees
    /// a request in `status_classes` also sees it in `latency_buckets`.
    #[inline]
    pub fn record_response(&self, status: u16, micros: Option<u64>) {
        if let Some(micros) = micros {
            let bucket = LATENCY_BUCKETS_US
                .iter()
                .position(|&le| micros <= le)
                .unwrap_or(LATENCY_BUCKETS_US.len());
            self.latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
            self.latency_sum_us.fetch_add(micros, Ordering::Relaxed);
        }
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.status_classes[class].fetch_add(1, Ordering::Relaxed);
    }

    /// Worker side: Redis stopped answering (`degraded`) or answers again; keeps the time spent
    /// degraded. Calls that do not change the state change nothing.
    pub fn set_redis_degraded(&self, degraded: bool) {
        let now = coarse_monotonic_ms().max(1);
        if degraded {
            let _ = self.redis_degraded_since_ms.compare_exchange(
                0,
                now,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        } else {
            let since = self.redis_degraded_since_ms.swap(0, Ordering::Relaxed);
            if since > 0 {
                self.redis_degraded_ms
                    .fetch_add(now.saturating_sub(since), Ordering::Relaxed);
            }
        }
    }

    /// Time spent with Redis degraded, including the current period, as of `now_ms`
    /// (CLOCK_MONOTONIC ms).
    pub fn redis_degraded_total_ms(&self, now_ms: u64) -> u64 {
        let since = self.redis_degraded_since_ms.load(Ordering::Relaxed);
        let current = if since > 0 {
            now_ms.saturating_sub(since)
        } else {
            0
        };
        self.redis_degraded_ms.load(Ordering::Relaxed) + current
    }

    pub fn recycle_reason(&self) -> Option<RecycleReason> {
        RecycleReason::from_u32(self.recycle_reason.load(Ordering::Relaxed))
    }
}

/// A mapped scoreboard. Cheap to share: every method takes `&self`.
pub struct Scoreboard {
    region: Region,
    capacity: usize,
}

// SAFETY: only atomics, in `#[repr(C)]` structs and arrays: any bit pattern is valid.
unsafe impl Shared for Header {}
// SAFETY: as above.
unsafe impl Shared for Slot {}

impl Scoreboard {
    /// Creates a zeroed region with room for `capacity` worker records (master side). The fd is
    /// close-on-exec; the spawner passes it to each worker explicitly.
    pub fn create(capacity: usize, global_cap: u32) -> io::Result<(Scoreboard, OwnedFd)> {
        let (region, fd) = Region::create(MEMFD_NAME, slot_offset(capacity))?;
        let board = Scoreboard { region, capacity };
        let h = board.header();
        h.capacity.store(capacity as u32, Ordering::Relaxed);
        h.master_pid.store(std::process::id(), Ordering::Relaxed);
        h.global_cap.store(global_cap, Ordering::Relaxed);
        let random = std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            (std::process::id(), monotonic_ms()),
        );
        h.instance.store(random, Ordering::Relaxed);
        h.magic.store(MAGIC, Ordering::Release);
        Ok((board, fd))
    }

    /// Maps an existing region (worker side, or `supervisor status` read-only).
    pub fn open(fd: impl AsFd, writable: bool) -> io::Result<Scoreboard> {
        let region = Region::open(fd, writable)?;
        let len = region.len();
        if len < slot_offset(0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "scoreboard too small",
            ));
        }
        let capacity = (len - slot_offset(0)) / std::mem::size_of::<Slot>();
        let board = Scoreboard { region, capacity };
        let h = board.header();
        if h.magic.load(Ordering::Acquire) != MAGIC
            || h.capacity.load(Ordering::Relaxed) as usize != capacity
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a scoreboard of this supervisor version",
            ));
        }
        Ok(board)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn header(&self) -> &Header {
        self.region.get(0)
    }

    /// Record `index`; panics if `index >= capacity` (a programming error).
    pub fn slot(&self, index: usize) -> &Slot {
        assert!(
            index < self.capacity,
            "scoreboard slot {index} out of range"
        );
        self.region.get(slot_offset(index))
    }

    pub fn slots(&self) -> impl Iterator<Item = (usize, &Slot)> {
        (0..self.capacity).map(move |i| (i, self.slot(i)))
    }

    /// Takes one host-wide permit for the worker in record `index`, unless the cap is reached.
    ///
    /// The host counter is bumped first and the record second (and the reverse on release): a
    /// process killed between the two steps leaves the host counter one too high, which errs
    /// towards refusing a request, never towards exceeding the cap.
    pub fn try_acquire_global(&self, index: usize) -> bool {
        let h = self.header();
        let cap = h.global_cap.load(Ordering::Relaxed);
        let taken = h
            .global_inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .is_ok();
        if taken {
            self.slot(index).held_global.fetch_add(1, Ordering::AcqRel);
        }
        taken
    }

    /// Returns one host-wide permit taken by `try_acquire_global(index)`.
    pub fn release_global(&self, index: usize) {
        self.slot(index).held_global.fetch_sub(1, Ordering::AcqRel);
        self.header().global_inflight.fetch_sub(1, Ordering::AcqRel);
    }

    /// Master side, after reaping the process of record `index`: returns the host-wide permits
    /// it still held and frees the record. Returns how many permits were returned.
    pub fn reclaim(&self, index: usize) -> u32 {
        let slot = self.slot(index);
        let held = slot.held_global.swap(0, Ordering::AcqRel);
        if held > 0 {
            let _ = self.header().global_inflight.fetch_update(
                Ordering::AcqRel,
                Ordering::Acquire,
                |n| Some(n.saturating_sub(held)),
            );
        }
        slot.clear();
        held
    }
}

impl Slot {
    /// Zeroes the record (state `free`), as [`Scoreboard::reclaim`] does once the host-wide
    /// permits are back.
    fn clear(&self) {
        // Every field is named (no `..`): a field added to `Slot` does not compile until it is
        // cleared here too (or named as kept), so the record's next process never inherits a
        // counter of the last one.
        let Slot {
            pid,
            worker_id,
            generation,
            state: _, // set last, below
            heartbeat_ms,
            started_ms,
            requests,
            inflight,
            held_global: _, // returned above
            connections,
            rejected_local,
            timeouts,
            queued,
            health_inflight,
            queue_full,
            queue_timeouts,
            redis_state,
            cluster_rejected,
            redis_degraded,
            rss_bytes,
            recycle_reason,
            app_pid,
            app_restarts,
            accept_errors,
            app_502_streak,
            status_classes,
            latency_buckets,
            latency_sum_us,
            rate_limited,
            client_gone,
            kind,
            app_load,
            app_port,
            app_failing,
            app_sent,
            app_moved_us,
            app_wait_since_us,
            redis_degraded_ms,
            redis_degraded_since_ms,
            current,
        } = self;
        for field in [
            pid,
            worker_id,
            generation,
            inflight,
            connections,
            queued,
            health_inflight,
            redis_state,
            recycle_reason,
            app_pid,
            app_restarts,
            app_502_streak,
            kind,
            app_port,
            app_failing,
        ] {
            field.store(0, Ordering::Relaxed);
        }
        let counters = [
            heartbeat_ms,
            started_ms,
            requests,
            rejected_local,
            timeouts,
            queue_full,
            queue_timeouts,
            cluster_rejected,
            redis_degraded,
            rss_bytes,
            accept_errors,
            latency_sum_us,
            rate_limited,
            client_gone,
            app_sent,
            app_moved_us,
            app_wait_since_us,
            redis_degraded_ms,
            redis_degraded_since_ms,
        ];
        for field in counters
            .into_iter()
            .chain(status_classes)
            .chain(latency_buckets)
        {
            field.store(0, Ordering::Relaxed);
        }
        // An entry's text means nothing while it has no start time.
        for entry in current {
            entry.started_ms.store(0, Ordering::Relaxed);
        }
        // HTTP workers read the app's load without a lock: the pid goes with the rest of it.
        app_load.store(0, Ordering::Release);
        self.set_state(SlotState::Free);
    }
}

fn slot_offset(index: usize) -> usize {
    let header = std::mem::size_of::<Header>().next_multiple_of(std::mem::align_of::<Slot>());
    header + index * std::mem::size_of::<Slot>()
}

/// Microseconds of CLOCK_MONOTONIC: the same clock in every process on the host.
pub fn monotonic_us() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available on Linux");
    ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1_000
}

/// Milliseconds of CLOCK_MONOTONIC: the same clock in every process on the host.
pub fn monotonic_ms() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available on Linux");
    ts.tv_sec() as u64 * 1000 + ts.tv_nsec() as u64 / 1_000_000
}

/// `CLOCK_MONOTONIC_COARSE` in milliseconds: the same clock as `monotonic_ms` as of the last
/// scheduler tick (at most a few ms behind, never ahead), read without the TSC. For stamps
/// taken on every request, where a few ms do not matter and a clock read is a measurable part
/// of the cost.
pub fn coarse_monotonic_ms() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .expect("CLOCK_MONOTONIC_COARSE is always available on Linux");
    ts.tv_sec() as u64 * 1000 + ts.tv_nsec() as u64 / 1_000_000
}

/// The resolution of `coarse_monotonic_ms` (one scheduler tick), in whole ms rounded up.
pub fn coarse_tick_ms() -> u64 {
    static TICK: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICK.get_or_init(|| {
        nix::time::clock_getres(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
            .map(|r| {
                (Duration::from(r).as_nanos() as u64)
                    .div_ceil(1_000_000)
                    .max(1)
            })
            // A tick is 1-10 ms on any Linux (HZ 100 to 1000).
            .unwrap_or(10)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_cap_is_exact_and_reclaim_returns_permits() {
        let (board, fd) = Scoreboard::create(4, 3).unwrap();
        assert!(board.try_acquire_global(0));
        assert!(board.try_acquire_global(1));
        assert!(board.try_acquire_global(1));
        assert!(
            !board.try_acquire_global(0),
            "fourth permit over a cap of 3"
        );

        // A second mapping (as a worker has) sees the same counters.
        let other = Scoreboard::open(&fd, true).unwrap();
        assert_eq!(other.header().global_inflight.load(Ordering::Relaxed), 3);

        // Worker 1 dies holding two permits: the master gives them back.
        assert_eq!(board.reclaim(1), 2);
        assert_eq!(other.header().global_inflight.load(Ordering::Relaxed), 1);
        board.release_global(0);
        assert_eq!(board.header().global_inflight.load(Ordering::Relaxed), 0);
    }

    /// The bytes of a record that belong to a field (not padding). Every field is named (no
    /// `..`), so a new one counts here as soon as it exists.
    fn field_bytes(slot: &Slot) -> usize {
        use std::mem::size_of_val;
        let Slot {
            pid,
            worker_id,
            generation,
            state,
            heartbeat_ms,
            started_ms,
            requests,
            inflight,
            held_global,
            connections,
            rejected_local,
            timeouts,
            queued,
            health_inflight,
            queue_full,
            queue_timeouts,
            redis_state,
            cluster_rejected,
            redis_degraded,
            rss_bytes,
            recycle_reason,
            app_pid,
            app_restarts,
            accept_errors,
            app_502_streak,
            status_classes,
            latency_buckets,
            latency_sum_us,
            rate_limited,
            client_gone,
            kind,
            app_load,
            app_port,
            app_failing,
            app_sent,
            app_moved_us,
            app_wait_since_us,
            redis_degraded_ms,
            redis_degraded_since_ms,
            current,
        } = slot;
        size_of_val(pid)
            + size_of_val(worker_id)
            + size_of_val(generation)
            + size_of_val(state)
            + size_of_val(heartbeat_ms)
            + size_of_val(started_ms)
            + size_of_val(requests)
            + size_of_val(inflight)
            + size_of_val(held_global)
            + size_of_val(connections)
            + size_of_val(rejected_local)
            + size_of_val(timeouts)
            + size_of_val(queued)
            + size_of_val(health_inflight)
            + size_of_val(queue_full)
            + size_of_val(queue_timeouts)
            + size_of_val(redis_state)
            + size_of_val(cluster_rejected)
            + size_of_val(redis_degraded)
            + size_of_val(rss_bytes)
            + size_of_val(recycle_reason)
            + size_of_val(app_pid)
            + size_of_val(app_restarts)
            + size_of_val(accept_errors)
            + size_of_val(app_502_streak)
            + size_of_val(status_classes)
            + size_of_val(latency_buckets)
            + size_of_val(latency_sum_us)
            + size_of_val(rate_limited)
            + size_of_val(client_gone)
            + size_of_val(kind)
            + size_of_val(app_load)
            + size_of_val(app_port)
            + size_of_val(app_failing)
            + size_of_val(app_sent)
            + size_of_val(app_moved_us)
            + size_of_val(app_wait_since_us)
            + size_of_val(redis_degraded_ms)
            + size_of_val(redis_degraded_since_ms)
            + size_of_val(current)
    }

    #[test]
    fn reclaim_leaves_nothing_of_the_last_process_in_the_record() {
        use std::os::unix::fs::FileExt;

        let (board, fd) = Scoreboard::create(2, 1).unwrap();
        let file = std::fs::File::from(fd);
        let record = std::mem::size_of::<Slot>();
        // Every byte of record 1 set, as a process that wrote every field would leave it.
        file.write_at(&vec![0xff; record], slot_offset(1) as u64)
            .unwrap();
        board.reclaim(1);
        let mut after = vec![0; record];
        file.read_exact_at(&mut after, slot_offset(1) as u64)
            .unwrap();
        // Left as they were: the padding between fields, and the text of the request entries
        // (meaningless once their start time is 0).
        let fields = field_bytes(board.slot(0));
        let text = TRACKED_REQUESTS * REQUEST_TEXT_WORDS * 8;
        let left = after.iter().filter(|&&b| b != 0).count();
        assert_eq!(left, record - fields + text, "bytes of fields not cleared");
        assert_eq!(board.slot(1).state(), SlotState::Free);
        assert_eq!(
            board.slot(0).pid.load(Ordering::Relaxed),
            0,
            "other records untouched"
        );
    }

    #[test]
    fn in_flight_requests_are_described_for_another_process() {
        let (board, fd) = Scoreboard::create(1, 1).unwrap();
        let master = Scoreboard::open(&fd, false).unwrap();
        let slot = board.slot(0);
        let a = slot.begin_request("GET", "/block?ms=5000").unwrap();
        let long = "/x".repeat(100);
        let b = slot.begin_request("POST", &long).unwrap();
        let seen = master.slot(0).requests_in_flight();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].1, "GET /block?ms=5000");
        assert_eq!(seen[1].1.len(), 96, "truncated to the entry's size");
        assert!(seen[1].1.starts_with("POST /x/x"));
        for _ in 2..TRACKED_REQUESTS {
            slot.begin_request("GET", "/").unwrap();
        }
        assert_eq!(slot.begin_request("GET", "/"), None, "all entries taken");
        slot.end_request(a);
        slot.end_request(b);
        assert_eq!(
            master.slot(0).requests_in_flight().len(),
            TRACKED_REQUESTS - 2
        );
        // Entries are reused; a shorter text hides the longer one it overwrites.
        assert_eq!(slot.begin_request("GET", "/s"), Some(a));
        assert_eq!(slot.begin_request("GET", "/t"), Some(b));
        let seen = master.slot(0).requests_in_flight();
        assert_eq!(
            (seen[0].1.as_str(), seen[1].1.as_str()),
            ("GET /s", "GET /t")
        );
        slot.end_request(a);
        slot.end_request(b);
        board.reclaim(0);
        assert!(master.slot(0).requests_in_flight().is_empty());
    }

    #[test]
    fn responses_are_counted_by_class_and_duration() {
        let (board, _fd) = Scoreboard::create(1, 1).unwrap();
        let slot = board.slot(0);
        slot.record_response(200, Some(0));
        slot.record_response(204, Some(1_000));
        slot.record_response(404, Some(1_001));
        slot.record_response(503, Some(60_000_000));
        slot.record_response(302, None);
        let classes: Vec<u64> = slot
            .status_classes
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        assert_eq!(classes, [0, 2, 1, 1, 1]);
        let buckets: Vec<u64> = slot
            .latency_buckets
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        assert_eq!(buckets[0], 2, "<= 1 ms, inclusive");
        assert_eq!(buckets[1], 1);
        assert_eq!(buckets[LATENCY_BUCKETS_US.len()], 1, "past the last bound");
        assert_eq!(slot.latency_sum_us.load(Ordering::Relaxed), 60_002_001);
        board.reclaim(0);
        assert_eq!(slot.status_classes[1].load(Ordering::Relaxed), 0);
        assert_eq!(slot.latency_sum_us.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn degraded_time_adds_up_across_periods() {
        let (board, _fd) = Scoreboard::create(1, 1).unwrap();
        let slot = board.slot(0);
        slot.set_redis_degraded(false);
        assert_eq!(slot.redis_degraded_total_ms(u64::MAX / 2), 0);
        slot.set_redis_degraded(true);
        let since = slot.redis_degraded_since_ms.load(Ordering::Relaxed);
        assert!(since > 0);
        slot.set_redis_degraded(true); // already degraded: the period keeps its start
        assert_eq!(slot.redis_degraded_since_ms.load(Ordering::Relaxed), since);
        assert_eq!(slot.redis_degraded_total_ms(since + 700), 700);
        slot.set_redis_degraded(false);
        assert_eq!(slot.redis_degraded_since_ms.load(Ordering::Relaxed), 0);
        let done = slot.redis_degraded_ms.load(Ordering::Relaxed);
        assert_eq!(slot.redis_degraded_total_ms(u64::MAX / 2), done);
    }

    #[test]
    fn slots_do_not_overlap_the_header() {
        assert!(slot_offset(0) >= std::mem::size_of::<Header>());
        assert_eq!(slot_offset(0) % std::mem::align_of::<Slot>(), 0);
        let (board, _fd) = Scoreboard::create(2, 1).unwrap();
        board.slot(0).requests.store(7, Ordering::Relaxed);
        assert_eq!(board.header().global_cap.load(Ordering::Relaxed), 1);
        assert_eq!(board.slot(1).requests.load(Ordering::Relaxed), 0);
    }
}
