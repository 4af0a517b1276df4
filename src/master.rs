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

use std::collections::{HashMap, VecDeque};
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
use worker::cluster::Janitor;
use worker::config::{default_workers, AcceptMode, Config};
use worker::protocol;
use worker::ratelimit::RateTable;
use worker::scoreboard::{monotonic_ms, Kind, RecycleReason, Scoreboard, SlotState};

use crate::control::ControlServer;
use crate::listeners::Listeners;
use crate::logging::LevelHandle;
use crate::metrics::{Death, Metrics};
use crate::pidfile::PidFile;
use crate::recycle::{self, Observed, Plan};
use crate::runtime_dir::RuntimeDir;
use crate::spawn::{self, SpawnRequest};
use crate::upgrade::{self, Handover, SelfExec};
use crate::{rss, sys};

mod health;
mod reloading;
mod requests;
mod slots;
mod stop;
mod systemd;
mod upgrading;

use health::Health;
use reloading::PendingReload;
use slots::{backoff, is_app, slots_for, Exited, Shown, Verdict, WorkerSlot, APP_IDS};

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

fn unix_mode(config: &Config) -> Result<u32> {
    u32::from_str_radix(&config.server.unix_mode, 8).with_context(|| {
        format!(
            "server.unix_mode {:?} is not octal",
            config.server.unix_mode
        )
    })
}

/// The count `-w` names: app processes with `app.command`, HTTP workers otherwise.
fn workers_of(config: &Config) -> u32 {
    config.server.workers.unwrap_or_else(default_workers)
}

fn log_listeners(listeners: &Listeners, mode: AcceptMode) {
    let mode = if listeners.is_adopted() {
        AcceptMode::Shared // systemd's sockets: one per address
    } else {
        mode
    };
    let accept = match mode {
        AcceptMode::Reuseport => "reuseport",
        AcceptMode::Shared => "shared",
    };
    for (addr, sockets) in listeners.addresses() {
        info!(addr = %addr, sockets, accept = %accept, "listening");
    }
}

/// Builds the master: binds every listener, creates the scoreboard, installs signal handling.
/// Nothing is spawned yet; errors here exit 1 with the message.
pub fn setup(
    config: Config,
    reload: Reload,
    log_level: LevelHandle,
    self_exec: SelfExec,
    mut handover: Option<Handover>,
) -> Result<Master> {
    // Signals first: one that comes while the rest is set up (a HUP from a service manager, a
    // TERM) waits for the loop instead of killing the master with its default action.
    let (signals, ttin, ttou) = install_signals()?;

    // The metrics socket of an upgrading master, taken over only for the same metrics.bind
    // (otherwise closed, and metrics.bind bound as configured).
    let handed_metrics = match handover.as_mut().and_then(|h| h.metrics.take()) {
        Some((bind, fd)) => {
            let socket = crate::listeners::inherited_listener(
                fd,
                "the metrics socket handed over by the old master",
            )?;
            (bind == config.metrics.bind).then(|| std::net::TcpListener::from(socket))
        }
        None => None,
    };
    let workers = workers_of(&config);
    let processes = config.processes(workers);
    // An upgrading master's pidfile names a live master (it): not a second instance.
    if handover.is_none() {
        requests::refuse_if_pidfile_live(&config)?;
    }
    let (listeners, upgrade_ready) = take_listeners(&config, processes.http, handover)?;
    log_listeners(&listeners, config.server.accept);
    // The new master of an upgrade takes the control socket and the pidfile over once it is
    // ready (`maybe_announce_ready`): until then they are the old master's, which may go on.
    let (control, pidfile) = if upgrade_ready.is_some() {
        (None, None)
    } else {
        let (control, pidfile) = requests::claim_control_and_pidfile(&config)?;
        (Some(control), pidfile)
    };
    let mut runtime_dir = RuntimeDir::create(&config.server.runtime_dir)?;
    runtime_dir.share_with(&config.server)?;
    let (board, board_fd) =
        Scoreboard::create(SCOREBOARD_CAPACITY, config.limits.max_concurrent_requests)
            .context("cannot create the scoreboard")?;
    let (rates, rates_fd) = RateTable::create(config.limits.max_active_instances)
        .context("cannot create the rate table")?;
    rates.configure(!config.limits.rate.is_empty(), config.limits.idle_ttl);
    let janitor = Janitor::start(&config, board.header().instance.load(Ordering::Relaxed));
    // The new master of an upgrade serves the metrics once it takes over (see `Metrics::gate`).
    let metrics = Metrics::start(
        &config.metrics,
        &board_fd,
        handed_metrics,
        upgrade_ready.is_none(),
    )?;
    // Opened here once so that a bad path is a clear startup error, not a worker crash loop,
    // and given to server.user, who opens it in the workers.
    crate::run_as::prepare_access_file(&config).map_err(anyhow::Error::msg)?;

    Ok(Master {
        config_fd: spawn::config_fd(&config)?,
        config,
        config_gen: 0,
        pending_reload: None,
        reload,
        log_level,
        listeners: Some(listeners),
        board,
        board_fd,
        rates,
        rates_fd,
        janitor,
        metrics,
        signals,
        ttin,
        ttou,
        slots: slots_for(processes),
        procs: HashMap::new(),
        recycle_queue: VecDeque::new(),
        next_rss_sample: Instant::now(),
        next_rate_sweep: Instant::now() + RATE_SWEEP_EVERY,
        phase: Phase::Running,
        apps_told_to_stop: false,
        announced_ready: false,
        exit_code: 0,
        runtime_dir,
        self_exec,
        upgrade: None,
        handed_over_to: None,
        upgrade_ready,
        systemd: systemd::Systemd::from_env(),
        control,
        pidfile,
    })
}

