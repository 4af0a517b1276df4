//! A binary upgrade (USR2, `supervisor upgrade`), seen from the old master: it starts the
//! binary on disk as a new master with its listeners, keeps serving until the new one says
//! every one of its workers is ready, then hands over (control socket, pidfile, systemd's
//! MAINPID) and drains; if the new one fails first, this one keeps serving and says why. The
//! new master's side is `setup`'s handover; the mechanics are `crate::upgrade`.

use std::time::Instant;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tracing::{error, info, warn};

use super::exits::Exit;
use super::{Master, Phase};
use crate::upgrade;

impl Master {
    /// USR2 and `supervisor upgrade`: starts the binary on disk as a new master with our
    /// listeners. This master keeps serving until the new one says every one of its workers is
    /// ready, then drains and exits; if the new one fails first, this one keeps serving and says
    /// why.
    pub(super) fn begin_upgrade(&mut self) -> Result<String, String> {
        if self.phase != Phase::Running {
            return Err("the master is stopping".into());
        }
        if let Some(u) = &self.upgrade {
            return Err(format!(
                "an upgrade is already under way (new master pid {})",
                u.pid
            ));
        }
        if let Some(pid) = self.handed_over_to {
            return Err(format!("already handed over to master pid {pid}"));
        }
        if let Some((_, old)) = &self.upgrade_ready {
            return Err(format!(
                "this master is the new master of an upgrade from master {old} and is not \
                 ready yet"
            ));
        }
        if std::process::id() == 1 {
            // The old master exits once the new one is ready: as process 1 (a container's
            // init), its exit would end the container.
            return Err(
                "this master is process 1 (a container's init): it cannot hand over \
                        and exit; restart the container instead"
                    .into(),
            );
        }
        let Some(listeners) = self.listeners.as_ref() else {
            return Err("no listeners to hand over".into());
        };
        let within = self.config.app.ready_timeout + upgrade::READY_MARGIN;
        let metrics = self.metrics.as_ref().map(|m| m.hand_over());
        match upgrade::start_new_master(&self.self_exec, listeners, metrics, within) {
            Ok(u) => {
                let msg = format!(
                    "new master pid {} started from {}; this master drains once it is ready",
                    u.pid,
                    self.self_exec.exe.display()
                );
                info!(
                    pid = u.pid.as_raw(),
                    exe = %self.self_exec.exe.display(),
                    ready_within = ?within,
                    "upgrade: started the new master"
                );
                self.upgrade = Some(u);
                Ok(msg)
            }
            Err(e) => {
                error!("upgrade failed, this master keeps serving: {e:#}");
                Err(format!("{e:#}"))
            }
        }
    }

    /// The new master wrote on its readiness pipe, or closed it.
    pub(super) fn on_upgrade_pipe(&mut self) {
        let Some(u) = self.upgrade.as_mut() else {
            return;
        };
        let mut buf = [0u8; 8];
        let n = match u.ready.as_ref() {
            Some(fd) => nix::unistd::read(fd, &mut buf).unwrap_or(0),
            None => return,
        };
        if n == 0 {
            // It exited or closed the pipe without being ready: the reaper or the deadline
            // says what happened.
            u.ready = None;
            return;
        }
        if buf[..n].contains(&b'R') && !u.abandoned {
            let pid = u.pid;
            self.upgrade = None;
            self.handed_over_to = Some(pid);
            info!(
                new_master = pid.as_raw(),
                "upgrade: the new master is ready; draining this master's workers"
            );
            if let Some(l) = self.listeners.as_mut() {
                l.set_handed_over();
            }
            if let Some(m) = &self.metrics {
                m.set_accepting(false);
            }
            // systemd: the new master is the service's main process from now on (allowed
            // under NotifyAccess=main because we are the main process until now).
            self.systemd_main_pid(pid.as_raw() as u32);
            self.begin_stop(false);
        }
    }

    /// An upgrade not ready by its deadline is abandoned: the new master is stopped.
    pub(super) fn check_upgrade(&mut self) {
        let Some(u) = self.upgrade.as_mut() else {
            return;
        };
        let now = Instant::now();
        if u.abandoned {
            // Told to stop and still there after a fast stop's time: killed (its workers die
            // with it), so that a hung new master does not block later upgrades for good.
            if u.kill_at.is_some_and(|t| now >= t) {
                u.kill_at = None;
                warn!(
                    pid = u.pid.as_raw(),
                    "upgrade: the stopped new master is still running; killing it"
                );
                let _ = kill(u.pid, Signal::SIGKILL);
            }
            return;
        }
        if now < u.deadline {
            return;
        }
        error!(
            pid = u.pid.as_raw(),
            "upgrade failed: the new master did not get its workers ready in time; stopping it, \
             this master keeps serving"
        );
        u.abandon(Signal::SIGQUIT);
    }

    /// The new master of an upgrade exited. Before it took over, this is a failed upgrade.
    pub(super) fn on_new_master_exit(&mut self, pid: Pid, exit: Exit) {
        if self.upgrade.as_ref().is_some_and(|u| u.pid == pid) {
            let u = self.upgrade.take().expect("checked");
            if u.abandoned {
                info!(pid = pid.as_raw(), exit = %exit.describe(false), "upgrade: the new master stopped");
            } else {
                error!(
                    pid = pid.as_raw(),
                    "upgrade failed: the new master {} before it was ready; this master keeps \
                     serving (its own log lines above say why)",
                    exit.describe(false)
                );
            }
            self.restore_control_and_pidfile();
        } else if self.handed_over_to == Some(pid) {
            warn!(pid = pid.as_raw(), exit = %exit.describe(false), "the new master exited");
        }
    }

    /// After a failed upgrade. The new master takes the control socket and the pidfile over just
    /// before it says it is ready; one that died (or was stopped) in between took them with it.
    fn restore_control_and_pidfile(&mut self) {
        if let Some(control) = self.control.as_mut() {
            match control.restore() {
                Ok(true) => warn!(
                    path = %control.path().display(),
                    "upgrade: the control socket had gone with the new master; made again"
                ),
                Ok(false) => {}
                Err(e) => {
                    error!("upgrade: the control socket is gone and cannot be made again: {e:#}")
                }
            }
        }
        if let Some(pidfile) = &self.pidfile {
            match pidfile.restore() {
                Ok(true) => warn!(
                    path = %pidfile.path().display(),
                    "upgrade: the pidfile had gone with the new master; written again"
                ),
                Ok(false) => {}
                Err(e) => error!("upgrade: {e:#}"),
            }
        }
    }
}
