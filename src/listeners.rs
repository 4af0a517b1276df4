//! The listening sockets: parsed from `server.bind`, checked free, bound and kept by the master
//! for its whole life, so a respawned worker inherits the same socket (and the connections
//! queued on it) instead of a new one.
//!
//! It must not accept connections: only workers do.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};
use tracing::{info, warn};
use worker::config::AcceptMode;

/// One entry of `server.bind`, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BindAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for BindAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BindAddr::Tcp(a) => write!(f, "{a}"),
            BindAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl BindAddr {
    pub fn parse(s: &str) -> Result<BindAddr> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                bail!("bind address {s:?}: empty unix socket path");
            }
            return Ok(BindAddr::Unix(PathBuf::from(path)));
        }
        let addr = s
            .to_socket_addrs()
            .with_context(|| format!("bind address {s:?}: cannot resolve"))?
            .next()
            .with_context(|| format!("bind address {s:?}: resolves to no address"))?;
        Ok(BindAddr::Tcp(addr))
    }
}

/// The sockets of one bind address.
struct Group {
    /// The address bound (port 0 resolved to the port we got).
    addr: BindAddr,
    /// The address as configured (port 0 kept), which a reload matches against.
    requested: BindAddr,
    /// `reuseport` TCP: one socket per worker number (index = id - 1), all on the same port;
    /// `None` where the master released it (see `release`).
    /// `shared` TCP and every Unix socket: one socket for all workers.
    sockets: Vec<Option<Socket>>,
    per_worker: bool,
    /// A Unix socket file we created and must remove when we stop.
    unix_path: Option<PathBuf>,
}

/// One socket passed by the service manager (see `activation::from_env`).
pub struct Activated {
    pub socket: Socket,
    pub addr: BindAddr,
    pub fd: RawFd,
    /// Its name from `LISTEN_FDNAMES` (`FileDescriptorName=` in the .socket unit), if given.
    pub name: Option<String>,
}

/// What a rebind does with each address of the new list.
enum Next {
    /// Keeps the group already listening there (its index).
    Keep(usize),
    /// A group bound afresh.
    New(Group),
}

/// Binds a new group for `a`: one socket, or one per worker number (`per_worker`, reuseport
/// TCP), listening at once with `backlog` unless `listen_now` is `None` (their workers listen).
fn new_group(
    a: &BindAddr,
    per_worker: bool,
    workers: u32,
    backlog: i32,
    listen_now: Option<i32>,
    unix_mode: u32,
) -> Result<Group> {
    Ok(match a {
        BindAddr::Tcp(sa) => {
            let first = bind_tcp(
                *sa,
                if per_worker {
                    listen_now
                } else {
                    Some(backlog)
                },
            )?;
            let actual = local_tcp_addr(&first)?;
            let mut g = Group {
                addr: BindAddr::Tcp(actual),
                requested: a.clone(),
                sockets: vec![Some(first)],
                per_worker,
                unix_path: None,
            };
            if per_worker {
                for _ in 1..workers {
                    g.sockets.push(Some(bind_tcp(actual, listen_now)?));
                }
            }
            g
        }
        BindAddr::Unix(path) => Group {
            sockets: vec![Some(bind_unix(path, backlog, unix_mode)?)],
            addr: a.clone(),
            requested: a.clone(),
            per_worker: false,
            unix_path: Some(path.clone()),
        },
    })
}

pub struct Listeners {
    groups: Vec<Group>,
    backlog: i32,
    /// The Unix socket files are not ours to remove: handed over to a new master (binary
    /// upgrade), or, in a new master, not yet taken over (its upgrade may still fail, and the
    /// old master serves on them).
    handed_over: bool,
    /// The sockets came from systemd (`adopt`): kept as they are for the master's life.
    adopted: bool,
}

/// One group of listening sockets as handed from an upgrading master to the new one (in the
/// environment, as JSON): the fds themselves are inherited across the exec by number.
#[derive(Debug, Serialize, Deserialize)]
pub struct HandedGroup {
    /// As configured (port 0 kept), so the new master's config matches it like a reload does.
    pub requested: String,
    /// As bound.
    pub addr: String,
    pub per_worker: bool,
    /// The socket of each worker number (reuseport), or the one shared socket; `None` where
    /// released.
    pub fds: Vec<Option<RawFd>>,
    /// The Unix socket file to remove at stop, now the new master's job.
    pub unix_path: Option<PathBuf>,
}

