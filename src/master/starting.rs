//! Starting a master: the signal handlers first, then the listeners (an upgrading master's,
//! systemd's, or bound here), the control socket and pidfile, the runtime directory, the
//! scoreboard and the rate table, the metrics thread; nothing is spawned yet. Every error here
//! exits 1 with its message.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use signal_hook::consts::signal::{SIGTTIN, SIGTTOU};
use signal_hook::iterator::backend::SignalDelivery;
use signal_hook::iterator::exfiltrator::SignalOnly;
use tracing::info;
use worker::cluster::Janitor;
use worker::config::{default_workers, AcceptMode, Config};
use worker::ratelimit::RateTable;
use worker::scoreboard::Scoreboard;

use super::slots::slots_for;
use super::{
    requests, systemd, Master, Phase, Reload, HANDLED_SIGNALS, RATE_SWEEP_EVERY,
    SCOREBOARD_CAPACITY,
};
use crate::listeners::Listeners;
use crate::logging::LevelHandle;
use crate::metrics::Metrics;
use crate::runtime_dir::RuntimeDir;
use crate::spawn;
use crate::sys;
use crate::upgrade::{Handover, SelfExec};

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
    rates.configure(config.limits.rate.is_some(), config.limits.idle_ttl);
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
        reload_failures: 0,
        last_reload_error: None,
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
pub(super) type Signals = SignalDelivery<UnixStream, SignalOnly>;

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
                config.server.unix_mode.0,
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
        config.server.unix_mode.0,
    )
    .context("cannot take over the listeners of the upgrading master")?;
    info!(
        old_master = h.parent,
        sockets, "upgrade: took over the listeners of the old master"
    );
    Ok((listeners, Some((ready, h.parent))))
}

/// The count `-w` names: app processes with `app.command`, HTTP workers otherwise.
pub(super) fn workers_of(config: &Config) -> u32 {
    config.server.workers.unwrap_or_else(default_workers)
}

pub(super) fn log_listeners(listeners: &Listeners, mode: AcceptMode) {
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
