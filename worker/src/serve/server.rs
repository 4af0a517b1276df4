//! The serving core of a worker: the accept loops and the graceful drain.
//!
//! Owns one accept loop per listener (a connection permit is taken *before* `accept`, so a full
//! worker leaves new connections in the kernel's queue rather than accepting and dropping
//! them), the log of accept failures they share, and the drain: stop accepting after emptying
//! the accept queue, ask every connection to finish, and wait until all of them are gone. The
//! state they share is `state::Worker`. It does not install signals or touch the process (that
//! is `process`), and can be driven from a test with a plain listener, scoreboard and pipe.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, SemaphorePermit};
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use crate::listener::{AcceptError, Listener, Peer, Stream};
use crate::serve::connection;
use crate::serve::state::{ConnectionGuard, Worker};
use crate::shm::scoreboard::{monotonic_ms, Slot, SlotState};

/// How long an accept loop pauses after the process ran out of fds, buffers or memory.
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Such failures are logged at most this often per worker (with how many were not): at the fd
/// limit every pause ends in another one, 10 a second per listener.
const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

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
        let errors = Arc::new(AcceptErrors::default());
        for listener in listeners {
            info!(listener = %listener.local_addr(), "accepting connections");
            tokio::spawn(accept_loop(
                worker,
                listener,
                rx.clone(),
                Arc::clone(&errors),
            ));
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
    errors: Arc<AcceptErrors>,
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
                    errors.recovered();
                }
                spawn_connection(worker, stream, peer, Some(permit), &drain)
            }
            Err(e) => match AcceptError::classify(&e) {
                AcceptError::Connection => debug!(error = %e, "accept: connection failed"),
                kind => {
                    failing = true;
                    errors.failed(worker.slot(), &e, kind);
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