impl Listeners {
    /// Checks every address is free, then binds and listens. With `reuseport`, sockets for
    /// worker numbers `1..=workers` are created now; more are created on demand.
    pub fn bind(
        binds: &[String],
        mode: AcceptMode,
        workers: u32,
        backlog: u32,
        unix_mode: u32,
    ) -> Result<Listeners> {
        let mut listeners = Listeners {
            groups: Vec::new(),
            backlog: 0,
            handed_over: false,
            adopted: false,
        };
        listeners.rebind(binds, mode, workers, backlog, unix_mode)?;
        Ok(listeners)
    }

    /// Takes over the sockets an upgrading master handed over, then moves to `binds` like a
    /// reload: the addresses still configured keep their sockets (and the connections queued
    /// on them), the others are closed, new ones are bound. Sockets of worker numbers above
    /// `workers` are closed too: nobody would accept what lands there.
    pub fn inherit(
        handed: Vec<HandedGroup>,
        adopted: bool,
        binds: &[String],
        mode: AcceptMode,
        workers: u32,
        backlog: u32,
        unix_mode: u32,
    ) -> Result<Listeners> {
        let mut groups = Vec::with_capacity(handed.len());
        for h in handed {
            let mut sockets = Vec::with_capacity(h.fds.len());
            for fd in h.fds {
                sockets.push(match fd {
                    Some(fd) => Some(inherited_listener(
                        fd,
                        &format!("the listener for {} handed over by the old master", h.addr),
                    )?),
                    None => None,
                });
            }
            groups.push(Group {
                addr: BindAddr::parse(&h.addr)?,
                requested: BindAddr::parse(&h.requested)?,
                sockets,
                per_worker: h.per_worker,
                unix_path: h.unix_path,
            });
        }
        // Sockets systemd passed the old master stay as they are (`rebind` keeps them). The
        // Unix socket files stay the old master's until this one takes over (`take_ownership`).
        let mut listeners = Listeners {
            groups,
            backlog: 0,
            handed_over: true,
            adopted,
        };
        listeners.rebind(binds, mode, workers, backlog, unix_mode)?;
        for g in listeners.groups.iter_mut().filter(|g| g.per_worker) {
            g.sockets.truncate(workers as usize);
        }
        Ok(listeners)
    }

    /// What a new master needs to take these sockets over (see `inherit`), and the fds it must
    /// inherit. The Unix socket files become its to remove once it has taken over
    /// (`set_handed_over`).
    pub fn hand_over(&self) -> (Vec<HandedGroup>, Vec<RawFd>) {
        let mut fds = Vec::new();
        let groups = self
            .groups
            .iter()
            .map(|g| {
                // A socket no worker listens on yet holds no connection: the new master makes
                // its own for that worker number.
                let own: Vec<Option<RawFd>> = g
                    .sockets
                    .iter()
                    .map(|s| s.as_ref().filter(|s| listening(s)).map(|s| s.as_raw_fd()))
                    .collect();
                fds.extend(own.iter().flatten());
                HandedGroup {
                    requested: g.requested.to_string(),
                    addr: g.addr.to_string(),
                    per_worker: g.per_worker,
                    fds: own,
                    unix_path: g.unix_path.clone(),
                }
            })
            .collect();
        (groups, fds)
    }

    /// From now on a new master owns the Unix socket files: `close` leaves them.
    pub fn set_handed_over(&mut self) {
        self.handed_over = true;
    }

    /// The new master of an upgrade has taken over: the Unix socket files are its to remove.
    pub fn take_ownership(&mut self) {
        self.handed_over = false;
    }

