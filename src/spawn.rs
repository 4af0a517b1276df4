//! Starting one worker process: fork + exec of this same binary in its hidden `worker` mode,
//! with exactly the fds it needs.
//!
//! Why exec and not just fork: a forked copy of a running Rust process inherits its allocator,
//! its logging state and any lock another thread happened to hold; exec gives the worker a clean
//! process image, so the worker is an ordinary single-purpose program.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use nix::unistd::Pid;
use worker::config::Config;

use crate::sys;

/// Environment variable carrying the resolved config (JSON) from master to worker.
pub const CONFIG_ENV: &str = "SUPERVISOR_WORKER_CONFIG";

/// Variables systemd sets for the service's main process only.
const SYSTEMD_ENV: [&str; 6] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

pub struct Spawned {
    pub pid: Pid,
    /// Read end of the worker's pipe to the master: `R` when it accepts connections, `M` when
    /// it has served its `max_requests`; EOF when it exits.
    pub pipe: OwnedFd,
}

pub struct SpawnRequest<'a> {
    pub id: u32,
    pub slot: usize,
    pub listen_fds: &'a [i32],
    pub scoreboard: &'a OwnedFd,
    /// The per-client rate table.
    pub rates: &'a OwnedFd,
    pub config_json: &'a str,
    /// Requests after which the worker asks to be recycled (0: never).
    pub max_requests: u64,
    /// Start held: ready but not accepting until SIGUSR2.
    pub hold: bool,
    /// The master's private runtime directory.
    pub runtime_dir: &'a std::path::Path,
}

pub fn spawn_worker(req: SpawnRequest<'_>) -> Result<Spawned> {
    // The running image, not the path it was started from: if the file on disk is replaced
    // (a package upgrade) or deleted, respawned workers still run the master's own version,
    // whose scoreboard layout and config format they share.
    let exe = "/proc/self/exe";
    // Both ends close-on-exec; only the write end is made inheritable, in the child.
    let (ready_read, ready_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("cannot create a pipe")?;
    let master_pid = std::process::id();

    let mut cmd = Command::new(exe);
    // argv[0] as the master's, so `ps` shows `supervisor worker --id N`, not /proc/self/exe.
    cmd.arg0(
        std::env::args_os()
            .next()
            .unwrap_or_else(|| "supervisor".into()),
    );
    cmd.arg("worker")
        .arg("--id")
        .arg(req.id.to_string())
        .arg("--slot")
        .arg(req.slot.to_string())
        .arg("--master-pid")
        .arg(master_pid.to_string())
        .arg("--ready-fd")
        .arg(ready_write.as_raw_fd().to_string())
        .arg("--scoreboard-fd")
        .arg(req.scoreboard.as_raw_fd().to_string())
        .arg("--rates-fd")
        .arg(req.rates.as_raw_fd().to_string())
        .arg("--max-requests")
        .arg(req.max_requests.to_string())
        .arg("--runtime-dir")
        .arg(req.runtime_dir);
    if req.hold {
        cmd.arg("--hold");
    }
    for fd in req.listen_fds {
        cmd.arg("--listen-fd").arg(fd.to_string());
    }
    cmd.env(CONFIG_ENV, req.config_json).stdin(Stdio::null());
    // systemd's variables are the master's: a worker (or its app) that saw them could send
    // READY=1 for the service or take fds 3.. for sockets passed to the master.
    for var in SYSTEMD_ENV {
        cmd.env_remove(var);
    }

    let mut inherit = req.listen_fds.to_vec();
    inherit.push(ready_write.as_raw_fd());
    inherit.push(req.scoreboard.as_raw_fd());
    inherit.push(req.rates.as_raw_fd());
    sys::prepare_worker_exec(&mut cmd, inherit, master_pid);

    let child = cmd.spawn().context("cannot start a worker process")?;
    // The master's copy of the write end must go, or EOF would never be seen.
    drop(ready_write);
    Ok(Spawned {
        pid: Pid::from_raw(child.id() as i32),
        pipe: ready_read,
    })
}

/// Serializes the config for `SpawnRequest::config_json`.
pub fn config_json(config: &Config) -> String {
    serde_json::to_string(config).expect("the config always serializes")
}
