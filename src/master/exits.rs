//! A worker process that exited: reaping it (the master is the only reaper), giving back what
//! it held (its scoreboard record, its host-wide and cluster-wide permits, its counters for the
//! metrics), logging how it ended, and doing what `slots::on_exit` decided: respawn it now or
//! after a backoff, retry a failed replacement, hand its place to its successor, or give up
//! when nothing can boot.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracing::{error, info, warn};
use worker::scoreboard::RecycleReason;

use super::slots::{self, is_app, Exited, Shown, Verdict};
use super::{Master, Phase, Proc};
use crate::metrics::Death;

impl Master {
    /// Reaps every exited child without blocking. The master is the only reaper.
    pub(super) fn reap(&mut self) {
        loop {
            let status = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => return,
                Ok(s) => s,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return, // ECHILD: no children left
            };
            let (pid, exit) = match status {
                WaitStatus::Exited(pid, code) => (pid, Exit::Code(code)),
                WaitStatus::Signaled(pid, sig, _) => (pid, Exit::Signal(sig)),
                _ => continue,
            };
            let Some(proc) = self.procs.remove(&pid) else {
                // Not a worker: the new master of an upgrade is the only other child.
                self.on_new_master_exit(pid, exit);
                continue;
            };
            self.on_exit(pid, proc, exit);
        }
    }

    fn on_exit(&mut self, pid: Pid, proc: Proc, exit: Exit) {
        let exited = Exited {
            pid,
            retiring: proc.retiring.map(|(reason, _)| reason),
            hung: proc.hung,
            acked: proc.acked,
            killed_by_us: proc.killed_by_us,
            uptime: proc.started.elapsed(),
        };
        let stopping = matches!(self.phase, Phase::Stopping { .. });
        let recycled = exited.retiring.or(proc.hung.then_some(RecycleReason::Hung));
        let unasked = slots::unasked(&self.slots, &exited, stopping);
        let returned = match &self.metrics {
            Some(m) => m.reap(
                &self.board,
                proc.record,
                recycled,
                unasked.then(|| exit.death()),
            ),
            None => self.board.reclaim(proc.record),
        };
        if let Some(janitor) = &self.janitor {
            janitor.purge(pid.as_raw() as u32);
        }
        if returned > 0 {
            warn!(
                worker.id = %Shown(proc.id),
                pid = pid.as_raw(),
                permits = returned,
                "returned host-wide permits held by the dead worker"
            );
        }
        // A worker of a reload's configuration that could not boot: the reload failed.
        let disproves = !stopping
            && !proc.acked
            && !proc.killed_by_us
            && self
                .pending_reload
                .as_ref()
                .is_some_and(|p| p.gen == proc.config_gen);
        let verdict = slots::on_exit(&mut self.slots, &exited, stopping);
        self.carry_out_exit(&proc, &exited, exit, verdict, disproves);
    }

    /// Logs an exit and does what its verdict asks (`slots::on_exit` has updated the slot).
    fn carry_out_exit(
        &mut self,
        proc: &Proc,
        exited: &Exited,
        exit: Exit,
        verdict: Verdict,
        disproves: bool,
    ) {
        let (id, pid, uptime) = (proc.id, exited.pid.as_raw(), exited.uptime);
        let how = exit.describe(proc.killed_by_us);
        match verdict {
            Verdict::Recycled(reason) if exit.is_clean() => {
                info!(worker.id = %Shown(id), pid, reason = %reason.as_str(), uptime = ?uptime, "worker recycled");
            }
            Verdict::Recycled(reason) => {
                warn!(worker.id = %Shown(id), pid, reason = %reason.as_str(), "worker recycled: {how}");
            }
            Verdict::Stopped if exit.is_clean() => {
                info!(worker.id = %Shown(id), pid, "worker stopped");
            }
            Verdict::Stopped => warn!(worker.id = %Shown(id), pid, "worker stopped: {how}"),
            Verdict::ReplacementFailed {
                index,
                retry_in,
                retry,
            } => {
                if retry {
                    self.recycle_queue.push_back(self.slots[index].id);
                }
                error!(worker.id = %Shown(id), pid, retry_in = ?retry_in, "replacement worker failed to boot: {how}");
                self.systemd_replacement_failed(id, &how);
                if disproves {
                    self.reload_disproved(id, &how);
                }
            }
            Verdict::SuccessorTakesOver { next, .. } => {
                self.release(next);
                error!(worker.id = %Shown(id), pid, "worker died while being replaced: {how}");
            }
            Verdict::BootFailed {
                index,
                failures,
                retry_in,
            } => {
                let delay = self.schedule_respawn(index, retry_in);
                error!(worker.id = %Shown(id), pid, failures, retry_in = ?delay, "worker failed to boot: {how}");
                if disproves {
                    self.reload_disproved(id, &how);
                }
                self.boot_failures_fatal(id, failures);
            }
            Verdict::Died { index, respawn_in } => {
                let delay = self.schedule_respawn(index, respawn_in);
                if exited.hung {
                    error!(worker.id = %Shown(id), pid, uptime = ?uptime, respawn_in = ?delay, "worker killed as hung");
                } else {
                    error!(worker.id = %Shown(id), pid, uptime = ?uptime, respawn_in = ?delay, "worker died: {how}");
                }
            }
        }
    }

    /// Sets when worker slot `index` is started again. A slot left empty for a while gives up
    /// its reuseport sockets meanwhile (see `Listeners::release`); an immediate respawn keeps
    /// them, so the replacement inherits the connections already queued.
    pub(super) fn schedule_respawn(&mut self, index: usize, delay: Duration) -> Duration {
        let slot = &mut self.slots[index];
        slot.respawn_at = Some(Instant::now() + delay);
        if !delay.is_zero() && !is_app(slot.id) {
            if let Some(l) = self.listeners.as_mut() {
                l.release(slot.id);
            }
        }
        delay
    }

    /// After a boot failure: if nothing serves and this worker keeps failing, further retries
    /// would only spin, so stop with one clear error and exit 1.
    pub(super) fn boot_failures_fatal(&mut self, id: u32, failures: u32) -> bool {
        let serving = |app: bool| self.procs.values().any(|p| p.acked && is_app(p.id) == app);
        if slots::gives_up(id, failures, serving) {
            error!(
                failures,
                "workers keep failing to boot and none is serving; giving up (see the errors above)"
            );
            self.exit_code = 1;
            self.begin_stop(true);
            return true;
        }
        false
    }
}