    /// Keeps the sockets systemd passed (socket activation) instead of binding `server.bind`.
    /// systemd opens one socket per address, so each is shared by every worker, whatever
    /// `server.accept` says. Nothing is probed or bound, and no file is ever removed: the
    /// sockets, and their Unix socket files, belong to the .socket unit.
    pub fn adopt(sockets: Vec<Activated>) -> Listeners {
        let groups = sockets
            .into_iter()
            .map(|a| {
                info!(
                    addr = %a.addr,
                    fd = a.fd,
                    name = a.name.as_deref().unwrap_or("-"),
                    "adopted a socket from systemd (LISTEN_FDS)"
                );
                Group {
                    addr: a.addr.clone(),
                    requested: a.addr,
                    sockets: vec![Some(a.socket)],
                    per_worker: false,
                    unix_path: None,
                }
            })
            .collect();
        info!("socket activation: server.bind is not used; every worker accepts on the adopted sockets (accept = shared)");
        Listeners {
            groups,
            backlog: 0,
            handed_over: false,
            adopted: true,
        }
    }

    /// Whether these are systemd's sockets (`adopt`).
    pub fn is_adopted(&self) -> bool {
        self.adopted
    }

    /// Moves to a new set of addresses (a reload): addresses already bound in the same mode
    /// keep their sockets (and the connections queued on them); new ones are probed and bound;
    /// the master's copies of the others are closed (workers still holding them drain them).
    /// All or nothing: on error nothing changed.
    pub fn rebind(
        &mut self,
        binds: &[String],
        mode: AcceptMode,
        workers: u32,
        backlog: u32,
        unix_mode: u32,
    ) -> Result<()> {
        if self.adopted {
            // The .socket unit owns the addresses: changing them means changing that unit.
            warn!("reload: server.bind, accept, backlog and unix_mode do not apply under socket activation; keeping the sockets systemd passed (edit the .socket unit and restart it to change them)");
            return Ok(());
        }
        let backlog = backlog.min(i32::MAX as u32) as i32;
        let mut addrs = Vec::new();
        for b in binds {
            let a = BindAddr::parse(b)?;
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
        let per_worker_for =
            |a: &BindAddr| matches!(a, BindAddr::Tcp(_)) && mode == AcceptMode::Reuseport;
        // At the start every worker number's socket listens at once: nothing serves yet, and
        // connections wait for the first workers. Later (a reload, a binary upgrade) a new
        // address's reuseport sockets wait for their workers, like `fds_for`'s.
        let listen_now = (self.groups.is_empty() && !self.handed_over).then_some(backlog);
        // An address we already listen on: asked for the same way ("port 0" again keeps the
        // port we got), or an explicit port that is the one a "port 0" got.
        let held = |a: &BindAddr| {
            self.groups
                .iter()
                .position(|g| &g.requested == a)
                .or_else(|| self.groups.iter().position(|g| &g.addr == a))
        };
        let reusable =
            |a: &BindAddr| held(a).filter(|&i| self.groups[i].per_worker == per_worker_for(a));
        // All probes before any bind: a half-bound set would be harder to explain. Addresses
        // we hold ourselves are not probed (the probe would find us).
        for a in addrs.iter().filter(|a| held(a).is_none()) {
            probe_free(a)?;
        }
        let mut next = Vec::with_capacity(addrs.len());
        let mut kept = vec![false; self.groups.len()];
        for a in &addrs {
            // Each group serves one address of the new list (two addresses can name the same
            // group: "127.0.0.1:0" and the port it got); a second one gets a new bind.
            if let Some(i) = reusable(a).filter(|&i| !kept[i]) {
                kept[i] = true;
                next.push(Next::Keep(i));
                continue;
            }
            let group = new_group(
                a,
                per_worker_for(a),
                workers,
                backlog,
                listen_now,
                unix_mode,
            )?;
            next.push(Next::New(group));
        }
        self.commit(next, backlog);
        self.backlog = backlog;
        Ok(())
    }

    /// A rebind's second half, which cannot fail: the new set of groups in order, the old
    /// groups not kept closed (and their Unix socket files removed, unless a new group uses the
    /// same path or the sockets were handed over to a new master).
    fn commit(&mut self, next: Vec<Next>, backlog: i32) {
        let mut old: Vec<Option<Group>> = std::mem::take(&mut self.groups)
            .into_iter()
            .map(Some)
            .collect();
        for n in next {
            let g = match n {
                Next::Keep(i) => {
                    let g = old[i].take().expect("each old group is kept at most once");
                    if backlog != self.backlog {
                        // Updates the queue length in place; a socket whose worker has not
                        // listened yet is left to it.
                        for s in g.sockets.iter().flatten().filter(|s| listening(s)) {
                            let _ = s.listen(backlog);
                        }
                    }
                    g
                }
                Next::New(g) => g,
            };
            self.groups.push(g);
        }
        for g in old.into_iter().flatten() {
            let still_used = self
                .groups
                .iter()
                .any(|n| n.unix_path.is_some() && n.unix_path == g.unix_path);
            drop(g.sockets);
            if let (Some(p), false, false) = (g.unix_path, still_used, self.handed_over) {
                let _ = std::fs::remove_file(p);
            }
        }
    }

    /// The addresses actually bound (port 0 resolved), for the log.
    pub fn addresses(&self) -> impl Iterator<Item = (&BindAddr, usize)> {
        self.groups
            .iter()
            .map(|g| (&g.addr, g.sockets.iter().flatten().count()))
    }

    /// The fds worker number `id` (1-based) serves; creates its reuseport sockets if it has
    /// none (a new worker number, or one whose sockets were released). Sockets created here are
    /// bound but not listening: a reuseport socket joins the group, and gets its share of new
    /// connections, only at `listen()`, which the worker calls once it is ready to accept (its
    /// app is up). Until then the connections go to the workers that serve, instead of waiting
    /// for a boot that may take seconds or fail.
    pub fn fds_for(&mut self, id: u32) -> Result<Vec<RawFd>> {
        let index = id as usize - 1;
        let mut fds = Vec::with_capacity(self.groups.len());
        for g in &mut self.groups {
            let socket = if g.per_worker {
                let BindAddr::Tcp(addr) = g.addr else {
                    unreachable!("only TCP groups are per-worker")
                };
                if g.sockets.len() <= index {
                    g.sockets.resize_with(index + 1, || None);
                }
                if g.sockets[index].is_none() {
                    g.sockets[index] = Some(bind_tcp(addr, None)?);
                }
                &g.sockets[index]
            } else {
                &g.sockets[0]
            };
            fds.push(socket.as_ref().expect("present").as_raw_fd());
        }
        Ok(fds)
    }

    /// Worker `id` reported ready, so its own sockets listen, with the `server.backlog` of the
    /// configuration it started with: brings them to the current one (a reload may have
    /// changed it while the worker booted).
    pub fn sync_backlog(&self, id: u32) {
        for g in self.groups.iter().filter(|g| g.per_worker) {
            if let Some(Some(s)) = g.sockets.get(id as usize - 1) {
                if listening(s) {
                    let _ = s.listen(self.backlog);
                }
            }
        }
    }

    /// Closes the master's copy of worker `id`'s own (reuseport) sockets. A reuseport socket
    /// that nobody accepts on still gets its share of new connections, which would then wait
    /// forever; so when a worker number goes away (TTOU) or will stay empty for a while (respawn
    /// backoff), its sockets leave the group. A worker still holding its copy drains the queue
    /// before it closes it. Shared sockets are never released.
    pub fn release(&mut self, id: u32) {
        for g in self.groups.iter_mut().filter(|g| g.per_worker) {
            if let Some(s) = g.sockets.get_mut(id as usize - 1) {
                *s = None;
            }
        }
    }

    /// Closes every socket and removes the Unix socket files we created.
    pub fn close(self) {
        for g in self.groups {
            drop(g.sockets);
            if let (Some(p), false) = (g.unix_path, self.handed_over) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// Takes fd `fd`, passed to this process by number (socket activation, a binary upgrade), and
/// checks it is a listening stream socket; an error names `what` passed it and the fd.
pub fn inherited_listener(fd: RawFd, what: &str) -> Result<Socket> {
    let socket = Socket::from(crate::sys::inherited_fd(fd, what)?);
    let kind = socket.r#type().map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOTSOCK) {
            anyhow::anyhow!("{what}: fd {fd} is not a socket")
        } else {
            anyhow::Error::new(e).context(format!("{what}: cannot inspect fd {fd}"))
        }
    })?;
    if kind != Type::STREAM {
        let kind = match kind {
            Type::DGRAM => "datagram",
            Type::SEQPACKET => "seqpacket",
            _ => "non-stream",
        };
        bail!("{what}: fd {fd} is a {kind} socket; supervisor serves HTTP on stream sockets only (ListenStream=)");
    }
    let listening = socket
        .is_listener()
        .with_context(|| format!("{what}: cannot inspect fd {fd}"))?;
    if !listening {
        bail!("{what}: fd {fd} is a stream socket that is not listening (SO_ACCEPTCONN is off)");
    }
    Ok(socket)
}

fn local_tcp_addr(s: &Socket) -> Result<SocketAddr> {
    s.local_addr()?
        .as_socket()
        .context("listening socket has no TCP address")
}

/// SO_REUSEPORT lets a second process bind a port that is already served and silently take half
/// its traffic. So before binding, probe each address *without* SO_REUSEPORT: the probe fails
/// if anything (another program, another supervisor) listens there.
fn probe_free(addr: &BindAddr) -> Result<()> {
    match addr {
        BindAddr::Tcp(sa) => {
            if sa.port() == 0 {
                return Ok(()); // the kernel picks a free port
            }
            let probe = Socket::new(Domain::for_address(*sa), Type::STREAM, None)?;
            // SO_REUSEADDR only so that our own connections in TIME_WAIT from a previous run do
            // not count as "in use"; it never allows binding over a listening socket.
            probe.set_reuse_address(true)?;
            if sa.is_ipv6() {
                probe.set_only_v6(true)?;
            }
            match probe.bind(&SockAddr::from(*sa)) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                    bail!("address {sa} is already in use: another program (or another supervisor) is listening there")
                }
                Err(e) => Err(e).with_context(|| format!("cannot bind {sa}")),
            }
        }
        BindAddr::Unix(path) => {
            let meta = match std::fs::symlink_metadata(path) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot inspect {}", path.display()))
                }
            };
            if !meta.file_type().is_socket() {
                bail!(
                    "cannot bind unix:{}: the path exists and is not a socket",
                    path.display()
                );
            }
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => bail!(
                    "address unix:{} is already in use: another program (or another supervisor) is listening there",
                    path.display()
                ),
                // Nobody listens: a stale file left by a process that did not clean up.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path)
                        .with_context(|| format!("cannot remove stale socket {}", path.display()))
                }
                // Anything else (no permission, ...) proves nothing: the file is not ours to remove.
                Err(e) => bail!(
                    "cannot bind unix:{}: a socket exists there and connecting to it failed ({e}); \
                     remove it if it is stale",
                    path.display()
                ),
            }
        }
    }
}

