//! Metrics: the Prometheus text exposition (`[metrics] bind`, path `/metrics`), aggregated from
//! the scoreboard, and the probes an orchestrator asks (`/livez`, `/readyz`, see `Probe`). No request goes to a worker: every worker counts into its own record, and a
//! scrape adds the records up.
//!
//! Owns the metrics thread (its own single-threaded tokio runtime and a small HTTP/1 server, so
//! that a slow or stuck scraper never delays the master's poll loop), the totals of workers
//! that have exited (so that counters never go backwards when a record is freed and reused),
//! and the recycle counts. The master calls [`Metrics::reap`] instead of
//! `Scoreboard::reclaim`: folding a dead worker's counters into the totals and freeing its
//! record happen under the same lock a scrape takes, so a scrape sees the worker either live or
//! folded, never both or neither.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tracing::{debug, info, warn};
use worker::cluster::RedisState;
use worker::config::MetricsConfig;
use worker::scoreboard::{
    monotonic_ms, Kind, RecycleReason, Scoreboard, Slot, SlotState, LATENCY_BUCKETS_US,
};

/// Connections served at once. When all are taken, the one that has sent no request for
/// longest is closed to make room for a new one: silent connections never hold a scrape up.
const MAX_CONNECTIONS: usize = 4;
/// A scraper must send its request head within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest one connection may stay open, whatever it does.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

const BUCKETS: usize = LATENCY_BUCKETS_US.len() + 1;

/// `/livez` fails when the master's control loop has not run for this long (it runs at least
/// once a second).
const LIVE_WITHIN_MS: u64 = 10_000;

/// What `/livez` and `/readyz` answer from: a look at the scoreboard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Probe {
    /// Since the master's control loop last ran.
    master_age_ms: u64,
    /// HTTP workers serving (not booting, not draining).
    serving: u64,
    /// App processes kept (any state), and those taking requests and healthy.
    apps: u64,
    apps_open: u64,
}

impl Probe {
    fn of(board: &Scoreboard) -> Probe {
        let mut probe = Probe {
            master_age_ms: monotonic_ms()
                .saturating_sub(board.header().master_heartbeat_ms.load(Ordering::Relaxed)),
            ..Probe::default()
        };
        for (_, slot) in board.slots() {
            let state = slot.state();
            match slot.kind() {
                Kind::Http => probe.serving += u64::from(state == SlotState::Serving),
                Kind::App if state != SlotState::Free => {
                    probe.apps += 1;
                    let load = slot.app_load();
                    // Taking requests, and not answering only 502s (`Slot::app_healthy`).
                    probe.apps_open += u64::from(load.pid != 0 && load.open && slot.app_healthy());
                }
                Kind::App => {}
            }
        }
        probe
    }

    /// `/livez`: the master's control loop runs (it restarts hung or dead workers itself, so
    /// their state is `/readyz`'s business, not a reason to restart the whole server).
    fn live(&self) -> Result<String, String> {
        if self.master_age_ms > LIVE_WITHIN_MS {
            return Err(format!(
                "not live: the master's control loop has not run for {} ms\n",
                self.master_age_ms
            ));
        }
        Ok("live\n".into())
    }

    /// `/readyz`: live, at least one HTTP worker serving, and, with app processes, at least
    /// one of them taking requests. A stopping server (its workers draining) is not ready, so
    /// that a load balancer stops sending before the listeners close.
    fn ready(&self) -> Result<String, String> {
        self.live()?;
        if self.serving == 0 {
            return Err("not ready: no HTTP worker is serving (starting, or stopping)\n".into());
        }
        if self.apps > 0 && self.apps_open == 0 {
            return Err(format!(
                "not ready: none of the {} app processes takes requests (starting, \
                 restarting, failing, or answering only 502s)\n",
                self.apps
            ));
        }
        let apps = if self.apps > 0 {
            format!(
                ", {} of {} app processes taking requests",
                self.apps_open, self.apps
            )
        } else {
            String::new()
        };
        Ok(format!(
            "ready: {} HTTP workers serving{apps}\n",
            self.serving
        ))
    }
}

