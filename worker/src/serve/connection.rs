//! One client connection: HTTP/1.1 or h2c served by hyper, its idle keep-alive timeout and its
//! part in a graceful drain.
//!
//! Owns the per-connection task, which acts on the bookkeeping `activity` keeps (requests in
//! flight on this connection, when it went idle, whether the client sent bytes since, whether
//! it has ended), and runs the tunnel of an upgraded connection (which `proxy` builds) in that
//! same task, so that a WebSocket stays a counted, drained connection. It must not make
//! per-request decisions (that is `request`) nor accept sockets (that is `server`).
//!
//! # Timeouts: why this module runs its own, and hyper's are off
//!
//! Read in hyper 1.12 (`proto/h1/conn.rs`) and hyper-util 0.1.21 (`server/conn/auto`):
//!
//! - hyper has no idle timeout for HTTP/1 or HTTP/2 server connections.
//! - Its HTTP/1 `header_read_timeout` is re-armed after every response (a timer-wheel update
//!   and a clock read per request), and does not run while the `auto` builder reads the first
//!   bytes to tell HTTP/2's preface from HTTP/1, so a client that connects and sends nothing is
//!   bounded by nothing in hyper. It is switched off (`server`).
//!
//! So this module runs one timer per connection, measured from the end of the last request (or
//! from accept), and armed once per idle period rather than once per request:
//!
//! - no request in flight and no byte received for `keepalive_timeout`: the connection is shut
//!   down gracefully (an idle HTTP/1 connection closes at once, HTTP/2 gets GOAWAY);
//! - bytes received but no request started `header_timeout` after the connection went idle: the
//!   client is too slow with its head and the connection is dropped. This bounds HTTP/1 heads
//!   and the protocol-detection phase (the first bytes, before a first request). On a
//!   connection known to be HTTP/2, frames between requests (PINGs, SETTINGS) are no head: it
//!   goes idle at `keepalive_timeout` like one that sends nothing.
//!
//! A third deadline, `client_timeout`, covers the client that stops reading: while a write to
//! its socket is blocked (the socket's send buffer full) for that long, the connection is cut,
//! which ends its requests and frees their permits. (A client that stops sending a body it
//! announced is `client_body`'s.) The same timer enforces `min_response_rate` (see
//! `RateWindow`): a client that reads, but too slowly, is cut at the instant its average falls
//! below the rate. Both cuts reset the connection, dropping what the kernel still holds for it.
//! All of this costs a plain counter per write; the clock and the kernel are asked only while a
//! write is blocked.
//!
//! A client may close its sending side once its request is out (half-close, RFC 9112 9.6):
//! the end of input is held back from hyper until the request is over, so it is answered; a
//! client that is gone resets the connection, which ends its requests at once.
//!
//! The two idle timers never fight: the keep-alive timer hands over to the header timeout as
//! soon as bytes arrive. Both count from the moment the connection went idle, so a head that
//! starts arriving late has less than `header_timeout` to complete; configure
//! `keepalive_timeout <= header_timeout` (the defaults are 5 s and 10 s).

use std::future::{poll_fn, Future};
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::pin::{pin, Pin};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::http::activity::{Activity, IdleCheck, IdleLimits, RateWindow, TrackedIo, NOT_BLOCKED};
use crate::listener::{reset_on_close, unsent_bytes, Stream};
use crate::serve::request;
use crate::serve::state::{ConnectionGuard, Worker};

/// Why a connection was asked to shut down.
#[derive(Clone, Copy, Debug)]
enum Shutdown {
    Idle,
    Drain,
}

