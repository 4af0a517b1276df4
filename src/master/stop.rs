//! How the master stops, decided without processes: which processes are signalled when a stop
//! begins and with what, when the app processes follow the HTTP workers, when whatever is left
//! is killed, and what becomes of a reload or an upgrade under way. The master carries it out
//! (signals, the answer to `supervisor reload`, abandoning the new master).

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use worker::protocol;

/// How long a fast stop (INT, QUIT) waits for workers before SIGKILL.
pub(super) const FAST_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// What the master has when a stop begins.
pub(super) struct Before<'a> {
    pub(super) fast: bool,
    pub(super) graceful_timeout: Duration,
    /// Every live child process, and whether it is an app host.
    pub(super) procs: &'a [(Pid, bool)],
    /// A reload whose outcome `supervisor reload` clients are waiting for.
    pub(super) reload_pending: bool,
    /// A binary upgrade's new master that has not taken over.
    pub(super) upgrade_in_progress: bool,
}

/// What a stop's start does.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Start {
    /// Whatever still runs then is killed.
    pub(super) deadline: Instant,
    /// Drain (graceful) or exit at once (fast).
    pub(super) signal: Signal,
    /// Signalled now: HTTP workers first in a graceful stop (the app processes keep taking
    /// the requests they drain), everything in a fast one or when no HTTP worker is left.
    pub(super) signal_now: Vec<Pid>,
    /// The app processes are among them (otherwise see [`apps_to_stop`]).
    pub(super) apps_told: bool,
    /// The reload's clients are told it will not complete.
    pub(super) fail_reload: bool,
    /// The upgrade's new master is stopped with `signal` too: it must not outlive this stop.
    pub(super) abandon_upgrade: bool,
}

pub(super) fn begin(before: &Before<'_>, now: Instant) -> Start {
    let (wait, signal) = if before.fast {
        (FAST_STOP_TIMEOUT, protocol::EXIT_NOW)
    } else {
        (before.graceful_timeout, protocol::DRAIN)
    };
    let http_left = before.procs.iter().any(|&(_, app)| !app);
    let apps_told = before.fast || !http_left;
    Start {
        deadline: now + wait,
        signal,
        signal_now: before
            .procs
            .iter()
            .filter(|&&(_, app)| apps_told || !app)
            .map(|&(pid, _)| pid)
            .collect(),
        apps_told,
        fail_reload: before.reload_pending,
        abandon_upgrade: before.upgrade_in_progress,
    }
}

/// During a graceful stop whose app processes were not told yet: once no HTTP worker is left,
/// they drain (the processes to signal with [`protocol::DRAIN`]); `None` until then.
pub(super) fn apps_to_stop(apps_told: bool, procs: &[(Pid, bool)]) -> Option<Vec<Pid>> {
    if apps_told || procs.iter().any(|&(_, app)| !app) {
        return None;
    }
    Some(procs.iter().map(|&(pid, _)| pid).collect())
}

/// Whether whatever still runs is to be killed now (once).
pub(super) fn kill_the_rest(deadline: Instant, killed: bool, now: Instant) -> bool {
    !killed && now >= deadline
}

#[cfg(test)]
mod tests {
    use super::*;

    const HTTP: bool = false;
    const APP: bool = true;

    fn procs() -> Vec<(Pid, bool)> {
        vec![
            (Pid::from_raw(10), HTTP),
            (Pid::from_raw(11), HTTP),
            (Pid::from_raw(20), APP),
            (Pid::from_raw(21), APP),
        ]
    }

    fn graceful(procs: &[(Pid, bool)]) -> Before<'_> {
        Before {
            fast: false,
            graceful_timeout: Duration::from_secs(30),
            procs,
            reload_pending: false,
            upgrade_in_progress: false,
        }
    }

    #[test]
    fn a_graceful_stop_drains_the_http_workers_then_the_app_processes_then_kills_at_the_deadline() {
        let now = Instant::now();
        let all = procs();
        let start = begin(&graceful(&all), now);
        assert_eq!(start.signal, protocol::DRAIN);
        assert_eq!(start.signal_now, [Pid::from_raw(10), Pid::from_raw(11)]);
        assert!(!start.apps_told);
        assert_eq!(start.deadline, now + Duration::from_secs(30));
        // One HTTP worker still drains: the apps go on serving it.
        assert_eq!(apps_to_stop(false, &all[1..]), None);
        // The last one is gone: now the apps drain.
        assert_eq!(
            apps_to_stop(false, &all[2..]),
            Some(vec![Pid::from_raw(20), Pid::from_raw(21)])
        );
        assert_eq!(apps_to_stop(true, &all[2..]), None, "told once");
        assert!(!kill_the_rest(start.deadline, false, now));
        assert!(kill_the_rest(start.deadline, false, start.deadline));
        assert!(
            !kill_the_rest(start.deadline, true, start.deadline),
            "killed once"
        );
    }

    #[test]
    fn a_fast_stop_tells_everything_at_once_and_waits_five_seconds() {
        let now = Instant::now();
        let all = procs();
        let fast = Before {
            fast: true,
            ..graceful(&all)
        };
        let start = begin(&fast, now);
        assert_eq!(start.signal, protocol::EXIT_NOW);
        assert_eq!(start.signal_now.len(), 4);
        assert!(start.apps_told);
        assert_eq!(start.deadline, now + FAST_STOP_TIMEOUT);
        // Without HTTP workers (only apps left), a graceful stop drains the apps at once too.
        let start = begin(&graceful(&all[2..]), now);
        assert!(start.apps_told);
        assert_eq!(start.signal_now, [Pid::from_raw(20), Pid::from_raw(21)]);
    }

    #[test]
    fn a_stop_during_a_reload_or_an_upgrade_fails_the_one_and_stops_the_other() {
        let all = procs();
        let during = Before {
            reload_pending: true,
            upgrade_in_progress: true,
            ..graceful(&all)
        };
        let start = begin(&during, Instant::now());
        assert!(start.fail_reload, "the reload's clients get an answer");
        assert!(
            start.abandon_upgrade,
            "the new master does not outlive the stop"
        );
        let plain = begin(&graceful(&all), Instant::now());
        assert!(!plain.fail_reload && !plain.abandon_upgrade);
    }
}
