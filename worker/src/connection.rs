//! One client connection: HTTP/1.1 or h2c served by hyper, its idle keep-alive timeout and its
//! part in a graceful drain.
//!
//! Owns the per-connection task and the bookkeeping it needs (requests in flight on this
//! connection, when it went idle, whether the client sent bytes since, whether it has ended),
//! and runs the tunnel of an upgraded connection (which `proxy` builds) in that same task, so
//! that a WebSocket stays a counted, drained connection. It must not make
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
use std::io;
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::listener::{reset_on_close, unsent_bytes, Stream};
use crate::request;
use crate::scoreboard::{coarse_monotonic_ms, coarse_tick_ms};
use crate::server::{ConnectionGuard, Worker};

/// What this connection has been doing, shared between its task, its socket wrapper and the
/// guards of its requests. Everything runs on one thread; atomics only make it `Sync`.
pub(crate) struct Activity {
    opened: Instant,
    /// `opened` on the coarse clock, which stamps the end of every request (see `ended_ms`).
    opened_coarse_ms: u64,
    started: AtomicU32,
    finished: AtomicU32,
    /// Milliseconds after `opened` at which the last request in flight ended.
    idle_since_ms: AtomicU64,
    /// The client sent bytes since the connection went idle: a request head is on its way.
    read_since_idle: AtomicBool,
    /// The connection speaks HTTP/2 (seen on its first request).
    http2: AtomicBool,
    /// Milliseconds after `opened` since which a write to the client has been blocked (its
    /// socket full); `NOT_BLOCKED` while writes go through.
    write_blocked_ms: AtomicU64,
    /// Streamed response bodies that handed hyper a frame and have not been asked for the next
    /// one yet: on HTTP/2, a stream the client grants no window stays so, with no socket write
    /// ever blocking.
    unclaimed: AtomicU32,
    /// When (coarse clock) a streamed body was last asked for its next frame.
    last_claim_ms: AtomicU64,
    /// The connection has ended (its client is gone), for the requests that outlive it.
    closed: AtomicBool,
    /// An upgraded connection's tunnel (`proxy`), run by this connection's task once hyper
    /// hands the socket over, so that it stays counted and drained like the connection.
    tunnel: std::sync::Mutex<Option<Tunnel>>,
    /// Bytes written to the client's socket so far.
    written: AtomicU64,
    /// The client closed its sending side mid-request (see `TrackedIo::poll_read`): the
    /// connection's task, to wake when the last request ends so that hyper sees the end.
    eof_held: AtomicBool,
    eof_waker: std::sync::Mutex<Option<std::task::Waker>>,
}

/// The copy loop of an upgraded connection.
pub(crate) type Tunnel = Pin<Box<dyn Future<Output = ()> + Send>>;

const NOT_BLOCKED: u64 = u64::MAX;

/// Connection-level timeouts, in milliseconds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IdleLimits {
    pub(crate) keepalive_ms: u64,
    pub(crate) header_ms: u64,
    /// `worker.client_timeout`: the longest a write to the client may stay blocked.
    pub(crate) client_ms: u64,
    /// `worker.min_response_rate`, bytes per second (0: none), and `worker.min_rate_grace`.
    pub(crate) min_response_rate: u64,
    pub(crate) rate_grace_ms: u64,
}

/// `worker.min_response_rate` on one connection (as Kestrel's `MinResponseDataRate`): the
/// bytes the client has taken, divided by the time since the worker's writes started waiting
/// for it, must stay above the rate once `rate_grace_ms` has passed. Bytes count once the
/// client's side has them (written minus what the kernel still holds, `unsent_bytes`), so the
/// socket's send buffer, megabytes on a fast link, earns a slow reader no credit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RateWindow {
    /// When the window opened: the start of a blocked write (ms after `opened`).
    start_ms: u64,
    /// Bytes the client had taken by then.
    start_taken: u64,
}