/// Serves one connection until it closes. `drain` flips to `true` when the worker drains; the
/// task holds it (and `guard`) until the very end, which is how the server knows that every
/// connection is gone.
///
/// When the worker drains, an HTTP/2 connection gets GOAWAY at once (the protocol makes that
/// race-free). An HTTP/1 connection is shut down only while a request is in flight (its
/// response then carries `Connection: close`); an idle one, or one whose next head is still
/// arriving, is left to its client's next request, which `request` answers with `Connection:
/// close`, or to the idle and header timers. Closing it at once would race with a request
/// already on its way, which the client would see as a connection closed before any response.
/// The same holds for a connection accepted from the kernel's queue during the drain: its
/// client has most likely sent a request that hyper has not read yet.
pub(crate) async fn serve(
    worker: &'static Worker,
    stream: Stream,
    peer: Option<IpAddr>,
    guard: ConnectionGuard,
    mut drain: watch::Receiver<bool>,
) {
    let limits = worker.limits.idle;
    let activity = Arc::new(Activity::new(Instant::now()));
    let fd = stream.raw_fd();
    let io = TokioIo::new(TrackedIo::new(stream, Arc::clone(&activity)));
    let service = {
        let activity = Arc::clone(&activity);
        service_fn(move |req| request::handle(worker, activity.begin(), peer, req))
    };
    let mut conn = pin!(worker.http.serve_connection_with_upgrades(io, service));

    let mut drain_signal = pin!(drain.wait_for(|draining| *draining));
    let mut draining = false;
    let mut drain_polled = false;
    let mut shutdown: Option<Shutdown> = None;

    let first = activity
        .next_check(limits)
        .expect("no request in flight yet");
    // See `idle_timer`; `busy`: it fired mid-request, to be re-armed when the request ends.
    let mut timer = pin!(tokio::time::sleep_until(activity.at(first)));
    let mut busy = false;
    // Armed (for this deadline) only while a write to the client is blocked.
    let mut stall = pin!(tokio::time::sleep_until(activity.opened));
    let mut watch = StallWatch::new(limits, fd);
    let mut stalled = false;

    let result = poll_fn(|cx: &mut Context<'_>| 'poll: loop {
        if let Poll::Ready(res) = conn.as_mut().poll(cx) {
            return Poll::Ready(Some(res));
        }
        // Even during a shutdown: a client that reads nothing would hold it open for ever.
        match watch.check(stall.as_mut(), cx, &activity) {
            Stall::None => {}
            Stall::Recheck => continue 'poll,
            Stall::Cut => {
                stalled = true;
                return Poll::Ready(None);
            }
        }
        if shutdown.is_some() {
            return Poll::Pending;
        }
        // The drain signal is polled once to register this task's waker, and after that only
        // once the worker's flag says it may have fired: polling a watch future takes locks,
        // and this loop runs on every wake-up of the connection, i.e. every request.
        if !draining
            && (!drain_polled || worker.draining.load(Ordering::Relaxed))
            && drain_signal.as_mut().poll(cx).is_ready()
        {
            // Changed to `true`, or the server is gone: drain either way.
            draining = true;
        }
        drain_polled = true;
        // Not while only part of a head has arrived: hyper counts an HTTP/1 connection between
        // requests as idle and would close it, dropping the request on its way. Once the head
        // is complete the request is in flight, and its response says `Connection: close`.
        if draining && (activity.inflight() > 0 || activity.http2.load(Ordering::Relaxed)) {
            conn.as_mut().graceful_shutdown();
            shutdown = Some(Shutdown::Drain);
            continue 'poll;
        }
        if busy {
            if let Some(deadline) = activity.next_check(limits) {
                busy = false;
                timer.as_mut().reset(activity.at(deadline));
            }
        }
        match idle_timer(timer.as_mut(), cx, &activity, limits, &mut busy) {
            Timer::Pending => return Poll::Pending,
            Timer::Stuck => {
                stalled = true;
                return Poll::Ready(None);
            }
            Timer::Idle => {
                conn.as_mut().graceful_shutdown();
                shutdown = Some(Shutdown::Idle);
                continue 'poll;
            }
            // A graceful shutdown would let a slow first head go on (HTTP/1 only turns
            // keep-alive off); this client has had its time, so the connection is dropped.
            Timer::SlowHead => return Poll::Ready(None),
        }
    })
    .await;

    log_end(&result, &activity, shutdown, watch.too_slow, stalled, peer);
    run_tunnel(&activity, result).await;
    drop(guard);
}

/// How hyper's connection ended with an error.
type ConnError = Box<dyn std::error::Error + Send + Sync>;

/// The connection's end, in the log: expected noise at debug level, a cut client at info.
fn log_end(
    result: &Option<Result<(), ConnError>>,
    activity: &Activity,
    shutdown: Option<Shutdown>,
    too_slow: bool,
    stalled: bool,
    peer: Option<IpAddr>,
) {
    match result {
        Some(Ok(())) => debug!(shutdown = ?shutdown, "connection closed"),
        // Client resets, slow or abandoned heads, cancelled protocol detection: expected noise.
        Some(Err(e)) => debug!(shutdown = ?shutdown, error = %e, "connection ended with an error"),
        None if too_slow => info!(
            peer = ?peer,
            bytes.written = activity.written.load(Ordering::Relaxed),
            "the client took the response slower than worker.min_response_rate; connection cut"
        ),
        None if stalled => info!(
            peer = ?peer,
            "the client read nothing of the response for worker.client_timeout; connection cut"
        ),
        None => debug!("no complete request head within worker.header_timeout; connection cut"),
    }
}

/// After the connection: an upgrade (WebSocket) runs its tunnel, the socket being the tunnel's
/// now; the connection stays counted (its guard, under worker.max_connections) and holds the
/// drain until it ends.
async fn run_tunnel(activity: &Activity, result: Option<Result<(), ConnError>>) {
    activity.closed.store(true, Ordering::Relaxed);
    let tunnel = activity
        .tunnel
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    // Only after a connection that ended cleanly: hyper hands the socket over then. After an
    // error or a cut (the 101 could not be written), the upgrade never completes and the
    // tunnel is dropped unrun.
    if let (Some(tunnel), Some(Ok(()))) = (tunnel, result) {
        tunnel.await;
    }
}

