//! The pipe from a worker to its master, open for the worker's whole life.
//!
//! The protocol is one byte per message, each sent at most once per process: [`READY`] once the
//! worker accepts connections, then [`MAX_REQUESTS_SOON`] and [`MAX_REQUESTS`] as it nears and
//! reaches `worker.max_requests` completed requests (the master starts a replacement at the
//! first and drains this worker once both the replacement is ready and the second has come).
//! The master sees end-of-file when the worker exits. Writes never block: the pipe is
//! non-blocking, and a message that cannot be written is the caller's to log and drop. This
//! module owns the bytes and the writing, not the decision of when to send them.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;

use nix::fcntl::{fcntl, FcntlArg, OFlag};

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
/// [`MAX_REQUESTS_SOON`]; 0 when it never will. Half-way, but at least 50 requests ahead (so that
/// a replacement boots in time even for a small limit under heavy load) and at most 1000 (so
/// that two processes overlap only briefly for a large one).
pub fn prepare_at(max_requests: u64) -> u64 {
    if max_requests == 0 {
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

#[cfg(test)]
mod tests {
    use super::prepare_at;

    #[test]
    fn replacements_are_prepared_ahead_of_the_limit() {
        assert_eq!(prepare_at(0), 0);
        assert_eq!(prepare_at(1), 1);
        assert_eq!(prepare_at(20), 1);
        assert_eq!(prepare_at(100), 50);
        assert_eq!(prepare_at(1000), 500);
        assert_eq!(prepare_at(10_000), 9_000);
    }
}
