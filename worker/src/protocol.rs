//! Everything the master and a worker say to each other, in one place: how a worker is started
//! ([`Handoff`]), the bytes it writes on its pipe, the signals each side sends, and what each
//! process writes in shared memory. The master (`src/master.rs`, `src/spawn.rs`) and the worker
//! (`process`, `apphost`, `server`) use these names, never a raw flag, byte or signal.
//!
//! "Worker" below is either kind of child: an HTTP worker, or an app host (`--app`), which runs
//! one app process of the pool. Both speak the same protocol.
//!
//! # Start
//!
//! The master forks and execs its own binary as `supervisor worker` with the [`Handoff`] flags.
//! The worker inherits, and only these: the listening sockets, the write end of its pipe, the
//! scoreboard and the rate table (memfds, see `scoreboard` and `ratelimit`), and the resolved
//! configuration as JSON in a sealed memfd. The master has filled the worker's scoreboard record
//! before the fork (identity: pid, number, generation, kind, start time; state `booting`).
//!
//! # The pipe (worker to master)
//!
//! One byte per message, each sent at most once per process: [`READY`] once the worker accepts
//! connections (or, held, once it could), then [`MAX_REQUESTS_SOON`] and [`MAX_REQUESTS`] as it
//! nears and reaches `worker.max_requests`. The master sees end-of-file when the worker exits;
//! the exit status says how (0, [`EXIT_STARTUP`], [`EXIT_MASTER_GONE`], a signal).
//!
//! # Signals (master to worker)
//!
//! | signal | name here | the worker |
//! | --- | --- | --- |
//! | SIGTERM | [`DRAIN`] | stops accepting, finishes what it has within `server.graceful_timeout`, exits 0 |
//! | SIGUSR2 | [`RELEASE`] | a held worker starts accepting (ignored by any other) |
//! | SIGUSR1 | [`REOPEN_LOGS`] | reopens its log file and access log |
//! | SIGQUIT, SIGINT | [`EXIT_NOW`] | exits at once (fast stop) |
//! | SIGKILL | | a worker hung past `worker.timeout`, or still running after its drain's deadline |
//!
//! A worker checks its parent every [`crate::PARENT_CHECK_INTERVAL`]: once re-parented (the
//! master died), it exits at once with [`EXIT_MASTER_GONE`], its app with it.
//!
//! # Shared memory
//!
//! In a worker's scoreboard record, the master writes the identity fields (before the fork),
//! `rss_bytes`, `recycle_reason`, the `serving` state of a released worker, and clears the
//! record when it has reaped the process (`Scoreboard::reclaim`, which also returns the
//! host-wide permits the process held). The worker writes its heartbeat, its state (`serving`,
//! `draining`) and every counter. In an app host's record, the app host writes its app's pid,
//! port and health and opens or closes it to new requests; HTTP workers take and give back its
//! request slots (`app_load`, `app_sent`). In the header, the master writes the identity and the
//! caps; workers count host-wide permits and waiters. In the rate table, workers write the
//! clients' words; the master sets the table up, turns it on or off on a reload, and sweeps
//! forgotten clients.
//!
//! # A recycle, step by step
//!
//! 1. Ahead of its `max_requests` (see [`prepare_at`]) the worker sends [`MAX_REQUESTS_SOON`];
//!    the master starts a replacement with `--hold` in the same worker number (at most
//!    `worker.max_recycling` at once).
//! 2. The replacement boots and sends [`READY`], but accepts nothing.
//! 3. At `max_requests` the worker sends [`MAX_REQUESTS`] and keeps serving.
//! 4. With both, the master sends [`RELEASE`] to the replacement (its record says `serving` from
//!    then on) and [`DRAIN`] to the old worker.
//! 5. The old worker stops accepting, finishes its requests, exits 0; the master sees end-of-file,
//!    reaps it and clears its record.
//!
//! Any other recycle (`max_rss`, `max_lifetime`, a reload) starts the replacement without
//! `--hold` and goes from 2 to 4 as soon as it sends [`READY`]: the old worker drains only once
//! its replacement accepts, so no moment goes without a worker. (A hung worker is killed and
//! respawned: it cannot drain.)
//!
//! # A drain
//!
//! On [`DRAIN`] a worker marks its record `draining`, closes its listeners (an HTTP worker) or
//! closes itself to new requests (an app host), lets requests in flight finish and keep-alive
//! connections close after their current response, then exits 0. The master kills it if it is
//! still running after `server.graceful_timeout`.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use clap::Args;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::signal::Signal;

