//! Reloading the configuration (HUP, `supervisor reload`): what can fail is made first and
//! changes nothing if it does (`prepare_reload`); then the master's own settings change and
//! every worker of the older configuration is replaced by a rolling surge (`apply_reload`,
//! `slots::reload_plan`). The reload stays pending until a worker of the new configuration
//! reports ready; one that fails to boot first undoes it for the workers (`reload_disproved`).
//! `supervisor reload` clients get their answer then.

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tracing::{error, info, warn};
use worker::cluster::Janitor;
use worker::config::Config;
use worker::ratelimit::RateTable;
use worker::scoreboard::RecycleReason;

use super::slots::{self, is_app, Shown};
use super::starting::{log_listeners, workers_of};
use super::{Master, Phase};
use crate::spawn;

/// A reload whose new workers have not yet shown that they can start. The first of them to
/// report ready settles it; one that fails to boot first undoes it for the workers: the
/// previous configuration comes back for every worker started from then on, the reload's
/// other replacements stop, and the old workers go on serving.
pub(super) struct PendingReload {
    pub(super) gen: u64,
    pub(super) previous: Config,
    pub(super) previous_fd: OwnedFd,
    pub(super) previous_gen: u64,
    pub(super) previous_workers: u32,
    /// What `supervisor reload` is told once the new workers start.
    pub(super) message: String,
    /// Control clients (`supervisor reload`) waiting for the outcome.
    pub(super) clients: Vec<u64>,
    /// They get an answer by then at the latest (the command waits 30 s).
    pub(super) answer_by: Instant,
}

/// What a reload made before changing anything (see `Master::prepare_reload`).
struct PreparedReload {
    config: Config,
    /// The workers' copy of `config`.
    config_fd: OwnedFd,
    /// A new rate table, when its size changes.
    rates: Option<(RateTable, OwnedFd)>,
}

/// How long `supervisor reload` waits for the first new worker before it is told the reload
/// is under way (less than the command's own 30 s).
const RELOAD_ANSWER_WITHIN: Duration = Duration::from_secs(20);

impl Master {
    /// HUP and `supervisor reload`: re-read and validate the configuration. Invalid: log why,
    /// change nothing and return why. Valid: apply it, then replace every worker by a rolling
    /// surge; returns what was done.
    pub(super) fn reload(&mut self) -> Result<String, String> {
        if self.phase != Phase::Running {
            return Err("the master is stopping".to_string());
        }
        if let Some(u) = &self.upgrade {
            // The new master has read the configuration already; this one hands over soon.
            let why = format!(
                "a binary upgrade is under way (new master pid {}): reload that master once it \
                 has taken over",
                u.pid
            );
            warn!("reload refused: {why}");
            return Err(why);
        }
        info!("HUP: reloading the configuration");
        self.systemd_reloading();
        match (self.reload)().and_then(|new| self.prepare_reload(new)) {
            Ok(prepared) => Ok(self.apply_reload(prepared)),
            Err(e) => {
                for line in e.lines() {
                    error!("reload failed, keeping the current configuration: {line}");
                }
                self.reload_failed(&e);
                self.systemd_reload_failed(&e);
                Err(e)
            }
        }
    }

    /// What a reload needs that can fail, made before anything changes: the workers' copy of
    /// the new configuration, a new rate table if its size changes, the listeners rebound if
    /// their settings change (the last step: nothing fails after it).
    fn prepare_reload(&mut self, new: Config) -> Result<PreparedReload, String> {
        crate::run_as::prepare_access_file(&new)?;
        // The workers get the metrics settings as at start (see `apply_reload`).
        let mut for_workers = new.clone();
        for_workers.metrics = self.config.metrics.clone();
        let config_fd = spawn::config_fd(&for_workers).map_err(|e| format!("{e:#}"))?;
        // The rate table's size is fixed: another size means a new table for new workers
        // (draining ones keep the old one).
        let rates = if new.limits.max_active_instances != self.config.limits.max_active_instances {
            let table = RateTable::create(new.limits.max_active_instances)
                .map_err(|e| format!("cannot create the rate table: {e}"))?;
            Some(table)
        } else {
            None
        };
        let sockets_changed = new.server.bind != self.config.server.bind
            || new.server.accept != self.config.server.accept
            || new.server.backlog != self.config.server.backlog
            || new.server.unix_mode != self.config.server.unix_mode;
        if sockets_changed {
            let http = new.processes(workers_of(&new)).http;
            let l = self.listeners.as_mut().ok_or("listeners are closed")?;
            l.rebind(
                &new.server.bind,
                new.server.accept,
                http,
                new.server.backlog,
                new.server.unix_mode.0,
            )
            .map_err(|e| format!("{e:#}"))?;
            if let Some(l) = &self.listeners {
                log_listeners(l, new.server.accept);
            }
        }
        Ok(PreparedReload {
            config: new,
            config_fd,
            rates,
        })
    }

