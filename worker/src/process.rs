//! The worker process around the server: runtime, readiness, heartbeat, parent watch, signals.
//!
//! Owns what `run` does in order: map the scoreboard, build the current_thread runtime, wrap the
//! inherited listeners, start serving, mark the record `Serving`, acknowledge on the pipe to the
//! master, then wait for a signal (TERM: graceful drain; INT, QUIT: exit at once; USR1: reopen
//! the log file) or for the master to disappear. With an app process, it starts it before
//! reporting ready and stops it last. It must not look at requests or connections; `server`
//! does that.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use tokio::signal::unix::{signal, SignalKind};

fn listen(sig: Signal) -> std::io::Result<tokio::signal::unix::Signal> {
    signal(SignalKind::from_raw(sig as i32))
}
use tokio::time::MissedTickBehavior;
use tracing::{debug, error, info, info_span, warn};

use crate::app::pool::AppPool;
use crate::app::proxy::Proxy;
use crate::config::{Config, Trusted, Upstream};
use crate::limits::cluster::Cluster;
use crate::listener::Listener;
use crate::protocol::{self, MasterPipe};
use crate::protocol::{WorkerArgs, EXIT_MASTER_GONE, EXIT_STARTUP};
use crate::serve::access_log::AccessLog;
use crate::serve::client_rate::ClientRate;
use crate::serve::server::{DrainSummary, Server};
use crate::serve::state::{Limiters, Worker};
use crate::shm::ratelimit::RateTable;
use crate::shm::scoreboard::{self, Scoreboard, Slot, SlotState};

/// How often the worker stamps `heartbeat_ms` in its record. The stamp is written by a task on
/// the event loop, so a loop blocked by a handler stops it, which is what the master's hang
/// detection looks for.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// How often the worker checks that its master is still its parent.
pub const PARENT_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// `limits.rate` over the master's table, if a rate is set: only the mapping can fail.
fn client_rate(
    config: &crate::config::Config,
    fd: &std::os::fd::OwnedFd,
    trusted: Trusted,
) -> std::io::Result<Option<ClientRate>> {
    let limits = &config.limits;
    let Some(rate) = limits.rate else {
        return Ok(None);
    };
    let key = limits.key.clone();
    Ok(Some(ClientRate::new(
        RateTable::open(fd, true)?,
        rate.count,
        rate.period,
        limits.burst,
        limits.idle_ttl,
        key,
        trusted,
    )))
}

pub(crate) fn run(args: WorkerArgs) -> ExitCode {
    let span = info_span!("worker", worker.id = args.id);
    // Entered for the whole run: with a current_thread runtime every task is polled on this
    // thread, inside `block_on`, so every event of the worker carries `worker.id`.
    let _entered = span.enter();

    let board = match Scoreboard::open(&args.scoreboard, true) {
        Ok(board) if args.slot < board.capacity() => board,
        Ok(board) => {
            error!(
                slot = args.slot,
                capacity = board.capacity(),
                "scoreboard record out of range"
            );
            return ExitCode::from(EXIT_STARTUP);
        }
        Err(e) => {
            error!(error = %e, "cannot map the scoreboard");
            return ExitCode::from(EXIT_STARTUP);
        }
    };
    // The mapping outlives the fd.
    drop(args.scoreboard);
    // Whose forwarding headers are believed, for `limits.rate` and the access log.
    let trusted = args.config.server.forwarded_allow_ips.clone();
    let rate = match client_rate(&args.config, &args.rates, trusted.clone()) {
        Ok(rate) => rate,
        Err(e) => {
            error!(error = %e, "cannot map the rate table");
            return ExitCode::from(EXIT_STARTUP);
        }
    };
    drop(args.rates);
    let instance = board.header().instance.load(Ordering::Relaxed);
    let cluster = match cluster_of(&args.config, rate.as_ref(), instance) {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "cannot use redis");
            return ExitCode::from(EXIT_STARTUP);
        }
    };

    // What needs root is done (the scoreboard and rate table mapped, Redis's TLS files read):
    // from here on the worker, and the app it starts, run as `server.user`.
    if let Err(e) = crate::privileges::drop_privileges(&args.config.server, args.master_pid) {
        error!("{e}");
        return ExitCode::from(EXIT_STARTUP);
    }

    let (runtime, master) = match event_loop_and_pipe(args.ready) {
        Ok(both) => both,
        Err(code) => return code,
    };
    let worker = Worker::new(
        &args.config,
        args.id,
        board,
        args.slot,
        master,
        args.max_requests,
        Limiters { rate, cluster },
    );
    // The config was checked by the master (and the file opened once), so only opening the
    // file can fail here.
    match AccessLog::new(&args.config.log, trusted, args.id) {
        Ok(Some(log)) => {
            let _ = worker.access.set(log);
        }
        Ok(None) => {}
        Err(e) => {
            error!(error = %e, "cannot open the access log");
            return ExitCode::from(EXIT_STARTUP);
        }
    }
    install_panic_hook();
    let code = runtime.block_on(serve(
        worker,
        args.listeners,
        args.master_pid,
        &args.config,
        args.runtime_dir.as_deref(),
        args.hold,
    ));
    // Dropping the runtime drops every remaining task, and with them their permits.
    drop(runtime);
    code
}

