//! Admission: the permits a request must hold while it is served.
//!
//! Owns the worker's concurrency limit (`worker.max_concurrent`, counted in this worker's
//! scoreboard record, which is its single source of truth) and the host-wide limit
//! (`limits.max_concurrent_requests`, through the scoreboard's atomics). Every permit is an RAII
//! guard: dropping it — on success, error, panic, disconnect or timeout alike — gives it back.
//! With `limits.queue`, a request over either limit waits for its permits in this worker's
//! first-in, first-out queue, within `limits.queue_timeout`. This module decides nothing about
//! responses or connections.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::Notify;

use crate::shm::scoreboard::{Scoreboard, Slot};

/// Why a request was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rejection {
    /// `worker.max_concurrent` requests are already in flight in this worker (no queue).
    Worker,
    /// `limits.max_concurrent_requests` are already in flight on this host (no queue).
    Host,
    /// `limits.queue` requests are already waiting in this worker.
    QueueFull,
    /// The request waited `limits.queue_timeout` without getting its permits.
    QueueTimeout,
}

/// `limits.queue`: requests over a limit wait here, first come first served, instead of being
/// refused at once.
struct Queue {
    /// Most requests waiting at once; 0: no queue.
    limit: u32,
    timeout: Duration,
    /// A permit of this worker came back: the head of the queue tries again.
    freed: Notify,
    /// Held by the request at the head of the queue while it waits: tokio's mutex hands itself
    /// over in the order it was asked for, which makes the queue first in, first out.
    turn: tokio::sync::Mutex<()>,
}

/// How often the head of the queue looks again for a host-wide permit: other workers give theirs
/// back without telling this one.
const HOST_RETRY: Duration = Duration::from_millis(1);

/// The limits one worker enforces, bound to its scoreboard record.
pub(crate) struct Admission {
    board: Scoreboard,
    slot: usize,
    max_concurrent: u32,
    queue: Queue,
}

impl Admission {
    pub(crate) fn new(
        board: Scoreboard,
        slot: usize,
        max_concurrent: u32,
        queue: u32,
        queue_timeout: Duration,
    ) -> Admission {
        Admission {
            board,
            slot,
            max_concurrent,
            queue: Queue {
                limit: queue,
                timeout: queue_timeout,
                freed: Notify::new(),
                turn: tokio::sync::Mutex::new(()),
            },
        }
    }

    pub(crate) fn board(&self) -> &Scoreboard {
        &self.board
    }

    pub(crate) fn slot(&self) -> &Slot {
        self.board.slot(self.slot)
    }

    /// This worker's record in the scoreboard.
    pub(crate) fn slot_index(&self) -> usize {
        self.slot
    }

    /// Takes the worker permit, then the host-wide one: the cheap local check first, and a
    /// request refused locally never touches (or briefly holds) a host-wide permit. `Err` with
    /// the limit that refused, counted, when there is no queue; with a queue, `Err(None)`: the
    /// request may wait (`wait`). Nobody may be waiting already, or this would jump the queue.
    pub(crate) fn admit(&self) -> Result<Permits<'_>, Option<Rejection>> {
        let queued = self.queue.limit > 0;
        if queued && self.slot().queued.load(Ordering::Relaxed) > 0 {
            return Err(None);
        }
        match self.try_admit() {
            Ok(permits) => Ok(permits),
            Err(_) if queued => Err(None),
            Err(why) => {
                self.count(why);
                Err(Some(why))
            }
        }
    }

    /// Waits in the queue for both permits, within `limits.queue_timeout`.
    pub(crate) async fn wait(&self) -> Result<Permits<'_>, Rejection> {
        let slot = self.slot();
        if slot
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.queue.limit).then_some(n + 1)
            })
            .is_err()
        {
            self.count(Rejection::QueueFull);
            return Err(Rejection::QueueFull);
        }
        let _leave = Leave(slot);
        let waited = tokio::time::timeout(self.queue.timeout, async {
            let _turn = self.queue.turn.lock().await;
            // This worker's permit first; it is kept while the host-wide one is awaited
            // (trying for both each time would give it back, and wake ourselves, in a loop).
            let local = loop {
                // Registered before trying, so a permit freed in between is not missed.
                let freed = self.queue.freed.notified();
                tokio::pin!(freed);
                freed.as_mut().enable();
                match self.try_local() {
                    Some(local) => break local,
                    None => freed.await,
                }
            };
            loop {
                let freed = self.queue.freed.notified();
                tokio::pin!(freed);
                freed.as_mut().enable();
                if let Some(global) = self.try_global() {
                    return Permits {
                        _global: global,
                        _local: local,
                    };
                }
                tokio::select! {
                    _ = freed => {}
                    _ = tokio::time::sleep(HOST_RETRY) => {}
                }
            }
        })
        .await;
        waited.map_err(|_| {
            self.count(Rejection::QueueTimeout);
            Rejection::QueueTimeout
        })
    }

    fn try_admit(&self) -> Result<Permits<'_>, Rejection> {
        let local = self.try_local().ok_or(Rejection::Worker)?;
        let global = self.try_global().ok_or(Rejection::Host)?;
        Ok(Permits {
            _global: global,
            _local: local,
        })
    }

    fn count(&self, why: Rejection) {
        let slot = self.slot();
        let counter = match why {
            Rejection::Worker => &slot.rejected_local,
            Rejection::Host => &self.board.header().global_rejected,
            Rejection::QueueFull => &slot.queue_full,
            Rejection::QueueTimeout => &slot.queue_timeouts,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn try_local(&self) -> Option<LocalPermit<'_>> {
        let max = self.max_concurrent;
        self.slot()
            .inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| LocalPermit { admission: self })
    }

    fn try_global(&self) -> Option<GlobalPermit<'_>> {
        // `then`, not `then_some`: an eagerly built permit would be dropped on refusal,
        // releasing one we never took.
        self.board
            .try_acquire_global(self.slot)
            .then(|| GlobalPermit { admission: self })
    }

    /// A permit came back: the head of the queue, if any, tries again.
    fn freed(&self) {
        if self.queue.limit > 0 {
            self.queue.freed.notify_one();
        }
    }
}

