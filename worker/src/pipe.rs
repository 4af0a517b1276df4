//! The pipe from a worker to its master, open for the worker's whole life.
//!
//! The protocol is one byte per message, each sent at most once per process: [`READY`] once the
//! worker accepts connections, then [`MAX_REQUESTS`] if and when it has completed
//! `worker.max_requests` requests (the master then starts a replacement and drains this one).
//! The master sees end-of-file when the worker exits. Writes never block: the pipe is
//! non-blocking, and a message that cannot be written is the caller's to log and drop. This
//! module owns the bytes and the writing, not the decision of when to send them.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;

use nix::fcntl::{fcntl, FcntlArg, OFlag};

/// The worker accepts connections. Sent once, right after it starts serving.
pub const READY: u8 = b'R';
/// The worker has completed `max_requests` requests and asks to be replaced. It keeps serving
/// normally until the master sends SIGTERM. Sent at most once, and never while draining.
pub const MAX_REQUESTS: u8 = b'M';

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
