//! A connection to the app over its Unix socket that the event loop watches for reading only.
//!
//! Why not tokio's `UnixStream`: it registers every socket for both read and write readiness,
//! edge-triggered. On a Unix stream socket the kernel signals "writable" each time the peer
//! reads (`unix_write_space` has no "was the writer short of room" check, unlike TCP), so every
//! request the app reads woke the worker once more, for nothing: a context switch and an
//! event-loop turn per request, on the CPU the app needs. Here the socket is registered for
//! reading only; a write goes straight to the socket and only a write that finds the buffer full
//! (large uploads) registers a second handle, on a duplicate of the descriptor, for write
//! readiness, and drops it once the write goes through.
//!
//! Also the signal that a connect to the app failed (`connect_failed`, `a_connect_failed`): the
//! app's supervising task (`child`) waits on it to check the app's socket and restart an app
//! that can no longer be reached.

#![allow(unsafe_code)]

use std::io;
use std::net::Shutdown;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::config::Upstream;
use crate::listener::Stream;

/// Woken when a connect to a Unix socket found no socket file or no listener on it (see
/// `connect_failed`). Only waiters are woken, so that the connects that fail while the app
/// starts (it does not listen yet) leave nothing behind.
static CONNECT_FAILED: Notify = Notify::const_new();

/// Asks the app's supervising task to check that the app can still be reached (an app host,
/// when HTTP workers report requests its app did not answer).
pub(crate) fn check_reachable() {
    CONNECT_FAILED.notify_waiters();
}

/// Called by every failed connect to a Unix socket: not found or refused wakes the app's
/// supervising task, which checks its socket (a cheap no-op for anything else).
pub(crate) fn connect_failed(e: &io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
    ) {
        CONNECT_FAILED.notify_waiters();
    }
}

/// Resolves at the next failed connect (or [`check_reachable`]) after it is first polled.
pub(crate) fn a_connect_failed() -> tokio::sync::futures::Notified<'static> {
    CONNECT_FAILED.notified()
}

#[derive(Debug)]
pub(crate) struct AppUnix {
    socket: AsyncFd<StdUnixStream>,
    /// A duplicate of the socket registered for write readiness, only while a write waits for
    /// room in the socket buffer.
    waiting_write: Option<AsyncFd<StdUnixStream>>,
}

impl AppUnix {
    pub(crate) async fn connect(path: &Path) -> io::Result<AppUnix> {
        // tokio's connect waits for a connect that is in progress; then the socket leaves
        // tokio's registration for ours.
        let stream = tokio::net::UnixStream::connect(path)
            .await
            .inspect_err(connect_failed)?
            .into_std()?;
        Ok(AppUnix {
            socket: register(stream, Interest::READABLE)?,
            waiting_write: None,
        })
    }
}

fn register(socket: StdUnixStream, interest: Interest) -> io::Result<AsyncFd<StdUnixStream>> {
    // SAFETY: the `UnixStream` owns its descriptor, which stays open and the same until the
    // `AsyncFd` (which owns the stream) is dropped.
    unsafe { AsyncFd::register_with_interest(socket, interest) }.map_err(io::Error::from)
}

impl AsyncRead for AppUnix {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut guard = ready!(this.socket.poll_read_ready(cx))?;
            // SAFETY: recv writes only initialised bytes into the slice, and `n` of them.
            let unfilled = unsafe { buf.unfilled_mut() };
            let room = unfilled.len();
            match guard.try_io(|s| socket2::SockRef::from(s.get_ref()).recv(unfilled)) {
                Ok(Ok(n)) => {
                    // A read that did not fill the buffer emptied the socket: the next read
                    // waits for the next edge instead of a recv that would only say
                    // EWOULDBLOCK (one system call per response saved; tokio's own sockets do
                    // the same).
                    if n > 0 && n < room {
                        guard.clear_ready();
                    }
                    // SAFETY: recv initialised the first `n` bytes.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for AppUnix {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            match socket2::SockRef::from(this.socket.get_ref()).send(data) {
                Ok(n) => {
                    this.waiting_write = None;
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if this.waiting_write.is_none() {
                        // Registering reports the current state: room that appeared since the
                        // write failed is not missed.
                        let dup = this.socket.get_ref().try_clone()?;
                        this.waiting_write = Some(register(dup, Interest::WRITABLE)?);
                    }
                    let waiter = this.waiting_write.as_ref().expect("just set");
                    let mut guard = ready!(waiter.poll_write_ready(cx))?;
                    guard.clear_ready();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.socket.get_ref().shutdown(Shutdown::Write))
    }
}

/// A pooled connection to the app or upstream.
pub(crate) type AppStream = Stream<AppUnix>;

impl AppStream {
    pub(crate) async fn connect(to: &Upstream) -> io::Result<AppStream> {
        match to {
            Upstream::Unix(path) => Ok(Stream::Unix(AppUnix::connect(path).await?)),
            Upstream::Tcp(authority) => Stream::tcp(TcpStream::connect(authority.as_str()).await?),
        }
    }
}