/// Leaves the queue's count, however the wait ends (permits, timeout, client gone).
struct Leave<'a>(&'a Slot);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Both permits of an admitted request. Field order is drop order: the host-wide permit, the
/// scarcer one, goes back first.
pub(crate) struct Permits<'a> {
    _global: GlobalPermit<'a>,
    _local: LocalPermit<'a>,
}

/// One of this worker's `max_concurrent` slots.
pub(crate) struct LocalPermit<'a> {
    admission: &'a Admission,
}

impl Drop for LocalPermit<'_> {
    fn drop(&mut self) {
        self.admission
            .slot()
            .inflight
            .fetch_sub(1, Ordering::AcqRel);
        self.admission.freed();
    }
}

/// One of the host's `limits.max_concurrent_requests` slots.
pub(crate) struct GlobalPermit<'a> {
    admission: &'a Admission,
}

impl Drop for GlobalPermit<'_> {
    fn drop(&mut self) {
        self.admission.board.release_global(self.admission.slot);
        self.admission.freed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_are_exact_and_released_on_drop() {
        let (board, fd) = Scoreboard::create(2, 3).unwrap();
        let view = Scoreboard::open(&fd, false).unwrap();
        let adm = Admission::new(board, 1, 2, 0, Duration::ZERO);

        let a = adm.admit().unwrap();
        let b = adm.admit().unwrap();
        assert_eq!(adm.admit().err(), Some(Some(Rejection::Worker)));
        assert_eq!(view.slot(1).inflight.load(Ordering::Relaxed), 2);
        assert_eq!(view.slot(1).held_global.load(Ordering::Relaxed), 2);
        assert_eq!(view.slot(1).rejected_local.load(Ordering::Relaxed), 1);
        // Refused locally: the host counter was never touched.
        assert_eq!(view.header().global_rejected.load(Ordering::Relaxed), 0);

        // Other workers take the remaining host-wide permits: the next request here is refused
        // by the host cap, gives its local permit back, and releases nobody else's permit.
        drop(a);
        let other = Admission::new(
            Scoreboard::open(&fd, true).unwrap(),
            0,
            10,
            0,
            Duration::ZERO,
        );
        let o1 = other.admit().unwrap();
        let o2 = other.admit().unwrap();
        assert_eq!(view.header().global_inflight.load(Ordering::Relaxed), 3);
        assert_eq!(adm.admit().err(), Some(Some(Rejection::Host)));
        assert_eq!(adm.admit().err(), Some(Some(Rejection::Host)));
        assert_eq!(view.header().global_inflight.load(Ordering::Relaxed), 3);
        assert_eq!(view.slot(0).held_global.load(Ordering::Relaxed), 2);
        assert_eq!(view.slot(1).held_global.load(Ordering::Relaxed), 1);
        assert_eq!(view.slot(1).inflight.load(Ordering::Relaxed), 1);
        assert_eq!(view.header().global_rejected.load(Ordering::Relaxed), 2);

        drop((b, o1, o2));
        assert_eq!(view.header().global_inflight.load(Ordering::Relaxed), 0);
        assert_eq!(view.slot(1).inflight.load(Ordering::Relaxed), 0);
        assert_eq!(view.slot(1).held_global.load(Ordering::Relaxed), 0);
        assert_eq!(view.slot(0).held_global.load(Ordering::Relaxed), 0);
    }
}
