//! The serving core of a worker: its shared state, the accept loops and the graceful drain.
//!
//! Owns `Worker` (everything the request path shares, built once per process), one accept loop
//! per listener (a connection permit is taken *before* `accept`, so a full worker leaves new
//! connections in the kernel's queue rather than accepting and dropping them), and the drain:
//! stop accepting after emptying the accept queue, ask every connection to finish, and wait until
//! all of them are gone. It does not install signals or touch the process (that is `process`),
//! and can be driven from a test with a plain listener, scoreboard and pipe.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::{watch, Semaphore, SemaphorePermit};
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use crate::activity::IdleLimits;
use crate::admission::Admission;
use crate::app;
use crate::client_body::BodyTiming;
use crate::config::Config;
use crate::connection;
use crate::listener::{AcceptError, Listener, Peer, Stream};
use crate::protocol::MasterPipe;
use crate::response::{self, Responses};
use crate::scoreboard::{monotonic_ms, Scoreboard, Slot, SlotState};

/// How long an accept loop pauses after the process ran out of fds, buffers or memory.
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Such failures are logged at most this often per worker (with how many were not): at the fd
/// limit every pause ends in another one, 10 a second per listener.
const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// hyper refuses a read buffer smaller than this (it must hold a minimal request head).
const MIN_HEADER_BYTES: u64 = 8192;

/// Per-request limits, in the units the hot path uses.
impl Limits {
    /// `worker.client_timeout`, `worker.min_request_rate` and `worker.min_rate_grace`, for
    /// request bodies (`client_body`); the connection's write side reads its own from `idle`.
    pub(crate) fn body_timing(&self) -> BodyTiming {
        self.body
    }
}

pub(crate) struct Limits {
    pub(crate) max_body_bytes: u64,
    pub(crate) request_timeout: Duration,
    /// `worker.max_headers`, which hyper enforces on HTTP/1 only: `request` counts HTTP/2's.
    pub(crate) max_headers: usize,
    pub(crate) idle: IdleLimits,
    body: BodyTiming,
}

/// What every connection and request of this worker process shares. Built once and leaked:
/// it lives as long as the process, and a `&'static` lets the request path hold it without
/// reference counting.
pub(crate) struct Worker {
    pub(crate) admission: Admission,
    pub(crate) responses: Responses,
    pub(crate) limits: Limits,
    pub(crate) http: auto::Builder<TokioExecutor>,
    /// The pipe to the master (readiness, then the request to be recycled).
    pub(crate) master: MasterPipe,
    /// Completed requests after which the worker asks the master to replace it; 0: never.
    pub(crate) max_requests: u64,
    /// Completed requests after which the master is asked to prepare the replacement.
    pub(crate) prepare_at: u64,
    /// What the built-in app keeps for the life of the process.
    pub(crate) app: app::State,
    /// Set when the drain starts: HTTP/1 responses then close their connection.
    pub(crate) draining: AtomicBool,
    /// Set at start when the app is a process or an upstream: requests go there instead of
    /// the built-in app.
    pub(crate) proxy: std::sync::OnceLock<crate::proxy::Proxy>,
    /// The server's drain signal, for tasks that outlive their connection (upgraded
    /// tunnels) to subscribe to: the drain waits until every receiver is gone.
    pub(crate) drain_watch: std::sync::OnceLock<watch::Sender<bool>>,
    /// Whether requests are timed: only when something shows their durations (metrics or the
    /// access log), to spare two clock reads per request otherwise.
    pub(crate) timed: bool,
    /// The access log (`log.access`), set at start when it is on.
    pub(crate) access: std::sync::OnceLock<crate::access_log::AccessLog>,
    /// `limits.rate`, when set.
    pub(crate) rate: Option<crate::client_rate::ClientRate>,
    /// `limits.cluster_max_concurrent_requests` through `redis.url`, when both are set.
    pub(crate) cluster: Option<crate::cluster::Cluster>,
    connections: Semaphore,
    accept_errors: AcceptErrors,
}