/// The cluster-wide limits through Redis (`limits.cluster_max_concurrent_requests`, and
/// `limits.rate` counted there), when Redis is configured and one of them is set.
fn cluster_of(
    config: &Config,
    rate: Option<&crate::serve::client_rate::ClientRate>,
    instance: u64,
) -> Result<Option<Cluster>, String> {
    let limits = &config.limits;
    let cluster_rate = rate.map(|r| r.gcra());
    if !config.redis.enabled(&config.sentinel)
        || (limits.cluster_max_concurrent_requests == 0 && cluster_rate.is_none())
    {
        return Ok(None);
    }
    Cluster::new(
        &config.redis,
        &config.sentinel,
        limits.cluster_max_concurrent_requests,
        limits.on_redis_error,
        cluster_rate,
        instance,
    )
    .map(Some)
    .map_err(|e| e.to_string())
}

async fn serve(
    worker: &'static Worker,
    fds: Vec<std::os::fd::OwnedFd>,
    master_pid: u32,
    config: &Config,
    runtime_dir: Option<&Path>,
    hold: bool,
) -> ExitCode {
    if let Some(cluster) = &worker.cluster {
        cluster.start(worker.admission.slot()).await;
    }
    serve_until_done(worker, fds, master_pid, config, runtime_dir, hold).await
}

async fn serve_until_done(
    worker: &'static Worker,
    fds: Vec<std::os::fd::OwnedFd>,
    master_pid: u32,
    config: &Config,
    runtime_dir: Option<&Path>,
    hold: bool,
) -> ExitCode {
    let slot = worker.admission.slot();
    // Signals first: from here on a TERM from the master drains instead of killing us, and a
    // USR1 (whose default action is to terminate) reopens the log instead.
    // USR2 releases a held worker (see below); a worker that is not held ignores it.
    let mut signals = match Signals::install() {
        Ok(s) => s,
        Err(code) => return code,
    };

    spawn_heartbeat(slot);
    // The app (a process or an upstream) before readiness: a worker is ready when its app is.
    // It may take up to `app.ready_timeout`: a stop meanwhile ends the boot (the app, if it
    // started, dies with this process).
    tokio::select! {
        started = start_app(worker, config, runtime_dir) => {
            if let Err(why) = started {
                error!("{why}");
                return ExitCode::from(EXIT_STARTUP)
            }
        }
        _ = signals.drain.recv() => {
            info!("SIGTERM while the app starts: exiting");
            return ExitCode::SUCCESS
        }
        _ = signals.int.recv() => return ExitCode::SUCCESS,
        _ = signals.exit_now.recv() => return ExitCode::SUCCESS,
    }
    let mut parent_check = tokio::time::interval(PARENT_CHECK_INTERVAL);
    parent_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let watch = Watch {
        worker,
        master_pid,
        log_file: config.log.file.as_str(),
    };
    if hold {
        if let Err(code) = watch.held(&mut signals, &mut parent_check).await {
            return code;
        }
    }

    // Only now, with the app up (and a held worker released), do this worker's own sockets
    // start listening: see `Listener::from_fd`.
    let mut listeners = Vec::with_capacity(fds.len());
    for fd in fds {
        match Listener::from_fd(fd, config.server.backlog) {
            Ok(l) => listeners.push(l),
            Err(e) => {
                error!(error = %e, "unusable listener");
                return ExitCode::from(EXIT_STARTUP);
            }
        }
    }
    let server = Server::start(worker, listeners);
    slot.set_state(SlotState::Serving);
    // The pipe stays open after this: `request` sends `MAX_REQUESTS` on it later.
    if !hold {
        if let Err(e) = worker.master.send(protocol::READY) {
            error!(error = %e, "cannot acknowledge readiness to the master");
            return ExitCode::from(EXIT_STARTUP);
        }
    }
    info!(pid = std::process::id(), "worker serving");
    let graceful_timeout = config.server.graceful_timeout;
    watch
        .serve(server, graceful_timeout, &mut signals, &mut parent_check)
        .await
}

/// What a serving worker watches besides its connections: the master's signals and the
/// master itself.
struct Watch<'a> {
    worker: &'static Worker,
    master_pid: u32,
    log_file: &'a str,
}

