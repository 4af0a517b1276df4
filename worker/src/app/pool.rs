//! The app processes as one pool: which app process an HTTP worker sends a request to.
//!
//! With `app.command`, the master runs the app processes apart from the HTTP workers, each
//! behind an app host of its own (`apphost`), and publishes each one's load in its scoreboard
//! record ([`Slot::app_load`]: the host's pid, whether it takes new requests, the requests in
//! flight to it). Any HTTP worker sends any request to the least busy open app process with a
//! free slot (`app.concurrency`; 0: no limit per app), so a request stuck in one app process
//! never holds up others while another one is free.
//!
//! When every app process is busy, requests wait in one host-wide queue, first come first
//! served: each worker keeps its own waiters in order, the head of each publishes when it began
//! to wait, and only the oldest head host-wide may take a slot that frees up (merging ordered
//! queues by their oldest head is one ordered queue). A slot freed in this worker wakes its head
//! at once; one freed in another worker is seen within [`RETRY`]. The wait is part of the
//! request's `worker.request_timeout`.
//!
//! `app.pack_window` (off by default) trades some of that guarantee for CPU: an app process that
//! took or ended a request less than the window ago, and has fewer than [`PACK_DEPTH`] in
//! flight, is preferred even while busy, so that it reads the next request in the same wake-up
//! instead of another process waking for it (see [`Pick`]). A request that turns out to be slow
//! then holds up those packed behind it in that window; past it, the process is passed over as
//! today. Measured (bench/side_by_side.py, 3 uvicorn processes, `GET /` at 5,000 req/s, medians
//! of 4 rounds): 1 ms cut the app processes' CPU per request from 78 to 68 µs and the whole
//! tree's from 122 to 116 µs (nginx + gunicorn: 95). In the 5% blocking mix at 100 req/s the
//! fast requests that waited over 50 ms were 0.46% with it and 0.50-0.71% without (two runs
//! each, where all three processes are blocked at once about 1.4% of the time): at that rate the
//! cost is below the noise; it grows with the rate and the window.
//!
//! Owns choosing and counting; the `proxy` module owns the connection to the chosen process.

use std::cmp::Reverse;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use crate::config::Upstream;
use crate::shm::scoreboard::{monotonic_us, AppLoad, Kind, Scoreboard, Slot, APP_OPEN};

/// How often a waiting request looks again for a free app process: other workers free their
/// slots without telling this one.
const RETRY: Duration = Duration::from_millis(1);

/// With `app.pack_window`, the most requests a busy app process is given in flight before it is
/// passed over for an idle one (fewer if `app.concurrency` is lower).
pub(crate) const PACK_DEPTH: u32 = 8;

/// The HTTP worker's view of the app processes.
pub(crate) struct AppPool {
    /// Requests in flight to one app process; 0: no limit.
    concurrency: u32,
    /// This worker's record (where its queue's head publishes its arrival).
    own: usize,
    /// Where `{socket}` apps listen (`app-<id>-<host pid>.sock`).
    runtime_dir: PathBuf,
    /// Where the next scan starts, so that equally loaded app processes share the work.
    next: AtomicUsize,
    /// `app.pack_window` in µs; 0: never send to a busy app process while another is free.
    pack_us: u64,
    /// This worker's requests waiting for an app process.
    waiting: AtomicU32,
    /// A slot was given back in this worker: the head of the queue looks again.
    freed: Notify,
    /// Held by the request at the head of this worker's queue: tokio's mutex hands itself over
    /// in the order it was asked for.
    turn: tokio::sync::Mutex<()>,
}

/// One request slot of one app process, given back when dropped.
pub(crate) struct AppLease {
    board: &'static Scoreboard,
    pool: &'static AppPool,
    record: usize,
    host_pid: u32,
}