    /// Puts a prepared reload in force: the master's own settings, then a rolling replacement
    /// of every worker; returns what `supervisor reload` is told.
    fn apply_reload(&mut self, prepared: PreparedReload) -> String {
        let PreparedReload {
            config: mut new,
            config_fd,
            rates,
        } = prepared;
        self.last_reload_error = None;
        if new.log.file != self.config.log.file && !new.log.file.is_empty() {
            if let Err(e) = crate::run_as::log_to_file(&new) {
                error!("reload: log.file: {e}");
            }
        }
        self.warn_control_changes(&new);
        if new.log.format != self.config.log.format {
            warn!("reload: log.format applies to new workers; the master keeps its format until restarted");
        }
        self.log_level.set(new.log.level);
        if let Some(m) = &self.metrics {
            m.reload(&new.metrics);
        } else if !new.metrics.bind.is_empty() {
            warn!(metrics.bind = %new.metrics.bind, "reload: metrics.bind changes at the next start; no metrics until then");
        }
        // Read at start only: the new workers go on timing requests for the metrics this
        // master serves (and not for metrics it does not), whatever the file says now.
        new.metrics = self.config.metrics.clone();
        if new.redis != self.config.redis || new.limits != self.config.limits {
            self.janitor =
                Janitor::start(&new, self.board.header().instance.load(Ordering::Relaxed));
        }
        if let Some((rates, fd)) = rates {
            info!(
                limits.max_active_instances = new.limits.max_active_instances,
                "reload: new per-client rate table; clients' budgets start afresh"
            );
            self.rates = rates;
            self.rates_fd = fd;
        }
        self.rates
            .configure(new.limits.rate.is_some(), new.limits.idle_ttl);
        self.board
            .header()
            .global_cap
            .store(new.limits.max_concurrent_requests, Ordering::Relaxed);
        let workers = workers_of(&new);
        let previous_fd = std::mem::replace(&mut self.config_fd, config_fd);
        let previous = std::mem::replace(&mut self.config, new);
        let previous_gen = self.config_gen;
        let previous_workers = self.workers();
        self.config_gen += 1;
        self.set_worker_count(workers);
        let replacing = self.replace_older_processes();
        info!(workers, "configuration reloaded; replacing workers");
        let message = format!("configuration reloaded; {workers} workers, replacing {replacing}");
        let mut pending = PendingReload {
            gen: self.config_gen,
            previous,
            previous_fd,
            previous_gen,
            previous_workers,
            message: message.clone(),
            clients: Vec::new(),
            answer_by: Instant::now() + RELOAD_ANSWER_WITHIN,
        };
        if let Some(earlier) = self.pending_reload.take() {
            // Not proven yet either: what to go back to is still what ran before it.
            self.answer_reload(&earlier.clients, Ok(&earlier.message));
            pending.previous = earlier.previous;
            pending.previous_fd = earlier.previous_fd;
            pending.previous_gen = earlier.previous_gen;
            pending.previous_workers = earlier.previous_workers;
        }
        self.pending_reload = Some(pending);
        message
    }

    /// Every process of an older configuration is replaced, a few at a time (see
    /// `slots::reload_plan`); returns how many worker numbers have one.
    fn replace_older_processes(&mut self) -> usize {
        let gen = self.config_gen;
        let procs = &self.procs;
        let older = |p: Pid| procs.get(&p).is_some_and(|p| p.config_gen < gen);
        let held_ready = |p: Pid| procs.get(&p).is_some_and(|p| p.held && p.acked);
        let replacing = self
            .slots
            .iter()
            .filter(|s| s.pid.is_some_and(older))
            .count();
        let (promoted, targets) = slots::reload_plan(&mut self.slots, held_ready, older);
        for slots::Promotion { next, old, reason } in promoted {
            self.release(next);
            if let Some(old) = old {
                self.retire(old, reason);
            }
        }
        self.recycle_queue.clear();
        let now = Instant::now();
        for (id, pid) in targets {
            self.request_recycle(id, pid, RecycleReason::Reload, now);
        }
        replacing
    }

