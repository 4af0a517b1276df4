//! The few operating-system calls that need `unsafe`: preparing a worker between fork and exec,
//! and taking ownership of inherited file descriptors. Everything else in the binary is safe code
//! (`#![deny(unsafe_code)]` at the crate root, allowed only here).

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes `cmd`, when spawned, a proper worker of this master:
///
/// - every fd above stderr is made close-on-exec, then the listed ones inheritable again, in
///   the child only: each worker gets exactly its listeners, its readiness pipe and the
///   scoreboard, and nothing else leaks into it;
/// - `PR_SET_PDEATHSIG(SIGKILL)`: the kernel kills the worker when the thread that forked it
///   dies. That is the master's main thread, which is the only thread the master has, so it
///   means "when the master dies". A master that died before the `prctl` is caught by the
///   `getppid` check right after it (and by the worker's own periodic check).
///
/// The pre-exec hook runs in the forked child before `execve`. A forked child of a
/// multi-threaded process may only call async-signal-safe functions (another thread may have
/// held the allocator's lock at fork time), so the hook does nothing but raw syscalls on memory
/// allocated before the fork, and the worker's real work starts only after `exec` gives it a
/// fresh process image.
pub fn prepare_worker_exec(cmd: &mut Command, inherit: Vec<RawFd>, master_pid: u32) {
    let hook = move || -> io::Result<()> {
        // Fds the master itself inherited without close-on-exec (from a shell, a wrapper)
        // are not the worker's business: mark everything above stderr close-on-exec first.
        // Linux >= 5.11; on older kernels the call fails and only our own fds are exact.
        // SAFETY: close_range is a plain syscall; with CLOSE_RANGE_CLOEXEC it closes nothing.
        unsafe {
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
            );
        }
        for &fd in &inherit {
            // SAFETY: fcntl on an fd number is async-signal-safe; the fd is open in the master,
            // so it is open in the child; clearing FD_CLOEXEC affects only the child's table.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } == -1 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: prctl and getppid are async-signal-safe and touch no Rust state.
        unsafe {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) == -1
            {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() as u32 != master_pid {
                // No allocation here (io::Error::other would box): a raw errno says it.
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
        }
        Ok(())
    };
    // SAFETY: the hook above only performs async-signal-safe syscalls and does not allocate.
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
    // Close-on-exec again: the worker's own children (app processes, later) must not inherit it.
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
