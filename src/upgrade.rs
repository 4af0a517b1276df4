//! Zero-downtime binary upgrade (USR2): the master starts the binary on disk as a new master,
//! handing over its listening sockets; the new master starts its own workers on them and, once
//! every one has said it accepts, tells the old master, which then drains its workers and
//! exits. Connections keep landing on the same sockets the whole time, so none is refused.
//!
//! Hand-written rather than taken from a crate: what goes over is this project's own listener
//! layout (a socket per worker number with `reuseport`), and the few steps need the master's
//! loop (its poll set, its reaper). The handover itself is plain exec with inherited fds plus
//! one environment variable, like systemd's `LISTEN_FDS`; the new master checks that the
//! variable comes from its parent, so one left in a shell's environment is ignored.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::listeners::{HandedGroup, Listeners};

/// The environment variable that carries a `Handover` to the new master.
pub const ENV: &str = "SUPERVISOR_UPGRADE";

/// How long a new master has to get every worker ready, on top of `app.ready_timeout` (its
/// workers wait that long for their apps).
pub const READY_MARGIN: Duration = Duration::from_secs(30);

/// What the old master hands over, besides the fds themselves.
#[derive(Debug, Serialize, Deserialize)]
pub struct Handover {
    /// The old master: the variable counts only in a child of it.
    pub parent: u32,
    /// The write end of a pipe: the new master writes `R` on it once it is ready.
    pub ready_fd: RawFd,
    pub listeners: Vec<HandedGroup>,
    /// The sockets came from systemd (socket activation): kept as they are, whatever the
    /// configuration says.
    #[serde(default)]
    pub adopted: bool,
    /// `metrics.bind` as configured and the socket serving it, when metrics are on.
    #[serde(default)]
    pub metrics: Option<(String, RawFd)>,
}

/// How this process was started, captured first thing, so that an upgrade runs the binary now
/// at that path (not the running image, which a package upgrade replaced) with the same
/// arguments.
#[derive(Debug, Clone)]
pub struct SelfExec {
    pub exe: PathBuf,
    argv0: OsString,
    args: Vec<OsString>,
}

impl SelfExec {
    pub fn capture() -> SelfExec {
        let mut all = std::env::args_os();
        let argv0 = all.next().unwrap_or_else(|| "supervisor".into());
        SelfExec {
            exe: resolve_exe(Path::new(&argv0)),
            argv0,
            args: all.collect(),
        }
    }
}

/// The path of the program as started: `argv[0]` made absolute if it has a slash, else looked
/// up in `PATH` like the shell did; the running image's path as a last resort. Symlinks are
/// kept as they are: a `/usr/bin/supervisor` link moved to a new version is followed at the
/// upgrade.
fn resolve_exe(argv0: &Path) -> PathBuf {
    let fallback = || std::env::current_exe().unwrap_or_else(|_| argv0.to_path_buf());
    if argv0.as_os_str().is_empty() {
        return fallback();
    }
    if argv0.to_string_lossy().contains('/') {
        return std::env::current_dir()
            .map(|d| d.join(argv0))
            .unwrap_or_else(|_| argv0.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(argv0))
        .find(|p| is_executable(p))
        .unwrap_or_else(fallback)
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Reads and removes the handover variable. Called first thing in `main`, while the process
/// has one thread. `Ok(None)`: no upgrade. A variable not from our parent is ignored, with the
/// reason returned for the log.
pub fn take_handover() -> Result<Option<Handover>, String> {
    let Some(raw) = std::env::var_os(ENV) else {
        return Ok(None);
    };
    std::env::remove_var(ENV);
    let handover: Handover = serde_json::from_str(&raw.to_string_lossy())
        .map_err(|e| format!("{ENV} is not a handover from an upgrading master ({e}); ignored"))?;
    let parent = nix::unistd::getppid().as_raw() as u32;
    if handover.parent != parent {
        return Err(format!(
            "{ENV} names master {} but our parent is {parent}: a leftover in the environment; ignored",
            handover.parent
        ));
    }
    Ok(Some(handover))
}

/// An upgrade under way, as the old master sees it.
pub struct InProgress {
    pub pid: Pid,
    /// Read end of the new master's readiness pipe; `None` once it hit EOF.
    pub ready: Option<OwnedFd>,
    /// When the new master must be ready by.
    pub deadline: Instant,
    /// Past the deadline, or this master stops: the new master was told to stop.
    pub abandoned: bool,
    /// When an abandoned new master still running gets SIGKILL.
    pub kill_at: Option<Instant>,
}

impl InProgress {
    /// Gives up on this new master: tells it to stop with `signal` (QUIT: fast, TERM:
    /// graceful); `kill_at` is when it gets SIGKILL if still there.
    pub fn abandon(&mut self, signal: Signal) {
        self.abandoned = true;
        self.kill_at = Some(Instant::now() + ABANDON_GRACE);
        let _ = nix::sys::signal::kill(self.pid, signal);
    }
}

/// How long an abandoned new master has to stop before SIGKILL: twice a fast stop's time.
const ABANDON_GRACE: Duration = Duration::from_secs(10);

/// Starts the new master: the binary at `exec.exe`, the same arguments, this master's
/// listeners as inherited fds, and a pipe to say when it is ready.
pub fn start_new_master(
    exec: &SelfExec,
    listeners: &Listeners,
    metrics: Option<(String, RawFd)>,
    ready_within: Duration,
) -> Result<InProgress> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .context("cannot create the upgrade pipe")?;
    let (groups, mut fds) = listeners.hand_over();
    let handover = Handover {
        parent: std::process::id(),
        ready_fd: write.as_raw_fd(),
        listeners: groups,
        adopted: listeners.is_adopted(),
        metrics: metrics.clone(),
    };
    let mut cmd = Command::new(&exec.exe);
    cmd.arg0(&exec.argv0)
        .args(&exec.args)
        .env(ENV, serde_json::to_string(&handover).expect("serializes"));
    // systemd's variables: the sockets go over in the handover, not as LISTEN_FDS (which name
    // this process), and the watchdog names this process too: the new master pings it (once
    // it is the main process) rather than leaving that to a master about to exit.
    // NOTIFY_SOCKET stays: the new master reports to systemd like this one.
    for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_PID"] {
        cmd.env_remove(var);
    }
    fds.push(write.as_raw_fd());
    fds.extend(metrics.map(|(_, fd)| fd));
    crate::sys::prepare_upgrade_exec(&mut cmd, fds);
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", exec.exe.display()))?;
    drop(write); // ours must go, or EOF would never come
    Ok(InProgress {
        pid: Pid::from_raw(child.id() as i32),
        ready: Some(read),
        deadline: Instant::now() + ready_within,
        abandoned: false,
        kill_at: None,
    })
}