/// How the master starts a worker: the flags of `supervisor worker`, parsed by the worker and
/// written by the master ([`Handoff::to_args`]) from this one definition. The resolved
/// configuration travels in an inherited sealed memfd (`--config-fd`), not in argv (readable by
/// every user on the host) nor in the environment (size-limited by exec, and shown in
/// `/proc/PID/environ`).
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct Handoff {
    /// Worker number (app process number with `--app`), which survives respawns.
    #[arg(long)]
    pub id: u32,
    /// The worker's record in the scoreboard.
    #[arg(long)]
    pub slot: usize,
    /// The worker exits when its parent is no longer this process.
    #[arg(long)]
    pub master_pid: u32,
    /// Listening sockets, already bound.
    #[arg(long = "listen-fd")]
    pub listen_fds: Vec<i32>,
    /// Write end of the pipe to the master.
    #[arg(long)]
    pub ready_fd: i32,
    #[arg(long)]
    pub scoreboard_fd: i32,
    #[arg(long)]
    pub rates_fd: i32,
    /// The resolved configuration: JSON in a sealed memfd.
    #[arg(long)]
    pub config_fd: i32,
    /// Requests after which the worker asks to be recycled, jitter included; 0: never.
    #[arg(long, default_value_t = 0)]
    pub max_requests: u64,
    /// Accept nothing until [`RELEASE`] (a replacement prepared ahead of time).
    #[arg(long)]
    pub hold: bool,
    /// Run one app process of the pool (an app host) instead of an HTTP worker.
    #[arg(long)]
    pub app: bool,
    /// The master's private runtime directory (app sockets).
    #[arg(long)]
    pub runtime_dir: Option<PathBuf>,
}

impl Handoff {
    /// The flags that [`Handoff`]'s parser reads back as `self` (after the `worker` command).
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut flag = |name: &str, value: String| {
            args.push(format!("--{name}").into());
            args.push(value.into());
        };
        flag("id", self.id.to_string());
        flag("slot", self.slot.to_string());
        flag("master-pid", self.master_pid.to_string());
        flag("ready-fd", self.ready_fd.to_string());
        flag("scoreboard-fd", self.scoreboard_fd.to_string());
        flag("rates-fd", self.rates_fd.to_string());
        flag("config-fd", self.config_fd.to_string());
        flag("max-requests", self.max_requests.to_string());
        for fd in &self.listen_fds {
            flag("listen-fd", fd.to_string());
        }
        if let Some(dir) = &self.runtime_dir {
            args.push("--runtime-dir".into());
            args.push(dir.into());
        }
        if self.hold {
            args.push("--hold".into());
        }
        if self.app {
            args.push("--app".into());
        }
        args
    }
}

/// Master to worker: drain (stop accepting, finish what is in flight, exit).
pub const DRAIN: Signal = Signal::SIGTERM;
/// Master to a held worker: start accepting.
pub const RELEASE: Signal = Signal::SIGUSR2;
/// Master to worker: reopen the log files (after a rotation).
pub const REOPEN_LOGS: Signal = Signal::SIGUSR1;
/// Master to worker: exit at once (a fast stop). SIGINT means the same.
pub const EXIT_NOW: Signal = Signal::SIGQUIT;

/// The worker accepts connections. Sent once, right after it starts serving.
pub const READY: u8 = b'R';
/// The worker is nearing `max_requests` (see [`prepare_at`]): the master starts its replacement
/// now, so that the replacement is ready, and sharing the worker's sockets, by the time the
/// worker reaches the limit. Sent at most once, and never while draining.
pub const MAX_REQUESTS_SOON: u8 = b'm';
/// The worker has completed `max_requests` requests and asks to be replaced. It keeps serving
/// normally until the master sends SIGTERM (as soon as the replacement is ready). Sent at most
/// once, and never while draining.
pub const MAX_REQUESTS: u8 = b'M';

/// After how many completed requests a worker with this `max_requests` sends
/// [`MAX_REQUESTS_SOON`]; 0 when it never will (no limit, or `worker.max_requests_preboot` off:
/// the master then starts the replacement when the limit is reached). Half-way, but at least 50 requests ahead (so that
/// a replacement boots in time even for a small limit under heavy load) and at most 1000 (so
/// that two processes overlap only briefly for a large one).
pub fn prepare_at(max_requests: u64, preboot: bool) -> u64 {
    if max_requests == 0 || !preboot {
        return 0;
    }
    let lead = (max_requests / 2)
        .max(max_requests.saturating_sub(1).min(50))
        .min(1000);
    (max_requests - lead).max(1)
}