const RECYCLE_REASONS: [RecycleReason; 5] = [
    RecycleReason::MaxRequests,
    RecycleReason::MaxRss,
    RecycleReason::MaxLifetime,
    RecycleReason::Reload,
    RecycleReason::Hung,
];

/// How a worker died without being asked to stop, for `supervisor_worker_deaths_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Death {
    /// It exited: a crash that exits, a failed boot, or a TERM, INT or QUIT from elsewhere
    /// (a worker exits when told to by anyone).
    Exited,
    /// A SIGKILL the master did not send: the kernel's OOM killer or an operator.
    Killed,
    /// Any other signal that killed it (SIGSEGV, SIGABRT, ...).
    Signaled,
}

const DEATHS: [(Death, &str); 3] = [
    (Death::Exited, "exit"),
    (Death::Killed, "sigkill"),
    (Death::Signaled, "signal"),
];

/// Counters of one record, or of many added up.
#[derive(Clone, Debug, Default)]
struct Counters {
    classes: [u64; 5],
    buckets: [u64; BUCKETS],
    latency_sum_us: u64,
    rate_limited: u64,
    client_gone: u64,
    rejected_local: u64,
    queue_full: u64,
    queue_timeouts: u64,
    cluster_rejected: u64,
    timeouts: u64,
    redis_degraded_requests: u64,
    redis_degraded_ms: u64,
    app_restarts: u64,
    accept_errors: u64,
}

impl Counters {
    fn add(&mut self, slot: &Slot, now_ms: u64) {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        for (t, c) in self.classes.iter_mut().zip(&slot.status_classes) {
            *t += load(c);
        }
        for (t, c) in self.buckets.iter_mut().zip(&slot.latency_buckets) {
            *t += load(c);
        }
        self.latency_sum_us += load(&slot.latency_sum_us);
        self.rate_limited += load(&slot.rate_limited);
        self.client_gone += load(&slot.client_gone);
        self.rejected_local += load(&slot.rejected_local);
        self.queue_full += load(&slot.queue_full);
        self.queue_timeouts += load(&slot.queue_timeouts);
        self.cluster_rejected += load(&slot.cluster_rejected);
        self.timeouts += load(&slot.timeouts);
        self.redis_degraded_requests += load(&slot.redis_degraded);
        self.redis_degraded_ms += slot.redis_degraded_total_ms(now_ms);
        self.app_restarts += u64::from(slot.app_restarts.load(Ordering::Relaxed));
        self.accept_errors += load(&slot.accept_errors);
    }
}

/// What the master and the metrics thread share.
struct State {
    /// Counters of every worker process that has exited.
    retired: Counters,
    /// Replaced workers that have exited, by reason (`RECYCLE_REASONS` order).
    recycles: [u64; 5],
    /// Workers that died unasked, by cause (`DEATHS` order).
    deaths: [u64; 3],
    /// Highest degraded time shown so far: a worker's period is read from two atomics, and a
    /// read between the worker's two updates may come out a few ms short.
    degraded_ms_shown: u64,
}