impl IdleLimits {
    /// The instant (ms after `opened`) by which a client that has taken `taken` bytes falls
    /// below the minimum response rate in `window`.
    fn rate_deadline(&self, window: RateWindow, taken: u64) -> u64 {
        let earned = taken
            .saturating_sub(window.start_taken)
            .saturating_mul(1000)
            / self.min_response_rate;
        window
            .start_ms
            .saturating_add(earned.max(self.rate_grace_ms))
    }

    /// The window a write blocked at `blocked_ms` (the client having taken `taken`) counts
    /// in: the current one, if the client has kept pace so far, or a new one. A client that
    /// took everything before its deadline owes nothing for the time the worker had nothing to
    /// send: that time is no wait for it.
    fn window_at(&self, current: Option<RateWindow>, blocked_ms: u64, taken: u64) -> RateWindow {
        match current {
            Some(w) if blocked_ms < self.rate_deadline(w, taken) => w,
            _ => RateWindow {
                start_ms: blocked_ms,
                start_taken: taken,
            },
        }
    }
}

/// What the idle timer should do when it fires.
#[derive(Debug, PartialEq, Eq)]
enum IdleCheck {
    /// A request is in flight: not idle.
    Busy,
    /// Not due yet: fire again at this many ms after `opened`.
    Wait(u64),
    /// Nothing received for `keepalive_timeout`: shut the connection down gracefully.
    Idle,
    /// Bytes arrived but no request started within `header_timeout`: cut the connection.
    SlowHead,
}

impl Activity {
    fn new(opened: Instant) -> Activity {
        Activity {
            opened,
            opened_coarse_ms: coarse_monotonic_ms(),
            started: AtomicU32::new(0),
            finished: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(0),
            read_since_idle: AtomicBool::new(false),
            http2: AtomicBool::new(false),
            write_blocked_ms: AtomicU64::new(NOT_BLOCKED),
            unclaimed: AtomicU32::new(0),
            last_claim_ms: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            tunnel: std::sync::Mutex::new(None),
            written: AtomicU64::new(0),
            eof_held: AtomicBool::new(false),
            eof_waker: std::sync::Mutex::new(None),
        }
    }

    /// Frames are waiting to be sent, and none has been taken for `client_ms`: the client
    /// grants no flow-control window (HTTP/2) and the connection is stuck on it.
    fn streams_stuck(&self, client_ms: u64) -> bool {
        self.unclaimed.load(Ordering::Relaxed) > 0
            && coarse_monotonic_ms().saturating_sub(self.last_claim_ms.load(Ordering::Relaxed))
                >= client_ms
    }

    /// Notes how a write to the client went: blocked (from when, if it was not already), or
    /// through (and how much). Only a blocked write reads the clock.
    fn wrote(&self, res: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = res {
            // One thread: a plain load and store, no locked instruction.
            let written = self.written.load(Ordering::Relaxed);
            self.written
                .store(written.wrapping_add(*n as u64), Ordering::Relaxed);
        }
        match res {
            Poll::Pending => {
                if self.write_blocked_ms.load(Ordering::Relaxed) == NOT_BLOCKED {
                    self.write_blocked_ms
                        .store(self.ms_since_open(), Ordering::Relaxed);
                }
            }
            Poll::Ready(_) => {
                if self.write_blocked_ms.load(Ordering::Relaxed) != NOT_BLOCKED {
                    self.write_blocked_ms.store(NOT_BLOCKED, Ordering::Relaxed);
                }
            }
        }
    }

    /// A request starts on this connection; it ends when the guard drops.
    pub(crate) fn begin(self: &Arc<Self>) -> ActivityGuard {
        self.started.fetch_add(1, Ordering::Relaxed);
        ActivityGuard(Arc::clone(self))
    }

    fn inflight(&self) -> u32 {
        self.started
            .load(Ordering::Relaxed)
            .wrapping_sub(self.finished.load(Ordering::Relaxed))
    }