#[derive(Clone, Copy, Debug)]
pub(super) enum Exit {
    Code(i32),
    Signal(Signal),
}

pub(super) fn signal_name(sig: i32) -> &'static str {
    Signal::try_from(sig).map_or("?", |s| s.as_str())
}

impl Exit {
    pub(super) fn is_clean(self) -> bool {
        matches!(self, Exit::Code(0))
    }

    /// A worker's death in words, telling apart a crash from a kill nobody here sent.
    pub(super) fn describe(self, killed_by_us: bool) -> String {
        match self {
            Exit::Code(0) => "exited with status 0".to_string(),
            Exit::Code(c) => format!("exited with status {c}"),
            Exit::Signal(Signal::SIGKILL) if killed_by_us => {
                "killed by SIGKILL from supervisor".to_string()
            }
            Exit::Signal(Signal::SIGKILL) => {
                "killed by SIGKILL not sent by supervisor (the kernel's OOM killer or an operator)"
                    .to_string()
            }
            Exit::Signal(s) => format!("killed by signal {}", s.as_str()),
        }
    }

    /// The cause `supervisor_worker_deaths_total` counts a worker's unasked death under.
    pub(super) fn death(self) -> Death {
        match self {
            Exit::Code(_) => Death::Exited,
            Exit::Signal(Signal::SIGKILL) => Death::Killed,
            Exit::Signal(_) => Death::Signaled,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sigkill_we_did_not_send_is_called_out() {
        let theirs = Exit::Signal(Signal::SIGKILL).describe(false);
        assert!(theirs.contains("not sent by supervisor"), "{theirs}");
        let ours = Exit::Signal(Signal::SIGKILL).describe(true);
        assert!(ours.contains("from supervisor"), "{ours}");
    }
}
