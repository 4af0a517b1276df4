//! The master: one single-threaded control loop that owns the listeners, the scoreboard, the
//! worker processes and the signals. It never touches a request.
//!
//! Single-threaded on purpose: `PR_SET_PDEATHSIG` fires when the *thread* that forked a worker
//! exits, so spawning from the only thread ties workers to the master's life; and forking a
//! process with no other threads cannot inherit a lock held elsewhere. The loop waits in
//! `poll(2)` on a signal self-pipe and the workers' pipes, with a timeout for the next timer (a
//! delayed respawn, a memory sample, a stop deadline).
//!
//! Replacing a worker (recycling, reload) is always a surge: the replacement starts in the same
//! worker number (so it shares that number's sockets), and only once it reports ready is the
//! old process told to drain. At most `worker.max_recycling` replacements run at once.
//!
//! This file is the loop and the state it carries; each responsibility has a module of its
//! own. The decisions, pure and unit-tested without processes: `slots` (a worker number's
//! fate: exits, backoff, replacements, scaling, reload plans), `health` (hung, overdue
//! drains), `stop` (who is told what during a stop). The shell that carries them out:
//! `starting` (`setup`), `spawning`, `exits` (reaping), `recycling` (checks, the replacement
//! queue, the handover), `signals`, `reloading`, `upgrading`, `requests` (the control socket),
//! `systemd`.
//!
//! Why decisions as functions over the slot table rather than one machine taking an event enum
//! and returning an action list: a decision's effects feed the next one within the same turn
//! (a fork fails and the slot backs off; a promotion releases a held process, whose pid the
//! next decision needs), so an action list would have to be carried out and its results fed
//! back as more events. Each function here takes the facts it needs and returns what to do,
//! over the same state the shell keeps (`WorkerSlot`); the lifecycle stories (surge recycle,
//! held replacement, crash backoff and give-up, hung kill, rolling reload, TTIN/TTOU during a
//! recycle, stop during a reload or an upgrade, a worker dying while held) are each a unit
//! test of them, without processes or sleeps.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use signal_hook::consts::signal::*;
use tracing::{error, info, warn};
use worker::cluster::Janitor;
use worker::config::Config;
use worker::protocol;
use worker::ratelimit::RateTable;
use worker::scoreboard::{RecycleReason, Scoreboard};

use crate::control::ControlServer;
use crate::listeners::Listeners;
use crate::logging::LevelHandle;
use crate::metrics::Metrics;
use crate::pidfile::PidFile;
use crate::recycle::{Observed, Plan};
use crate::runtime_dir::RuntimeDir;
use crate::upgrade::{self, SelfExec};

mod exits;
mod health;
mod recycling;
mod reloading;
mod requests;
mod signals;
mod slots;
mod spawning;
mod starting;
mod stop;
mod systemd;
mod upgrading;

use reloading::PendingReload;
use slots::{is_app, Shown, WorkerSlot, APP_IDS};
pub use starting::setup;
use starting::Signals;

/// Scoreboard records: room for the largest worker count plus as many replacements again.
const SCOREBOARD_CAPACITY: usize = 2048;
/// Upper bound on one `poll` wait: hung-worker checks run at least this often.
/// How often the master clears forgotten clients from the rate table.
const RATE_SWEEP_EVERY: Duration = Duration::from_secs(60);
const MAX_POLL_WAIT: Duration = Duration::from_secs(1);

/// Every signal the master acts on (`on_signals`); each is described in man/supervisor.1.
pub const HANDLED_SIGNALS: [i32; 9] = [
    SIGTERM, SIGINT, SIGQUIT, SIGCHLD, SIGHUP, SIGTTIN, SIGTTOU, SIGUSR1, SIGUSR2,
];

/// Re-reads the configuration from the same sources as at start (for HUP).
pub type Reload = Box<dyn Fn() -> Result<Config, String>>;

/// A live worker process.
struct Proc {
    id: u32,
    record: usize,
    /// Read end of the worker's pipe to the master (`R` ready, `M` max_requests reached).
    pipe: Option<OwnedFd>,
    acked: bool,
    started: Instant,
    /// Configuration generation it was started with (a reload replaces older ones).
    config_gen: u64,
    plan: Plan,
    observed: Observed,
    /// We sent SIGKILL ourselves, so a SIGKILL death is ours and not the OOM killer's.
    killed_by_us: bool,
    /// Killed because its heartbeat stopped.
    hung: bool,
    /// Started held (ready but not accepting until released with SIGUSR2).
    held: bool,
    /// Told to drain, and why; it is killed if still running at the deadline.
    retiring: Option<(RecycleReason, Instant)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Stopping {
        deadline: Instant,
        fast: bool,
        killed: bool,
    },
}