/// The master's handle on the metrics thread.
pub struct Metrics {
    state: Arc<Mutex<State>>,
    /// `metrics.bind` as configured, and the address it gave.
    bind: String,
    addr: SocketAddr,
    /// A copy of the listening socket, for the new master of a binary upgrade to take over.
    listener: TcpListener,
    /// Whether this master accepts scrapes: during a binary upgrade only one of the two
    /// masters sharing the socket does (the old one until the new one is ready), so that a
    /// scraper never sees the counters of both in turn.
    gate: tokio::sync::watch::Sender<bool>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding it cannot leave the totals half-updated in a way that matters more
    // than stopping the metrics would.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    /// Binds `[metrics] bind` and starts the metrics thread; `None` when metrics are off. A bind
    /// error is a startup error. `board` is the scoreboard's memfd (the thread maps it
    /// read-only). `inherited`: the socket an upgrading master served `metrics.bind` on (when
    /// the new configuration has the same `metrics.bind`), taken over instead of binding it
    /// again. `accepting`: whether scrapes are served from the start (see `gate`).
    pub fn start(
        config: &MetricsConfig,
        board: &OwnedFd,
        inherited: Option<TcpListener>,
        accepting: bool,
    ) -> Result<Option<Metrics>> {
        if config.bind.is_empty() {
            return Ok(None);
        }
        let addr: SocketAddr = config
            .bind
            .parse()
            .with_context(|| format!("metrics.bind {:?} is not IP:PORT", config.bind))?;
        let listener = match inherited {
            Some(l) => l,
            None => TcpListener::bind(addr)
                .with_context(|| format!("cannot listen on metrics.bind {addr}"))?,
        };
        let copy = listener
            .try_clone()
            .context("cannot keep a copy of the metrics socket")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let board = Scoreboard::open(board, false).context("cannot map the scoreboard")?;
        let state = Arc::new(Mutex::new(State {
            retired: Counters::default(),
            recycles: [0; 5],
            deaths: [0; 3],
            degraded_ms_shown: 0,
        }));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the metrics thread's event loop")?;
        let shared = Arc::new(Shared {
            state: state.clone(),
            board,
        });
        let (gate, gate_rx) = tokio::sync::watch::channel(accepting);
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || runtime.block_on(serve(listener, shared, gate_rx)))
            .context("cannot start the metrics thread")?;
        info!(addr = %addr, "metrics: serving /metrics, /livez and /readyz");
        Ok(Some(Metrics {
            state,
            bind: config.bind.clone(),
            addr,
            listener: copy,
            gate,
        }))
    }

    /// Starts or stops accepting scrapes (a binary upgrade: see `gate`).
    pub fn set_accepting(&self, on: bool) {
        let _ = self.gate.send(on);
    }

    /// What a new master needs to take the metrics socket over: `metrics.bind` as configured
    /// (it takes the socket only for the same setting) and the socket's fd.
    pub fn hand_over(&self) -> (String, std::os::fd::RawFd) {
        use std::os::fd::AsRawFd;
        (self.bind.clone(), self.listener.as_raw_fd())
    }

    /// Master side, after reaping the process of record `index`: adds its counters to the
    /// totals (and its recycle, if it was replaced, to the recycle counts, or its death, if it
    /// died unasked, to the death counts) and frees the record, atomically for a scrape.
    /// Returns what `Scoreboard::reclaim` returns.
    pub fn reap(
        &self,
        board: &Scoreboard,
        index: usize,
        recycled: Option<RecycleReason>,
        died: Option<Death>,
    ) -> u32 {
        let mut state = lock(&self.state);
        state.retired.add(board.slot(index), monotonic_ms());
        if let Some(reason) = recycled {
            if let Some(i) = RECYCLE_REASONS.iter().position(|&r| r == reason) {
                state.recycles[i] += 1;
            }
        }
        if let Some(death) = died {
            if let Some(i) = DEATHS.iter().position(|&(d, _)| d == death) {
                state.deaths[i] += 1;
            }
        }
        board.reclaim(index)
    }

    /// The address it serves on (a port 0 resolved).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// HUP: the metrics socket stays as it is; a new address needs a restart.
    pub fn reload(&self, new: &MetricsConfig) {
        if new.bind != self.bind {
            warn!(
                metrics.bind = %new.bind,
                serving = %self.addr,
                "reload: metrics.bind changes at the next start; metrics stay where they are"
            );
        }
    }
}

/// What the metrics thread holds.
struct Shared {
    state: Arc<Mutex<State>>,
    board: Scoreboard,
}

/// Everything one scrape shows, read at one moment.
#[derive(Debug)]
struct Snapshot {
    counters: Counters,
    recycles: [u64; 5],
    deaths: [u64; 3],
    inflight: u64,
    queued: u64,
    connections: u64,
    /// Memory by worker number, `app-N` for app process N (a process being replaced counts
    /// both its processes).
    memory: BTreeMap<(u32, u32), u64>,
    /// HTTP workers by state: booting, serving, draining.
    states: [u64; 3],
    /// App processes (their hosts) by state.
    app_states: [u64; 3],
    redis_connected: u64,
    redis_degraded: u64,
    host_inflight: u64,
    host_cap: u64,
    host_rejected: u64,
    /// Workers whose app answers only 502s (`Slot::app_healthy`).
    apps_unhealthy: u64,
}

