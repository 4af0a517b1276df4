//! A worker number's state across the processes that serve it, and what the exit of one of
//! them does to that state: the first part of the master's lifecycle written as a pure,
//! synchronous decision (facts in, a [`Verdict`] out), so that crash backoff, a replacement that
//! fails to boot and a worker dying while its replacement is held are tested without processes
//! (see the tests below). The master carries out the verdict: logs, respawn timers, releasing a
//! held process, the reload's outcome, giving up.

use std::time::Duration;

use nix::unistd::Pid;
use worker::scoreboard::RecycleReason;

/// Backoff between respawns of a worker that keeps failing: doubles from this...
const RESPAWN_BACKOFF_START: Duration = Duration::from_millis(100);
/// ...up to this.
const RESPAWN_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A worker that ran at least this long before dying is respawned at once: it was not a
/// crash loop.
pub(super) const STABLE_UPTIME: Duration = Duration::from_secs(10);

/// How long to wait before the next try, after `failures` failures in a row (at least one).
pub(super) fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    RESPAWN_BACKOFF_START
        .saturating_mul(1 << exp)
        .min(RESPAWN_BACKOFF_MAX)
}

/// One worker number (1..=workers, or an app process's number) and its history across
/// respawns.
pub(super) struct WorkerSlot {
    pub(super) id: u32,
    pub(super) generation: u32,
    /// The process serving this number (or booting to).
    pub(super) pid: Option<Pid>,
    /// A replacement booting (or held, ready); it takes over from `pid`.
    pub(super) successor: Option<Pid>,
    /// Consecutive failures (boot failures and early crashes) for the backoff.
    pub(super) failures: u32,
    pub(super) respawn_at: Option<std::time::Instant>,
    /// A replacement is wanted, for this reason, not before this time.
    pub(super) recycle: Option<(RecycleReason, std::time::Instant)>,
    /// Why the last process of this number was replaced (for `status`).
    pub(super) last_recycle: Option<RecycleReason>,
}

impl WorkerSlot {
    pub(super) fn new(id: u32) -> WorkerSlot {
        WorkerSlot {
            id,
            generation: 0,
            pid: None,
            successor: None,
            failures: 0,
            respawn_at: None,
            recycle: None,
            last_recycle: None,
        }
    }
}

/// What the master knew of a process when it exited.
#[derive(Clone, Copy, Debug)]
pub(super) struct Exited {
    pub(super) pid: Pid,
    /// Told to drain (replaced), and why.
    pub(super) retiring: Option<RecycleReason>,
    /// Killed because its heartbeat stopped.
    pub(super) hung: bool,
    /// It had reported ready.
    pub(super) acked: bool,
    /// Killed by the master (a TTOU, a drain past its deadline, a stop).
    pub(super) killed_by_us: bool,
    pub(super) uptime: Duration,
}

/// What the exit means, once the worker number's state is updated.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// A replaced process finished its drain.
    Recycled(RecycleReason),
    /// It was asked to go (a stop, a TTOU), or belongs to no worker number any more.
    Stopped,
    /// A replacement died before it took over (record `index`): the old process serves on,
    /// and the recycle (if still wanted) is tried again in `retry_in`.
    ReplacementFailed {
        index: usize,
        retry_in: Duration,
        retry: bool,
    },
    /// The serving process died while its replacement was booting or held: the replacement
    /// takes over (and must be released).
    SuccessorTakesOver { index: usize, next: Pid },
    /// It never reported ready: respawn in `retry_in`.
    BootFailed {
        index: usize,
        failures: u32,
        retry_in: Duration,
    },
    /// It died after serving (or was killed as hung): respawn in `respawn_in`.
    Died { index: usize, respawn_in: Duration },
}

/// Whether nobody asked the process to go: not a recycle, a stop, a TTOU or a hung kill (for
/// the metrics' count of deaths). Ask before [`on_exit`] changes the slots.
pub(super) fn unasked(slots: &[WorkerSlot], exited: &Exited, stopping: bool) -> bool {
    exited.retiring.is_none()
        && !exited.hung
        && !stopping
        && !exited.killed_by_us
        && slots
            .iter()
            .any(|s| s.pid == Some(exited.pid) || s.successor == Some(exited.pid))
}

