//! The master: one single-threaded control loop that owns the listeners, the scoreboard, the
//! worker processes and the signals. It never touches a request.
//!
//! Single-threaded on purpose: `PR_SET_PDEATHSIG` fires when the *thread* that forked a worker
//! exits, so spawning from the only thread ties workers to the master's life; and forking a
//! process with no other threads cannot inherit a lock held elsewhere. The loop waits in
//! `poll(2)` on a signal self-pipe and the workers' readiness pipes, with a timeout for the next
//! timer (a delayed respawn, a stop deadline).

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use signal_hook::consts::signal::*;
use signal_hook::iterator::backend::SignalDelivery;
use signal_hook::iterator::exfiltrator::SignalOnly;
use tracing::{debug, error, info, warn};
use worker::config::{default_workers, AcceptMode, Config};
use worker::scoreboard::{monotonic_ms, Scoreboard, SlotState};

use crate::listeners::Listeners;
use crate::spawn::{self, SpawnRequest};
use crate::sys;

/// Scoreboard records: room for the largest worker count plus as many replacements again.
const SCOREBOARD_CAPACITY: usize = 2048;
/// Consecutive failed boots of one worker, while no worker serves, before the master gives up.
const MAX_BOOT_FAILURES: u32 = 5;
/// First respawn delay after a crash; doubles per consecutive failure.
const RESPAWN_BACKOFF_START: Duration = Duration::from_millis(100);
const RESPAWN_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A worker that served at least this long before dying is not part of a crash loop.
const STABLE_UPTIME: Duration = Duration::from_secs(10);
/// How long a fast stop (INT, QUIT) waits for workers before SIGKILL.
const FAST_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound on one `poll` wait, so a missed wake-up can never stall the loop for long.
const MAX_POLL_WAIT: Duration = Duration::from_secs(1);

/// One worker number (1..=workers) and its history across respawns.
struct WorkerSlot {
    id: u32,
    generation: u32,
    pid: Option<Pid>,
    /// Consecutive failures (boot failures and early crashes) for the backoff.
    failures: u32,
    respawn_at: Option<Instant>,
}

/// A live worker process.
struct Proc {
    id: u32,
    record: usize,
    ready: Option<OwnedFd>,
    acked: bool,
    started: Instant,
    /// We sent SIGKILL ourselves, so a SIGKILL death is ours and not the OOM killer's.
    killed_by_us: bool,
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
    config_json: String,
    listeners: Option<Listeners>,
    board: Scoreboard,
    board_fd: OwnedFd,
    signals: SignalDelivery<UnixStream, SignalOnly>,
    /// TTIN and TTOU received and not yet acted on.
    ttin: Arc<AtomicUsize>,
    ttou: Arc<AtomicUsize>,
    slots: Vec<WorkerSlot>,
    procs: HashMap<Pid, Proc>,
    phase: Phase,
    announced_ready: bool,
    exit_code: i32,
}

/// Builds the master: binds every listener, creates the scoreboard, installs signal handling.
/// Nothing is spawned yet; errors here exit 1 with the message.
pub fn setup(config: Config) -> Result<Master> {
    let workers = config.server.workers.unwrap_or_else(default_workers);
    let unix_mode = u32::from_str_radix(&config.server.unix_mode, 8).with_context(|| {
        format!(
            "server.unix_mode {:?} is not octal",
            config.server.unix_mode
        )
    })?;
    let listeners = Listeners::bind(
        &config.server.bind,
        config.server.accept,
        workers,
        config.server.backlog,
        unix_mode,
    )?;
    for (addr, sockets) in listeners.addresses() {
        let accept = match config.server.accept {
            AcceptMode::Reuseport => "reuseport",
            AcceptMode::Shared => "shared",
        };
        info!(addr = %addr, sockets, accept, "listening");
    }
    let (board, board_fd) =
        Scoreboard::create(SCOREBOARD_CAPACITY, config.limits.max_concurrent_requests)
            .context("cannot create the scoreboard")?;

    let (read, write) = UnixStream::pair().context("cannot create the signal pipe")?;
    read.set_nonblocking(true)?;
    write.set_nonblocking(true)?;
    let signals = SignalDelivery::with_pipe(
        read,
        write,
        SignalOnly,
        [
            SIGTERM, SIGINT, SIGQUIT, SIGCHLD, SIGHUP, SIGTTIN, SIGTTOU, SIGUSR1, SIGUSR2,
        ],
    )
    .context("cannot install signal handlers")?;
    let ttin = Arc::new(AtomicUsize::new(0));
    let ttou = Arc::new(AtomicUsize::new(0));
    sys::count_signal(SIGTTIN, ttin.clone()).context("cannot install signal handlers")?;
    sys::count_signal(SIGTTOU, ttou.clone()).context("cannot install signal handlers")?;

    let slots = (1..=workers)
        .map(|id| WorkerSlot {
            id,
            generation: 0,
            pid: None,
            failures: 0,
            respawn_at: None,
        })
        .collect();
    Ok(Master {
        config_json: spawn::config_json(&config),
        config,
        listeners: Some(listeners),
        board,
        board_fd,
        signals,
        ttin,
        ttou,
        slots,
        procs: HashMap::new(),
        phase: Phase::Running,
        announced_ready: false,
        exit_code: 0,
    })
}