pub struct Master {
    config: Config,
    /// The configuration for new workers (`spawn::config_fd`).
    config_fd: OwnedFd,
    config_gen: u64,
    /// The last reload, until its new workers show they can start.
    pending_reload: Option<PendingReload>,
    reload: Reload,
    log_level: LevelHandle,
    listeners: Option<Listeners>,
    board: Scoreboard,
    board_fd: OwnedFd,
    /// The per-client rate table every worker shares, sized by `limits.max_active_instances`.
    rates: RateTable,
    rates_fd: OwnedFd,
    /// Returns dead workers' cluster-wide permits (with `redis.url`).
    janitor: Option<Janitor>,
    /// The metrics thread (`[metrics] bind`), which also keeps dead workers' counters.
    metrics: Option<Metrics>,
    signals: Signals,
    /// TTIN and TTOU received and not yet acted on.
    ttin: Arc<AtomicUsize>,
    ttou: Arc<AtomicUsize>,
    slots: Vec<WorkerSlot>,
    procs: HashMap<Pid, Proc>,
    /// Worker numbers waiting for a replacement, oldest request first.
    recycle_queue: VecDeque<u32>,
    next_rss_sample: Instant,
    /// When the rate table is next cleared of forgotten clients (`RateTable::sweep`).
    next_rate_sweep: Instant,
    phase: Phase,
    /// A graceful stop has told the app processes to drain (after the HTTP workers).
    apps_told_to_stop: bool,
    announced_ready: bool,
    /// Reloads refused (a configuration that does not load, or whose workers cannot boot),
    /// and why the last one was, until a reload is applied.
    reload_failures: u64,
    last_reload_error: Option<String>,
    exit_code: i32,
    /// Where app sockets go; removed when the master is dropped.
    runtime_dir: RuntimeDir,
    /// How this master was started: what a binary upgrade runs again.
    self_exec: SelfExec,
    /// A binary upgrade this master started and that is not ready yet.
    upgrade: Option<upgrade::InProgress>,
    /// The new master of an upgrade took over: this one drains and exits.
    handed_over_to: Option<Pid>,
    /// Started by an upgrading master: the pipe on which to tell it that we are ready.
    upgrade_ready: Option<(OwnedFd, u32)>,
    /// What systemd is told (`Type=notify`); inert without `$NOTIFY_SOCKET`.
    systemd: systemd::Systemd,
    /// `supervisor status`, `reload`, ... connect here; removed when the master is dropped.
    control: Option<ControlServer>,
    /// `server.pidfile`; removed when the master is dropped.
    pidfile: Option<PidFile>,
}

impl Master {
    /// Runs until the master stops; returns the process exit code.
    pub fn run(mut self) -> i32 {
        let p = self.processes();
        info!(
            workers = p.http,
            apps = p.apps,
            pid = std::process::id(),
            "starting"
        );
        loop {
            self.board
                .header()
                .master_heartbeat_ms
                .store(worker::scoreboard::monotonic_ms(), Ordering::Relaxed);
            // Signals already here first: a stop signal sent to the whole process group (a
            // terminal's Ctrl-C) also reaches the workers, and their exits must be seen as part
            // of that stop, not as deaths.
            self.on_signals();
            self.reap();
            if let Phase::Stopping { .. } = self.phase {
                if self.procs.is_empty() {
                    break;
                }
                self.stop_apps_after_http();
                self.enforce_stop_deadline();
            } else {
                self.spawn_due();
                self.check_workers();
                self.start_replacements();
                self.check_pending_reload();
                self.check_upgrade();
                if self.phase != Phase::Running {
                    continue; // spawning gave up: go straight to stopping
                }
            }
            self.systemd_tick();
            self.wait_for_events();
        }
        if let Some(l) = self.listeners.take() {
            l.close();
        }
        info!(code = self.exit_code, "stopped");
        self.exit_code
    }

    fn slot_index(&self, id: u32) -> Option<usize> {
        self.slots.iter().position(|s| s.id == id)
    }

    /// App hosts beyond one per app number, until they have exited: replacements (booting,
    /// held or ready) and the processes they replaced while those drain. Each runs an app
    /// process (memory, CPU, perhaps a database pool), so `max_recycling` bounds them all, not
    /// only the booting ones.
    fn extra_app_processes(&self) -> usize {
        self.procs
            .iter()
            .filter(|(pid, p)| is_app(p.id) && !self.slots.iter().any(|s| s.pid == Some(**pid)))
            .count()
    }