/// The log of accept failures for want of resources, shared by the worker's accept loops:
/// one line per `ACCEPT_ERROR_LOG_EVERY`, saying how many failed since the last one. Touched
/// only when an accept fails, and once when it works again after failures.
#[derive(Default)]
struct AcceptErrors {
    /// When the next failure may be logged (`monotonic_ms`).
    next_log_ms: AtomicU64,
    /// Failures since the last line.
    unlogged: AtomicU64,
}

impl AcceptErrors {
    fn failed(&self, slot: &Slot, e: &std::io::Error, kind: AcceptError) {
        slot.accept_errors.fetch_add(1, Ordering::Relaxed);
        let now = monotonic_ms();
        if now < self.next_log_ms.load(Ordering::Relaxed) {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.next_log_ms.store(
            now + ACCEPT_ERROR_LOG_EVERY.as_millis() as u64,
            Ordering::Relaxed,
        );
        warn!(
            error = %e,
            ?kind,
            accept.failures_unlogged = self.unlogged.swap(0, Ordering::Relaxed),
            "accept failed; pausing {}ms after each failure (logged at most every {}s)",
            ACCEPT_BACKOFF.as_millis(),
            ACCEPT_ERROR_LOG_EVERY.as_secs()
        );
    }

    /// An accept worked after failures.
    fn recovered(&self) {
        let unlogged = self.unlogged.swap(0, Ordering::Relaxed);
        self.next_log_ms.store(0, Ordering::Relaxed);
        if unlogged > 0 {
            info!(
                accept.failures_unlogged = unlogged,
                "accepting again after accept failures"
            );
        }
    }
}

/// The limits that span workers or hosts, when configured.
#[derive(Default)]
pub(crate) struct Limiters {
    /// `limits.rate`.
    pub(crate) rate: Option<crate::client_rate::ClientRate>,
    /// `limits.cluster_max_concurrent_requests` through `redis.url`.
    pub(crate) cluster: Option<crate::cluster::Cluster>,
}

impl Worker {
    /// Builds the worker's shared state around its (writable) scoreboard mapping and record and
    /// its pipe to the master. `max_requests` already includes this worker's jitter.
    pub(crate) fn new(
        config: &Config,
        id: u32,
        board: Scoreboard,
        slot: usize,
        master: MasterPipe,
        max_requests: u64,
        limiters: Limiters,
    ) -> &'static Worker {
        let w = &config.worker;
        let host_cap = response::host_cap(&board);

        let mut header_bytes = w.max_header_bytes.bytes();
        if header_bytes < MIN_HEADER_BYTES {
            warn!(
                worker.max_header_bytes = header_bytes,
                "worker.max_header_bytes is below hyper's minimum; using {MIN_HEADER_BYTES}"
            );
            header_bytes = MIN_HEADER_BYTES;
        }
        let header_bytes = usize::try_from(header_bytes).unwrap_or(usize::MAX);

        let mut http = auto::Builder::new(TokioExecutor::new());
        // hyper's own HTTP/1 header timer is off: the connection's idle timer (`connection`)
        // enforces `worker.header_timeout` at the same instant, for HTTP/2 too, and is armed
        // once per idle period rather than once per request. `writev(false)`: the response head
        // and body are copied into one buffer and sent with one `write`, which measured 4-5%
        // less CPU per small response than a vectored write of the two (bench/, A/B paired
        // with nginx); bodies still go out in bounded pieces (`max_buf_size`). A client that
        // closes its sending side after its request is answered: `connection` holds the end of
        // input back from hyper until the request is over.
        http.http1()
            .timer(TokioTimer::new())
            .keep_alive(true)
            .header_read_timeout(None)
            .writev(false)
            .max_buf_size(header_bytes)
            .max_headers(w.max_headers as usize);
        http.http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(header_bytes).unwrap_or(u32::MAX));