    /// Bytes arrived since the connection went idle, which on HTTP/1 means the next head is on
    /// its way. Not on HTTP/2: there, idle connections carry PINGs and other frames that are
    /// no request, and an idle HTTP/2 connection gets GOAWAY at `keepalive_timeout` instead of
    /// being cut at `header_timeout`.
    fn head_arriving(&self) -> bool {
        self.read_since_idle.load(Ordering::Relaxed) && !self.http2.load(Ordering::Relaxed)
    }

    fn ms_since_open(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    /// `ms_since_open` for the end of a request, read from the coarse clock (this runs on
    /// every request; the fine clock is a measurable part of its cost). Each coarse stamp lags
    /// the fine clock by less than one tick, so adding a tick makes the result never earlier
    /// than the truth and at most two ticks later: an idle deadline never comes early.
    fn ended_ms(&self) -> u64 {
        coarse_monotonic_ms().saturating_sub(self.opened_coarse_ms) + coarse_tick_ms()
    }

    fn at(&self, ms: u64) -> Instant {
        self.opened + Duration::from_millis(ms)
    }

    /// The next instant (ms after `opened`) at which `check` may have something to do; `None`
    /// while a request is in flight.
    fn next_check(&self, limits: IdleLimits) -> Option<u64> {
        if self.inflight() > 0 {
            return None;
        }
        let since = self.idle_since_ms.load(Ordering::Relaxed);
        let header = since.saturating_add(limits.header_ms);
        if self.head_arriving() {
            Some(header)
        } else {
            // Bytes may still arrive before the keep-alive deadline, and then the header
            // deadline applies: wake for whichever comes first.
            Some(header.min(since.saturating_add(limits.keepalive_ms)))
        }
    }

    fn check(&self, now_ms: u64, limits: IdleLimits) -> IdleCheck {
        if self.inflight() > 0 {
            return IdleCheck::Busy;
        }
        let since = self.idle_since_ms.load(Ordering::Relaxed);
        let header = since.saturating_add(limits.header_ms);
        let keepalive = since.saturating_add(limits.keepalive_ms);
        if self.head_arriving() {
            if now_ms >= header {
                IdleCheck::SlowHead
            } else {
                IdleCheck::Wait(header)
            }
        } else if now_ms >= keepalive {
            IdleCheck::Idle
        } else if now_ms < header {
            IdleCheck::Wait(header.min(keepalive))
        } else {
            IdleCheck::Wait(keepalive)
        }
    }
}

/// One request in flight on a connection.
pub(crate) struct ActivityGuard(Arc<Activity>);

/// A request's view of its connection, which it may outlive (a proxied request whose client
/// left goes on until the app is done).
pub(crate) struct ClientConnection(Arc<Activity>);

impl ClientConnection {
    /// The client's connection has ended.
    pub(crate) fn gone(&self) -> bool {
        self.0.closed.load(Ordering::Relaxed)
    }

    /// Hands the connection's task the tunnel to run once the upgrade completes; `Err` gives
    /// it back if the connection cannot take it (HTTP/2, or one is already set).
    pub(crate) fn set_tunnel(&self, tunnel: Tunnel) -> Result<(), Tunnel> {
        if self.0.http2.load(Ordering::Relaxed) {
            return Err(tunnel);
        }
        let mut slot = self.0.tunnel.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return Err(tunnel);
        }
        *slot = Some(tunnel);
        Ok(())
    }
}

impl ActivityGuard {
    /// The request's connection, for work that may outlive the request's place on it.
    pub(crate) fn connection(&self) -> ClientConnection {
        ClientConnection(Arc::clone(&self.0))
    }

    /// Records that the connection speaks HTTP/2 (a drain can then send GOAWAY at once).
    pub(crate) fn set_http2(&self) {
        self.0.http2.store(true, Ordering::Relaxed);
    }

