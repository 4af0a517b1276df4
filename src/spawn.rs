//! Starting one worker process: fork + exec of this same binary in its hidden `worker` mode,
//! with exactly the fds it needs.
//!
//! Why exec and not just fork: a forked copy of a running Rust process inherits its allocator,
//! its logging state and any lock another thread happened to hold; exec gives the worker a clean
//! process image, so the worker is an ordinary single-purpose program.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use nix::fcntl::{FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::unistd::Pid;
use worker::config::Config;
use worker::protocol::Handoff;

use crate::sys;

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
    /// Read end of the worker's pipe to the master (see `worker::protocol`); EOF when it exits.
    pub pipe: OwnedFd,
}

pub struct SpawnRequest<'a> {
    pub id: u32,
    pub slot: usize,
    pub listen_fds: &'a [i32],
    pub scoreboard: &'a OwnedFd,
    /// The per-client rate table.
    pub rates: &'a OwnedFd,
    /// The resolved configuration, from `config_fd`.
    pub config: &'a OwnedFd,
    /// Requests after which the worker asks to be recycled (0: never).
    pub max_requests: u64,
    /// Start held: ready but not accepting until released (`worker::protocol::RELEASE`).
    pub hold: bool,
    /// An app host (one app process of the pool) rather than an HTTP worker.
    pub app_host: bool,
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
    let handoff = Handoff {
        id: req.id,
        slot: req.slot,
        master_pid,
        listen_fds: req.listen_fds.to_vec(),
        ready_fd: ready_write.as_raw_fd(),
        scoreboard_fd: req.scoreboard.as_raw_fd(),
        rates_fd: req.rates.as_raw_fd(),
        config_fd: req.config.as_raw_fd(),
        max_requests: req.max_requests,
        hold: req.hold,
        app: req.app_host,
        runtime_dir: Some(req.runtime_dir.to_path_buf()),
    };
    cmd.arg("worker").args(handoff.to_args());
    cmd.stdin(Stdio::null());
    // systemd's variables are the master's: a worker (or its app) that saw them could send
    // READY=1 for the service or take fds 3.. for sockets passed to the master.
    for var in SYSTEMD_ENV {
        cmd.env_remove(var);
    }

    let mut inherit = req.listen_fds.to_vec();
    inherit.push(ready_write.as_raw_fd());
    inherit.push(req.scoreboard.as_raw_fd());
    inherit.push(req.rates.as_raw_fd());
    inherit.push(req.config.as_raw_fd());
    sys::prepare_worker_exec(&mut cmd, inherit, master_pid);

    let child = cmd.spawn().context("cannot start a worker process")?;
    // The master's copy of the write end must go, or EOF would never be seen.
    drop(ready_write);
    Ok(Spawned {
        pid: Pid::from_raw(child.id() as i32),
        pipe: ready_read,
    })
}

/// The resolved config for `SpawnRequest::config`: JSON in a memfd sealed against any change,
/// made once per configuration and inherited by every worker, which reads it at offset 0.
///
/// Not an environment variable (as it was): exec limits one string to 128 KiB (20,000
/// `server.forwarded_allow_ips` made every worker start fail), and a worker's and its app's
/// `/proc/PID/environ` would show the Redis password to anyone who may read them.
pub fn config_fd(config: &Config) -> Result<OwnedFd> {
    let json = serde_json::to_vec(config).expect("the config always serializes");
    let fd = memfd_create(
        c"supervisor-config",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .context("cannot create the memfd for the workers' configuration")?;
    let mut file = std::fs::File::from(fd);
    file.write_all(&json)
        .context("cannot write the workers' configuration")?;
    nix::fcntl::fcntl(
        &file,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SEAL
                | SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_WRITE,
        ),
    )
    .context("cannot seal the workers' configuration")?;
    Ok(file.into())
}

/// Reads the config a worker inherited as `config_fd` (the worker side of `config_fd`): at
/// offset 0, whatever the shared file offset.
pub fn read_config(fd: OwnedFd) -> Result<Config> {
    let file = std::fs::File::from(fd);
    let len = file
        .metadata()
        .context("cannot stat the configuration")?
        .len();
    let mut json = vec![0; usize::try_from(len).context("configuration too large")?];
    file.read_exact_at(&mut json, 0)
        .context("cannot read the configuration")?;
    serde_json::from_slice(&json).context("bad worker config")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_goes_through_a_sealed_memfd_and_reads_back_at_any_offset() {
        let mut config = Config::default();
        let list: Vec<String> = (0..20_000)
            .map(|i| format!("10.{}.{}.1", i / 256, i % 256))
            .collect();
        config.server.forwarded_allow_ips = worker::config::Trusted::parse(&list).unwrap();
        let fd = config_fd(&config).unwrap();
        let mut file = std::fs::File::from(fd.try_clone().unwrap());
        // Another worker's read moved the shared offset.
        std::io::Read::read(&mut file, &mut [0; 100]).unwrap();
        assert!(file.write_all(b"x").is_err(), "sealed against writes");
        let back = read_config(fd).unwrap();
        assert_eq!(
            back.server.forwarded_allow_ips,
            config.server.forwarded_allow_ips
        );
    }
}
