//! supervisor's worker library: everything that runs inside a worker process (HTTP serving,
//! admission, the app side) plus the pieces the master shares with it (the configuration
//! shape, the protocol, the shared memory). Request code here never sees a pid; lifecycle
//! lives in the binary.
//!
//! The master forks and execs its own binary in worker mode, which calls [`run`]: an HTTP
//! worker (`process`) or an app host (`apphost`, one app process of the pool). The folders are
//! the layers, each using only those below it:
//!
//! - `serve/`: `server` (accept loops, drain) runs one `connection` task per client, which runs
//!   `request` for every request (limits, timeout, panics), holding a `request_guard`, over the
//!   worker's `state`;
//! - `app/`: what answers an admitted request: the `builtin` app, or the `proxy` to the app
//!   processes (`pool`) or an upstream;
//! - `http/`: the pieces both share (`response`, `client_body`, `activity`, and `context`, the
//!   part of the state the app side sees);
//! - `limits/`: `admission` (worker and host caps, the queue), `cluster` (Redis);
//! - `shm/`: the memory shared with the master (`scoreboard`, `ratelimit`).
//!
//! The worker talks to its master through the scoreboard and one byte at a time on a pipe, and
//! the master to it through signals ([`protocol`]).

#![deny(unsafe_code)]

pub mod config;
pub mod exec;
pub mod logfile;
pub mod privileges;
pub mod protocol;

mod app;
mod apphost;
mod http;
mod limits;
mod listener;
mod process;
mod serve;
mod shm;

// The modules the master uses too, where it has always found them.
pub use limits::cluster;
pub use serve::access_log;
pub use shm::{ratelimit, scoreboard};

#[cfg(test)]
mod tests;

use std::process::ExitCode;

pub use process::{HEARTBEAT_INTERVAL, PARENT_CHECK_INTERVAL};
pub use protocol::{WorkerArgs, EXIT_MASTER_GONE, EXIT_STARTUP};

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
