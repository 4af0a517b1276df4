//! The few operating-system calls that need `unsafe`: preparing a worker between fork and exec,
//! and taking ownership of inherited file descriptors. Everything else in the binary is safe code
//! (`#![deny(unsafe_code)]` at the crate root, allowed only here).

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes `cmd`, when spawned, a proper worker of this master: it gets exactly the `inherit`ed
/// fds (its listeners, its readiness pipe and the scoreboard) and dies with the master (see
/// `worker::exec::child_hook`). It starts with USR1 and USR2 blocked: the master sends them to
/// workers (log reopening, the release of a held replacement), and until the worker has its
/// handlers their default action would kill it. The worker unblocks them once it handles them,
/// and one that came meanwhile is delivered then. Nothing else is blocked.
pub fn prepare_worker_exec(cmd: &mut Command, inherit: Vec<RawFd>, master_pid: u32) {
    let hook = worker::exec::child_hook(inherit, master_pid, &[libc::SIGUSR1, libc::SIGUSR2]);
    // SAFETY: the hook only performs async-signal-safe syscalls and does not allocate.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Takes ownership of a file descriptor the master passed to this worker by number.
///
/// Checks that the fd is open first, so a bad number (someone starting the hidden worker mode
/// by hand) is a clear error rather than two owners of one fd.
pub fn inherited_fd(fd: RawFd, what: &str) -> io::Result<OwnedFd> {
    if fd < 3 {
        return Err(io::Error::other(format!(
            "{what}: fd {fd} is a standard stream"
        )));
    }
    // SAFETY: F_GETFD only queries the fd table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err(io::Error::other(format!(
            "{what}: fd {fd} is not open ({})",
            io::Error::last_os_error()
        )));
    }
    // Close-on-exec again: the worker's own children (its app process) must not inherit it.
    // SAFETY: as above, a plain fcntl on an open fd.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the fd is open, was handed to this process for its exclusive use by the master,
    // and nothing else in this process has wrapped it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Counts deliveries of `signal` in `counter`. The self-pipe that wakes the master coalesces
/// repeated signals; for TTIN/TTOU the count matters (two TTOU mean two workers fewer).
pub fn count_signal(
    signal: libc::c_int,
    counter: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> io::Result<()> {
    // SAFETY: the handler only does an atomic add, which is async-signal-safe, and never
    // allocates, locks or panics.
    unsafe {
        signal_hook::low_level::register(signal, move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })?;
    }
    Ok(())
}

/// Makes `cmd`, when spawned, the new master of a binary upgrade: it inherits exactly the
/// `inherit`ed fds (the listeners and its readiness pipe) and, unlike a worker, does not die
/// with this master: it is to outlive it.
pub fn prepare_upgrade_exec(cmd: &mut Command, inherit: Vec<RawFd>) {
    let hook = move || worker::exec::inherit_only(&inherit);
    // SAFETY: the hook only performs async-signal-safe syscalls and does not allocate.
    unsafe {
        cmd.pre_exec(hook);
    }
}
