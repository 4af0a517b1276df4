//! An app host: the process the master runs for one app process of the pool (`app.command`).
//!
//! The master treats it as it treats an HTTP worker (spawn, readiness on the pipe, heartbeat,
//! held start, drain, recycling by `max_requests`, `max_rss`, `max_lifetime`, hang, crash
//! backoff), so the app processes get the whole lifecycle without a second one in the master.
//! The app host starts the app (`child`), passes its output to the log under `app.id`, and says
//! in its scoreboard record whether HTTP workers may send it requests ([`Slot::app_load`]): open
//! once the app is up (and a held host released), closed while the app restarts or once the
//! host drains. An HTTP worker that finds the app dead before the host does (a refused
//! connection, a kill for `app.kill_on_timeout`) closes it too, and the host leaves it closed
//! until it has restarted the app. It counts nothing on the request path: HTTP workers count
//! the requests they send it, which the host compares with its `max_requests`.
//!
//! Draining (SIGTERM): closed to new requests, it waits until the requests in flight to its app
//! are done (within `server.graceful_timeout`), then stops the app and exits.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, error, info, info_span, warn};

use crate::app::child::{AppProcess, Health, Launch};
use crate::config::{AppOutput, Config, Upstream};
use crate::process::Signals;
use crate::protocol::{self, MasterPipe};
use crate::protocol::{WorkerArgs, EXIT_MASTER_GONE, EXIT_STARTUP};
use crate::shm::scoreboard::{Scoreboard, Slot, SlotState};

/// How often the host looks at what HTTP workers wrote in its record: requests sent (for
/// `max_requests`), failed requests (the app may be unreachable), the end of a drain.
const LOOK_EVERY: Duration = Duration::from_millis(20);
/// How long an app that an HTTP worker closed to requests (see `pool::AppLease::unreachable`)
/// stays closed while this host sees it run: its death is seen long before.
const REOPEN_AFTER: Duration = Duration::from_secs(1);

pub(crate) fn run(args: WorkerArgs) -> ExitCode {
    let span = info_span!("app", app.id = args.id);
    let _entered = span.enter();
    let board = match Scoreboard::open(&args.scoreboard, true) {
        Ok(board) if args.slot < board.capacity() => board,
        Ok(_) => {
            error!(slot = args.slot, "scoreboard record out of range");
            return ExitCode::from(EXIT_STARTUP);
        }
        Err(e) => {
            error!(error = %e, "cannot map the scoreboard");
            return ExitCode::from(EXIT_STARTUP);
        }
    };
    drop(args.scoreboard);
    drop(args.rates);
    if let Err(e) = crate::privileges::drop_privileges(&args.config.server, args.master_pid) {
        error!("{e}");
        return ExitCode::from(EXIT_STARTUP);
    }
    let (runtime, master) = match crate::process::event_loop_and_pipe(args.ready) {
        Ok(both) => both,
        Err(code) => return code,
    };
    // The record lives as long as the process: the mapping is never unmapped before exit.
    let board: &'static Scoreboard = Box::leak(Box::new(board));
    let slot = board.slot(args.slot);
    let host = Host {
        slot,
        master,
        id: args.id,
        master_pid: args.master_pid,
        max_requests: args.max_requests,
        config: &args.config,
    };
    let code = runtime.block_on(host.serve(args.runtime_dir.as_deref(), args.hold));
    drop(runtime);
    code
}

struct Host<'a> {
    slot: &'static Slot,
    master: MasterPipe,
    id: u32,
    master_pid: u32,
    max_requests: u64,
    config: &'a Config,
}

/// What the app host keeps from one turn of its loop to the next.
#[derive(Default)]
struct Turns {
    /// Released (or never held): it may take requests.
    released: bool,
    /// Draining since then (SIGTERM).
    draining_since: Option<Instant>,
    /// After how many requests sent to the app the master is told to prepare a replacement.
    prepare_at: u64,
    told_soon: bool,
    told_reached: bool,
    /// The app's run of unanswered requests at the last look.
    failed_seen: u32,
    /// This host last opened the app (so, if it is closed, an HTTP worker closed it).
    opened: bool,
    /// Since when an HTTP worker has kept it closed.
    closed_by_worker: Option<Instant>,
}

