//! What the master does for each control-socket request (`supervisor status`, `reload`, `stop`,
//! `scale`, `upgrade`), and the files that say a master runs here: the control socket and the
//! pidfile. The socket's mechanics (accepting, reading, the peer check) are `control`'s.

use std::path::Path;

use super::*;
use crate::control::{self, Location, Reply, Request};
use crate::pidfile;
use crate::status::{self, LimitsInfo, MasterInfo};

/// Before binding anything: refuse to start beside a live master named by `server.pidfile`.
pub(super) fn refuse_if_pidfile_live(config: &Config) -> Result<()> {
    if config.server.pidfile.is_empty() {
        return Ok(());
    }
    pidfile::refuse_if_live(Path::new(&config.server.pidfile))
}

/// The control socket and the pidfile, made ours. The new master of a binary upgrade calls
/// this directly once it is ready, taking both over from the old master, which still answers on
/// the socket: the new socket is renamed over the old one's path (the old master, seeing another
/// file there, leaves it at exit), and the pidfile gets our pid (the old master removes it only
/// while it holds its own).
pub(super) fn take_over_control_and_pidfile(
    config: &Config,
) -> Result<(ControlServer, Option<PidFile>)> {
    let server = ControlServer::bind(&Location::of(config))?;
    let pidfile = if config.server.pidfile.is_empty() {
        None
    } else {
        Some(PidFile::create(Path::new(&config.server.pidfile))?)
    };
    Ok((server, pidfile))
}

/// Once the listeners are bound: the control socket (refusing if another master answers on it)
/// and the pidfile.
pub(super) fn claim_control_and_pidfile(
    config: &Config,
) -> Result<(ControlServer, Option<PidFile>)> {
    control::refuse_if_live(&Location::of(config), std::process::id())?;
    take_over_control_and_pidfile(config)
}

impl Master {
    /// Serves the control socket's clients after `poll` (`ready`: its part of the poll set).
    pub(super) fn on_control(&mut self, ready: &[bool]) {
        let Some(control) = self.control.as_mut() else {
            return;
        };
        let requests = control.on_events(ready);
        for (id, request) in requests {
            let hold = matches!(request, Request::Stop { .. });
            if matches!(request, Request::Reload) {
                info!("control: reload requested");
                // Answered once the new workers start or fail (see `PendingReload`).
                if let Some(r) = self.reload_for(id) {
                    let reply = match r {
                        Ok(m) => Reply::ok(m),
                        Err(e) => Reply::err(e),
                    };
                    if let Some(control) = self.control.as_mut() {
                        control.answer(id, &reply, false);
                    }
                }
                continue;
            }
            let reply = self.execute(request);
            if let Some(control) = self.control.as_mut() {
                control.answer(id, &reply, hold && reply.ok);
            }
        }
    }

    fn execute(&mut self, request: Request) -> Reply {
        let outcome = |r: Result<String, String>| match r {
            Ok(m) => Reply::ok(m),
            Err(e) => Reply::err(e),
        };
        match request {
            Request::Ping => Reply::ok("pong"),
            Request::Status => {
                let mut reply = Reply::ok("status");
                reply.status = Some(self.status());
                reply
            }
            // Answered in `on_control` once the outcome is known; here only if called directly.
            Request::Reload => outcome(self.reload()),
            Request::Stop { fast } => self.stop_requested(fast),
            Request::Scale { workers } => {
                let mut reply = outcome(self.scale(workers));
                reply.workers = Some(self.workers());
                reply
            }
            Request::Upgrade => {
                info!("control: upgrade requested");
                let mut reply = outcome(self.begin_upgrade());
                if let Some(u) = self.upgrade.as_ref().filter(|_| reply.ok) {
                    let pid = u.pid.as_raw() as u32;
                    reply.new_master = Some(pid);
                    reply.new_socket = Some(Location::of(&self.config).for_master(pid));
                    // Until the deadline, then the old master's drain (the command also counts
                    // the old master's exit as the new one's success).
                    let left = u
                        .deadline
                        .saturating_duration_since(std::time::Instant::now());
                    let wait = left + self.config.server.graceful_timeout;
                    reply.wait_ms = Some(wait.as_millis() as u64);
                }
                reply
            }
        }
    }

