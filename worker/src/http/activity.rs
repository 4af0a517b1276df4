//! What one client connection has been doing, shared by its task (`connection`), its socket
//! wrapper (`TrackedIo`, which counts bytes and sees blocked writes and the client's
//! half-close) and the guards of its requests: requests in flight, when it went idle, whether
//! the client sent bytes since, whether it has ended, and the tunnel of an upgrade. Also the
//! connection-level limits (`IdleLimits`) and the decisions they make from this bookkeeping
//! (`Activity::check`, the response-rate window). See `connection` for the timeouts' design.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::listener::Stream;
use crate::shm::scoreboard::{coarse_monotonic_ms, coarse_tick_ms};

/// What this connection has been doing, shared between its task, its socket wrapper and the
/// guards of its requests. Everything runs on one thread; atomics only make it `Sync`.
pub(crate) struct Activity {
    pub(crate) opened: Instant,
    /// `opened` on the coarse clock, which stamps the end of every request (see `ended_ms`).
    opened_coarse_ms: u64,
    started: AtomicU32,
    finished: AtomicU32,
    /// Milliseconds after `opened` at which the last request in flight ended.
    idle_since_ms: AtomicU64,
    /// The client sent bytes since the connection went idle: a request head is on its way.
    read_since_idle: AtomicBool,
    /// The connection speaks HTTP/2 (seen on its first request).
    pub(crate) http2: AtomicBool,
    /// Milliseconds after `opened` since which a write to the client has been blocked (its
    /// socket full); `NOT_BLOCKED` while writes go through.
    pub(crate) write_blocked_ms: AtomicU64,
    /// Streamed response bodies that handed hyper a frame and have not been asked for the next
    /// one yet: on HTTP/2, a stream the client grants no window stays so, with no socket write
    /// ever blocking.
    unclaimed: AtomicU32,
    /// When (coarse clock) a streamed body was last asked for its next frame.
    last_claim_ms: AtomicU64,
    /// The connection has ended (its client is gone), for the requests that outlive it.
    pub(crate) closed: AtomicBool,
    /// An upgraded connection's tunnel (`proxy`), run by this connection's task once hyper
    /// hands the socket over, so that it stays counted and drained like the connection.
    pub(crate) tunnel: std::sync::Mutex<Option<Tunnel>>,
    /// Bytes written to the client's socket so far.
    pub(crate) written: AtomicU64,
    /// The client closed its sending side mid-request (see `TrackedIo::poll_read`): the
    /// connection's task, to wake when the last request ends so that hyper sees the end.
    eof_held: AtomicBool,
    eof_waker: std::sync::Mutex<Option<std::task::Waker>>,
}

/// The copy loop of an upgraded connection.
pub(crate) type Tunnel = Pin<Box<dyn Future<Output = ()> + Send>>;

pub(crate) const NOT_BLOCKED: u64 = u64::MAX;

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
pub(crate) struct RateWindow {
    /// When the window opened: the start of a blocked write (ms after `opened`).
    start_ms: u64,
    /// Bytes the client had taken by then.
    start_taken: u64,
}

impl IdleLimits {
    /// The instant (ms after `opened`) by which a client that has taken `taken` bytes falls
    /// below the minimum response rate in `window`.
    pub(crate) fn rate_deadline(&self, window: RateWindow, taken: u64) -> u64 {
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
    pub(crate) fn window_at(
        &self,
        current: Option<RateWindow>,
        blocked_ms: u64,
        taken: u64,
    ) -> RateWindow {
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
pub(crate) enum IdleCheck {
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
    pub(crate) fn new(opened: Instant) -> Activity {
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
    pub(crate) fn streams_stuck(&self, client_ms: u64) -> bool {
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

    pub(crate) fn inflight(&self) -> u32 {
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

    pub(crate) fn ms_since_open(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    /// `ms_since_open` for the end of a request, read from the coarse clock (this runs on
    /// every request; the fine clock is a measurable part of its cost). Each coarse stamp lags
    /// the fine clock by less than one tick, so adding a tick makes the result never earlier
    /// than the truth and at most two ticks later: an idle deadline never comes early.
    fn ended_ms(&self) -> u64 {
        coarse_monotonic_ms().saturating_sub(self.opened_coarse_ms) + coarse_tick_ms()
    }

    pub(crate) fn at(&self, ms: u64) -> Instant {
        self.opened + Duration::from_millis(ms)
    }

    /// The next instant (ms after `opened`) at which `check` may have something to do; `None`
    /// while a request is in flight.
    pub(crate) fn next_check(&self, limits: IdleLimits) -> Option<u64> {
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

    pub(crate) fn check(&self, now_ms: u64, limits: IdleLimits) -> IdleCheck {
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
pub(crate) struct TrackedIo {
    stream: Stream,
    activity: Arc<Activity>,
}

impl TrackedIo {
    pub(crate) fn new(stream: Stream, activity: Arc<Activity>) -> TrackedIo {
        TrackedIo { stream, activity }
    }
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