impl Shared {
    fn snapshot(&self) -> Snapshot {
        let mut state = lock(&self.state);
        let now_ms = monotonic_ms();
        let mut counters = state.retired.clone();
        let mut snap = Snapshot {
            counters: Counters::default(),
            recycles: state.recycles,
            deaths: state.deaths,
            inflight: 0,
            queued: 0,
            connections: 0,
            memory: BTreeMap::new(),
            states: [0; 3],
            app_states: [0; 3],
            redis_connected: 0,
            redis_degraded: 0,
            host_inflight: 0,
            host_cap: 0,
            host_rejected: 0,
            apps_unhealthy: 0,
        };
        for (_, slot) in self.board.slots() {
            // A free record is all zeroes: adding it changes nothing, so no record is skipped
            // by a state read at the wrong moment.
            counters.add(slot, now_ms);
            let s = slot.state();
            if s == SlotState::Free {
                continue;
            }
            snap.inflight += u64::from(slot.inflight.load(Ordering::Relaxed));
            snap.queued += u64::from(slot.queued.load(Ordering::Relaxed));
            snap.connections += u64::from(slot.connections.load(Ordering::Relaxed));
            let id = slot.worker_id.load(Ordering::Relaxed);
            let kind = slot.kind();
            *snap.memory.entry((kind as u32, id)).or_default() +=
                slot.rss_bytes.load(Ordering::Relaxed);
            match kind {
                Kind::Http => snap.states[s as usize - 1] += 1,
                Kind::App => snap.app_states[s as usize - 1] += 1,
            }
            snap.apps_unhealthy += u64::from(!slot.app_healthy());
            match RedisState::from_u32(slot.redis_state.load(Ordering::Relaxed)) {
                RedisState::Connected => snap.redis_connected += 1,
                RedisState::Degraded => snap.redis_degraded += 1,
                RedisState::Off => {}
            }
        }
        state.degraded_ms_shown = state.degraded_ms_shown.max(counters.redis_degraded_ms);
        counters.redis_degraded_ms = state.degraded_ms_shown;
        drop(state);
        let h = self.board.header();
        snap.host_inflight = u64::from(h.global_inflight.load(Ordering::Relaxed));
        snap.host_cap = u64::from(h.global_cap.load(Ordering::Relaxed));
        snap.host_rejected = h.global_rejected.load(Ordering::Relaxed);
        snap.counters = counters;
        snap
    }
}

/// One metric family with its samples, for `Snapshot::encode`.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(&[(&str, &str)], M)],
) -> fmt::Result {
    let Some((_, first)) = samples.first() else {
        return Ok(());
    };
    let mut metric = encoder.encode_descriptor(name, help, None, first.metric_type())?;
    if let [(&[], value)] = samples {
        return value.encode(metric);
    }
    for (labels, value) in samples {
        value.encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

/// One metric family whose samples differ by one label, `key`: `values` pairs each label value
/// with its sample.
fn by_label<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    key: &str,
    values: Vec<(&str, M)>,
) -> fmt::Result {
    let labels: Vec<[(&str, &str); 1]> = values.iter().map(|(v, _)| [(key, *v)]).collect();
    let samples: Vec<(&[(&str, &str)], M)> = labels
        .iter()
        .zip(values)
        .map(|(l, (_, m))| (&l[..], m))
        .collect();
    family(encoder, name, help, &samples)
}

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

fn gauge(v: u64) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
}

impl Snapshot {
    /// Requests: answered, their durations, refused, timed out, left by their clients; recycles, deaths and app restarts.
    fn encode_requests(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let c = &self.counters;
        let classes = ["1xx", "2xx", "3xx", "4xx", "5xx"];
        by_label(
            e,
            "supervisor_requests",
            "Requests answered, by status class",
            "class",
            classes.into_iter().zip(c.classes.map(counter)).collect(),
        )?;

        let mut buckets: Vec<(f64, u64)> = LATENCY_BUCKETS_US
            .iter()
            .map(|&us| (us as f64 / 1e6, 0))
            .collect();
        buckets.push((f64::INFINITY, 0));
        for (b, n) in buckets.iter_mut().zip(c.buckets) {
            b.1 = n;
        }
        let count: u64 = c.buckets.iter().sum();
        let mut m = e.encode_descriptor(
            "supervisor_request_duration_seconds",
            "Time from a request's arrival to the end of its response",
            None,
            MetricType::Histogram,
        )?;
        m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            c.latency_sum_us as f64 / 1e6,
            count,
            &buckets,
            None,
        )?;