        let worker = Worker {
            admission: Admission::new(
                board,
                slot,
                w.max_concurrent,
                config.limits.queue,
                config.limits.queue_timeout,
            ),
            responses: Responses::new(
                id,
                w.max_body_bytes,
                w.max_concurrent,
                w.request_timeout,
                host_cap,
                config.limits.queue,
                config.limits.queue_timeout,
            ),
            limits: Limits {
                max_body_bytes: w.max_body_bytes.bytes(),
                request_timeout: w.request_timeout,
                max_headers: w.max_headers as usize,
                idle: IdleLimits {
                    keepalive_ms: w.keepalive_timeout.as_millis() as u64,
                    header_ms: w.header_timeout.as_millis() as u64,
                    client_ms: w.client_timeout.as_millis() as u64,
                    min_response_rate: w.min_response_rate.bytes_per_second(),
                    rate_grace_ms: w.min_rate_grace.as_millis() as u64,
                },
                body: BodyTiming {
                    timeout: w.client_timeout,
                    min_rate: w.min_request_rate.bytes_per_second(),
                    grace: w.min_rate_grace,
                },
            },
            http,
            master,
            max_requests,
            prepare_at: crate::protocol::prepare_at(max_requests),
            app: app::State::default(),
            draining: AtomicBool::new(false),
            proxy: std::sync::OnceLock::new(),
            drain_watch: std::sync::OnceLock::new(),
            timed: !config.metrics.bind.is_empty() || config.log.access,
            access: std::sync::OnceLock::new(),
            rate: limiters.rate,
            cluster: limiters.cluster,
            connections: Semaphore::new(w.max_connections.max(1) as usize),
            accept_errors: AcceptErrors::default(),
        };
        Box::leak(Box::new(worker))
    }

    fn slot(&self) -> &Slot {
        self.admission.slot()
    }
}

/// One open client connection: holds its place under `worker.max_connections` and keeps the
/// record's `connections` count.
pub(crate) struct ConnectionGuard {
    worker: &'static Worker,
    _permit: Option<SemaphorePermit<'static>>,
}