    /// A streamed response body handed hyper a frame (`true`), or was asked for the next one
    /// after that (`false`); see `Activity::unclaimed`.
    pub(crate) fn frame_out(&self, out: bool) {
        let a = &self.0;
        if out {
            if a.unclaimed.fetch_add(1, Ordering::Relaxed) == 0 {
                a.last_claim_ms
                    .store(coarse_monotonic_ms(), Ordering::Relaxed);
            }
        } else {
            a.unclaimed.fetch_sub(1, Ordering::Relaxed);
            a.last_claim_ms
                .store(coarse_monotonic_ms(), Ordering::Relaxed);
        }
    }
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let a = &self.0;
        let finished = a.finished.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        if finished == a.started.load(Ordering::Relaxed) {
            a.idle_since_ms.store(a.ended_ms(), Ordering::Relaxed);
            a.read_since_idle.store(false, Ordering::Relaxed);
            // A plain load first: this runs at the end of every request.
            if a.eof_held.load(Ordering::Relaxed) {
                a.eof_held.store(false, Ordering::Relaxed);
                if let Some(waker) = a.eof_waker.lock().ok().and_then(|mut w| w.take()) {
                    waker.wake();
                }
            }
        }
    }
}

/// The client socket as hyper sees it: it notes when the client sends bytes.
struct TrackedIo {
    stream: Stream,
    activity: Arc<Activity>,
}