        let reasons = [
            ("rate_limit", c.rate_limited),
            ("worker_limit", c.rejected_local),
            ("host_limit", self.host_rejected),
            ("cluster_limit", c.cluster_rejected),
            ("queue_full", c.queue_full),
            ("queue_timeout", c.queue_timeouts),
        ];
        by_label(
            e,
            "supervisor_rejections",
            "Requests refused by a limit (429 or 503), by the limit",
            "reason",
            reasons.into_iter().map(|(r, n)| (r, counter(n))).collect(),
        )?;
        family(
            e,
            "supervisor_request_timeouts",
            "Requests answered 504 after worker.request_timeout",
            &[(&[], counter(c.timeouts))],
        )?;
        family(
            e,
            "supervisor_accept_errors",
            "Failed accepts for want of resources (the fd limit, socket buffers, memory)",
            &[(&[], counter(c.accept_errors))],
        )?;
        family(
            e,
            "supervisor_requests_client_gone",
            "Requests whose client left before the response was sent (logged 499); the app finished them with their permits held",
            &[(&[], counter(c.client_gone))],
        )?;

        by_label(
            e,
            "supervisor_recycles",
            "Workers replaced and exited, by reason",
            "reason",
            RECYCLE_REASONS
                .iter()
                .map(|r| r.as_str())
                .zip(self.recycles.map(counter))
                .collect(),
        )?;
        by_label(
            e,
            "supervisor_worker_deaths",
            "Workers that died without being asked to stop (crash, failed boot, OOM kill), by cause",
            "cause",
            DEATHS
                .iter()
                .map(|&(_, label)| label)
                .zip(self.deaths.map(counter))
                .collect(),
        )?;
        family(
            e,
            "supervisor_app_restarts",
            "App processes restarted by their worker after they exited",
            &[(&[], counter(c.app_restarts))],
        )?;
        Ok(())
    }

    /// What runs now: requests in flight, queues, connections, memory, workers and app processes by state.
    fn encode_processes(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let plain_gauges = [
            (
                "supervisor_requests_in_flight",
                "Requests being served now",
                self.inflight,
            ),
            (
                "supervisor_queue_depth",
                "Requests waiting in the workers' queues (limits.queue) now",
                self.queued,
            ),
            (
                "supervisor_connections",
                "Open client connections",
                self.connections,
            ),
            (
                "supervisor_host_requests_in_flight",
                "Requests holding a host-wide permit (limits.max_concurrent_requests)",
                self.host_inflight,
            ),
            (
                "supervisor_host_requests_limit",
                "The host-wide cap, limits.max_concurrent_requests",
                self.host_cap,
            ),
            (
                "supervisor_apps_unhealthy",
                "Worker processes whose app (or upstream) answers only 502s: the last 3 \
                 requests or more in a row",
                self.apps_unhealthy,
            ),
            (
                "supervisor_memory_bytes",
                "Memory of every worker and its app, at the last sample",
                self.memory.values().sum(),
            ),
        ];
        for (name, help, v) in plain_gauges {
            family(e, name, help, &[(&[], gauge(v))])?;
        }

        let ids: Vec<String> = self
            .memory
            .keys()
            .map(|&(kind, id)| match Kind::from_u32(kind) {
                Kind::Http => id.to_string(),
                Kind::App => format!("app-{id}"),
            })
            .collect();
        by_label(
            e,
            "supervisor_worker_memory_bytes",
            "Memory of a worker number's processes (worker=\"app-N\": app process N and its \
             host), at the last sample",
            "worker",
            ids.iter()
                .map(String::as_str)
                .zip(self.memory.values().map(|&v| gauge(v)))
                .collect(),
        )?;

        let states = ["booting", "serving", "draining"];
        by_label(
            e,
            "supervisor_workers",
            "HTTP worker processes, by state",
            "state",
            states.into_iter().zip(self.states.map(gauge)).collect(),
        )?;
        by_label(
            e,
            "supervisor_app_processes",
            "App processes of the pool (app.command), by state of their host",
            "state",
            states.into_iter().zip(self.app_states.map(gauge)).collect(),
        )?;
        Ok(())
    }

    /// Redis: workers by their view of it, and time and requests spent without it.
    fn encode_redis(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let c = &self.counters;
        by_label(
            e,
            "supervisor_redis_workers",
            "Worker processes by their view of Redis (cluster-wide limits)",
            "state",
            vec![
                ("connected", gauge(self.redis_connected)),
                ("degraded", gauge(self.redis_degraded)),
            ],
        )?;
        family(
            e,
            "supervisor_redis_degraded_seconds",
            "Time workers spent with Redis degraded, summed over workers",
            &[(&[], counter(c.redis_degraded_ms / 1000))],
        )?;
        family(
            e,
            "supervisor_redis_degraded_requests",
            "Requests handled by limits.on_redis_error because Redis did not answer",
            &[(&[], counter(c.redis_degraded_requests))],
        )?;
        Ok(())
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        self.encode_requests(&mut e)?;
        self.encode_processes(&mut e)?;
        self.encode_redis(&mut e)
    }
}