/// The app's slot a request holds (`app.concurrency` toward an upstream, a slot of one app
/// process of the pool), held by the response body until it is sent.
pub(crate) struct AppPermit {
    pub(crate) _sem: Option<tokio::sync::SemaphorePermit<'static>>,
    pub(crate) lease: Option<AppLease>,
}

impl AppPermit {
    /// The ticket of the app process slot held (`AppLease::ticket`); 0: none.
    pub(crate) fn ticket(&self) -> u64 {
        self.lease.as_ref().map_or(0, AppLease::ticket)
    }
}

/// Why no app process was found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NoApp {
    /// Every app process fails to start again and again.
    Failing,
}

impl AppPool {
    pub(crate) fn new(
        concurrency: u32,
        own: usize,
        runtime_dir: PathBuf,
        pack_window: Duration,
    ) -> AppPool {
        AppPool {
            concurrency,
            own,
            runtime_dir,
            next: AtomicUsize::new(0),
            pack_us: u64::try_from(pack_window.as_micros()).unwrap_or(u64::MAX),
            waiting: AtomicU32::new(0),
            freed: Notify::new(),
            turn: tokio::sync::Mutex::new(()),
        }
    }

    /// A slot in the least busy open app process, waiting for one (first come, first served,
    /// host-wide) while all are busy or none is up yet. Cancel-safe: a request dropped while it
    /// waits leaves the queue.
    pub(crate) async fn acquire(
        &'static self,
        board: &'static Scoreboard,
    ) -> Result<AppLease, NoApp> {
        // Nobody waits, here or elsewhere: take one if there is one.
        if self.waiting.load(Ordering::Relaxed) == 0
            && board.header().app_waiters.load(Ordering::Relaxed) == 0
        {
            if let Some(lease) = self.try_take(board) {
                return Ok(lease);
            }
        }
        let _waiter = Waiter::new(self, board);
        let _turn = self.turn.lock().await;
        let arrived = monotonic_us().max(1);
        let own = board.slot(self.own);
        own.app_wait_since_us.store(arrived, Ordering::Relaxed);
        let _head = Head(own);
        loop {
            if self.oldest_head(board, arrived) {
                if let Some(lease) = self.try_take(board) {
                    return Ok(lease);
                }
            }
            if all_failing(board) {
                return Err(NoApp::Failing);
            }
            let freed = self.freed.notified();
            tokio::select! {
                _ = freed => {}
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
    }

    /// Whether no other worker's queue has a head that began to wait before `arrived` (ties:
    /// the lower record first).
    fn oldest_head(&self, board: &Scoreboard, arrived: u64) -> bool {
        let used = records_used(board);
        (0..used).filter(|&r| r != self.own).all(|r| {
            let since = board.slot(r).app_wait_since_us.load(Ordering::Relaxed);
            since == 0 || since > arrived || (since == arrived && r > self.own)
        })
    }

    /// Takes a slot in the least busy open app process with room, if there is one (with
    /// `app.pack_window`, see [`Pick`]).
    fn try_take(&'static self, board: &'static Scoreboard) -> Option<AppLease> {
        let used = records_used(board);
        if used == 0 {
            return None;
        }
        if self.pack_us > 0 {
            return self.try_take_packed(board, used);
        }
        // A few tries: another worker may take the chosen slot between the look and the take.
        for _ in 0..4 {
            let start = self.next.fetch_add(1, Ordering::Relaxed) % used;
            let mut best: Option<(usize, u32, u32)> = None;
            for i in 0..used {
                let r = (start + i) % used;
                let slot = board.slot(r);
                if slot.kind() != Kind::App {
                    continue;
                }
                let load = slot.app_load();
                if load.pid == 0 || !load.open {
                    continue;
                }
                if self.concurrency > 0 && load.inflight >= self.concurrency {
                    continue;
                }
                if best.is_none_or(|(_, _, n)| load.inflight < n) {
                    best = Some((r, load.pid, load.inflight));
                    if load.inflight == 0 {
                        break;
                    }
                }
            }
            let (record, pid, _) = best?;
            let slot = board.slot(record);
            if slot.app_take(pid, self.concurrency) {
                slot.app_sent.fetch_add(1, Ordering::Relaxed);
                return Some(AppLease {
                    board,
                    pool: self,
                    record,
                    host_pid: pid,
                });
            }
        }
        None
    }

    /// `try_take` with `app.pack_window`: the best app process by [`Pick`].
    fn try_take_packed(&'static self, board: &'static Scoreboard, used: usize) -> Option<AppLease> {
        let depth = match self.concurrency {
            0 => PACK_DEPTH,
            c => c.min(PACK_DEPTH),
        };
        for _ in 0..4 {
            let now = monotonic_us();
            let mut best: Option<(usize, u32, Pick)> = None;
            for r in 0..used {
                let slot = board.slot(r);
                let load = slot.app_load();
                if slot.kind() != Kind::App || load.pid == 0 || !load.open {
                    continue;
                }
                if self.concurrency > 0 && load.inflight >= self.concurrency {
                    continue;
                }
                let moved = slot.app_moved_us.load(Ordering::Relaxed);
                let pick = Pick::of(load.inflight, moved, now, self.pack_us, depth);
                if best.is_none_or(|(_, _, b)| pick < b) {
                    best = Some((r, load.pid, pick));
                }
            }
            let (record, pid, pick) = best?;
            let slot = board.slot(record);
            if slot.app_take(pid, self.concurrency) {
                slot.app_sent.fetch_add(1, Ordering::Relaxed);
                if matches!(pick, Pick::Idle(_)) {
                    slot.app_moved_us.store(now, Ordering::Relaxed);
                }
                return Some(AppLease {
                    board,
                    pool: self,
                    record,
                    host_pid: pid,
                });
            }
        }
        None
    }
}

/// With `app.pack_window`: how good an app process with room is for the next request, best
/// first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Pick {
    /// Busy, but it took or ended a request within the window: it is running, and reads the
    /// next request as soon as it is done with these (one wake-up for all). The most recently
    /// moved first.
    Moving(Reverse<u64>),
    /// Nothing in flight; the most recently moved first (warm, and the others stay asleep).
    Idle(Reverse<u64>),
    /// Busy and still for longer than the window (maybe stuck), or at `PACK_DEPTH`: the fewest
    /// in flight first, as without packing.
    Busy(u32),
}

impl Pick {
    fn of(inflight: u32, moved_us: u64, now_us: u64, window_us: u64, depth: u32) -> Pick {
        if inflight == 0 {
            Pick::Idle(Reverse(moved_us))
        } else if inflight < depth && now_us.saturating_sub(moved_us) < window_us {
            Pick::Moving(Reverse(moved_us))
        } else {
            Pick::Busy(inflight)
        }
    }
}

/// Waits until some app process takes requests (an HTTP worker's boot).
pub(crate) async fn wait_for_an_app(board: &Scoreboard) {
    let open = || {
        (0..records_used(board)).any(|r| {
            let slot = board.slot(r);
            slot.kind() == Kind::App && slot.app_load().open
        })
    };
    let mut pause = Duration::from_millis(2);
    while !open() {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

fn records_used(board: &Scoreboard) -> usize {
    (board.header().records_used.load(Ordering::Acquire) as usize).min(board.capacity())
}

/// Whether there are app processes and every one of them fails to start again and again.
fn all_failing(board: &Scoreboard) -> bool {
    let mut apps = 0;
    for r in 0..records_used(board) {
        let slot = board.slot(r);
        if slot.kind() != Kind::App || slot.pid.load(Ordering::Relaxed) == 0 {
            continue;
        }
        if slot.app_failing.load(Ordering::Relaxed) == 0 {
            return false;
        }
        apps += 1;
    }
    apps > 0
}

/// Counts a request as waiting, here and host-wide, while it lives.
struct Waiter {
    pool: &'static AppPool,
    board: &'static Scoreboard,
}

impl Waiter {
    fn new(pool: &'static AppPool, board: &'static Scoreboard) -> Waiter {
        pool.waiting.fetch_add(1, Ordering::Relaxed);
        board.header().app_waiters.fetch_add(1, Ordering::Relaxed);
        Waiter { pool, board }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.pool.waiting.fetch_sub(1, Ordering::Relaxed);
        self.board
            .header()
            .app_waiters
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Clears the published arrival of this worker's queue head when it stops waiting.
struct Head<'a>(&'a Slot);

impl Drop for Head<'_> {
    fn drop(&mut self) {
        self.0.app_wait_since_us.store(0, Ordering::Relaxed);
    }
}

impl AppLease {
    /// Where the app process listens: `app-<id>-<host pid>.sock` in the runtime directory,
    /// or the port it was given (`{port}`).
    pub(crate) fn upstream(&self) -> Upstream {
        let slot = self.board.slot(self.record);
        match slot.app_port.load(Ordering::Relaxed) {
            0 => Upstream::Unix(self.pool.runtime_dir.join(format!(
                "app-{}-{}.sock",
                slot.worker_id.load(Ordering::Relaxed),
                self.host_pid
            ))),
            port => Upstream::Tcp(format!("127.0.0.1:{port}")),
        }
    }

    /// The app host's record (where the app's health is counted).
    pub(crate) fn slot(&self) -> &'static Slot {
        self.board.slot(self.record)
    }

    /// The app process refused a connection (it died and its host has not noticed yet, or its
    /// socket is gone): no new request goes to it until its host opens it again, which it
    /// does once it has seen the app die and restarted it (or after `apphost::REOPEN_AFTER` if
    /// the app turns out to run on).
    pub(crate) fn unreachable(&self) {
        close(self.slot(), self.host_pid);
    }

    /// The record and host pid packed in one word, to find the app process again after the
    /// request is gone (`app.kill_on_timeout`, see [`kill_app_of`]).
    pub(crate) fn ticket(&self) -> u64 {
        ((self.record as u64 + 1) << 32) | u64::from(self.host_pid)
    }
}

impl Drop for AppLease {
    fn drop(&mut self) {
        let slot = self.board.slot(self.record);
        slot.app_give_back(self.host_pid);
        if self.pool.pack_us > 0 {
            slot.app_moved_us.store(monotonic_us(), Ordering::Relaxed);
        }
        self.pool.freed.notify_one();
    }
}

/// Closes the app process of `slot` to new requests if its host is still `host_pid` (see
/// `AppLease::unreachable`).
fn close(slot: &Slot, host_pid: u32) {
    let _ = slot
        .app_load
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
            let load = AppLoad::of(w);
            (load.pid == host_pid && load.open).then_some(w & !APP_OPEN)
        });
}

/// Kills the app process named by `ticket` ([`AppLease::ticket`]; 0: none) if its host is still
/// the same process: `app.kill_on_timeout`. Its host restarts it as after a crash; meanwhile no
/// request goes to it (closed here before the kill: its host would only see the death a moment
/// later, and requests sent to it in between would fail).
pub(crate) fn kill_app_of(board: &Scoreboard, ticket: u64) {
    let Some(record) = ((ticket >> 32) as usize).checked_sub(1) else {
        return;
    };
    let host_pid = ticket as u32;
    if record >= board.capacity() {
        return;
    }
    let slot = board.slot(record);
    if slot.app_load().pid != host_pid {
        return;
    }
    let app = slot.app_pid.load(Ordering::Relaxed);
    if app != 0 {
        tracing::warn!(
            app.id = slot.worker_id.load(Ordering::Relaxed),
            app.pid = app,
            "killing the app process: a request passed worker.request_timeout \
             (app.kill_on_timeout)"
        );
        close(slot, host_pid);
        crate::app::child::kill_group(app, nix::sys::signal::Signal::SIGKILL);
    }
}
