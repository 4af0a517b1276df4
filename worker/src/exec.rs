//! What a child needs between fork and exec, shared by the master (starting workers) and the
//! worker (starting its app): the raw syscalls that need `unsafe`.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;

/// The pre-exec hook that makes a child a proper child of this process:
///
/// - every fd above stderr is made close-on-exec, then the `inherit`ed ones inheritable again,
///   in the child only: it gets exactly those, and nothing else this process holds leaks into
///   it (Linux >= 5.11; on older kernels `close_range` fails and only fds that were already
///   close-on-exec are kept out);
/// - exactly the signals in `blocked` blocked, whatever the spawning thread blocks (std's
///   `Command` passes its mask on); the master's workers start with USR1 and USR2 blocked until
///   they handle them, an app with none;
/// - `PR_SET_PDEATHSIG(SIGKILL)`: the kernel kills the child when the thread that forked it
///   dies, which for our single-threaded master, and for the worker's event-loop thread, means
///   "when this process dies". A parent that died before the `prctl` is caught by the `getppid`
///   check right after it.
///
/// It runs in the forked child before `execve`, where only async-signal-safe calls are allowed
/// (another thread may have held the allocator's lock at fork time): it makes raw syscalls on
/// memory allocated before the fork and does not allocate. Install it with
/// `unsafe { cmd.pre_exec(hook) }` (std or tokio `Command`).
pub fn child_hook(
    inherit: Vec<RawFd>,
    parent_pid: u32,
    blocked: &[libc::c_int],
) -> impl FnMut() -> io::Result<()> + Send + Sync + 'static {
    // Built before the fork: the hook must not allocate.
    let mut mask = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set; sigaddset adds signal numbers to it.
    let mask = unsafe {
        libc::sigemptyset(mask.as_mut_ptr());
        for &sig in blocked {
            libc::sigaddset(mask.as_mut_ptr(), sig);
        }
        mask.assume_init()
    };
    move || {
        inherit_only(&inherit)?;
        // SAFETY: sigprocmask, prctl and getppid are async-signal-safe and touch no Rust state;
        // the mask was built before the fork. The mask survives the exec.
        unsafe {
            if libc::sigprocmask(libc::SIG_SETMASK, &mask, std::ptr::null_mut()) == -1 {
                return Err(io::Error::last_os_error());
            }
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
            if libc::getppid() as u32 != parent_pid {
                // No allocation here (io::Error::other would box): a raw errno says it.
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
        }
        Ok(())
    }
}

/// Between fork and exec: makes every fd above stderr close-on-exec, then the `inherit`ed ones
/// inheritable again, in the child only, so that it gets exactly those (see `child_hook`; also
/// the master's hook for the new master of a binary upgrade). Async-signal-safe: raw syscalls,
/// no allocation.
pub fn inherit_only(inherit: &[RawFd]) -> io::Result<()> {
    // SAFETY: close_range is a plain syscall; with CLOSE_RANGE_CLOEXEC it closes nothing.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
        );
    }
    for &fd in inherit {
        // SAFETY: fcntl on an fd number is async-signal-safe; the fd is open in the parent,
        // so it is open in the child; clearing FD_CLOEXEC affects only the child's table.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } == -1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