impl Shared {
    /// The exposition, in the Prometheus text format (version 0.0.4).
    fn exposition(&self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self.snapshot()));
        let mut text = String::with_capacity(8 * 1024);
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry) {
            warn!(error = %e, "metrics: cannot encode the exposition");
        }
        text
    }
}

async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut gate: tokio::sync::watch::Receiver<bool>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "metrics: cannot use the listener; no metrics");
            return;
        }
    };
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    // The connections open, oldest first.
    let mut open: std::collections::VecDeque<Arc<Scraper>> = Default::default();
    loop {
        // Not accepting (see `Metrics::gate`): the connections wait in the socket's queue for
        // the master that is.
        if !*gate.borrow_and_update() {
            if gate.changed().await.is_err() {
                return;
            }
            continue;
        }
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = gate.changed() => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                debug!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // A task that has finished dropped its handle: only ours is left.
        open.retain(|c| Arc::strong_count(c) > 1);
        if open.len() >= MAX_CONNECTIONS {
            if let Some(i) = open.iter().position(|c| !c.asked.load(Ordering::Relaxed)) {
                let silent = open.remove(i).expect("found");
                silent.close.notify_one();
                debug!("metrics: closed a connection that sent no request, to make room");
            }
        }
        // Waits only while every connection is a scrape being answered.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let scraper = Arc::new(Scraper::default());
        open.push_back(scraper.clone());
        let shared = shared.clone();
        tokio::spawn(async move {
            let asked = scraper.clone();
            let service = hyper::service::service_fn(move |req| {
                asked.asked.store(true, Ordering::Relaxed);
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&shared, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                done = tokio::time::timeout(CONNECTION_TIMEOUT, conn) => {
                    if let Ok(Err(e)) = done {
                        debug!(error = %e, "metrics: connection failed");
                    }
                }
                _ = scraper.close.notified() => {}
            }
            drop(permit);
        });
    }
}

/// One metrics connection, as the accept loop sees it.
#[derive(Default)]
struct Scraper {
    /// Its request has arrived: it is not closed to make room.
    asked: std::sync::atomic::AtomicBool,
    /// Closes it to make room for a new connection.
    close: tokio::sync::Notify,
}

