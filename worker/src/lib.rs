//! supervisor's worker library: everything that runs inside a worker process (HTTP serving,
//! admission, the built-in app) plus the pieces the master shares with it (the configuration
//! shape and the scoreboard). Request code here never sees a pid; lifecycle lives in the binary.
//!
//! The master forks and execs its own binary in worker mode, which calls [`run`]. Inside:
//! `process` (runtime, readiness, heartbeat, signals) runs `server` (accept loops, drain), which
//! runs one `connection` task per client (hyper, keep-alive), which runs `request` for every
//! request (limits via `admission`, timeout, panics, the in-flight description in the
//! scoreboard), which calls the built-in `app`. The worker talks to its master through the
//! scoreboard and one byte at a time on a pipe, and the master to it through signals ([`protocol`]).

#![deny(unsafe_code)]

pub mod access_log;
pub mod config;
pub mod exec;
pub mod logfile;
pub mod privileges;
pub mod protocol;
pub mod ratelimit;
pub mod scoreboard;
mod shared_region;

mod activity;
mod admission;
mod app;
mod appconn;
mod apphost;
mod child;
mod client_body;
mod client_rate;
pub mod cluster;
mod conn_pool;
mod connection;
mod context;
mod edge;
mod listener;
mod pool;
mod process;
mod proxy;
mod redis_target;
mod request;
mod request_guard;
mod response;
mod server;
mod state;

#[cfg(test)]
mod tests;

use std::os::fd::OwnedFd;
use std::process::ExitCode;

pub use process::{HEARTBEAT_INTERVAL, PARENT_CHECK_INTERVAL};

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
    /// worker accepts connections, then `b'm'` and `b'M'` near and at `max_requests` (see [`protocol`]).
    pub ready: OwnedFd,
    /// Requests after which the worker asks to be recycled (jitter already added); 0: never.
    pub max_requests: u64,
    /// Boot and report ready, but accept nothing until SIGUSR2: a replacement prepared ahead
    /// of its predecessor's `max_requests`.
    pub hold: bool,
    /// The scoreboard memfd (see [`scoreboard`]), mapped writable.
    pub scoreboard: OwnedFd,
    /// The per-client rate table's memfd (see [`ratelimit`]), mapped writable when
    /// `limits.rate` is set.
    pub rates: OwnedFd,
    /// The master's private runtime directory (app sockets go there).
    pub runtime_dir: Option<std::path::PathBuf>,
    pub config: config::Config,
}

/// Runs a worker process to the end: serves until SIGTERM (graceful drain, bounded by
/// `server.graceful_timeout`, then 0), SIGINT or SIGQUIT (exit at once, 0), or until the master
/// disappears ([`EXIT_MASTER_GONE`]). [`EXIT_STARTUP`] if it cannot start. SIGUSR1 reopens
/// `log.file` (when set) as stderr. Tracing must already be initialised, writing to stderr;
/// this installs a panic hook that logs through it.
pub fn run(args: WorkerArgs) -> ExitCode {
    if args.app_host {
        apphost::run(args)
    } else {
        process::run(args)
    }
}