impl Host<'_> {
    async fn serve(&self, runtime_dir: Option<&std::path::Path>, hold: bool) -> ExitCode {
        let mut signals = match Signals::install() {
            Ok(s) => s,
            Err(code) => return code,
        };
        crate::process::spawn_heartbeat(self.slot);
        self.slot.app_init(std::process::id());
        let app = match self.start_app(runtime_dir, &mut signals).await {
            Ok(app) => app,
            Err(code) => return code,
        };
        let released = !hold;
        if released {
            self.slot.set_state(SlotState::Serving);
        }
        debug!(held = hold, "app host ready");

        let mut health = app.health();
        let mut look = tokio::time::interval(LOOK_EVERY);
        look.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut parent_check = tokio::time::interval(crate::process::PARENT_CHECK_INTERVAL);
        parent_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut turns = Turns {
            released,
            prepare_at: protocol::prepare_at(
                self.max_requests,
                self.config.worker.max_requests_preboot,
            ),
            ..Turns::default()
        };
        loop {
            let now = health.borrow().clone();
            self.publish(&mut turns, &now);
            if let Some(since) = turns.draining_since {
                let grace = self.config.server.graceful_timeout;
                let done = self.slot.app_load().inflight == 0;
                if done || since.elapsed() >= grace {
                    if !done {
                        warn!(
                            requests.inflight = self.slot.app_load().inflight,
                            "requests still in flight to the app after server.graceful_timeout"
                        );
                    }
                    app.stop(app_grace(grace, since)).await;
                    return ExitCode::SUCCESS;
                }
            }
            tokio::select! {
                changed = health.changed() => {
                    if changed.is_err() {
                        error!("the app's supervising task ended");
                        return ExitCode::from(EXIT_STARTUP);
                    }
                }
                _ = look.tick() => self.look(&mut turns),
                _ = signals.drain.recv() => {
                    if turns.draining_since.is_none() {
                        info!("SIGTERM: draining (no new requests; waiting for those in flight)");
                        turns.draining_since = Some(Instant::now());
                        self.slot.set_state(SlotState::Draining);
                    }
                }
                _ = signals.release.recv() => {
                    if !turns.released {
                        turns.released = true;
                        self.slot.set_state(SlotState::Serving);
                        debug!("SIGUSR2: released");
                    }
                }
                _ = signals.int.recv() => {
                    app.stop(Duration::ZERO).await;
                    return ExitCode::SUCCESS;
                }
                _ = signals.exit_now.recv() => {
                    app.stop(Duration::ZERO).await;
                    return ExitCode::SUCCESS;
                }
                _ = signals.reopen_logs.recv() => crate::process::reopen_log_file(&self.config.log.file),
                _ = parent_check.tick() => {
                    if crate::process::master_gone(self.master_pid) {
                        app.stop(Duration::ZERO).await;
                        return ExitCode::from(EXIT_MASTER_GONE);
                    }
                }
            }
        }
    }

    /// Starts the app and tells the master it is ready; `Err` with the exit status if it
    /// cannot, or if the master stops it meanwhile.
    async fn start_app(
        &self,
        runtime_dir: Option<&std::path::Path>,
        signals: &mut Signals,
    ) -> Result<AppProcess, ExitCode> {
        let launch = match launch(self.config, self.id, runtime_dir) {
            Ok(l) => l,
            Err(why) => {
                error!("{why}");
                return Err(ExitCode::from(EXIT_STARTUP));
            }
        };
        if let Upstream::Tcp(addr) = &launch.address {
            if let Some(port) = addr.rsplit(':').next().and_then(|p| p.parse().ok()) {
                self.slot.app_port.store(port, Ordering::Relaxed);
            }
        }
        let app = tokio::select! {
            started = AppProcess::start(launch, self.slot) => match started {
                Ok(app) => app,
                Err(why) => {
                    error!("{why}");
                    return Err(ExitCode::from(EXIT_STARTUP));
                }
            },
            _ = signals.drain.recv() => {
                info!("SIGTERM while the app starts: exiting");
                return Err(ExitCode::SUCCESS);
            }
            _ = signals.int.recv() => return Err(ExitCode::SUCCESS),
            _ = signals.exit_now.recv() => return Err(ExitCode::SUCCESS),
        };
        if let Err(e) = self.master.send(protocol::READY) {
            error!(error = %e, "cannot acknowledge readiness to the master");
            app.stop(Duration::ZERO).await;
            return Err(ExitCode::from(EXIT_STARTUP));
        }
        Ok(app)
    }

    /// Publishes the app's health in the record and opens it to new requests while it is
    /// ready, released and not draining.
    fn publish(&self, t: &mut Turns, health: &Health) {
        let ready = matches!(health, Health::Ready);
        let failing = matches!(health, Health::Failing(_));
        self.slot
            .app_failing
            .store(u32::from(failing), Ordering::Relaxed);
        let open = ready && t.released && t.draining_since.is_none();
        if open && t.opened && !self.slot.app_load().open {
            // Closed by an HTTP worker that found the app dead before this host did (it
            // refused a connection, or was killed for a request past request_timeout): closed
            // until the app's task sees the exit, or if the app lives on after all, for a
            // while.
            let since = *t.closed_by_worker.get_or_insert_with(Instant::now);
            if since.elapsed() >= REOPEN_AFTER {
                warn!("the app was found unreachable but runs on; taking requests again");
                t.closed_by_worker = None;
                self.slot.app_set_open(true);
            }
        } else {
            t.closed_by_worker = None;
            self.slot.app_set_open(open);
        }
        t.opened = open;
    }

    /// Every `LOOK_EVERY`: tells the master when the app nears and reaches `max_requests`, and
    /// has the app's task check it when HTTP workers count requests it did not answer.
    fn look(&self, t: &mut Turns) {
        let sent = self.slot.app_sent.load(Ordering::Relaxed);
        let serving = t.draining_since.is_none();
        if serving && t.prepare_at > 0 && !t.told_soon && sent >= t.prepare_at {
            t.told_soon = true;
            let _ = self.master.send(protocol::MAX_REQUESTS_SOON);
        }
        if serving && self.max_requests > 0 && !t.told_reached && sent >= self.max_requests {
            t.told_reached = true;
            let _ = self.master.send(protocol::MAX_REQUESTS);
        }
        // HTTP workers count the requests the app did not answer in its record: the app's
        // socket may be gone or dead, which the app's task checks.
        let failed = self.slot.app_502_streak.load(Ordering::Relaxed);
        if failed > t.failed_seen {
            crate::app::appconn::check_reachable();
        }
        t.failed_seen = failed;
    }
}