/// The signals the master acts on, delivered on a pipe its loop polls.
type Signals = SignalDelivery<UnixStream, SignalOnly>;

/// The master's signal handlers: the signals it acts on arrive on a pipe its loop polls; TTIN
/// and TTOU are counted (several may come between two turns).
fn install_signals() -> Result<(Signals, Arc<AtomicUsize>, Arc<AtomicUsize>)> {
    let (read, write) = UnixStream::pair().context("cannot create the signal pipe")?;
    read.set_nonblocking(true)?;
    write.set_nonblocking(true)?;
    let signals = SignalDelivery::with_pipe(read, write, SignalOnly, HANDLED_SIGNALS)
        .context("cannot install signal handlers")?;
    let ttin = Arc::new(AtomicUsize::new(0));
    let ttou = Arc::new(AtomicUsize::new(0));
    sys::count_signal(SIGTTIN, ttin.clone()).context("cannot install signal handlers")?;
    sys::count_signal(SIGTTOU, ttou.clone()).context("cannot install signal handlers")?;
    Ok((signals, ttin, ttou))
}

/// The listening sockets: an upgrading master's first (with the pipe on which to tell it this
/// master is ready, and its pid); else those systemd passed; else bound here.
fn take_listeners(
    config: &Config,
    http: u32,
    handover: Option<Handover>,
) -> Result<(Listeners, Option<(OwnedFd, u32)>)> {
    let Some(h) = handover else {
        let listeners = match crate::activation::from_env()? {
            Some(sockets) => Listeners::adopt(sockets),
            None => Listeners::bind(
                &config.server.bind,
                config.server.accept,
                http,
                config.server.backlog,
                unix_mode(config)?,
            )?,
        };
        return Ok((listeners, None));
    };
    let ready = sys::inherited_fd(h.ready_fd, "upgrade readiness pipe")
        .context("cannot take over from the upgrading master")?;
    let sockets: usize = h
        .listeners
        .iter()
        .map(|g| g.fds.iter().flatten().count())
        .sum();
    let listeners = Listeners::inherit(
        h.listeners,
        h.adopted,
        &config.server.bind,
        config.server.accept,
        http,
        config.server.backlog,
        unix_mode(config)?,
    )
    .context("cannot take over the listeners of the upgrading master")?;
    info!(
        old_master = h.parent,
        sockets, "upgrade: took over the listeners of the old master"
    );
    Ok((listeners, Some((ready, h.parent))))
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

    /// Starts every worker number that has no process and whose backoff (if any) has passed.
    fn spawn_due(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            let slot = &self.slots[i];
            if slot.pid.is_some() || slot.respawn_at.is_some_and(|t| t > now) {
                continue;
            }
            match self.spawn(slot.id, false) {
                Ok(pid) => {
                    self.slots[i].pid = Some(pid);
                    self.slots[i].respawn_at = None;
                }
                Err(e) => {
                    self.slots[i].failures += 1;
                    let (id, failures) = (self.slots[i].id, self.slots[i].failures);
                    let delay = self.schedule_respawn(i, backoff(failures));
                    error!(worker.id = %Shown(id), retry_in = ?delay, "cannot start worker: {e:#}");
                    if self.boot_failures_fatal(id, failures) {
                        return;
                    }
                }
            }
        }
    }

    /// Starts a process for worker number `id` (its slot's generation advances). The caller
    /// decides whether it is the slot's process or a successor.
    fn spawn(&mut self, id: u32, hold: bool) -> Result<Pid> {
        let Some(record) = self.free_record() else {
            bail!("scoreboard full ({SCOREBOARD_CAPACITY} records)");
        };
        let index = self.slot_index(id).context("no such worker number")?;
        let generation = self.slots[index].generation;
        let app_host = is_app(id);
        let listen_fds = if app_host {
            Vec::new()
        } else {
            self.listeners
                .as_mut()
                .context("listeners are closed")?
                .fds_for(id)?
        };
        let started = Instant::now();
        let mut plan = Plan::draw(&self.config.worker, started);
        if self.config.app_pool() && !app_host {
            // `max_requests` is the app's (gunicorn's meaning): an HTTP worker in front of app
            // processes leaks nothing by serving, and at thousands of requests a second its own
            // count would recycle it several times a second.
            plan.max_requests = 0;
        }
        // Identity first, pid after the fork: the worker only ever moves the state forward from
        // Booting, so the master must not write the state once the worker may be running.
        let rec = self.board.slot(record);
        let number = if app_host { id - APP_IDS } else { id };
        let kind = if app_host { Kind::App } else { Kind::Http };
        rec.kind.store(kind as u32, Ordering::Relaxed);
        rec.worker_id.store(number, Ordering::Relaxed);
        self.board
            .header()
            .records_used
            .fetch_max(record as u32 + 1, Ordering::AcqRel);
        rec.generation.store(generation, Ordering::Relaxed);
        rec.started_ms.store(monotonic_ms(), Ordering::Relaxed);
        rec.heartbeat_ms.store(monotonic_ms(), Ordering::Relaxed);
        rec.set_state(SlotState::Booting);
        let spawned = spawn::spawn_worker(SpawnRequest {
            id: number,
            app_host,
            slot: record,
            listen_fds: &listen_fds,
            scoreboard: &self.board_fd,
            rates: &self.rates_fd,
            config: &self.config_fd,
            max_requests: plan.max_requests,
            hold,
            runtime_dir: self.runtime_dir.apps(),
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
            worker.id = %Shown(id),
            pid = spawned.pid.as_raw(),
            generation,
            "worker spawned"
        );
        self.slots[index].generation += 1;
        self.procs.insert(
            spawned.pid,
            Proc {
                id,
                record,
                pipe: Some(spawned.pipe),
                acked: false,
                started,
                config_gen: self.config_gen,
                plan,
                observed: Observed::default(),
                killed_by_us: false,
                hung: false,
                held: hold,
                retiring: None,
            },
        );
        Ok(spawned.pid)
    }

    /// A scoreboard record that no live process uses.
    fn free_record(&self) -> Option<usize> {
        (0..self.board.capacity()).find(|&r| {
            self.board.slot(r).state() == SlotState::Free
                && !self.procs.values().any(|p| p.record == r)
        })
    }

    /// Hung workers, memory samples, recycle triggers and drain deadlines.
    fn check_workers(&mut self) {
        let now = Instant::now();
        let now_ms = monotonic_ms();
        let sample = now >= self.next_rss_sample;
        if sample {
            self.next_rss_sample = now + self.config.worker.rss_interval;
        }
        if now >= self.next_rate_sweep {
            self.next_rate_sweep = now + RATE_SWEEP_EVERY;
            let cleared = self.rates.sweep();
            if cleared > 0 {
                debug!(clients = cleared, "rate table: forgot idle clients");
            }
        }
        let mut due = Vec::new();
        for (pid, proc) in self.procs.iter_mut() {
            let rec = self.board.slot(proc.record);
            // A booting worker is timed from its spawn (the master sets its first heartbeat).
            let age = now_ms.saturating_sub(rec.heartbeat_ms.load(Ordering::Relaxed));
            let pulse = health::Pulse {
                heartbeat_age: Duration::from_millis(age),
                hung: proc.hung,
                retiring: proc.retiring,
                killed_by_us: proc.killed_by_us,
            };
            match health::check(&pulse, self.config.worker.timeout, now) {
                Health::Fine => {}
                Health::Draining => continue,
                Health::Hung => {
                    let doing: Vec<String> = rec
                        .requests_in_flight()
                        .into_iter()
                        .map(|(started, what)| {
                            format!("{what} ({}ms)", now_ms.saturating_sub(started))
                        })
                        .collect();
                    error!(
                        worker.id = %Shown(proc.id),
                        pid = pid.as_raw(),
                        heartbeat_age_ms = age,
                        requests.inflight = rec.inflight.load(Ordering::Relaxed),
                        requests = ?doing,
                        "worker hung: no heartbeat for longer than worker.timeout; killing it"
                    );
                    proc.hung = true;
                    proc.killed_by_us = true;
                    rec.recycle_reason
                        .store(RecycleReason::Hung as u32, Ordering::Relaxed);
                    let _ = kill(*pid, Signal::SIGKILL);
                    continue;
                }
                Health::DrainOverdue(reason) => {
                    warn!(
                        worker.id = %Shown(proc.id),
                        pid = pid.as_raw(),
                        reason = %reason.as_str(),
                        "worker still draining after server.graceful_timeout; killing it"
                    );
                    proc.killed_by_us = true;
                    let _ = kill(*pid, Signal::SIGKILL);
                    continue;
                }
            }
            if sample {
                let bytes = rss::tree_rss(pid.as_raw() as u32);
                rec.rss_bytes.store(bytes, Ordering::Relaxed);
                recycle::sample_rss(&self.config.worker, &mut proc.observed, bytes);
            }
            if proc.acked {
                if let Some(reason) = recycle::due(
                    &self.config.worker,
                    &proc.plan,
                    &proc.observed,
                    proc.started,
                    now,
                ) {
                    due.push((proc.id, *pid, reason));
                }
            }
        }
        for (id, pid, reason) in due {
            self.request_recycle(id, pid, reason, now);
        }
    }

    /// Asks for worker number `id`'s process `pid` to be replaced.
    fn request_recycle(&mut self, id: u32, pid: Pid, reason: RecycleReason, not_before: Instant) {
        let Some(i) = self.slot_index(id) else { return };
        let slot = &mut self.slots[i];
        if slot.pid != Some(pid) || slot.recycle.is_some() || slot.successor.is_some() {
            return; // not its current process, or already being replaced
        }
        slot.recycle = Some((reason, not_before));
        self.recycle_queue.push_back(id);
        if let Some(p) = self.procs.get(&pid) {
            self.board
                .slot(p.record)
                .recycle_reason
                .store(reason as u32, Ordering::Relaxed);
        }
        debug!(worker.id = %Shown(id), pid = pid.as_raw(), reason = %reason.as_str(), "recycle requested");
    }

    /// Starts replacements for queued recycles, at most `max_recycling` at a time (see
    /// `slots::plan_replacements`).
    fn start_replacements(&mut self) {
        if self.recycle_queue.is_empty() {
            return;
        }
        let now = Instant::now();
        let room = slots::Room {
            limit: self.config.worker.max_recycling as usize,
            extra_apps: self.extra_app_processes(),
            booting_http: self
                .slots
                .iter()
                .filter(|s| !is_app(s.id))
                .filter_map(|s| s.successor)
                .filter(|p| self.procs.get(p).is_some_and(|p| !p.acked))
                .count(),
            app_pool: self.config.app_pool(),
            reload_unproved: self.pending_reload.is_some(),
        };
        let queue = std::mem::take(&mut self.recycle_queue);
        let (start, mut waiting) =
            slots::plan_replacements(queue, &mut self.slots, room, is_app, now);
        for (i, hold) in start {
            let id = self.slots[i].id;
            let Some((reason, _)) = self.slots[i].recycle else {
                continue;
            };
            match self.spawn(id, hold) {
                Ok(pid) => {
                    info!(
                        worker.id = %Shown(id),
                        pid = pid.as_raw(),
                        reason = %reason.as_str(),
                        "starting a replacement"
                    );
                    self.slots[i].successor = Some(pid);
                }
                Err(e) => {
                    self.slots[i].failures += 1;
                    let delay = backoff(self.slots[i].failures);
                    self.slots[i].recycle = Some((reason, now + delay));
                    error!(worker.id = %Shown(id), retry_in = ?delay, "cannot start a replacement: {e:#}");
                    waiting.push_back(id);
                }
            }
        }
        self.recycle_queue = waiting;
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
    fn schedule_respawn(&mut self, index: usize, delay: Duration) -> Duration {
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
    fn boot_failures_fatal(&mut self, id: u32, failures: u32) -> bool {
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

    /// A worker reported ready: a successor takes over (and the old process drains), and the
    /// master announces readiness once every worker number has a ready process.
    fn on_ready(&mut self, id: u32, pid: Pid) {
        let Some(i) = self.slot_index(id) else { return };
        if let Some(l) = self.listeners.as_ref().filter(|_| !is_app(id)) {
            l.sync_backlog(id);
        }
        // Replacing a worker for max_requests: the old one serves up to its limit, sharing its
        // sockets with the ready replacement, and is drained when it reports the limit.
        let below_limit = self.slots[i]
            .pid
            .and_then(|old| self.procs.get(&old))
            .is_some_and(|old| !old.observed.max_requests_reached);
        if slots::takes_over_when_ready(&self.slots[i], pid, below_limit) {
            self.promote(i);
        }
        self.maybe_announce_ready();
    }

    /// The ready successor of slot `i` takes over; the process it replaces drains.
    fn promote(&mut self, i: usize) {
        let Some(slots::Promotion { next, old, reason }) = slots::promote(&mut self.slots[i])
        else {
            return;
        };
        self.release(next);
        if let Some(old) = old {
            self.retire(old, reason);
        }
        // Started before a reload that came while it booted: replace it in turn.
        if self
            .procs
            .get(&next)
            .is_some_and(|p| p.config_gen < self.config_gen)
        {
            let id = self.slots[i].id;
            self.request_recycle(id, next, RecycleReason::Reload, Instant::now());
        }
    }

    /// Lets a held process start accepting. Its record says `serving` from this moment (the
    /// process starts its accept loops within a tick of the signal), so that the scoreboard
    /// never shows a gap between it and the worker it replaces, which drains from now on.
    fn release(&mut self, pid: Pid) {
        if let Some(p) = self.procs.get_mut(&pid) {
            if p.held {
                p.held = false;
                self.board.slot(p.record).set_state(SlotState::Serving);
                let _ = kill(pid, protocol::RELEASE);
            }
        }
    }

    /// Tells a replaced process to drain; it is killed if still running after
    /// `server.graceful_timeout`.
    fn retire(&mut self, pid: Pid, reason: RecycleReason) {
        let deadline = Instant::now() + self.config.server.graceful_timeout;
        if let Some(p) = self.procs.get_mut(&pid) {
            p.retiring = Some((reason, deadline));
            self.board
                .slot(p.record)
                .recycle_reason
                .store(reason as u32, Ordering::Relaxed);
            debug!(worker.id = %Shown(p.id), pid = pid.as_raw(), reason = %reason.as_str(), "draining the replaced worker");
        }
        let _ = kill(pid, protocol::DRAIN);
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

    fn add_worker(&mut self) {
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
    fn set_worker_count(&mut self, workers: u32) {
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

    fn remove_worker(&mut self) {
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
    fn reopen_logs(&mut self) {
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

    /// The cause `supervisor_worker_deaths_total` counts a worker's unasked death under.
    fn death(self) -> Death {
        match self {
            Exit::Code(_) => Death::Exited,
            Exit::Signal(Signal::SIGKILL) => Death::Killed,
            Exit::Signal(_) => Death::Signaled,
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
    fn a_sigkill_we_did_not_send_is_called_out() {
        let theirs = Exit::Signal(Signal::SIGKILL).describe(false);
        assert!(theirs.contains("not sent by supervisor"), "{theirs}");
        let ours = Exit::Signal(Signal::SIGKILL).describe(true);
        assert!(ours.contains("from supervisor"), "{ours}");
    }
}