impl ConnectionGuard {
    fn new(worker: &'static Worker, permit: Option<SemaphorePermit<'static>>) -> ConnectionGuard {
        worker.slot().connections.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard {
            worker,
            _permit: permit,
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.worker
            .slot()
            .connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// A running server: accept loops plus their connections.
pub(crate) struct Server {
    worker: &'static Worker,
    /// `true` once draining. Every accept loop and connection task holds a receiver, so
    /// "all receivers dropped" means "every connection is done".
    drain: watch::Sender<bool>,
}

impl Drop for Server {
    fn drop(&mut self) {
        // Dropped without a drain (tests, a failed start): every connection drains. (The
        // worker keeps a sender for tunnels, so the channel does not close by itself.)
        self.worker.draining.store(true, Ordering::Relaxed);
        self.drain.send_replace(true);
    }
}

/// What a drain achieved.
#[derive(Debug)]
pub(crate) struct DrainSummary {
    /// Connections still open when it gave up; 0 when it completed.
    pub(crate) remaining: u32,
}

impl Server {
    /// Starts one accept loop per listener. Must run inside the worker's tokio runtime.
    pub(crate) fn start(worker: &'static Worker, listeners: Vec<Listener>) -> Server {
        let (drain, rx) = watch::channel(false);
        let _ = worker.drain_watch.set(drain.clone());
        for listener in listeners {
            info!(listener = %listener.local_addr(), "accepting connections");
            tokio::spawn(accept_loop(worker, listener, rx.clone()));
        }
        Server { worker, drain }
    }

    /// Graceful drain: marks the record `Draining`, accepts what is already queued, closes the
    /// listeners, asks every connection to finish (idle ones close now, busy HTTP/1 ones answer
    /// their request with `Connection: close`, HTTP/2 ones get GOAWAY) and waits until all are
    /// gone, or `timeout` passes (the master kills the worker after that anyway).
    pub(crate) async fn drain(self, timeout: Duration) -> DrainSummary {
        let slot = self.worker.slot();
        slot.set_state(SlotState::Draining);
        let started = Instant::now();
        let open = slot.connections.load(Ordering::Relaxed);
        let inflight = slot.inflight.load(Ordering::Relaxed);
        info!(
            connections = open,
            requests.inflight = inflight,
            server.graceful_timeout = ?timeout,
            "draining"
        );
        self.worker.draining.store(true, Ordering::Relaxed);
        self.drain.send_replace(true);
        let completed = tokio::time::timeout(timeout, self.drain.closed())
            .await
            .is_ok();
        let remaining = if completed {
            0
        } else {
            slot.connections.load(Ordering::Relaxed)
        };
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let requests = slot.requests.load(Ordering::Relaxed);
        if completed {
            info!(
                elapsed_ms,
                requests.total = requests,
                "drain complete: every connection finished"
            );
        } else {
            warn!(
                elapsed_ms,
                connections.remaining = remaining,
                requests.inflight = slot.inflight.load(Ordering::Relaxed),
                requests.total = requests,
                "drain timed out (server.graceful_timeout); exiting with connections open"
            );
        }
        DrainSummary { remaining }
    }
}

async fn accept_loop(
    worker: &'static Worker,
    listener: Listener,
    mut drain: watch::Receiver<bool>,
) {
    // Whether the last accept failed (see `AcceptErrors`).
    let mut failing = false;
    loop {
        // The permit comes first: at `max_connections` the loop waits here and new clients
        // wait in the kernel's queue (where another worker may pick them up).
        let permit = tokio::select! {
            biased;
            _ = drain.wait_for(|d| *d) => break,
            permit = worker.connections.acquire() => {
                permit.expect("the connection semaphore is never closed")
            }
        };
        let accepted = tokio::select! {
            biased;
            _ = drain.wait_for(|d| *d) => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                if failing {
                    failing = false;
                    worker.accept_errors.recovered();
                }
                spawn_connection(worker, stream, peer, Some(permit), &drain)
            }
            Err(e) => match AcceptError::classify(&e) {
                AcceptError::Connection => debug!(error = %e, "accept: connection failed"),
                kind => {
                    failing = true;
                    worker.accept_errors.failed(worker.slot(), &e, kind);
                    drop(permit);
                    tokio::select! {
                        biased;
                        _ = drain.wait_for(|d| *d) => break,
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                }
            },
        }
    }

    // Draining. Clients already in the accept queue completed their handshake and are waiting
    // for an answer: serve them (even past `max_connections`; the queue is bounded by the
    // backlog) instead of letting them be reset when the listener closes.
    let mut queued = 0u32;
    loop {
        match listener.accept_now() {
            Ok((stream, peer)) => {
                queued += 1;
                let permit = worker.connections.try_acquire().ok();
                spawn_connection(worker, stream, peer, permit, &drain);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if AcceptError::classify(&e) == AcceptError::Connection => {}
            Err(e) => {
                warn!(error = %e, "accept failed while emptying the queue");
                break;
            }
        }
    }
    info!(
        listener = %listener.local_addr(),
        connections.queued = queued,
        "stopped accepting"
    );
}

fn spawn_connection(
    worker: &'static Worker,
    stream: Stream,
    peer: Peer,
    permit: Option<SemaphorePermit<'static>>,
    drain: &watch::Receiver<bool>,
) {
    let guard = ConnectionGuard::new(worker, permit);
    let span = tracing::debug_span!("conn", client.addr = %peer);
    let ip = match peer {
        Peer::Tcp(addr) => Some(addr.ip()),
        Peer::Unix => None,
    };
    tokio::spawn(connection::serve(worker, stream, ip, guard, drain.clone()).instrument(span));
}