impl Watch<'_> {
    /// A held worker is the replacement of one that nears `max_requests`: it boots and
    /// reports ready, but accepts nothing until the master releases it (USR2) when the old
    /// worker has served its limit. Sharing the sockets earlier would split the old worker's
    /// traffic and leave the count of either to chance. `Err` with the exit status if it is
    /// stopped meanwhile.
    async fn held(
        &self,
        signals: &mut Signals,
        parent_check: &mut tokio::time::Interval,
    ) -> Result<(), ExitCode> {
        if let Err(e) = self.worker.master.send(protocol::READY) {
            error!(error = %e, "cannot acknowledge readiness to the master");
            return Err(ExitCode::from(EXIT_STARTUP));
        }
        debug!("worker ready; held until the master releases it");
        loop {
            tokio::select! {
                _ = signals.release.recv() => return Ok(()),
                _ = signals.drain.recv() => {
                    info!("SIGTERM while held: exiting");
                    return Err(ExitCode::SUCCESS);
                }
                _ = signals.int.recv() => return Err(ExitCode::SUCCESS),
                _ = signals.exit_now.recv() => return Err(ExitCode::SUCCESS),
                _ = signals.reopen_logs.recv() => reopen_worker_logs(self.log_file, self.worker),
                _ = parent_check.tick() => {
                    if master_gone(self.master_pid) {
                        return Err(ExitCode::from(EXIT_MASTER_GONE))
                    }
                }
            }
        }
    }

    /// Serves until a drain finishes (SIGTERM) or the master says to exit at once.
    async fn serve(
        &self,
        server: Server,
        graceful_timeout: std::time::Duration,
        signals: &mut Signals,
        parent_check: &mut tokio::time::Interval,
    ) -> ExitCode {
        let mut server = Some(server);
        let mut draining: Option<Pin<Box<dyn Future<Output = DrainSummary> + Send>>> = None;
        loop {
            tokio::select! {
                _ = signals.drain.recv() => match server.take() {
                    Some(s) => {
                        info!("SIGTERM: draining");
                        draining = Some(Box::pin(s.drain(graceful_timeout)));
                    }
                    None => info!("SIGTERM again: already draining"),
                },
                _ = signals.int.recv() => {
                    info!("SIGINT: exiting now");
                    return ExitCode::SUCCESS
                }
                _ = signals.exit_now.recv() => {
                    info!("SIGQUIT: exiting now");
                    return ExitCode::SUCCESS
                }
                _ = signals.reopen_logs.recv() => reopen_worker_logs(self.log_file, self.worker),
                _ = signals.release.recv() => debug!("SIGUSR2: not held; ignored"),
                _ = parent_check.tick() => {
                    if master_gone(self.master_pid) {
                        return ExitCode::from(EXIT_MASTER_GONE)
                    }
                }
                summary = async { draining.as_mut().expect("guarded").await }, if draining.is_some() => {
                    if summary.remaining > 0 {
                        warn!(connections.remaining = summary.remaining, "exiting after drain timeout");
                    }
                    return ExitCode::SUCCESS;
                }
            }
        }
    }
}

/// Sets up what requests go to when the app is not the built-in one: starts the app process
/// (`app.command`) and waits until it accepts connections, or points at `app.upstream`.
async fn start_app(
    worker: &'static Worker,
    config: &Config,
    runtime_dir: Option<&Path>,
) -> Result<(), String> {
    let app = &config.app;
    let trusted = config.server.forwarded_allow_ips.clone();
    let max_body = config.worker.max_body_bytes.bytes();
    let (target, pool) = if app.command.is_empty() {
        let Some(upstream) = app.upstream.clone() else {
            return Ok(());
        };
        info!(app.upstream = %upstream, "proxying to the upstream");
        (upstream, None)
    } else {
        // The app processes run apart (`apphost`); any of them takes any request.
        let dir = runtime_dir.ok_or("no runtime directory for the app processes")?;
        let pool = AppPool::new(
            app.concurrency,
            worker.admission.slot_index(),
            dir.to_path_buf(),
            app.pack_window,
        );
        // Ready once an app process is: until then its connections would only wait, while
        // those of a master it takes over from (an upgrade) are served at once.
        crate::app::pool::wait_for_an_app(worker.admission.board()).await;
        (Upstream::Unix(dir.to_path_buf()), Some(pool))
    };
    let proxy = Proxy::new(app, trusted, max_body, target, pool);
    if worker.proxy.set(proxy).is_err() {
        return Err("the app was set up twice".to_string());
    }
    Ok(())
}

/// A loopback port free right now, for `{port}`. (Another process may take it before the app
/// binds it; the app then fails to start, which is reported and retried.)
pub(crate) fn free_loopback_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Whether this worker was re-parented, i.e. its master is gone (logged once, here).
pub(crate) fn master_gone(master_pid: u32) -> bool {
    let ppid = nix::unistd::getppid().as_raw() as u32;
    if ppid == master_pid {
        return false;
    }
    error!(
        master.pid = master_pid,
        parent.pid = ppid,
        "master is gone; exiting"
    );
    true
}

