//! Whether a live worker process must be killed: hung (no heartbeat for `worker.timeout`), or
//! still draining after `server.graceful_timeout`. A pure decision over what the master knows of
//! the process, tested without processes below; the master logs and sends the SIGKILL.

use std::time::{Duration, Instant};

use worker::scoreboard::RecycleReason;

/// What the master knows of a live process, at one tick.
#[derive(Clone, Copy, Debug)]
pub(super) struct Pulse {
    /// Since its event loop last ran (a booting process: since its spawn).
    pub(super) heartbeat_age: Duration,
    /// Already killed as hung.
    pub(super) hung: bool,
    /// Told to drain, why, and by when it must be gone.
    pub(super) retiring: Option<(RecycleReason, Instant)>,
    /// Already killed by the master.
    pub(super) killed_by_us: bool,
}

/// What to do with the process now.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Health {
    /// Serving (or booting, or draining within its time): go on to its recycle checks.
    Fine,
    /// Draining within its time, or already killed: nothing more to check.
    Draining,
    /// No heartbeat for longer than `worker.timeout`: kill it as hung.
    Hung,
    /// Still draining past its deadline: kill it.
    DrainOverdue(RecycleReason),
}

pub(super) fn check(pulse: &Pulse, timeout: Duration, now: Instant) -> Health {
    if pulse.hung {
        return Health::Draining;
    }
    if pulse.heartbeat_age > timeout {
        return Health::Hung;
    }
    match pulse.retiring {
        Some((reason, deadline)) if now >= deadline && !pulse.killed_by_us => {
            Health::DrainOverdue(reason)
        }
        Some(_) => Health::Draining,
        None => Health::Fine,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(30);

    fn live() -> Pulse {
        Pulse {
            heartbeat_age: Duration::from_millis(500),
            hung: false,
            retiring: None,
            killed_by_us: false,
        }
    }

    #[test]
    fn a_process_whose_heartbeat_stopped_for_longer_than_the_timeout_is_hung_once() {
        let now = Instant::now();
        assert_eq!(check(&live(), TIMEOUT, now), Health::Fine);
        let at_timeout = Pulse {
            heartbeat_age: TIMEOUT,
            ..live()
        };
        assert_eq!(check(&at_timeout, TIMEOUT, now), Health::Fine);
        let stuck = Pulse {
            heartbeat_age: TIMEOUT + Duration::from_millis(1),
            ..live()
        };
        assert_eq!(check(&stuck, TIMEOUT, now), Health::Hung);
        // Killed already: not killed again while its death is on its way.
        let killed = Pulse {
            hung: true,
            ..stuck
        };
        assert_eq!(check(&killed, TIMEOUT, now), Health::Draining);
        // A draining process that hangs is hung too.
        let draining_stuck = Pulse {
            retiring: Some((RecycleReason::MaxRss, now + TIMEOUT)),
            ..stuck
        };
        assert_eq!(check(&draining_stuck, TIMEOUT, now), Health::Hung);
    }

    #[test]
    fn a_drain_is_killed_at_its_deadline_and_only_once() {
        let now = Instant::now();
        let draining = Pulse {
            retiring: Some((RecycleReason::Reload, now + Duration::from_secs(5))),
            ..live()
        };
        assert_eq!(check(&draining, TIMEOUT, now), Health::Draining);
        let later = now + Duration::from_secs(5);
        assert_eq!(
            check(&draining, TIMEOUT, later),
            Health::DrainOverdue(RecycleReason::Reload)
        );
        let killed = Pulse {
            killed_by_us: true,
            ..draining
        };
        assert_eq!(check(&killed, TIMEOUT, later), Health::Draining);
    }
}