fn listening(s: &Socket) -> bool {
    s.is_listener().unwrap_or(false)
}

/// A reuseport TCP socket bound to `sa`; listening with `backlog`, or (`None`) left for the
/// worker to listen on (see `Listeners::fds_for`).
fn bind_tcp(sa: SocketAddr, backlog: Option<i32>) -> Result<Socket> {
    let s = Socket::new(Domain::for_address(sa), Type::STREAM.cloexec(), None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if sa.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&SockAddr::from(sa)).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            anyhow::anyhow!("address {sa} is already in use")
        } else {
            anyhow::Error::new(e).context(format!("cannot bind {sa}"))
        }
    })?;
    if let Some(backlog) = backlog {
        s.listen(backlog)
            .with_context(|| format!("cannot listen on {sa}"))?;
    }
    Ok(s)
}

fn bind_unix(path: &Path, backlog: i32, mode: u32) -> Result<Socket> {
    let s = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None)?;
    let addr = SockAddr::unix(path)?;
    // The socket file gets its permissions at bind time from the umask; setting the umask around
    // the bind (the master is single-threaded) avoids a window where the file is more open than
    // `server.unix_mode` says.
    let mask = nix::sys::stat::Mode::from_bits_truncate(!mode & 0o777);
    let old = nix::sys::stat::umask(mask);
    let bound = s.bind(&addr);
    nix::sys::stat::umask(old);
    bound.with_context(|| format!("cannot bind unix:{}", path.display()))?;
    s.listen(backlog)
        .with_context(|| format!("cannot listen on unix:{}", path.display()))?;
    Ok(s)
}
