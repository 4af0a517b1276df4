//! A worker number's state across the processes that serve it, and what the exit of one of
//! them does to that state: the first part of the master's lifecycle written as a pure,
//! synchronous decision (facts in, a [`Verdict`] out), so that crash backoff, a replacement that
//! fails to boot and a worker dying while its replacement is held are tested without processes
//! (see the tests below). The master carries out the verdict: logs, respawn timers, releasing a
//! held process, the reload's outcome, giving up.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use nix::unistd::Pid;
use worker::config::Processes;
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
    pub(super) respawn_at: Option<Instant>,
    /// A replacement is wanted, for this reason, not before this time.
    pub(super) recycle: Option<(RecycleReason, Instant)>,
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

/// App processes are numbered from here in the master's bookkeeping (HTTP workers are 1..=1024),
/// so that one number names one slot whatever its kind; logs, `status` and the processes
/// themselves see the app's own number (1..).
pub(super) const APP_IDS: u32 = 1 << 16;

pub(super) fn is_app(id: u32) -> bool {
    id > APP_IDS
}

/// A slot's number as shown: `3` for HTTP worker 3, `app-3` for app process 3.
pub(super) struct Shown(pub(super) u32);

impl std::fmt::Display for Shown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if is_app(self.0) {
            write!(f, "app-{}", self.0 - APP_IDS)
        } else {
            write!(f, "{}", self.0)
        }
    }
}

/// The slots of a configuration: HTTP workers 1.., then app processes.
pub(super) fn slots_for(p: Processes) -> Vec<WorkerSlot> {
    (1..=p.http)
        .chain((1..=p.apps).map(|n| APP_IDS + n))
        .map(WorkerSlot::new)
        .collect()
}

/// Makes the slots `want` of each kind (a TTIN, a TTOU, `supervisor scale`, a reload): new
/// numbers (the next of their kind) start at the master's next turn, and the highest numbers
/// beyond the count are removed and returned, for the master to drain their processes (the
/// current one and a replacement it may have) and release their sockets. A removed number's
/// queued recycle goes with it (see [`plan_replacements`]).
pub(super) fn resize(slots: &mut Vec<WorkerSlot>, want: Processes) -> Vec<WorkerSlot> {
    let mut removed = Vec::new();
    for (app, n) in [(false, want.http), (true, want.apps)] {
        let count = |slots: &[WorkerSlot]| slots.iter().filter(|s| is_app(s.id) == app).count();
        while count(slots) < n as usize {
            let id = slots
                .iter()
                .map(|s| s.id)
                .filter(|&id| is_app(id) == app)
                .max()
                .unwrap_or(if app { APP_IDS } else { 0 })
                + 1;
            slots.push(WorkerSlot::new(id));
        }
        while count(slots) > n as usize {
            let last = (0..slots.len())
                .filter(|&i| is_app(slots[i].id) == app)
                .max_by_key(|&i| slots[i].id)
                .expect("counted above");
            removed.push(slots.remove(last));
        }
    }
    removed
}

/// Consecutive failed boots of one worker number, while nothing of its kind serves, before the
/// master gives up.
pub(super) const MAX_BOOT_FAILURES: u32 = 5;