    /// The scoreboard as `supervisor status` shows it, with what only the master knows.
    fn status(&self) -> status::Status {
        let mut s = status::snapshot(std::process::id(), &self.board, Some(&self.rates));
        for (w, base) in s
            .workers
            .iter_mut()
            .map(|w| (w, 0))
            .chain(s.apps.iter_mut().map(|w| (w, super::APP_IDS)))
        {
            w.last_recycle = self
                .slots
                .iter()
                .find(|slot| slot.id == base + w.worker_id)
                .and_then(|slot| slot.last_recycle)
                .map(|r| r.as_str().to_string());
        }
        let c = &self.config;
        s.master = Some(MasterInfo {
            listen: self
                .listeners
                .iter()
                .flat_map(|l| l.addresses().map(|(addr, _)| addr.to_string()))
                .collect(),
            control_socket: self
                .control
                .as_ref()
                .map(|c| c.path().display().to_string())
                .unwrap_or_default(),
            metrics: self
                .metrics
                .as_ref()
                .map(|m| m.addr().to_string())
                .unwrap_or_default(),
            workers: self.processes().http,
            apps: self.processes().apps,
            ready: self.announced_ready,
            stopping: self.phase != Phase::Running,
            reloads: self.config_gen,
            reload_failures: self.reload_failures,
            last_reload_error: self.last_reload_error.clone().unwrap_or_default(),
            limits: LimitsInfo {
                max_concurrent_requests: c.limits.max_concurrent_requests,
                cluster_max_concurrent_requests: c.limits.cluster_max_concurrent_requests,
                worker_max_concurrent: c.worker.max_concurrent,
                rate: c.limits.rate.map(|r| r.to_string()).unwrap_or_default(),
                queue: c.limits.queue,
                on_redis_error: c.limits.on_redis_error.as_str().to_string(),
            },
            redis_url: worker::cluster::redacted(&c.redis.url),
        });
        s
    }

    /// `supervisor stop [--fast]`: the TERM or QUIT path. The answer says how long the stop may
    /// take; the connection stays open until the master exits.
    fn stop_requested(&mut self, fast: bool) -> Reply {
        let how = if fast { "fast" } else { "graceful" };
        match self.phase {
            Phase::Running => {
                info!(fast, "control: {how} stop requested");
                self.begin_stop(fast);
            }
            Phase::Stopping { fast: false, .. } if fast => {
                info!("control: fast stop requested");
                self.begin_stop(true);
            }
            Phase::Stopping { .. } => {}
        }
        let wait = match self.phase {
            Phase::Stopping {
                deadline, killed, ..
            } => {
                // Past the deadline stragglers get SIGKILL; a few seconds more for that.
                let left = deadline.saturating_duration_since(Instant::now());
                left + if killed {
                    Duration::ZERO
                } else {
                    super::stop::FAST_STOP_TIMEOUT
                }
            }
            Phase::Running => Duration::ZERO,
        };
        let mut reply = Reply::ok(format!("{how} stop under way"));
        reply.wait_ms = Some(wait.as_millis() as u64);
        reply
    }

    /// `supervisor scale N`: as many TTIN or TTOU as it takes to have `workers` worker numbers.
    fn scale(&mut self, workers: u32) -> Result<String, String> {
        if self.phase != Phase::Running {
            return Err("the master is stopping".to_string());
        }
        crate::config_loader::workers_fit(&self.config, workers)
            .map_err(|why| format!("cannot scale to {workers} workers: {why}"))?;
        if let Some(u) = &self.upgrade {
            return Err(format!(
                "a binary upgrade is under way (new master pid {}): scale that master once it \
                 has taken over",
                u.pid
            ));
        }
        let before = self.workers();
        self.set_worker_count(workers);
        info!(workers, before, "control: scaled");
        let what = if self.config.app_pool() {
            let http = self.processes().http;
            format!("app processes (behind {http} HTTP workers)")
        } else {
            "workers".to_string()
        };
        Ok(format!("scaled from {before} to {workers} {what}"))
    }

    /// On reload: the control socket and the pidfile stay where they are until a restart.
    pub(super) fn warn_control_changes(&self, new: &Config) {
        let now = self.control.as_ref().map(|c| c.path().to_path_buf());
        let then = Location::of(new).for_master(std::process::id());
        if let Some(now) = now.filter(|p| *p != then) {
            warn!(
                control_socket = %now.display(),
                "reload: the control socket stays where it is until the master is restarted"
            );
        }
        if new.server.pidfile != self.config.server.pidfile {
            warn!("reload: server.pidfile applies when the master is restarted");
        }
    }
}