    /// `supervisor reload` from control client `id`: answered once the reload's outcome is
    /// known (see `PendingReload`), or at once if it is refused.
    pub(super) fn reload_for(&mut self, id: u64) -> Option<Result<String, String>> {
        let result = self.reload();
        match (&result, self.pending_reload.as_mut()) {
            (Ok(_), Some(p)) if p.gen == self.config_gen => {
                p.clients.push(id);
                None
            }
            _ => Some(result),
        }
    }

    pub(super) fn answer_reload(&mut self, clients: &[u64], outcome: Result<&str, &str>) {
        let reply = match outcome {
            Ok(m) => crate::control::Reply::ok(m),
            Err(e) => crate::control::Reply::err(e),
        };
        if let Some(c) = self.control.as_mut() {
            for &id in clients {
                c.answer(id, &reply, false);
            }
        }
    }

    /// A worker of the pending reload's configuration is ready: the reload stands.
    pub(super) fn reload_proved(&mut self, pid: Pid) {
        // With app processes, only one of them proves it (see `start_replacements`).
        if self.config.app_pool() && self.procs.get(&pid).is_some_and(|p| !is_app(p.id)) {
            return;
        }
        let gen = self.procs.get(&pid).map(|p| p.config_gen);
        if self.pending_reload.as_ref().map(|p| p.gen) != gen {
            return;
        }
        let p = self.pending_reload.take().expect("checked");
        self.answer_reload(&p.clients, Ok(&p.message));
    }

    /// Clients still waiting past `answer_by` are told the reload is under way.
    pub(super) fn check_pending_reload(&mut self) {
        let Some(p) = self.pending_reload.as_mut() else {
            return;
        };
        if p.clients.is_empty() || Instant::now() < p.answer_by {
            return;
        }
        let clients = std::mem::take(&mut p.clients);
        let message = format!(
            "{}; the new workers are still starting (see supervisor status)",
            p.message
        );
        self.answer_reload(&clients, Ok(&message));
    }

    /// Counts a refused reload and keeps why (its first line), for `supervisor status`.
    fn reload_failed(&mut self, why: &str) {
        self.reload_failures += 1;
        self.last_reload_error = Some(why.lines().next().unwrap_or(why).to_string());
    }

    /// A worker of the pending reload's configuration failed to boot before any was ready:
    /// the reload is undone for the workers (see `PendingReload`) and reported as failed.
    pub(super) fn reload_disproved(&mut self, id: u32, how: &str) {
        let Some(p) = self.pending_reload.take() else {
            return;
        };
        let why = format!(
            "reload failed: the new workers cannot start (worker {}: {how}); the old workers \
             keep serving with the previous configuration",
            Shown(id)
        );
        error!("{why}");
        self.reload_failed(&why);
        // The reload's other replacements stop: booting ones are killed, queued ones dropped.
        for slot in &mut self.slots {
            if slot
                .recycle
                .is_some_and(|(r, _)| r == RecycleReason::Reload)
            {
                slot.recycle = None;
            }
            let Some(next) = slot.successor else { continue };
            if let Some(proc) = self.procs.get_mut(&next) {
                if proc.config_gen == p.gen {
                    proc.killed_by_us = true;
                    let _ = kill(next, Signal::SIGKILL);
                    slot.successor = None;
                }
            }
        }
        let slots = &self.slots;
        self.recycle_queue
            .retain(|id| slots.iter().any(|s| s.id == *id && s.recycle.is_some()));
        self.config = p.previous;
        self.config_fd = p.previous_fd;
        self.config_gen = p.previous_gen;
        if self.phase == Phase::Running {
            self.set_worker_count(p.previous_workers);
        }
        self.systemd_reload_failed(&why);
        self.answer_reload(&p.clients, Err(&why));
    }
}