/// After a boot failure of worker number `id` (its `failures`-th in a row): whether further
/// retries would only spin, so that the master stops with one clear error (exit 1).
/// `serving(app)` says whether some process of that kind has reported ready: app processes that
/// never start make the HTTP workers useless, and the reverse, so one of the other kind serving
/// is no reason to go on.
pub(super) fn gives_up(id: u32, failures: u32, serving: impl Fn(bool) -> bool) -> bool {
    failures >= MAX_BOOT_FAILURES && !serving(is_app(id))
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
                slot.recycle = Some((reason, Instant::now() + retry_in));
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

/// A replacement of slot's process reported ready: whether it takes over now. One prepared
/// for `max_requests` waits, held, while the old process still serves below its limit (they
/// share the sockets meanwhile); any other takes over at once.
pub(super) fn takes_over_when_ready(
    slot: &WorkerSlot,
    ready: Pid,
    old_below_its_limit: bool,
) -> bool {
    let for_max_requests = slot
        .recycle
        .is_some_and(|(reason, _)| reason == RecycleReason::MaxRequests);
    slot.successor == Some(ready) && !(for_max_requests && old_below_its_limit)
}

/// Slot's process `pid` reported that it reached `max_requests`: whether its replacement takes
/// over now (it does if it is ready; otherwise when it reports ready).
pub(super) fn takes_over_at_limit(slot: &WorkerSlot, pid: Pid, successor_ready: bool) -> bool {
    slot.pid == Some(pid) && slot.successor.is_some() && successor_ready
}

/// A replacement taking over its worker number.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Promotion {
    /// Now the number's process: to be released if held.
    pub(super) next: Pid,
    /// The process it replaces, to drain.
    pub(super) old: Option<Pid>,
    pub(super) reason: RecycleReason,
}

/// The slot's successor becomes its process; `None` if it has none.
pub(super) fn promote(slot: &mut WorkerSlot) -> Option<Promotion> {
    let next = slot.successor.take()?;
    let old = slot.pid.replace(next);
    let reason = slot
        .recycle
        .take()
        .map_or(RecycleReason::Reload, |(reason, _)| reason);
    slot.failures = 0;
    slot.last_recycle = Some(reason);
    Some(Promotion { next, old, reason })
}

/// A reload's rolling replacement, decided: replacements ready and held for `max_requests`
/// (`held_ready`) take over now (the master releases them and drains what they replace); then
/// every number whose process is of an older configuration (`older`), these included, is to be
/// replaced, a few at a time, and a recycle already wanted becomes part of the reload. A
/// replacement already booting finishes, and is replaced in turn when it takes over (it is of
/// the older configuration too), so its number is left as it is.
pub(super) fn reload_plan(
    slots: &mut [WorkerSlot],
    held_ready: impl Fn(Pid) -> bool,
    older: impl Fn(Pid) -> bool,
) -> (Vec<Promotion>, Vec<(u32, Pid)>) {
    let mut promoted = Vec::new();
    for slot in slots.iter_mut() {
        if slot.successor.is_some_and(&held_ready) {
            promoted.extend(promote(slot));
        }
    }
    let mut targets = Vec::new();
    for slot in slots.iter_mut().filter(|s| s.successor.is_none()) {
        slot.recycle = None;
        if let Some(pid) = slot.pid.filter(|&p| older(p)) {
            targets.push((slot.id, pid));
        }
    }
    (promoted, targets)
}

/// Extra processes that exist now, beside one per worker number, and the rules that bound
/// them: the input of [`plan_replacements`].
#[derive(Clone, Copy, Debug)]
pub(super) struct Room {
    /// `worker.max_recycling`.
    pub(super) limit: usize,
    /// App processes that are no worker number's current one (replacements booting or held,
    /// old ones draining).
    pub(super) extra_apps: usize,
    /// HTTP workers' replacements still booting (a ready one, held for `max_requests`, no
    /// longer costs a boot).
    pub(super) booting_http: usize,
    /// The app runs as a pool of app processes (`app.command`).
    pub(super) app_pool: bool,
    /// A reload has not yet shown that its configuration starts.
    pub(super) reload_unproved: bool,
}