/// What is left of `graceful_timeout` (since the drain began) for the app to exit: a little
/// less than the master's own deadline, so the app's SIGKILL comes from here and is logged.
fn app_grace(graceful_timeout: Duration, since: Instant) -> Duration {
    let margin = (graceful_timeout / 5).min(Duration::from_millis(500));
    graceful_timeout
        .saturating_sub(margin)
        .saturating_sub(since.elapsed())
}

/// The app's command line with its placeholders replaced, and where it will listen.
fn launch(
    config: &Config,
    id: u32,
    runtime_dir: Option<&std::path::Path>,
) -> Result<Launch, String> {
    let app = &config.app;
    let (address, socket, port) = if app.command.iter().any(|a| a.contains("{socket}")) {
        let dir = runtime_dir.ok_or("no runtime directory for the app's {socket}")?;
        // The name HTTP workers derive from the record (`pool::AppLease::upstream`).
        let path = dir.join(format!("app-{id}-{}.sock", std::process::id()));
        let socket = path.display().to_string();
        (Upstream::Unix(path), socket, String::new())
    } else {
        let port = crate::process::free_loopback_port()
            .map_err(|e| format!("no free port for the app's {{port}}: {e}"))?;
        (
            Upstream::Tcp(format!("127.0.0.1:{port}")),
            String::new(),
            port.to_string(),
        )
    };
    // Resolved now, once for this app host: a release directory switched by a symlink is
    // picked up by the next app hosts (a reload), never half-way through this one's life.
    let cwd = match app.cwd.as_str() {
        "" => None,
        dir => Some(
            std::fs::canonicalize(dir)
                .map_err(|e| format!("app.cwd {dir}: cannot resolve it: {e}"))?,
        ),
    };
    let worker_id = id.to_string();
    let argv = app
        .command
        .iter()
        .map(|a| {
            a.replace("{socket}", &socket)
                .replace("{port}", &port)
                .replace("{worker}", &worker_id)
        })
        .collect();
    Ok(Launch {
        argv,
        address,
        worker_id: id,
        ready_timeout: app.ready_timeout,
        cwd,
        output: std::sync::Arc::new(crate::app::output::Writer {
            format: config.log.format,
            min: config.log.app_level,
            raw: config.log.app_output == AppOutput::Raw,
            app_id: id,
        }),
    })
}
