//! The state of a worker process: what every connection and request shares.
//!
//! Owns `Worker` (built once at start and leaked: it lives as long as the process, and a
//! `&'static` lets the request path hold it without reference counting), the limits that span
//! workers or hosts (`Limiters`), and `ConnectionGuard` (a connection's place under
//! `worker.max_connections`). What the app side reads is its `WorkerContext`, which `Worker` derefs
//! to; the accept loops and the drain are `server`'s.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::{Semaphore, SemaphorePermit};
use tracing::warn;

use crate::app::builtin;
use crate::config::Config;
use crate::http::activity::IdleLimits;
use crate::http::client_body::BodyTiming;
use crate::http::context::{Limits, WorkerContext};
use crate::http::response::{self, Responses};
use crate::limits::admission::Admission;
use crate::protocol::MasterPipe;
use crate::shm::scoreboard::{Scoreboard, Slot};

/// hyper refuses a read buffer smaller than this (it must hold a minimal request head).
const MIN_HEADER_BYTES: u64 = 8192;

/// What every connection and request of this worker process shares. Built once and leaked:
/// it lives as long as the process, and a `&'static` lets the request path hold it without
/// reference counting.
pub(crate) struct Worker {
    /// What the app side reads too (`Worker` derefs to it).
    pub(crate) ctx: WorkerContext,
    pub(crate) responses: Responses,
    pub(crate) http: auto::Builder<TokioExecutor>,
    /// The pipe to the master (readiness, then the request to be recycled).
    pub(crate) master: MasterPipe,
    /// Completed requests after which the worker asks the master to replace it; 0: never.
    pub(crate) max_requests: u64,
    /// Completed requests after which the master is asked to prepare the replacement.
    pub(crate) prepare_at: u64,
    /// What the built-in app keeps for the life of the process.
    pub(crate) app: builtin::State,
    /// Set when the drain starts: HTTP/1 responses then close their connection.
    pub(crate) draining: AtomicBool,
    /// Set at start when the app is a process or an upstream: requests go there instead of
    /// the built-in app.
    pub(crate) proxy: std::sync::OnceLock<crate::app::proxy::Proxy>,
    /// Whether requests are timed: only when something shows their durations (metrics or the
    /// access log), to spare two clock reads per request otherwise.
    pub(crate) timed: bool,
    /// The access log (`log.access`), set at start when it is on.
    pub(crate) access: std::sync::OnceLock<crate::serve::access_log::AccessLog>,
    /// `limits.rate`, when set.
    pub(crate) rate: Option<crate::serve::client_rate::ClientRate>,
    /// `limits.cluster_max_concurrent_requests` through `redis.url`, when both are set.
    pub(crate) cluster: Option<crate::limits::cluster::Cluster>,
    /// `worker.max_connections`: an accept loop takes a permit before it accepts.
    pub(crate) connections: Semaphore,
    /// `limits.health_paths`, and the health checks in flight.
    pub(crate) health: crate::serve::health::HealthPaths,
}

/// The limits that span workers or hosts, when configured.
#[derive(Default)]
pub(crate) struct Limiters {
    /// `limits.rate`.
    pub(crate) rate: Option<crate::serve::client_rate::ClientRate>,
    /// `limits.cluster_max_concurrent_requests` through `redis.url`.
    pub(crate) cluster: Option<crate::limits::cluster::Cluster>,
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

        let ctx = WorkerContext {
            admission: Admission::new(
                board,
                slot,
                w.max_concurrent,
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
            drain_watch: OnceLock::new(),
        };
        let worker = Worker {
            ctx,
            responses: Responses::new(
                id,
                w.max_body_bytes,
                w.max_concurrent,
                w.request_timeout,
                host_cap,
                config.limits.queue,
                config.limits.queue_timeout,
            ),
            http,
            master,
            max_requests,
            prepare_at: crate::protocol::prepare_at(max_requests, w.max_requests_preboot),
            app: builtin::State::default(),
            draining: AtomicBool::new(false),
            proxy: std::sync::OnceLock::new(),
            timed: !config.metrics.bind.is_empty() || config.log.access,
            access: std::sync::OnceLock::new(),
            rate: limiters.rate,
            cluster: limiters.cluster,
            connections: Semaphore::new(w.max_connections.max(1) as usize),
            health: crate::serve::health::HealthPaths::new(&config.limits.health_paths),
        };
        Box::leak(Box::new(worker))
    }

    pub(crate) fn slot(&self) -> &Slot {
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
    pub(crate) fn new(
        worker: &'static Worker,
        permit: Option<SemaphorePermit<'static>>,
    ) -> ConnectionGuard {
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

impl Deref for Worker {
    type Target = WorkerContext;

    fn deref(&self) -> &WorkerContext {
        &self.ctx
    }
}
