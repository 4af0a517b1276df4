//! The part of a worker's state that the app side (the built-in app, the proxy) reads: the
//! admission (its scoreboard record and the host's), the per-request limits, and the drain
//! signal that tasks outliving their connection hold on to.
//!
//! Split from `state::Worker`, which derefs to it, so that the app side sees only this and the
//! imports run one way: the request path (`request`, `connection`) above the app side, the app
//! side above this.

use std::sync::OnceLock;
use std::time::Duration;

use tokio::sync::watch;

use crate::http::activity::IdleLimits;
use crate::http::client_body::BodyTiming;
use crate::limits::admission::Admission;

/// What the app side reads of its worker.
pub(crate) struct WorkerContext {
    pub(crate) admission: Admission,
    pub(crate) limits: Limits,
    /// The server's drain signal, for tasks that outlive their connection (upgraded tunnels, a
    /// request to the app whose client left) to subscribe to: the drain waits until every
    /// receiver is gone.
    pub(crate) drain_watch: OnceLock<watch::Sender<bool>>,
}

impl Limits {
    /// `worker.client_timeout`, `worker.min_request_rate` and `worker.min_rate_grace`, for
    /// request bodies (`client_body`); the connection's write side reads its own from `idle`.
    pub(crate) fn body_timing(&self) -> BodyTiming {
        self.body
    }
}

/// Per-request limits, in the units the hot path uses.
pub(crate) struct Limits {
    pub(crate) max_body_bytes: u64,
    pub(crate) request_timeout: Duration,
    /// `worker.max_headers`, which hyper enforces on HTTP/1 only: `request` counts HTTP/2's.
    pub(crate) max_headers: usize,
    pub(crate) idle: IdleLimits,
    pub(crate) body: BodyTiming,
}
