//! What the master does on a signal (man/supervisor.1 lists them): TERM/INT a graceful stop,
//! QUIT a fast one, HUP a reload, USR2 a binary upgrade, TTIN/TTOU one worker more or less
//! (app processes with `app.command`), USR1 reopening the log files; and the worker count set
//! by `supervisor scale`.

use std::sync::atomic::Ordering;

use nix::sys::signal::kill;
use signal_hook::consts::signal::*;
use tracing::{debug, error, info, warn};
use worker::protocol;

use super::exits::signal_name;
use super::slots::{self, is_app};
use super::{Master, Phase};

impl Master {
    pub(super) fn on_signals(&mut self) {
        let pending: Vec<i32> = self.signals.pending().collect();
        for sig in pending {
            match sig {
                SIGCHLD => {} // reaped at the top of the loop
                SIGTERM => {
                    if self.phase == Phase::Running {
                        info!("TERM: graceful stop");
                        self.begin_stop(false);
                    }
                }
                SIGINT | SIGQUIT => {
                    let fast_already = matches!(self.phase, Phase::Stopping { fast: true, .. });
                    if !fast_already {
                        info!(signal = signal_name(sig), "fast stop");
                        self.begin_stop(true);
                    }
                }
                SIGTTIN => {
                    for _ in 0..self.ttin.swap(0, Ordering::Relaxed) {
                        self.add_worker();
                    }
                }
                SIGTTOU => {
                    for _ in 0..self.ttou.swap(0, Ordering::Relaxed) {
                        self.remove_worker();
                    }
                }
                SIGHUP => {
                    let _ = self.reload();
                }
                SIGUSR1 => self.reopen_logs(),
                SIGUSR2 => match self.begin_upgrade() {
                    Ok(_) => {}
                    Err(why) => warn!("USR2: no upgrade: {why}"),
                },
                other => debug!(signal = other, "ignored signal"),
            }
        }
    }

    pub(super) fn add_worker(&mut self) {
        if self.phase != Phase::Running {
            return;
        }
        let more = self.workers() + 1;
        if let Err(why) = crate::config_loader::workers_fit(&self.config, more) {
            warn!("TTIN: not starting a worker more: {why}; ignored");
            return;
        }
        self.set_worker_count(more);
        let p = self.processes();
        info!(workers = p.http, apps = p.apps, "TTIN: one worker more");
    }

    /// `workers` as `-w` means it (see `Config::processes`): new numbers start as usual (at
    /// the next turn), extra ones (the highest of their kind) drain away and leave their
    /// sockets' group.
    pub(super) fn set_worker_count(&mut self, workers: u32) {
        let want = self.config.processes(workers);
        for slot in slots::resize(&mut self.slots, want) {
            if !is_app(slot.id) {
                if let Some(l) = self.listeners.as_mut() {
                    l.release(slot.id);
                }
            }
            for pid in [slot.pid, slot.successor].into_iter().flatten() {
                let _ = kill(pid, protocol::DRAIN);
            }
        }
    }

    pub(super) fn remove_worker(&mut self) {
        let workers = self.workers();
        if self.phase != Phase::Running || workers <= 1 {
            if workers <= 1 {
                warn!("TTOU: already at one worker; ignored");
            }
            return;
        }
        self.set_worker_count(workers - 1);
        let p = self.processes();
        info!(workers = p.http, apps = p.apps, "TTOU: one worker fewer");
    }

    /// USR1: reopen the log file (after rotation), in the master and every worker, and the
    /// access log file in every worker.
    pub(super) fn reopen_logs(&mut self) {
        let access_file = self.config.log.access && !self.config.log.access_file.is_empty();
        if self.config.log.file.is_empty() && !access_file {
            info!("USR1: logging to stderr; nothing to reopen");
            return;
        }
        if !self.config.log.file.is_empty() {
            match crate::run_as::log_to_file(&self.config) {
                Ok(()) => info!(file = %self.config.log.file, "USR1: log file reopened"),
                Err(e) => error!("USR1: {e}"),
            }
        }
        // A rotated access log: the new file is created here (and given to server.user) before
        // the workers reopen it by its path.
        if let Err(e) = crate::run_as::prepare_access_file(&self.config) {
            error!("USR1: {e}");
        }
        for pid in self.procs.keys() {
            let _ = kill(*pid, protocol::REOPEN_LOGS);
        }
    }
}