/// The write end of the pipe to the master.
pub(crate) struct MasterPipe {
    file: File,
}

impl MasterPipe {
    /// Takes the inherited write end and makes it non-blocking, so that a master that stopped
    /// reading can never stall the event loop.
    pub(crate) fn new(fd: OwnedFd) -> io::Result<MasterPipe> {
        let flags = fcntl(&fd, FcntlArg::F_GETFL).map_err(io::Error::from)?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        fcntl(&fd, FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
        Ok(MasterPipe {
            file: File::from(fd),
        })
    }

    /// Writes one message byte. Fails with `WouldBlock` if the pipe is full, and with
    /// `BrokenPipe` once the master has closed its end (SIGPIPE is ignored by Rust programs).
    pub(crate) fn send(&self, message: u8) -> io::Result<()> {
        match (&self.file).write(&[message])? {
            1 => Ok(()),
            _ => Err(io::ErrorKind::WriteZero.into()),
        }
    }
}

/// Exit status when the worker could not start (scoreboard, event loop, signals, listeners,
/// readiness pipe); the reason is logged.
pub const EXIT_STARTUP: u8 = 70;
/// Exit status when the worker found that its master is gone (it was re-parented).
pub const EXIT_MASTER_GONE: u8 = 71;

/// What the master hands a worker process.
pub struct WorkerArgs {
    /// Worker number 1..=N (survives respawns); sent as `X-Worker-Id`.
    pub id: u32,
    /// Index of this process's record in the scoreboard.
    pub slot: usize,
    /// An app host (one app process of the pool, see `apphost`) rather than an HTTP worker;
    /// `id` is then the app process's number.
    pub app_host: bool,
    /// The worker exits when its parent is no longer this process.
    pub master_pid: u32,
    /// Already bound and listening sockets (TCP v4/v6 or Unix stream); blocking mode unknown.
    pub listeners: Vec<OwnedFd>,
    /// Write end of the pipe to the master, open for the worker's whole life: `b'R'` once the
    /// worker accepts connections, then `b'm'` and `b'M'` near and at `max_requests` (see the module doc).
    pub ready: OwnedFd,
    /// Requests after which the worker asks to be recycled (jitter already added); 0: never.
    pub max_requests: u64,
    /// Boot and report ready, but accept nothing until SIGUSR2: a replacement prepared ahead
    /// of its predecessor's `max_requests`.
    pub hold: bool,
    /// The scoreboard memfd (see [`crate::scoreboard`]), mapped writable.
    pub scoreboard: OwnedFd,
    /// The per-client rate table's memfd (see [`crate::ratelimit`]), mapped writable when
    /// `limits.rate` is set.
    pub rates: OwnedFd,
    /// The master's private runtime directory (app sockets go there).
    pub runtime_dir: Option<std::path::PathBuf>,
    pub config: crate::config::Config,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        handoff: Handoff,
    }

    #[test]
    fn what_the_master_writes_the_worker_reads_back() {
        use clap::Parser;
        let all = Handoff {
            id: 65_537,
            slot: 3,
            master_pid: 42,
            listen_fds: vec![3, 4],
            ready_fd: 5,
            scoreboard_fd: 6,
            rates_fd: 7,
            config_fd: 8,
            max_requests: 1_000,
            hold: true,
            app: true,
            runtime_dir: Some("/run/supervisor x/1".into()),
        };
        let none = Handoff {
            listen_fds: vec![],
            hold: false,
            app: false,
            runtime_dir: None,
            ..all.clone()
        };
        for handoff in [all, none] {
            let argv = std::iter::once("worker".into()).chain(handoff.to_args());
            assert_eq!(Cli::try_parse_from(argv).unwrap().handoff, handoff);
        }
    }

    #[test]
    fn replacements_are_prepared_ahead_of_the_limit() {
        assert_eq!(prepare_at(0, true), 0);
        assert_eq!(prepare_at(1, true), 1);
        assert_eq!(prepare_at(20, true), 1);
        assert_eq!(prepare_at(100, true), 50);
        assert_eq!(prepare_at(1000, true), 500);
        assert_eq!(prepare_at(10_000, true), 9_000);
        assert_eq!(
            prepare_at(1000, false),
            0,
            "no preboot: nothing said before the limit"
        );
    }
}