/// SIGUSR1: after a log rotation, points stderr (where the log goes) at a fresh open of
/// `log.file`, and reopens `log.access_file` when the access log goes to a file. A failure is
/// logged and the worker keeps writing to the old file.
fn reopen_worker_logs(log_file: &str, worker: &Worker) {
    reopen_log_file(log_file);
    match worker.access.get().map(|log| log.reopen()) {
        Some(Ok(Some(path))) => info!(log.access_file = path, "SIGUSR1: access log reopened"),
        Some(Err(e)) => error!(
            error = %e,
            "SIGUSR1: cannot reopen the access log; still writing to the old file"
        ),
        Some(Ok(None)) | None => {}
    }
}

/// Stamps the record's heartbeat now and then every `HEARTBEAT_INTERVAL`, from a task on the
/// event loop (so a blocked loop stops it).
pub(crate) fn spawn_heartbeat(slot: &'static Slot) -> tokio::task::JoinHandle<()> {
    slot.heartbeat_ms
        .store(scoreboard::monotonic_ms(), Ordering::Relaxed);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
        // After a stall, resume the beat; don't fire a burst that would hide the gap.
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            slot.heartbeat_ms
                .store(scoreboard::monotonic_ms(), Ordering::Relaxed);
        }
    })
}

/// Routes panics into the log (as JSON when the log is JSON) instead of raw stderr. Panics in
/// request handlers are also caught and answered with 500 by the request path, which logs them
/// again with the request they belong to.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = crate::serve::request::panic_message(info.payload());
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        error!(panic.location = %location, panic.message = message, "panicked");
    }));
}

/// SIGUSR1's first half, for every kind of process the master runs: points stderr (where the log
/// goes) at a fresh open of `log.file`. A failure is logged and the old file kept.
pub(crate) fn reopen_log_file(log_file: &str) {
    if log_file.is_empty() {
        debug!("SIGUSR1: logging to stderr, no log file to reopen; ignored");
        return;
    }
    match crate::logfile::redirect_stderr(log_file) {
        Ok(()) => info!(log.file = log_file, "SIGUSR1: log file reopened"),
        Err(e) => error!(
            log.file = log_file,
            error = %e,
            "SIGUSR1: cannot reopen the log file; still logging to the old one"
        ),
    }
}

/// The single-threaded event loop and the pipe to the master, for every kind of process the
/// master runs; `Err` with the exit status once the reason is logged.
pub(crate) fn event_loop_and_pipe(
    ready: std::os::fd::OwnedFd,
) -> Result<(tokio::runtime::Runtime, MasterPipe), ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            error!(error = %e, "cannot start the event loop");
            ExitCode::from(EXIT_STARTUP)
        })?;
    let master = MasterPipe::new(ready).map_err(|e| {
        error!(error = %e, "unusable pipe to the master");
        ExitCode::from(EXIT_STARTUP)
    })?;
    Ok((runtime, master))
}

/// The signals the master sends (see `protocol`), handled from here on.
pub(crate) struct Signals {
    pub(crate) drain: tokio::signal::unix::Signal,
    /// SIGINT (a Ctrl-C reaches the whole process group): as [`protocol::EXIT_NOW`].
    pub(crate) int: tokio::signal::unix::Signal,
    pub(crate) exit_now: tokio::signal::unix::Signal,
    pub(crate) reopen_logs: tokio::signal::unix::Signal,
    pub(crate) release: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers, then lets USR1 and USR2 through: the master starts its children
    /// with those two blocked, so that one sent during the boot waits for its handler. Must be
    /// called inside the event loop; `Err` with the exit status once the reason is logged.
    pub(crate) fn install() -> Result<Signals, ExitCode> {
        let failed = |e: std::io::Error| {
            error!(error = %e, "cannot install signal handlers");
            ExitCode::from(EXIT_STARTUP)
        };
        let signals = Signals {
            drain: listen(protocol::DRAIN).map_err(failed)?,
            int: listen(Signal::SIGINT).map_err(failed)?,
            exit_now: listen(protocol::EXIT_NOW).map_err(failed)?,
            reopen_logs: listen(protocol::REOPEN_LOGS).map_err(failed)?,
            release: listen(protocol::RELEASE).map_err(failed)?,
        };
        let late = [protocol::REOPEN_LOGS, protocol::RELEASE];
        if let Err(e) = SigSet::from_iter(late).thread_unblock() {
            error!(error = %e, "cannot unblock USR1 and USR2");
            return Err(ExitCode::from(EXIT_STARTUP));
        }
        Ok(signals)
    }
}