    /// The processes kept now, by kind.
    fn processes(&self) -> worker::config::Processes {
        let apps = self.slots.iter().filter(|s| is_app(s.id)).count() as u32;
        worker::config::Processes {
            http: self.slots.len() as u32 - apps,
            apps,
        }
    }

    /// The count `-w`, TTIN/TTOU and `supervisor scale` change: app processes with
    /// `app.command`, HTTP workers otherwise.
    fn workers(&self) -> u32 {
        let p = self.processes();
        if self.config.app_pool() {
            p.apps
        } else {
            p.http
        }
    }

    fn wait_for_events(&mut self) {
        let now = Instant::now();
        let mut wait = MAX_POLL_WAIT;
        match self.phase {
            Phase::Running => {
                for t in self.slots.iter().filter_map(|s| s.respawn_at) {
                    wait = wait.min(t.saturating_duration_since(now));
                }
                // A recycle's time matters until its replacement is started; one that is due but
                // waits for `max_recycling` is woken by a replacement's readiness, not a timer
                // (a time in the past here would make the loop spin).
                for (_, t) in self
                    .slots
                    .iter()
                    .filter(|s| s.successor.is_none())
                    .filter_map(|s| s.recycle)
                {
                    if t > now {
                        wait = wait.min(t - now);
                    }
                }
                wait = wait.min(self.next_rss_sample.saturating_duration_since(now));
                if let Some(u) = &self.upgrade {
                    let next = if u.abandoned {
                        u.kill_at
                    } else {
                        Some(u.deadline)
                    };
                    if let Some(t) = next {
                        wait = wait.min(t.saturating_duration_since(now));
                    }
                }
            }
            Phase::Stopping {
                deadline, killed, ..
            } if !killed => wait = wait.min(deadline.saturating_duration_since(now)),
            Phase::Stopping { .. } => {}
        }
        if let Some(due) = self.systemd_next_due(now) {
            wait = wait.min(due);
        }
        // Round up so we do not wake a hair before a timer and spin.
        let ms = wait.as_millis().min(u16::MAX as u128) as u16 + u16::from(!wait.is_zero());

        let pids: Vec<Pid> = self
            .procs
            .iter()
            .filter(|(_, p)| p.pipe.is_some())
            .map(|(pid, _)| *pid)
            .collect();
        let control_at;
        let mut upgrade_at = None;
        let readable: Vec<bool> = {
            let mut fds = Vec::with_capacity(pids.len() + 1);
            fds.push(PollFd::new(
                self.signals.get_read().as_fd(),
                PollFlags::POLLIN,
            ));
            for pid in &pids {
                let fd = self.procs[pid].pipe.as_ref().expect("filtered above");
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
            }
            // Then the new master's readiness pipe, during an upgrade.
            if let Some(fd) = self.upgrade.as_ref().and_then(|u| u.ready.as_ref()) {
                upgrade_at = Some(fds.len());
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
            }
            control_at = fds.len();
            if let Some(control) = &self.control {
                fds.extend(control.poll_fds());
            }
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(_) => fds
                    .iter()
                    .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                    .collect(),
                Err(nix::errno::Errno::EINTR) => vec![false; fds.len()],
                Err(e) => {
                    error!("poll failed: {e}");
                    vec![false; fds.len()]
                }
            }
        };
        for (pid, _) in pids.iter().zip(&readable[1..]).filter(|(_, r)| **r) {
            self.on_worker_pipe(*pid);
        }
        if upgrade_at.is_some_and(|i| readable[i]) {
            self.on_upgrade_pipe();
        }
        if readable[0] {
            self.on_signals();
        }
        self.on_control(&readable[control_at..]);
    }

    fn on_worker_pipe(&mut self, pid: Pid) {
        let Some(proc) = self.procs.get_mut(&pid) else {
            return;
        };
        let mut buf = [0u8; 64];
        let n = match proc.pipe.as_ref() {
            Some(fd) => nix::unistd::read(fd, &mut buf).unwrap_or(0),
            None => return,
        };
        if n == 0 {
            proc.pipe = None; // EOF: the worker is exiting
            return;
        }
        let bytes = &buf[..n];
        if bytes.contains(&protocol::MAX_REQUESTS_SOON) {
            proc.observed.max_requests_soon = true;
        }
        let reached = bytes.contains(&protocol::MAX_REQUESTS);
        if reached {
            proc.observed.max_requests_reached = true;
        }
        let id = proc.id;
        if bytes.contains(&protocol::READY) && !proc.acked {
            proc.acked = true;
            let boot = proc.started.elapsed();
            info!(worker.id = %Shown(id), pid = pid.as_raw(), boot = ?boot, "worker ready");
            self.reload_proved(pid);
            self.on_ready(id, pid);
        }
        if reached {
            // Its replacement may be ready and waiting for exactly this.
            if let Some(i) = self.slot_index(id) {
                let ready = self.slots[i]
                    .successor
                    .and_then(|s| self.procs.get(&s))
                    .is_some_and(|s| s.acked);
                if slots::takes_over_at_limit(&self.slots[i], pid, ready) {
                    self.promote(i);
                }
            }
        }
    }

    fn maybe_announce_ready(&mut self) {
        if self.announced_ready || self.phase != Phase::Running {
            return;
        }
        let all = self.slots.iter().all(|s| {
            s.pid
                .and_then(|pid| self.procs.get(&pid))
                .is_some_and(|p| p.acked)
        });
        if all {
            self.announced_ready = true;
            let p = self.processes();
            info!(workers = p.http, apps = p.apps, "ready");
            self.systemd_ready();
            if let Some((pipe, parent)) = self.upgrade_ready.take() {
                match requests::take_over_control_and_pidfile(&self.config) {
                    Ok((control, pidfile)) => {
                        self.control = Some(control);
                        self.pidfile = pidfile;
                    }
                    Err(e) => {
                        error!("upgrade: cannot take the control socket or the pidfile over: {e:#}")
                    }
                }
                // From now on the Unix socket files and the metrics are this master's.
                if let Some(l) = self.listeners.as_mut() {
                    l.take_ownership();
                }
                if let Some(m) = &self.metrics {
                    m.set_accepting(true);
                }
                match nix::unistd::write(&pipe, b"R") {
                    Ok(_) => info!(
                        old_master = parent,
                        "upgrade: every worker is ready; the old master drains and exits"
                    ),
                    Err(e) => error!(
                        old_master = parent,
                        "upgrade: cannot tell the old master that we are ready: {e}"
                    ),
                }
            }
        }
    }

    /// Starts a stop: graceful (TERM to workers, wait `graceful_timeout`) or fast (QUIT, wait a
    /// few seconds). The master's copies of the listeners close at once, so nothing new is
    /// queued on a socket no worker will serve; workers drain what is already queued.
    fn begin_stop(&mut self, fast: bool) {
        let procs = self.live_processes();
        let start = stop::begin(
            &stop::Before {
                fast,
                graceful_timeout: self.config.server.graceful_timeout,
                procs: &procs,
                reload_pending: self.pending_reload.is_some(),
                upgrade_in_progress: self.upgrade.as_ref().is_some_and(|u| !u.abandoned),
            },
            Instant::now(),
        );
        self.phase = Phase::Stopping {
            deadline: start.deadline,
            fast,
            killed: false,
        };
        self.systemd_stopping(fast);
        if let Some(p) = self.pending_reload.as_mut().filter(|_| start.fail_reload) {
            let clients = std::mem::take(&mut p.clients);
            let why = format!("{}; then the master began to stop", p.message);
            self.answer_reload(&clients, Err(&why));
        }
        if let Some(l) = self.listeners.take() {
            l.close();
        }
        if let Some(u) = self.upgrade.as_mut().filter(|_| start.abandon_upgrade) {
            warn!(
                pid = u.pid.as_raw(),
                "upgrade: stopping before the new master was ready; stopping it too"
            );
            u.abandon(start.signal);
        }
        self.apps_told_to_stop = start.apps_told;
        for pid in start.signal_now {
            let _ = kill(pid, start.signal);
        }
    }

    /// Every live child process, and whether it is an app host.
    fn live_processes(&self) -> Vec<(Pid, bool)> {
        self.procs
            .iter()
            .map(|(pid, p)| (*pid, is_app(p.id)))
            .collect()
    }

    /// During a graceful stop: once the last HTTP worker has exited, the app processes drain.
    fn stop_apps_after_http(&mut self) {
        if let Some(pids) = stop::apps_to_stop(self.apps_told_to_stop, &self.live_processes()) {
            self.apps_told_to_stop = true;
            for pid in pids {
                let _ = kill(pid, protocol::DRAIN);
            }
        }
    }

    fn enforce_stop_deadline(&mut self) {
        let Phase::Stopping {
            deadline,
            fast,
            killed: false,
        } = self.phase
        else {
            return;
        };
        if !stop::kill_the_rest(deadline, false, Instant::now()) {
            return;
        }
        warn!(
            workers = self.procs.len(),
            "workers still running after the stop timeout; killing them"
        );
        for (pid, proc) in self.procs.iter_mut() {
            proc.killed_by_us = true;
            let _ = kill(*pid, Signal::SIGKILL);
        }
        self.phase = Phase::Stopping {
            deadline,
            fast,
            killed: true,
        };
    }
}