/// Which queued recycles to start now: `(index of the slot, start it held)`, in queue order, and
/// the worker numbers that stay queued. At most `limit` extra processes of each kind exist at
/// any moment (counting those started here); a recycle waits for its `not before`; with app
/// processes, a reload replaces the HTTP workers only once an app process of the new
/// configuration is ready (the part that fails is the app), so that a reload that cannot start
/// leaves them as they were. A replacement for `max_requests` is prepared ahead and held until
/// the old worker has served its limit; any other takes over as soon as it is ready. A worker
/// number whose process died meanwhile is dropped: its respawn is the replacement.
pub(super) fn plan_replacements(
    queue: VecDeque<u32>,
    slots: &mut [WorkerSlot],
    mut room: Room,
    is_app: impl Fn(u32) -> bool,
    now: Instant,
) -> (Vec<(usize, bool)>, VecDeque<u32>) {
    let mut start = Vec::new();
    let mut waiting = VecDeque::new();
    for id in queue {
        let Some(index) = slots.iter().position(|s| s.id == id) else {
            continue;
        };
        let Some((reason, not_before)) = slots[index].recycle else {
            continue;
        };
        if slots[index].pid.is_none() {
            slots[index].recycle = None;
            continue;
        }
        let app = is_app(id);
        let in_progress = if app {
            room.extra_apps
        } else {
            room.booting_http
        };
        let unproved =
            reason == RecycleReason::Reload && !app && room.app_pool && room.reload_unproved;
        if in_progress >= room.limit || now < not_before || unproved {
            waiting.push_back(id);
            continue;
        }
        if app {
            room.extra_apps += 1;
        } else {
            room.booting_http += 1;
        }
        start.push((index, reason == RecycleReason::MaxRequests));
    }
    (start, waiting)
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

    fn room() -> Room {
        Room {
            limit: 2,
            extra_apps: 0,
            booting_http: 0,
            app_pool: false,
            reload_unproved: false,
        }
    }

    /// Worker numbers 1..=n, each served, each wanting a replacement for `reason`.
    fn wanting(n: u32, reason: RecycleReason) -> (Vec<WorkerSlot>, VecDeque<u32>) {
        let slots = (1..=n)
            .map(|id| {
                let mut s = WorkerSlot::new(id);
                s.pid = Some(pid(100 + id as i32));
                s.recycle = Some((reason, Instant::now()));
                s
            })
            .collect();
        (slots, (1..=n).collect())
    }

    #[test]
    fn a_recycle_storm_starts_at_most_max_recycling_replacements_and_keeps_the_order() {
        let (mut slots, queue) = wanting(6, RecycleReason::MaxRss);
        let (start, waiting) =
            plan_replacements(queue, &mut slots, room(), |_| false, Instant::now());
        assert_eq!(
            start,
            [(0, false), (1, false)],
            "not held: they take over when ready"
        );
        assert_eq!(waiting, [3, 4, 5, 6]);
        // Two booting already: none more.
        let busy = Room {
            booting_http: 2,
            ..room()
        };
        let (start, waiting) =
            plan_replacements(waiting, &mut slots, busy, |_| false, Instant::now());
        assert!(start.is_empty());
        assert_eq!(waiting, [3, 4, 5, 6]);
    }

    #[test]
    fn app_processes_and_http_workers_have_a_budget_each() {
        let (mut slots, queue) = wanting(4, RecycleReason::MaxRequests);
        let is_app = |id: u32| id > 2;
        let full_of_apps = Room {
            extra_apps: 2,
            ..room()
        };
        let (start, waiting) =
            plan_replacements(queue, &mut slots, full_of_apps, is_app, Instant::now());
        assert_eq!(start, [(0, true), (1, true)], "held until max_requests");
        assert_eq!(waiting, [3, 4]);
    }

    #[test]
    fn a_recycle_waits_for_its_time_and_a_dead_workers_recycle_is_dropped() {
        let (mut slots, queue) = wanting(2, RecycleReason::MaxLifetime);
        let later = Instant::now() + Duration::from_secs(60);
        slots[0].recycle = Some((RecycleReason::MaxLifetime, later));
        slots[1].pid = None;
        let (start, waiting) =
            plan_replacements(queue, &mut slots, room(), |_| false, Instant::now());
        assert!(start.is_empty());
        assert_eq!(waiting, [1]);
        assert_eq!(slots[1].recycle, None, "its respawn is the replacement");
        let (start, _) = plan_replacements(waiting, &mut slots, room(), |_| false, later);
        assert_eq!(start, [(0, false)]);
    }

    #[test]
    fn a_reload_replaces_http_workers_only_once_an_app_process_of_it_is_ready() {
        let (mut slots, queue) = wanting(3, RecycleReason::Reload);
        let is_app = |id: u32| id == 3;
        let unproved = Room {
            limit: 3,
            app_pool: true,
            reload_unproved: true,
            ..room()
        };
        let (start, waiting) =
            plan_replacements(queue, &mut slots, unproved, is_app, Instant::now());
        assert_eq!(start, [(2, false)], "the app process goes first");
        assert_eq!(waiting, [1, 2]);
        let proved = Room {
            reload_unproved: false,
            ..unproved
        };
        let (start, waiting) =
            plan_replacements(waiting, &mut slots, proved, is_app, Instant::now());
        assert_eq!(start, [(0, false), (1, false)]);
        assert!(waiting.is_empty());
    }

    #[test]
    fn a_replacement_held_for_max_requests_takes_over_when_the_old_worker_reaches_its_limit() {
        let mut slots = two_slots();
        slots[0].successor = Some(pid(101));
        slots[0].recycle = Some((RecycleReason::MaxRequests, Instant::now()));
        slots[0].failures = 2;
        // Ready while the old worker still serves below its limit: it waits, held.
        assert!(!takes_over_when_ready(&slots[0], pid(101), true));
        // Another process's limit, or a replacement not ready yet: nothing.
        assert!(!takes_over_at_limit(&slots[0], pid(200), true));
        assert!(!takes_over_at_limit(&slots[0], pid(100), false));
        assert!(takes_over_at_limit(&slots[0], pid(100), true));
        assert_eq!(
            promote(&mut slots[0]),
            Some(Promotion {
                next: pid(101),
                old: Some(pid(100)),
                reason: RecycleReason::MaxRequests
            })
        );
        assert_eq!((slots[0].pid, slots[0].successor), (Some(pid(101)), None));
        assert_eq!(slots[0].recycle, None);
        assert_eq!(slots[0].failures, 0);
        assert_eq!(slots[0].last_recycle, Some(RecycleReason::MaxRequests));
        assert_eq!(promote(&mut slots[0]), None, "nothing more to promote");
    }

    #[test]
    fn any_other_replacement_takes_over_as_soon_as_it_is_ready() {
        let mut slots = two_slots();
        slots[0].successor = Some(pid(101));
        slots[0].recycle = Some((RecycleReason::MaxRss, Instant::now()));
        assert!(
            !takes_over_when_ready(&slots[0], pid(999), true),
            "not its successor"
        );
        assert!(takes_over_when_ready(&slots[0], pid(101), true));
        // Held for max_requests, but the old worker is gone or at its limit already.
        slots[0].recycle = Some((RecycleReason::MaxRequests, Instant::now()));
        assert!(takes_over_when_ready(&slots[0], pid(101), false));
        // A successor from a reload that came while it booted has no recycle left.
        slots[0].recycle = None;
        let promoted = promote(&mut slots[0]).unwrap();
        assert_eq!(promoted.reason, RecycleReason::Reload);
    }

    #[test]
    fn ttin_adds_the_next_number_of_each_kind_and_ttou_removes_the_highest() {
        let mut slots = slots_for(Processes { http: 2, apps: 3 });
        let ids = |slots: &[WorkerSlot]| slots.iter().map(|s| s.id).collect::<Vec<_>>();
        assert_eq!(ids(&slots), [1, 2, APP_IDS + 1, APP_IDS + 2, APP_IDS + 3]);
        assert_eq!(Shown(APP_IDS + 2).to_string(), "app-2");
        assert_eq!(Shown(2).to_string(), "2");
        assert!(resize(&mut slots, Processes { http: 2, apps: 4 }).is_empty());
        assert_eq!(ids(&slots)[5], APP_IDS + 4);
        let removed = resize(&mut slots, Processes { http: 1, apps: 2 });
        assert_eq!(ids(&removed), [2, APP_IDS + 4, APP_IDS + 3]);
        assert_eq!(ids(&slots), [1, APP_IDS + 1, APP_IDS + 2]);
    }

    #[test]
    fn ttou_during_a_recycle_drains_the_replacement_too_and_drops_the_recycle() {
        let (mut slots, queue) = wanting(3, RecycleReason::MaxRss);
        slots[2].successor = Some(pid(999));
        let removed = resize(&mut slots, Processes { http: 2, apps: 0 });
        assert_eq!(removed.len(), 1);
        assert_eq!(
            (removed[0].pid, removed[0].successor),
            (Some(pid(103)), Some(pid(999))),
            "both are the master's to drain"
        );
        let (start, waiting) =
            plan_replacements(queue, &mut slots, room(), |_| false, Instant::now());
        assert_eq!(start, [(0, false), (1, false)]);
        assert!(waiting.is_empty(), "number 3's recycle went with it");
    }

    #[test]
    fn a_reload_replaces_every_older_process_including_a_held_replacement_that_takes_over() {
        let (mut slots, _) = wanting(3, RecycleReason::MaxRss);
        // 1: a replacement for max_requests, ready and held; 2: a replacement booting;
        // 3: a recycle queued. Every process is of the old configuration.
        slots[0].successor = Some(pid(201));
        slots[0].recycle = Some((RecycleReason::MaxRequests, Instant::now()));
        slots[1].successor = Some(pid(202));
        let (promoted, targets) = reload_plan(&mut slots, |p| p == pid(201), |_| true);
        assert_eq!(
            promoted,
            [Promotion {
                next: pid(201),
                old: Some(pid(101)),
                reason: RecycleReason::MaxRequests
            }]
        );
        assert_eq!(
            targets,
            [(1, pid(201)), (3, pid(103))],
            "the held replacement, now serving, is replaced in turn"
        );
        assert_eq!(
            slots[1].successor,
            Some(pid(202)),
            "the booting one finishes"
        );
        assert!(matches!(slots[1].recycle, Some((RecycleReason::MaxRss, _))));
        assert_eq!(slots[2].recycle, None, "its recycle is now the reload's");
        // Processes of the new configuration are left alone.
        let (promoted, targets) = reload_plan(&mut slots, |_| false, |p| p == pid(103));
        assert!(
            promoted.is_empty(),
            "a booting replacement is not held and ready"
        );
        assert_eq!(targets, [(3, pid(103))]);
    }

    #[test]
    fn boot_failures_give_up_only_when_nothing_of_their_kind_serves() {
        let nothing = |_: bool| false;
        let only_http = |app: bool| !app;
        assert!(
            !gives_up(1, MAX_BOOT_FAILURES - 1, nothing),
            "retries first"
        );
        assert!(gives_up(1, MAX_BOOT_FAILURES, nothing));
        assert!(
            !gives_up(1, MAX_BOOT_FAILURES, only_http),
            "another HTTP worker serves"
        );
        assert!(
            gives_up(APP_IDS + 1, MAX_BOOT_FAILURES, only_http),
            "HTTP workers are useless without an app process"
        );
        // The whole story: a worker that never reports ready, respawned until the give-up.
        let mut slots = slots_for(Processes { http: 1, apps: 0 });
        let never_ready = Exited {
            acked: false,
            uptime: Duration::from_millis(20),
            ..exited(100)
        };
        let mut gave_up_at = None;
        for attempt in 1..=10 {
            slots[0].pid = Some(pid(100));
            let Verdict::BootFailed { failures, .. } = on_exit(&mut slots, &never_ready, false)
            else {
                panic!("a boot failure");
            };
            if gives_up(1, failures, nothing) {
                gave_up_at = Some(attempt);
                break;
            }
        }
        assert_eq!(gave_up_at, Some(MAX_BOOT_FAILURES));
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