fn answer(shared: &Shared, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        let mut res = Response::new(Full::new(Bytes::from(body)));
        *res.status_mut() = status;
        res
    };
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/livez" | "/readyz") {
        return reply(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /livez or /readyz\n".into(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut res = reply(StatusCode::METHOD_NOT_ALLOWED, String::new());
        res.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return res;
    }
    if path != "/metrics" {
        let probe = Probe::of(&shared.board);
        let answer = if path == "/livez" {
            probe.live()
        } else {
            probe.ready()
        };
        return match answer {
            Ok(text) => reply(StatusCode::OK, text),
            Err(text) => reply(StatusCode::SERVICE_UNAVAILABLE, text),
        };
    }
    let mut res = reply(StatusCode::OK, shared.exposition());
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(prometheus_client::encoding::prometheus_text::CONTENT_TYPE),
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_takes_a_live_master_a_serving_worker_and_an_open_app_process() {
        let up = Probe {
            master_age_ms: 200,
            serving: 2,
            apps: 3,
            apps_open: 1,
        };
        assert_eq!(
            up.ready().unwrap(),
            "ready: 2 HTTP workers serving, 1 of 3 app processes taking requests\n"
        );
        assert!(up.live().is_ok());
        // The built-in app, or an upstream: no app processes to wait for.
        let builtin = Probe {
            apps: 0,
            apps_open: 0,
            ..up
        };
        assert_eq!(builtin.ready().unwrap(), "ready: 2 HTTP workers serving\n");
        let draining = Probe { serving: 0, ..up };
        assert!(draining
            .ready()
            .unwrap_err()
            .contains("no HTTP worker is serving"));
        assert!(draining.live().is_ok(), "a draining server is still live");
        let apps_down = Probe { apps_open: 0, ..up };
        assert!(apps_down
            .ready()
            .unwrap_err()
            .contains("none of the 3 app processes"));
        let stuck = Probe {
            master_age_ms: LIVE_WITHIN_MS + 1,
            ..up
        };
        assert!(stuck
            .live()
            .unwrap_err()
            .contains("control loop has not run"));
        assert!(stuck.ready().is_err(), "not live, not ready");
    }

    fn exposition_of(m: &Metrics, board_fd: &OwnedFd) -> String {
        let shared = Shared {
            state: m.state.clone(),
            board: Scoreboard::open(board_fd, false).unwrap(),
        };
        shared.exposition()
    }

    fn value(text: &str, series: &str) -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn a_reaped_workers_counters_stay_in_the_totals() {
        let (board, fd) = Scoreboard::create(2, 10).unwrap();
        let m = Metrics::start(
            &MetricsConfig {
                bind: "127.0.0.1:0".into(),
            },
            &fd,
            None,
            true,
        )
        .unwrap()
        .unwrap();
        let slot = board.slot(1);
        slot.set_state(SlotState::Serving);
        for _ in 0..3 {
            slot.record_response(200, Some(1500));
        }
        slot.record_response(404, Some(10));
        slot.rate_limited.fetch_add(2, Ordering::Relaxed);
        slot.app_restarts.fetch_add(2, Ordering::Relaxed);
        let ok = "supervisor_requests_total{class=\"2xx\"}";
        let before = exposition_of(&m, &fd);
        assert_eq!(value(&before, ok), 3);
        assert_eq!(
            value(&before, "supervisor_request_duration_seconds_count"),
            4
        );
        assert_eq!(value(&before, "supervisor_workers{state=\"serving\"}"), 1);

        assert_eq!(m.reap(&board, 1, Some(RecycleReason::MaxRss), None), 0);
        assert_eq!(board.slot(1).state(), SlotState::Free);
        let after = exposition_of(&m, &fd);
        assert_eq!(value(&after, ok), 3);
        assert_eq!(
            value(&after, "supervisor_request_duration_seconds_count"),
            4
        );
        assert_eq!(
            value(
                &after,
                "supervisor_request_duration_seconds_bucket{le=\"0.001\"}"
            ),
            1
        );
        assert_eq!(
            value(&after, "supervisor_rejections_total{reason=\"rate_limit\"}"),
            2
        );
        assert_eq!(
            value(&after, "supervisor_recycles_total{reason=\"max_rss\"}"),
            1
        );
        assert_eq!(value(&after, "supervisor_app_restarts_total"), 2);
        assert_eq!(value(&after, "supervisor_workers{state=\"serving\"}"), 0);
        let sigkill = "supervisor_worker_deaths_total{cause=\"sigkill\"}";
        assert_eq!(value(&after, sigkill), 0, "a recycle is not a death");

        board.slot(0).set_state(SlotState::Serving);
        m.reap(&board, 0, None, Some(Death::Killed));
        let died = exposition_of(&m, &fd);
        assert_eq!(value(&died, sigkill), 1);
        assert_eq!(
            value(&died, "supervisor_worker_deaths_total{cause=\"exit\"}"),
            0
        );
        assert_eq!(
            value(&died, "supervisor_recycles_total{reason=\"max_rss\"}"),
            1
        );
    }
}