impl Master {
    /// Runs until the master stops; returns the process exit code.
    pub fn run(mut self) -> i32 {
        info!(
            workers = self.slots.len(),
            pid = std::process::id(),
            "starting"
        );
        loop {
            self.reap();
            if let Phase::Stopping { .. } = self.phase {
                if self.procs.is_empty() {
                    break;
                }
                self.enforce_stop_deadline();
            } else {
                self.spawn_due();
                if self.phase != Phase::Running {
                    continue; // spawning gave up: go straight to stopping
                }
            }
            self.wait_for_events();
        }
        if let Some(l) = self.listeners.take() {
            l.close();
        }
        info!(code = self.exit_code, "stopped");
        self.exit_code
    }

    /// Starts every worker that has no process and whose backoff (if any) has passed.
    fn spawn_due(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            let slot = &self.slots[i];
            if slot.pid.is_some() || slot.respawn_at.is_some_and(|t| t > now) {
                continue;
            }
            if let Err(e) = self.spawn(i) {
                self.slots[i].failures += 1;
                let (id, failures) = (self.slots[i].id, self.slots[i].failures);
                let delay = self.schedule_respawn(i, backoff(failures));
                error!(worker.id = id, retry_in = ?delay, "cannot start worker: {e:#}");
                if self.boot_failures_fatal(failures) {
                    return;
                }
            }
        }
    }

    fn spawn(&mut self, index: usize) -> Result<()> {
        let Some(record) = self.free_record() else {
            bail!("scoreboard full ({SCOREBOARD_CAPACITY} records)");
        };
        let id = self.slots[index].id;
        let generation = self.slots[index].generation;
        let listen_fds = self
            .listeners
            .as_mut()
            .context("listeners are closed")?
            .fds_for(id)?;
        // Identity first, pid after the fork: the worker only ever moves the state forward from
        // Booting, so the master must not write the state once the worker may be running.
        let rec = self.board.slot(record);
        rec.worker_id.store(id, Ordering::Relaxed);
        rec.generation.store(generation, Ordering::Relaxed);
        rec.started_ms.store(monotonic_ms(), Ordering::Relaxed);
        rec.heartbeat_ms.store(monotonic_ms(), Ordering::Relaxed);
        rec.set_state(SlotState::Booting);
        let spawned = spawn::spawn_worker(SpawnRequest {
            id,
            slot: record,
            listen_fds: &listen_fds,
            scoreboard: &self.board_fd,
            config_json: &self.config_json,
        });
        let spawned = match spawned {
            Ok(s) => s,
            Err(e) => {
                self.board.reclaim(record);
                return Err(e);
            }
        };
        rec.pid
            .store(spawned.pid.as_raw() as u32, Ordering::Release);
        debug!(
            worker.id = id,
            pid = spawned.pid.as_raw(),
            generation,
            "worker spawned"
        );
        let slot = &mut self.slots[index];
        slot.pid = Some(spawned.pid);
        slot.generation += 1;
        slot.respawn_at = None;
        self.procs.insert(
            spawned.pid,
            Proc {
                id,
                record,
                ready: Some(spawned.ready),
                acked: false,
                started: Instant::now(),
                killed_by_us: false,
            },
        );
        Ok(())
    }

    /// A scoreboard record that no live process uses.
    fn free_record(&self) -> Option<usize> {
        (0..self.board.capacity()).find(|&r| {
            self.board.slot(r).state() == SlotState::Free
                && !self.procs.values().any(|p| p.record == r)
        })
    }

    /// Reaps every exited child without blocking. The master is the only reaper.
    fn reap(&mut self) {
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
                continue; // not a worker (cannot happen today: we start no other children)
            };
            self.on_exit(pid, proc, exit);
        }
    }

    fn on_exit(&mut self, pid: Pid, proc: Proc, exit: Exit) {
        let returned = self.board.reclaim(proc.record);
        let uptime = proc.started.elapsed();
        let stopping = matches!(self.phase, Phase::Stopping { .. });
        let slot_index = self.slots.iter().position(|s| s.pid == Some(pid));
        if let Some(i) = slot_index {
            self.slots[i].pid = None;
        }
        if returned > 0 {
            warn!(
                worker.id = proc.id,
                pid = pid.as_raw(),
                permits = returned,
                "returned host-wide permits held by the dead worker"
            );
        }
        let how = exit.describe(proc.killed_by_us);
        if stopping || slot_index.is_none() {
            if exit.is_clean() {
                info!(worker.id = proc.id, pid = pid.as_raw(), "worker stopped");
            } else {
                warn!(
                    worker.id = proc.id,
                    pid = pid.as_raw(),
                    "worker stopped: {how}"
                );
            }
            return;
        }
        let i = slot_index.expect("checked above");
        if !proc.acked {
            self.slots[i].failures += 1;
            let failures = self.slots[i].failures;
            let delay = self.schedule_respawn(i, backoff(failures));
            error!(
                worker.id = proc.id,
                pid = pid.as_raw(),
                failures,
                retry_in = ?delay,
                "worker failed to boot: {how}"
            );
            self.boot_failures_fatal(failures);
            return;
        }
        let slot = &mut self.slots[i];
        if uptime >= STABLE_UPTIME {
            slot.failures = 0;
        } else {
            slot.failures += 1;
        }
        let delay = match slot.failures {
            0 => Duration::ZERO,
            n => backoff(n),
        };
        let delay = self.schedule_respawn(i, delay);
        error!(
            worker.id = proc.id,
            pid = pid.as_raw(),
            uptime = ?uptime,
            respawn_in = ?delay,
            "worker died: {how}"
        );
    }

    /// Sets when worker slot `index` is started again. A slot left empty for a while gives up
    /// its reuseport sockets meanwhile (see `Listeners::release`); an immediate respawn keeps
    /// them, so the replacement inherits the connections already queued.
    fn schedule_respawn(&mut self, index: usize, delay: Duration) -> Duration {
        let slot = &mut self.slots[index];
        slot.respawn_at = Some(Instant::now() + delay);
        if !delay.is_zero() {
            if let Some(l) = self.listeners.as_mut() {
                l.release(slot.id);
            }
        }
        delay
    }

    /// After a boot failure: if nothing serves and this worker keeps failing, further retries
    /// would only spin, so stop with one clear error and exit 1.
    fn boot_failures_fatal(&mut self, failures: u32) -> bool {
        let serving = self.procs.values().any(|p| p.acked);
        if failures >= MAX_BOOT_FAILURES && !serving {
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

    fn wait_for_events(&mut self) {
        let now = Instant::now();
        let mut wait = MAX_POLL_WAIT;
        match self.phase {
            Phase::Running => {
                for t in self.slots.iter().filter_map(|s| s.respawn_at) {
                    wait = wait.min(t.saturating_duration_since(now));
                }
            }
            Phase::Stopping {
                deadline, killed, ..
            } if !killed => wait = wait.min(deadline.saturating_duration_since(now)),
            Phase::Stopping { .. } => {}
        }
        // Round up so we do not wake a hair before a timer and spin.
        let ms = wait.as_millis().min(u16::MAX as u128) as u16 + u16::from(!wait.is_zero());

        let pids: Vec<Pid> = self
            .procs
            .iter()
            .filter(|(_, p)| p.ready.is_some())
            .map(|(pid, _)| *pid)
            .collect();
        let readable: Vec<bool> = {
            let mut fds = Vec::with_capacity(pids.len() + 1);
            fds.push(PollFd::new(
                self.signals.get_read().as_fd(),
                PollFlags::POLLIN,
            ));
            for pid in &pids {
                let fd = self.procs[pid].ready.as_ref().expect("filtered above");
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
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
            self.on_ready_pipe(*pid);
        }
        if readable[0] {
            self.on_signals();
        }
    }

    fn on_ready_pipe(&mut self, pid: Pid) {
        let Some(proc) = self.procs.get_mut(&pid) else {
            return;
        };
        let mut buf = [0u8; 16];
        let n = match proc.ready.as_ref() {
            Some(fd) => nix::unistd::read(fd, &mut buf).unwrap_or(0),
            None => return,
        };
        if n == 0 {
            proc.ready = None; // EOF: the worker closed it (after the ACK, or by dying)
            return;
        }
        if buf[..n].contains(&b'R') && !proc.acked {
            proc.acked = true;
            info!(
                worker.id = proc.id,
                pid = pid.as_raw(),
                boot = ?proc.started.elapsed(),
                "worker ready"
            );
            self.maybe_announce_ready();
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
            info!(workers = self.slots.len(), "ready");
        }
    }

    fn on_signals(&mut self) {
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
                SIGHUP => warn!("HUP: configuration reload is not implemented yet; ignored"),
                SIGUSR1 => info!("USR1: logs go to stderr; nothing to reopen"),
                SIGUSR2 => warn!("USR2: binary upgrade is not implemented yet; ignored"),
                other => debug!(signal = other, "ignored signal"),
            }
        }
    }

    fn add_worker(&mut self) {
        if self.phase != Phase::Running {
            return;
        }
        let id = self.slots.iter().map(|s| s.id).max().unwrap_or(0) + 1;
        self.slots.push(WorkerSlot {
            id,
            generation: 0,
            pid: None,
            failures: 0,
            respawn_at: None,
        });
        info!(workers = self.slots.len(), "TTIN: one worker more");
    }

    fn remove_worker(&mut self) {
        if self.phase != Phase::Running || self.slots.len() <= 1 {
            if self.slots.len() <= 1 {
                warn!("TTOU: already at one worker; ignored");
            }
            return;
        }
        let slot = self.slots.pop().expect("more than one slot");
        if let Some(l) = self.listeners.as_mut() {
            l.release(slot.id);
        }
        if let Some(pid) = slot.pid {
            let _ = kill(pid, Signal::SIGTERM);
        }
        info!(workers = self.slots.len(), "TTOU: one worker fewer");
    }

    /// Starts a stop: graceful (TERM to workers, wait `graceful_timeout`) or fast (QUIT, wait a
    /// few seconds). The master's copies of the listeners close at once, so nothing new is
    /// queued on a socket no worker will serve; workers drain what is already queued.
    fn begin_stop(&mut self, fast: bool) {
        let wait = if fast {
            FAST_STOP_TIMEOUT
        } else {
            self.config.server.graceful_timeout
        };
        self.phase = Phase::Stopping {
            deadline: Instant::now() + wait,
            fast,
            killed: false,
        };
        if let Some(l) = self.listeners.take() {
            l.close();
        }
        let sig = if fast {
            Signal::SIGQUIT
        } else {
            Signal::SIGTERM
        };
        for pid in self.procs.keys() {
            let _ = kill(*pid, sig);
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
        if Instant::now() < deadline {
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

fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    RESPAWN_BACKOFF_START
        .saturating_mul(1 << exp)
        .min(RESPAWN_BACKOFF_MAX)
}

#[derive(Clone, Copy, Debug)]
enum Exit {
    Code(i32),
    Signal(Signal),
}

impl Exit {
    fn is_clean(self) -> bool {
        matches!(self, Exit::Code(0))
    }

    /// A worker's death in words, telling apart a crash from a kill nobody here sent.
    fn describe(self, killed_by_us: bool) -> String {
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
}

fn signal_name(sig: i32) -> &'static str {
    Signal::try_from(sig).map_or("?", |s| s.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(30), RESPAWN_BACKOFF_MAX);
    }

    #[test]
    fn a_sigkill_we_did_not_send_is_called_out() {
        let theirs = Exit::Signal(Signal::SIGKILL).describe(false);
        assert!(theirs.contains("not sent by supervisor"), "{theirs}");
        let ours = Exit::Signal(Signal::SIGKILL).describe(true);
        assert!(ours.contains("from supervisor"), "{ours}");
    }
}