/// What the idle timer found (see [`idle_timer`]).
enum Timer {
    /// Not due.
    Pending,
    /// Due mid-request, with HTTP/2 streams the client grants no window: cut.
    Stuck,
    /// Idle for `worker.keepalive`: a graceful shutdown.
    Idle,
    /// No complete first head within `worker.header_timeout`: cut.
    SlowHead,
}

/// The connection's idle timer. It is not re-armed on every request: when it fires, the
/// connection's activity gives the real deadline from when it went idle; when it fires
/// mid-request, it is re-armed as soon as the request ends (`busy`, see `serve`).
fn idle_timer(
    mut timer: Pin<&mut tokio::time::Sleep>,
    cx: &mut Context<'_>,
    activity: &Activity,
    limits: IdleLimits,
    busy: &mut bool,
) -> Timer {
    while timer.as_mut().poll(cx).is_ready() {
        let now = activity.ms_since_open();
        match activity.check(now, limits) {
            IdleCheck::Wait(deadline) => timer.as_mut().reset(activity.at(deadline)),
            IdleCheck::Busy => {
                if activity.streams_stuck(limits.client_ms) {
                    return Timer::Stuck;
                }
                // Normally re-armed in `serve` when the request ends (that happens inside the
                // connection's poll, or wakes it); this later check is only a backstop.
                *busy = true;
                timer
                    .as_mut()
                    .reset(activity.at(now.saturating_add(limits.keepalive_ms)));
            }
            IdleCheck::Idle => return Timer::Idle,
            IdleCheck::SlowHead => return Timer::SlowHead,
        }
    }
    Timer::Pending
}

/// What a connection whose writes to the client are blocked is allowed: `worker.client_timeout`
/// without taking anything, and with `worker.min_response_rate`, that rate over a window.
struct StallWatch {
    limits: IdleLimits,
    fd: RawFd,
    /// The deadline the stall timer is armed for.
    deadline: u64,
    /// `worker.min_response_rate`: the window the current blocked write counts in, the block
    /// it was last checked for, and the instant the client falls below the rate.
    window: Option<RateWindow>,
    window_block: u64,
    rate_deadline: u64,
    /// Cut for taking the response slower than `worker.min_response_rate`.
    too_slow: bool,
}

/// What [`StallWatch::check`] found.
enum Stall {
    /// Nothing blocked, or still within its time.
    None,
    /// The rate deadline moved (the client took more): look again.
    Recheck,
    /// The client had its time: cut the connection (reset, see `reset_on_close`).
    Cut,
}

impl StallWatch {
    fn new(limits: IdleLimits, fd: RawFd) -> StallWatch {
        StallWatch {
            limits,
            fd,
            deadline: NOT_BLOCKED,
            window: None,
            window_block: NOT_BLOCKED,
            rate_deadline: NOT_BLOCKED,
            too_slow: false,
        }
    }

    /// Bytes of the response the client has taken: written, less what the kernel still holds.
    fn taken(&self, activity: &Activity) -> u64 {
        let written = activity.written.load(Ordering::Relaxed);
        written.saturating_sub(unsent_bytes(self.fd).unwrap_or(0))
    }

    fn check(
        &mut self,
        mut stall: Pin<&mut tokio::time::Sleep>,
        cx: &mut Context<'_>,
        activity: &Activity,
    ) -> Stall {
        let blocked = activity.write_blocked_ms.load(Ordering::Relaxed);
        if blocked == NOT_BLOCKED {
            return Stall::None;
        }
        let limits = &self.limits;
        if limits.min_response_rate > 0 && blocked != self.window_block {
            self.window_block = blocked;
            let taken = self.taken(activity);
            let w = limits.window_at(self.window, blocked, taken);
            self.window = Some(w);
            self.rate_deadline = limits.rate_deadline(w, taken);
        }
        let deadline = blocked
            .saturating_add(limits.client_ms)
            .min(self.rate_deadline);
        if deadline != self.deadline {
            self.deadline = deadline;
            stall.as_mut().reset(activity.at(deadline));
        }
        if stall.as_mut().poll(cx).is_pending() {
            return Stall::None;
        }
        if deadline == self.rate_deadline {
            // The client may have taken more since the deadline was set: judge on what it has
            // now.
            let w = self.window.expect("set with rate_deadline");
            self.rate_deadline = self.limits.rate_deadline(w, self.taken(activity));
            if self.rate_deadline > activity.ms_since_open() {
                return Stall::Recheck;
            }
            self.too_slow = true;
        }
        // What the kernel still holds for this client would go on trickling to it for as long
        // as it likes after the close: a reset drops it.
        reset_on_close(self.fd);
        Stall::Cut
    }
}
