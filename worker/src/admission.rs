//! Admission: the permits a request must hold while it is served.
//!
//! Owns the worker's concurrency limit (`worker.max_concurrent`, counted in this worker's
//! scoreboard record, which is its single source of truth) and the host-wide limit
//! (`limits.max_concurrent_requests`, through the scoreboard's atomics). Every permit is an RAII
//! guard: dropping it — on success, error, panic, disconnect or timeout alike — gives it back.
//! This module decides nothing about responses, connections or time.

use std::sync::atomic::Ordering;

use crate::scoreboard::Scoreboard;

/// Why a request was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rejection {
    /// `worker.max_concurrent` requests are already in flight in this worker.
    Worker,
    /// `limits.max_concurrent_requests` are already in flight on this host.
    Host,
}

/// The limits one worker enforces, bound to its scoreboard record.
pub(crate) struct Admission {
    board: Scoreboard,
    slot: usize,
    max_concurrent: u32,
}

impl Admission {
    pub(crate) fn new(board: Scoreboard, slot: usize, max_concurrent: u32) -> Admission {
        Admission {
            board,
            slot,
            max_concurrent,
        }
    }

    pub(crate) fn board(&self) -> &Scoreboard {
        &self.board
    }

    pub(crate) fn slot(&self) -> &crate::scoreboard::Slot {
        self.board.slot(self.slot)
    }

    /// Takes the worker permit, then the host-wide one: the cheap local check first, and a
    /// request refused locally never touches (or briefly holds) a host-wide permit.
    pub(crate) fn admit(&self) -> Result<Permits<'_>, Rejection> {
        let local = self.try_local().ok_or(Rejection::Worker)?;
        let global = self.try_global().ok_or(Rejection::Host)?;
        Ok(Permits {
            _global: global,
            _local: local,
        })
    }

    fn try_local(&self) -> Option<LocalPermit<'_>> {
        let slot = self.slot();
        let max = self.max_concurrent;
        match slot
            .inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            }) {
            Ok(_) => Some(LocalPermit { admission: self }),
            Err(_) => {
                slot.rejected_local.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    fn try_global(&self) -> Option<GlobalPermit<'_>> {
        // The scoreboard counts host-wide rejections itself. (`then`, not `then_some`: an
        // eagerly built permit would be dropped on refusal, releasing one we never took.)
        self.board
            .try_acquire_global(self.slot)
            .then(|| GlobalPermit { admission: self })
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
    }
}

/// One of the host's `limits.max_concurrent_requests` slots.
pub(crate) struct GlobalPermit<'a> {
    admission: &'a Admission,
}

impl Drop for GlobalPermit<'_> {
    fn drop(&mut self) {
        self.admission.board.release_global(self.admission.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_are_exact_and_released_on_drop() {
        let (board, fd) = Scoreboard::create(2, 3).unwrap();
        let view = Scoreboard::open(&fd, false).unwrap();
        let adm = Admission::new(board, 1, 2);

        let a = adm.admit().unwrap();
        let b = adm.admit().unwrap();
        assert_eq!(adm.admit().err(), Some(Rejection::Worker));
        assert_eq!(view.slot(1).inflight.load(Ordering::Relaxed), 2);
        assert_eq!(view.slot(1).held_global.load(Ordering::Relaxed), 2);
        assert_eq!(view.slot(1).rejected_local.load(Ordering::Relaxed), 1);
        // Refused locally: the host counter was never touched.
        assert_eq!(view.header().global_rejected.load(Ordering::Relaxed), 0);

        // Other workers take the remaining host-wide permits: the next request here is refused
        // by the host cap, gives its local permit back, and releases nobody else's permit.
        drop(a);
        let other = Admission::new(Scoreboard::open(&fd, true).unwrap(), 0, 10);
        let o1 = other.admit().unwrap();
        let o2 = other.admit().unwrap();
        assert_eq!(view.header().global_inflight.load(Ordering::Relaxed), 3);
        assert_eq!(adm.admit().err(), Some(Rejection::Host));
        assert_eq!(adm.admit().err(), Some(Rejection::Host));
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
