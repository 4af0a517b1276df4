//! When the master tells systemd what (`crate::notify` does the telling): `READY=1` once every
//! worker number has a process that ACKed, `RELOADING=1` then `READY=1` around a reload,
//! `STOPPING=1`, a `STATUS=` line kept current, `WATCHDOG=1` pings from the control loop.
//!
//! The watchdog is pinged by the loop itself, not by a thread: a master stuck anywhere in its
//! loop stops pinging, which is what the watchdog is for.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::info;
use worker::cluster::RedisState;

use super::{Master, Phase};
use crate::notify::Notifier;

pub(super) struct Systemd {
    notifier: Notifier,
    /// `RELOADING=1` was sent: `READY=1` follows once every worker runs the new configuration.
    reloading: bool,
    /// Why the last reload failed, shown in `STATUS=` until a reload succeeds.
    reload_error: Option<String>,
    /// A reload whose replacements failed to boot (and are being retried): `READY=1` was
    /// sent, the error clears once every worker runs the new configuration after all.
    reload_stalled: bool,
    /// A binary upgrade handed over (`MAINPID=` sent): the new master talks to systemd now.
    handed_over: bool,
}

impl Systemd {
    pub(super) fn from_env() -> Systemd {
        Systemd {
            notifier: Notifier::from_env(),
            reloading: false,
            reload_error: None,
            reload_stalled: false,
            handed_over: false,
        }
    }
}

impl Master {
    /// Once per loop turn: `READY=1` after a reload, `STATUS=`, the watchdog.
    pub(super) fn systemd_tick(&mut self) {
        if !self.systemd.notifier.enabled() || self.systemd.handed_over {
            return;
        }
        let now = Instant::now();
        let pending = self.systemd.reloading || self.systemd.reload_stalled;
        if pending && self.phase == Phase::Running && self.all_workers_current() {
            info!("reload complete: every worker serves the new configuration");
            if self.systemd.reloading {
                self.systemd.notifier.ready();
            }
            self.systemd.reloading = false;
            self.systemd.reload_stalled = false;
            self.systemd.reload_error = None;
        }
        let status = self.systemd_status();
        self.systemd.notifier.status(&status, now);
        self.systemd.notifier.tick(now);
    }

    /// How long the loop may wait before `systemd_tick` has something to send.
    pub(super) fn systemd_next_due(&self, now: Instant) -> Option<Duration> {
        if self.systemd.handed_over {
            return None; // nothing more to send (see `systemd_tick`)
        }
        self.systemd.notifier.next_due(now)
    }

    /// Startup is finished (every worker ACKed).
    pub(super) fn systemd_ready(&mut self) {
        self.systemd.notifier.ready();
    }

    /// A HUP is being handled. Before the first `READY=1` there is nothing to reload as far as
    /// systemd knows: startup simply finishes later.
    pub(super) fn systemd_reloading(&mut self) {
        if self.announced_ready {
            self.systemd.reloading = true;
            self.systemd.notifier.reloading();
        }
    }

    /// The reload changed nothing: ready again at once, with the reason in the status.
    pub(super) fn systemd_reload_failed(&mut self, why: &str) {
        let why = why.lines().next().unwrap_or(why).to_string();
        self.systemd.reload_stalled = false;
        if self.systemd.reloading {
            self.systemd.reloading = false;
            let status = format!("reload failed, still running the previous configuration: {why}");
            self.systemd.notifier.reload_failed(&status);
        }
        self.systemd.reload_error = Some(why);
    }

    /// A replacement died before it was ready. During a reload, systemd is not left waiting
    /// for a `READY=1` that may never come: it gets one now, with the reason; the master keeps
    /// retrying (with backoff) while the old workers serve.
    pub(super) fn systemd_replacement_failed(&mut self, id: u32, how: &str) {
        if !self.systemd.reloading {
            return;
        }
        self.systemd.reloading = false;
        self.systemd.reload_stalled = true;
        let why = format!(
            "the replacement for worker {} failed to boot ({how})",
            super::Shown(id)
        );
        let status = format!("reload incomplete, retrying; the old workers keep serving: {why}");
        self.systemd.notifier.reload_failed(&status);
        self.systemd.reload_error = Some(why);
    }

    /// A binary upgrade handed over to master `pid`: systemd is told it is the main process
    /// now (we still are until this message, so `NotifyAccess=main` allows it), and this
    /// master says nothing more: its `STOPPING=1` would stop the service.
    pub(super) fn systemd_main_pid(&mut self, pid: u32) {
        self.systemd.notifier.main_pid(pid);
        self.systemd.handed_over = true;
    }

    pub(super) fn systemd_stopping(&mut self, fast: bool) {
        if self.systemd.handed_over {
            return;
        }
        self.systemd.reloading = false;
        self.systemd.reload_stalled = false;
        let how = if fast {
            "stopping (fast)"
        } else {
            "stopping: draining workers"
        };
        self.systemd.notifier.stopping(how);
    }

    /// Every worker number is served by an ACKed process of the current configuration.
    fn all_workers_current(&self) -> bool {
        self.slots.iter().all(|s| {
            s.pid
                .and_then(|p| self.procs.get(&p))
                .is_some_and(|p| p.acked && p.config_gen == self.config_gen)
        })
    }

    /// For example "serving 3/3 workers, 2 in flight (host cap 50), redis connected".
    fn systemd_status(&self) -> String {
        if let Phase::Stopping { fast, .. } = self.phase {
            let how = if fast { "stopping (fast)" } else { "stopping" };
            return format!("{how}: {} worker processes left", self.procs.len());
        }
        let serving = self
            .slots
            .iter()
            .filter(|s| {
                s.pid
                    .and_then(|p| self.procs.get(&p))
                    .is_some_and(|p| p.acked)
            })
            .count();
        let (mut inflight, mut queued) = (0u64, 0u64);
        let (mut redis_on, mut degraded) = (0, 0);
        for p in self.procs.values() {
            let rec = self.board.slot(p.record);
            inflight += u64::from(rec.inflight.load(Ordering::Relaxed));
            queued += u64::from(rec.queued.load(Ordering::Relaxed));
            match RedisState::from_u32(rec.redis_state.load(Ordering::Relaxed)) {
                RedisState::Off => {}
                RedisState::Connected => redis_on += 1,
                RedisState::Degraded => {
                    redis_on += 1;
                    degraded += 1;
                }
            }
        }
        let p = self.processes();
        let mut s = match p.apps {
            0 => format!("serving {serving}/{} workers, {inflight} in flight", p.http),
            apps => format!(
                "serving {serving}/{} workers and app processes ({} + {apps}), {inflight} in \
                 flight",
                p.http + apps,
                p.http
            ),
        };
        let cap = self.board.header().global_cap.load(Ordering::Relaxed);
        if cap > 0 {
            s.push_str(&format!(" (host cap {cap})"));
        }
        if queued > 0 {
            s.push_str(&format!(", {queued} queued"));
        }
        if degraded > 0 {
            s.push_str(&format!(
                ", redis degraded on {degraded}/{redis_on} workers"
            ));
        } else if redis_on > 0 {
            s.push_str(", redis connected");
        }
        if self.systemd.reloading {
            s.push_str(", reloading");
        }
        if let Some(e) = &self.systemd.reload_error {
            s.push_str(&format!("; last reload failed: {e}"));
        }
        s
    }
}