/// Updates the worker number the exited process belonged to and says what follows. Respawn
/// times are the master's to set (`Verdict::BootFailed`, `Verdict::Died`).
pub(super) fn on_exit(slots: &mut [WorkerSlot], exited: &Exited, stopping: bool) -> Verdict {
    if let Some(reason) = exited.retiring {
        return Verdict::Recycled(reason);
    }
    let current = slots.iter().position(|s| s.pid == Some(exited.pid));
    let successor_of = slots.iter().position(|s| s.successor == Some(exited.pid));
    if stopping || (current.is_none() && successor_of.is_none()) {
        return Verdict::Stopped;
    }
    if let Some(index) = successor_of {
        let slot = &mut slots[index];
        slot.successor = None;
        slot.failures += 1;
        let retry_in = backoff(slot.failures);
        let retry = match slot.recycle {
            Some((reason, _)) => {
                slot.recycle = Some((reason, std::time::Instant::now() + retry_in));
                true
            }
            None => false,
        };
        return Verdict::ReplacementFailed {
            index,
            retry_in,
            retry,
        };
    }
    let index = current.expect("checked above");
    let slot = &mut slots[index];
    if let Some(next) = slot.successor.take() {
        slot.pid = Some(next);
        slot.recycle = None;
        return Verdict::SuccessorTakesOver { index, next };
    }
    slot.pid = None;
    slot.recycle = None;
    if !exited.acked && !exited.hung {
        slot.failures += 1;
        return Verdict::BootFailed {
            index,
            failures: slot.failures,
            retry_in: backoff(slot.failures),
        };
    }
    if exited.uptime >= STABLE_UPTIME {
        slot.failures = 0;
    } else {
        slot.failures += 1;
    }
    let respawn_in = match slot.failures {
        0 => Duration::ZERO,
        n => backoff(n),
    };
    Verdict::Died { index, respawn_in }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn pid(n: i32) -> Pid {
        Pid::from_raw(n)
    }

    /// Worker number 1 served by pid 100 (and 2 by pid 200).
    fn two_slots() -> Vec<WorkerSlot> {
        let mut slots = vec![WorkerSlot::new(1), WorkerSlot::new(2)];
        slots[0].pid = Some(pid(100));
        slots[1].pid = Some(pid(200));
        slots
    }

    fn exited(n: i32) -> Exited {
        Exited {
            pid: pid(n),
            retiring: None,
            hung: false,
            acked: true,
            killed_by_us: false,
            uptime: Duration::from_secs(60),
        }
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(100), RESPAWN_BACKOFF_MAX);
    }

    #[test]
    fn a_worker_that_ran_long_is_respawned_at_once_and_a_crash_loop_backs_off() {
        let mut slots = two_slots();
        assert!(unasked(&slots, &exited(100), false));
        assert_eq!(
            on_exit(&mut slots, &exited(100), false),
            Verdict::Died {
                index: 0,
                respawn_in: Duration::ZERO
            }
        );
        assert_eq!(slots[0].pid, None);
        // Crashes a second after each respawn: 100 ms, 200 ms, 400 ms...
        let early = Exited {
            uptime: Duration::from_secs(1),
            ..exited(101)
        };
        for expected in [100, 200, 400] {
            slots[0].pid = Some(pid(101));
            assert_eq!(
                on_exit(&mut slots, &early, false),
                Verdict::Died {
                    index: 0,
                    respawn_in: Duration::from_millis(expected)
                }
            );
        }
        // A long run clears the count.
        slots[0].pid = Some(pid(100));
        on_exit(&mut slots, &exited(100), false);
        assert_eq!(slots[0].failures, 0);
        assert_eq!(slots[1].pid, Some(pid(200)), "other numbers untouched");
    }

    #[test]
    fn boot_failures_are_counted_for_the_give_up() {
        let mut slots = two_slots();
        let never_ready = Exited {
            acked: false,
            uptime: Duration::from_millis(50),
            ..exited(100)
        };
        for failures in 1..=3 {
            slots[0].pid = Some(pid(100));
            assert_eq!(
                on_exit(&mut slots, &never_ready, false),
                Verdict::BootFailed {
                    index: 0,
                    failures,
                    retry_in: backoff(failures)
                }
            );
        }
        // Killed as hung before its first ready is no boot failure: a respawn like any death.
        slots[0].pid = Some(pid(100));
        let hung = Exited {
            hung: true,
            ..never_ready
        };
        assert!(!unasked(&slots, &hung, false), "the master killed it");
        assert!(matches!(
            on_exit(&mut slots, &hung, false),
            Verdict::Died { index: 0, .. }
        ));
    }

    #[test]
    fn a_replacement_that_fails_to_boot_leaves_the_old_worker_serving_and_is_retried() {
        let mut slots = two_slots();
        slots[0].successor = Some(pid(101));
        slots[0].recycle = Some((RecycleReason::MaxRequests, Instant::now()));
        let failed = Exited {
            acked: false,
            ..exited(101)
        };
        assert_eq!(
            on_exit(&mut slots, &failed, false),
            Verdict::ReplacementFailed {
                index: 0,
                retry_in: backoff(1),
                retry: true
            }
        );
        assert_eq!(slots[0].pid, Some(pid(100)), "the old one serves on");
        assert_eq!(slots[0].successor, None);
        let (reason, not_before) = slots[0].recycle.expect("still wanted");
        assert_eq!(reason, RecycleReason::MaxRequests);
        assert!(not_before > Instant::now(), "not before the backoff");
    }

    #[test]
    fn a_worker_that_dies_while_its_replacement_is_held_hands_over_to_it() {
        let mut slots = two_slots();
        slots[0].successor = Some(pid(101));
        slots[0].recycle = Some((RecycleReason::MaxRequests, Instant::now()));
        assert_eq!(
            on_exit(&mut slots, &exited(100), false),
            Verdict::SuccessorTakesOver {
                index: 0,
                next: pid(101)
            }
        );
        assert_eq!(slots[0].pid, Some(pid(101)));
        assert_eq!((slots[0].successor, slots[0].recycle), (None, None));
    }

    #[test]
    fn a_drained_worker_or_one_stopped_on_purpose_changes_nothing() {
        let mut slots = two_slots();
        let drained = Exited {
            retiring: Some(RecycleReason::MaxRss),
            ..exited(99)
        };
        assert!(!unasked(&slots, &drained, false));
        assert_eq!(
            on_exit(&mut slots, &drained, false),
            Verdict::Recycled(RecycleReason::MaxRss)
        );
        // During a stop, or a process no number knows (removed by TTOU).
        assert!(!unasked(&slots, &exited(100), true));
        assert_eq!(on_exit(&mut slots, &exited(100), true), Verdict::Stopped);
        assert_eq!(on_exit(&mut slots, &exited(555), false), Verdict::Stopped);
        assert_eq!(slots[0].pid, Some(pid(100)));
        assert_eq!(slots[0].failures, 0);
    }
}
