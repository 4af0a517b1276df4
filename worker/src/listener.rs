//! Listening sockets and the client streams they yield.
//!
//! Owns turning an inherited, already-bound fd into a tokio listener (TCP over IPv4/IPv6, or a
//! Unix stream socket: the family is read from the socket itself), accepting from it (with the
//! readiness-driven `accept` of the event loop, and a raw non-blocking `accept_now` that really
//! asks the kernel, used to empty the accept queue on drain), and classifying accept errors.
//! It must not bind, listen or change socket options of the listener: the master owns those.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use socket2::{Domain, SockRef, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// A listening socket handed over by the master.
#[derive(Debug)]
pub(crate) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Wraps an inherited socket to accept on. Must run inside the tokio runtime (the socket is
    /// registered with its reactor). The fd's blocking mode is unknown, so it is made
    /// non-blocking here. A socket that is not listening yet (the master leaves a new worker
    /// number's reuseport sockets so, until this worker is ready) is made to listen with
    /// `backlog`; one that is keeps its queue and its length (systemd's `Backlog=`, say).
    pub(crate) fn from_fd(fd: OwnedFd, backlog: u32) -> io::Result<Listener> {
        let socket = Socket::from(fd);
        if socket.r#type()? != Type::STREAM {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "listener fd is not a stream socket",
            ));
        }
        if !socket.is_listener()? {
            // listen() on an unbound socket would pick a random port: refuse it instead.
            let bound = socket
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .is_some_and(|a| a.port() != 0);
            if !bound {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "listener fd is not listening and not bound to a port",
                ));
            }
            socket.listen(backlog.min(i32::MAX as u32) as i32)?;
        }
        let domain = socket.domain()?;
        socket.set_nonblocking(true)?;
        if domain == Domain::UNIX {
            let std = std::os::unix::net::UnixListener::from(OwnedFd::from(socket));
            Ok(Listener::Unix(UnixListener::from_std(std)?))
        } else if domain == Domain::IPV4 || domain == Domain::IPV6 {
            let std = std::net::TcpListener::from(OwnedFd::from(socket));
            Ok(Listener::Tcp(TcpListener::from_std(std)?))
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("listener fd has unsupported address family {domain:?}"),
            ))
        }
    }

    /// Where this listener listens, for logs.
    pub(crate) fn local_addr(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|e| format!("tcp (unknown: {e})"), |a| a.to_string()),
            Listener::Unix(l) => match l.local_addr() {
                Ok(a) => match a.as_pathname() {
                    Some(p) => format!("unix:{}", p.display()),
                    None => "unix:(unnamed)".to_string(),
                },
                Err(e) => format!("unix (unknown: {e})"),
            },
        }
    }

    /// Waits for the next connection. TCP connections get TCP_NODELAY: responses are written
    /// whole, so Nagle's algorithm would only add latency.
    pub(crate) async fn accept(&self) -> io::Result<(Stream, Peer)> {
        match self {
            Listener::Tcp(l) => {
                let (s, addr) = l.accept().await?;
                Ok((Stream::tcp(s)?, Peer::Tcp(addr)))
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                Ok((Stream::Unix(s), Peer::Unix))
            }
        }
    }

    /// One `accept(2)` on the (non-blocking) listener: `WouldBlock` once the kernel's accept
    /// queue is empty. Unlike `accept`, this does not trust the reactor's cached readiness, which
    /// may not yet reflect connections that arrived since the event loop last polled; draining
    /// must see every connection the kernel already completed.
    pub(crate) fn accept_now(&self) -> io::Result<(Stream, Peer)> {
        let sock = match self {
            Listener::Tcp(l) => SockRef::from(l),
            Listener::Unix(l) => SockRef::from(l),
        };
        let (socket, addr) = sock.accept()?;
        socket.set_nonblocking(true)?;
        match self {
            Listener::Tcp(_) => {
                let s = TcpStream::from_std(std::net::TcpStream::from(OwnedFd::from(socket)))?;
                let peer = addr.as_socket().map_or(Peer::Unix, Peer::Tcp);
                Ok((Stream::tcp(s)?, peer))
            }
            Listener::Unix(_) => {
                let s = std::os::unix::net::UnixStream::from(OwnedFd::from(socket));
                Ok((Stream::Unix(UnixStream::from_std(s)?), Peer::Unix))
            }
        }
    }
}

/// Who is on the other end of a connection, for logs.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Peer {
    Tcp(SocketAddr),
    Unix,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(a) => a.fmt(f),
            Peer::Unix => f.write_str("unix"),
        }
    }
}

/// What to do after `accept` failed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AcceptError {
    /// The failure belongs to one connection (it was reset or aborted while queued): go on.
    Connection,
    /// The process or host is out of a resource (fds, socket buffers, memory): retrying at once
    /// would spin, so back off before the next accept.
    Resources,
    /// Anything else; treated like `Resources` (log and back off), never a tight loop.
    Other,
}

impl AcceptError {
    pub(crate) fn classify(e: &io::Error) -> AcceptError {
        use nix::libc;
        match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                AcceptError::Resources
            }
            // accept(2) on Linux passes pending network errors of the new socket through; they
            // concern that one client only.
            Some(
                libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::EPROTO
                | libc::EPERM
                | libc::EINTR
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
                | libc::ETIMEDOUT,
            ) => AcceptError::Connection,
            _ => AcceptError::Other,
        }
    }
}

/// A connection over TCP or a Unix socket: an accepted client (`Stream`), or the worker's
/// connection to its app (`Stream<AppUnix>`, see `appconn`).
#[derive(Debug)]
pub(crate) enum Stream<U = UnixStream> {
    Tcp(TcpStream),
    Unix(U),
}

impl<U> Stream<U> {
    pub(crate) fn tcp(s: TcpStream) -> io::Result<Stream<U>> {
        s.set_nodelay(true)?;
        Ok(Stream::Tcp(s))
    }
}

impl Stream {
    /// The client socket's descriptor, for `unsent_bytes`.
    pub(crate) fn raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

/// Bytes written to the socket `fd` that its peer has not taken yet (for TCP: not yet
/// acknowledged), from the kernel (`TIOCOUTQ`, alias `SIOCOUTQ`); `None` if it cannot say.
/// One system call: for the few moments a write to a client is blocked, never per request.
#[allow(unsafe_code)]
pub(crate) fn unsent_bytes(fd: RawFd) -> Option<u64> {
    let mut unsent: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one `c_int` through the pointer, which points to one. A stale or
    // reused `fd` can only make the call fail or answer for another socket: no memory is at
    // stake, and the caller keeps its connection (and so the fd) open meanwhile.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut unsent) };
    (rc == 0).then(|| u64::try_from(unsent).unwrap_or(0))
}

/// Makes the close of socket `fd` a reset (`SO_LINGER` 0) that drops whatever the kernel still
/// holds to send: for a client cut off for not reading, which would otherwise be sent it after
/// the close, at its pace.
#[allow(unsafe_code)]
pub(crate) fn reset_on_close(fd: RawFd) {
    // SAFETY: the caller keeps the connection, and so `fd`, open for the borrow's short life.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let _ = SockRef::from(&fd).set_linger(Some(std::time::Duration::ZERO));
}

impl<U: AsyncRead + Unpin> AsyncRead for Stream<U> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl<U: AsyncWrite + Unpin> AsyncWrite for Stream<U> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        // tokio's TCP and Unix streams are; hyper then writes head and body with one writev.
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