impl AsyncRead for TrackedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.read_since_idle.store(true, Ordering::Relaxed);
        } else if matches!(res, Poll::Ready(Ok(()))) && buf.remaining() > 0 {
            // End of input. With a request in flight on HTTP/1, that is a client that closed
            // its sending side after its request (half-close, RFC 9112 9.6): it still waits
            // for the answer, so hyper, which would take it for a client gone, is told nothing
            // yet; it sees the end once the request is over. A client that is really gone
            // resets the connection, an error that goes through. (hyper's own `half_close`
            // stops reading altogether mid-request, so it would miss that reset too.)
            let a = &this.activity;
            if a.inflight() > 0 && !a.http2.load(Ordering::Relaxed) {
                if let Ok(mut waker) = a.eof_waker.lock() {
                    *waker = Some(cx.waker().clone());
                }
                a.eof_held.store(true, Ordering::Relaxed);
                return Poll::Pending;
            }
        }
        res
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.activity.wrote(&res);
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.activity.wrote(&res);
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // TCP and Unix sockets have nothing to flush: writes alone say whether the client reads.
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

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
    let io = TokioIo::new(TrackedIo {
        stream,
        activity: Arc::clone(&activity),
    });
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

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: IdleLimits = IdleLimits {
        keepalive_ms: 5_000,
        header_ms: 10_000,
        client_ms: 30_000,
        min_response_rate: 0,
        rate_grace_ms: 5_000,
    };

    #[test]
    fn idle_deadline_follows_requests_and_incoming_bytes() {
        let a = Arc::new(Activity::new(Instant::now()));
        // Fresh connection, nothing received: keep-alive limit from accept.
        assert_eq!(a.next_check(LIMITS), Some(5_000));
        assert_eq!(a.check(4_999, LIMITS), IdleCheck::Wait(5_000));
        assert_eq!(a.check(5_000, LIMITS), IdleCheck::Idle);

        // Bytes arrived: a head is on its way; the header limit applies instead.
        a.read_since_idle.store(true, Ordering::Relaxed);
        assert_eq!(a.next_check(LIMITS), Some(10_000));
        assert_eq!(a.check(5_000, LIMITS), IdleCheck::Wait(10_000));
        assert_eq!(a.check(10_000, LIMITS), IdleCheck::SlowHead);

        // A request in flight is never idle.
        let g1 = a.begin();
        let g2 = a.begin();
        assert_eq!(a.next_check(LIMITS), None);
        assert_eq!(a.check(60_000, LIMITS), IdleCheck::Busy);
        drop(g1);
        assert_eq!(a.check(60_000, LIMITS), IdleCheck::Busy);
        assert!(a.inflight() > 0);

        // The last one ends: idle from then, and the byte flag is reset.
        a.idle_since_ms.store(1, Ordering::Relaxed);
        drop(g2);
        let since = a.idle_since_ms.load(Ordering::Relaxed);
        assert!(!a.read_since_idle.load(Ordering::Relaxed));
        assert_eq!(
            a.inflight(),
            0,
            "idle between requests: a drain leaves it to the client"
        );
        assert_eq!(
            a.check(since + 4_999, LIMITS),
            IdleCheck::Wait(since + 5_000)
        );
        assert_eq!(a.check(since + 5_000, LIMITS), IdleCheck::Idle);
    }

    #[test]
    fn the_response_rate_is_averaged_over_a_window_of_blocked_writes() {
        let limits = IdleLimits {
            min_response_rate: 1000,
            rate_grace_ms: 5_000,
            ..LIMITS
        };
        // A write blocks at 100 ms, the client having taken 50 000 bytes: a window opens.
        let w = limits.window_at(None, 100, 50_000);
        assert_eq!(
            w,
            RateWindow {
                start_ms: 100,
                start_taken: 50_000
            }
        );
        // Nothing taken since: the grace, then the client is too slow.
        assert_eq!(limits.rate_deadline(w, 50_000), 5_100);
        // 1000 bytes/s earn a second each: 20 000 bytes taken, 20 s.
        assert_eq!(limits.rate_deadline(w, 70_000), 20_100);
        // Blocked again at 15 s with those 20 000 taken: still in pace, same window (its
        // credit and debt carry on).
        assert_eq!(limits.window_at(Some(w), 15_000, 70_000), w);
        // Blocked again at 30 s: the client had taken everything by its deadline, and the time
        // since was the worker's (nothing to send): a new window, with a new grace.
        let w2 = limits.window_at(Some(w), 30_000, 70_000);
        assert_eq!(
            w2,
            RateWindow {
                start_ms: 30_000,
                start_taken: 70_000
            }
        );
        assert_eq!(limits.rate_deadline(w2, 70_000), 35_000);
    }

    #[test]
    fn http2_frames_between_requests_are_no_head() {
        let limits = IdleLimits {
            keepalive_ms: 300,
            header_ms: 1_500,
            client_ms: 30_000,
            min_response_rate: 0,
            rate_grace_ms: 5_000,
        };
        let a = Activity::new(Instant::now());
        a.http2.store(true, Ordering::Relaxed);
        // A PING arrived: on HTTP/2 that is no request on its way, so the connection goes idle
        // (GOAWAY) at the keep-alive deadline rather than being cut later as a slow head.
        a.read_since_idle.store(true, Ordering::Relaxed);
        assert_eq!(a.next_check(limits), Some(300));
        assert_eq!(a.check(300, limits), IdleCheck::Idle);
        assert_eq!(a.check(1_500, limits), IdleCheck::Idle);
    }

    #[test]
    fn header_limit_shorter_than_keepalive_is_respected() {
        let limits = IdleLimits {
            keepalive_ms: 10_000,
            header_ms: 300,
            client_ms: 30_000,
            min_response_rate: 0,
            rate_grace_ms: 5_000,
        };
        let a = Activity::new(Instant::now());
        // Woken at the header deadline in case bytes arrived by then; none did: keep waiting.
        assert_eq!(a.next_check(limits), Some(300));
        assert_eq!(a.check(0, limits), IdleCheck::Wait(300));
        assert_eq!(a.check(300, limits), IdleCheck::Wait(10_000));
        assert_eq!(a.check(10_000, limits), IdleCheck::Idle);
        // Some bytes, but no complete head by the header deadline: cut.
        a.read_since_idle.store(true, Ordering::Relaxed);
        assert_eq!(a.check(299, limits), IdleCheck::Wait(300));
        assert_eq!(a.check(300, limits), IdleCheck::SlowHead);
    }
}
