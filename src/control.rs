//! The control socket: where `supervisor status`, `reload`, `stop`, `scale` and `upgrade` reach a
//! running master. This module owns where the socket is, how it is created and guarded, the
//! wire protocol, and the master's side of the connections; what each request does is the
//! master's business (`master::requests`), and the commands' side is `commands`.
//!
//! Where: `server.control_socket`, else `supervisor-<hash>.sock` in `server.runtime_dir`, else
//! `/run/supervisor` (root, or a user who can write there), else `$XDG_RUNTIME_DIR`, else the
//! temporary directory, `<hash>` a short hash of the resolved `server.bind`, so that a command
//! run with the same configuration finds the same socket and two instances on different
//! addresses do not collide. An address with port 0 does not say which instance it is (each
//! gets its own port), so then the name also carries the master's pid,
//! `supervisor-<hash>-<pid>.sock`, and a command picks the one such master that is alive.
//!
//! Who: the socket file is mode 0600, created in a private directory and renamed into place (so
//! no umask ever exposes it), and each connection's peer is checked with `SO_PEERCRED`: only the
//! master's own uid and root are served; anyone else is told so, logged and disconnected.
//!
//! Protocol (version 1): the client sends one JSON object on one line, `{"v":1,"cmd":"status"}`;
//! the master answers with one JSON line, `{"v":1,"ok":true,"master_pid":..,...}` and closes,
//! except after `stop`, when it keeps the connection open until it exits, so that the command
//! can wait for that. A client has `CLIENT_TIMEOUT` to send its request and read the answer;
//! at most `MAX_CLIENTS` are served at once, and a request is at most `MAX_REQUEST_BYTES`: the
//! master's loop never waits for a client. When all `MAX_CLIENTS` are taken, the one that has
//! been silent longest (no complete request yet) is closed to make room, so that connections
//! that send nothing cannot lock the commands out until their deadline.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::poll::{PollFd, PollFlags};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};
use worker::config::Config;

use crate::pidfile::alive;
use crate::status::Status;

pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line the master reads.
const MAX_REQUEST_BYTES: usize = 4096;
/// Clients served at once; more are told the master is busy.
const MAX_CLIENTS: usize = 8;
/// Time a client has to send its request and take the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// `stop` clients kept connected until the master exits.
const MAX_STOP_WAITERS: usize = 16;
/// After `accept` failed for want of resources (EMFILE), the listener rests this long rather
/// than wake the loop again at once.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(200);

/// A request, the `cmd` field naming which.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// Is a master there? (Used by `start` to tell a live socket from a stale one.)
    Ping,
    Status,
    Reload,
    Stop {
        #[serde(default)]
        fast: bool,
    },
    Scale {
        workers: u32,
    },
    Upgrade,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    v: u32,
    #[serde(flatten)]
    request: Request,
}

/// The answer to any request.
#[derive(Default, Serialize, Deserialize)]
pub struct Reply {
    pub v: u32,
    pub ok: bool,
    pub master_pid: u32,
    /// What was done, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Why it failed; may be several lines (a configuration's errors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The peer is not allowed to use this socket.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub denied: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// The number of workers after `scale`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<u32>,
    /// After `stop`: how long the master may take to exit (its stop timeout). After `upgrade`:
    /// how long the new master has to get ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
    /// After `upgrade`: the new master's pid, and where its control socket will be once it has
    /// taken over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_master: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_socket: Option<PathBuf>,
}

impl Reply {
    pub fn ok(message: impl Into<String>) -> Reply {
        Reply {
            v: PROTOCOL_VERSION,
            ok: true,
            master_pid: std::process::id(),
            message: Some(message.into()),
            ..Reply::default()
        }
    }

    pub fn err(error: impl Into<String>) -> Reply {
        Reply {
            v: PROTOCOL_VERSION,
            ok: false,
            master_pid: std::process::id(),
            error: Some(error.into()),
            ..Reply::default()
        }
    }
}

/// Where a master's control socket is, from its configuration.
#[derive(Clone, Debug, PartialEq)]
pub enum Location {
    /// One path (`server.control_socket`, or the default for fixed addresses).
    Fixed(PathBuf),
    /// `<dir>/<prefix>-<pid>.sock`: the default when `server.bind` has a port 0.
    PerPid { dir: PathBuf, prefix: String },
}

impl Location {
    pub fn of(config: &Config) -> Location {
        if !config.server.control_socket.is_empty() {
            return Location::Fixed(PathBuf::from(&config.server.control_socket));
        }
        let dir = default_dir(&config.server.runtime_dir);
        let prefix = format!("supervisor-{:012x}", bind_hash(&config.server.bind));
        if config.server.bind.iter().any(|b| has_port_zero(b)) {
            Location::PerPid { dir, prefix }
        } else {
            Location::Fixed(dir.join(format!("{prefix}.sock")))
        }
    }

    /// The path for master `pid`.
    pub fn for_master(&self, pid: u32) -> PathBuf {
        match self {
            Location::Fixed(p) => p.clone(),
            Location::PerPid { dir, prefix } => dir.join(format!("{prefix}-{pid}.sock")),
        }
    }

    /// In words, for `supervisor check`.
    pub fn describe(&self) -> String {
        match self {
            Location::Fixed(p) => p.display().to_string(),
            Location::PerPid { dir, prefix } => format!(
                "{} (server.bind has port 0: the name ends with the master's pid)",
                dir.join(format!("{prefix}-PID.sock")).display()
            ),
        }
    }

    /// The socket of the one running master this location can mean.
    pub fn find(&self) -> Result<PathBuf, String> {
        let (dir, prefix) = match self {
            Location::Fixed(p) => return Ok(p.clone()),
            Location::PerPid { dir, prefix } => (dir, prefix),
        };
        let mut live: Vec<PathBuf> = per_pid_sockets(dir, prefix)
            .into_iter()
            .filter(|(pid, _)| alive(*pid))
            .map(|(_, p)| p)
            .collect();
        live.sort();
        match live.len() {
            0 => Err(format!(
                "no supervisor master is running with this configuration: no {} \
                 (is it running, and with the same server.bind?)",
                dir.join(format!("{prefix}-PID.sock")).display()
            )),
            1 => Ok(live.remove(0)),
            _ => Err(format!(
                "several masters run with this configuration (server.bind has port 0); \
                 choose one with --socket: {}",
                live.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

/// Where default control sockets go (see the module's comment).
fn default_dir(runtime_dir: &str) -> PathBuf {
    // Not from $RUNTIME_DIRECTORY: a command run from a shell must find the socket of a master
    // started by systemd, whose environment it does not share. /run/supervisor is what the
    // shipped unit's RuntimeDirectory= creates, and what root uses anyway.
    if !runtime_dir.is_empty() {
        return PathBuf::from(runtime_dir);
    }
    let shared = Path::new(SHARED_DIR);
    let writable = nix::unistd::access(shared, nix::unistd::AccessFlags::W_OK).is_ok();
    if writable || nix::unistd::geteuid().is_root() {
        return shared.to_path_buf();
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| Path::new(d).is_absolute()) {
        return PathBuf::from(dir);
    }
    std::env::temp_dir()
}

/// The default directory of the control socket for root, or for a user it belongs to.
const SHARED_DIR: &str = "/run/supervisor";

/// FNV-1a (64 bits, the low 48 kept) over the sorted addresses: stable across builds and
/// versions, unlike std's hasher.
fn bind_hash(bind: &[String]) -> u64 {
    let mut sorted: Vec<&str> = bind.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in sorted.join("\n").bytes() {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h & 0xffff_ffff_ffff
}

fn has_port_zero(addr: &str) -> bool {
    !addr.starts_with("unix:") && addr.rsplit_once(':').is_some_and(|(_, port)| port == "0")
}

/// `<prefix>-<pid>.sock` entries of `dir`.
fn per_pid_sockets(dir: &Path, prefix: &str) -> Vec<(u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let pid = name
                .to_str()?
                .strip_prefix(prefix)?
                .strip_prefix('-')?
                .strip_suffix(".sock")?
                .parse()
                .ok()?;
            Some((pid, e.path()))
        })
        .collect()
}

/// Removes the per-pid sockets of masters that died without removing theirs (SIGKILL).
fn remove_dead_masters_sockets(location: &Location) {
    let Location::PerPid { dir, prefix } = location else {
        return;
    };
    let me = nix::unistd::geteuid().as_raw();
    for (pid, path) in per_pid_sockets(dir, prefix) {
        let ours = std::fs::symlink_metadata(&path)
            .is_ok_and(|m| m.file_type().is_socket() && m.uid() == me);
        if ours && !alive(pid) && std::fs::remove_file(&path).is_ok() {
            debug!(path = %path.display(), "removed a dead master's control socket");
        }
    }
}

/// Asks whoever listens on `path` for its pid: `Ok(None)` if nobody listens there (no file, or
/// a stale one).
pub fn probe(path: &Path) -> Result<Option<u32>> {
    let mut stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            return Ok(None)
        }
        Err(e) => return Err(e).with_context(|| format!("cannot probe {}", path.display())),
    };
    // Something listens. A master answers at once; anything else still owns the path.
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok();
    stream.set_write_timeout(Some(Duration::from_secs(2))).ok();
    let pid = exchange(&mut stream, &Request::Ping)
        .ok()
        .map(|r| r.master_pid);
    Ok(Some(pid.unwrap_or(0)))
}

/// Sends `request` and reads one reply line.
pub fn exchange(stream: &mut UnixStream, request: &Request) -> std::io::Result<Reply> {
    let mut line = serde_json::to_vec(&Envelope {
        v: PROTOCOL_VERSION,
        request: request.clone(),
    })
    .expect("a request serializes");
    line.push(b'\n');
    if let Err(e) = stream.write_all(&line) {
        // A master that refuses the peer answers and closes at once, maybe before the request
        // is written: its answer is still there to read.
        if !matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) {
            return Err(e);
        }
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.contains(&b'\n') {
            break;
        }
    }
    let end = buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len());
    if end == 0 {
        return Err(std::io::Error::new(
            ErrorKind::UnexpectedEof,
            "the master closed the connection without an answer",
        ));
    }
    serde_json::from_slice(&buf[..end]).map_err(|e| {
        std::io::Error::new(
            ErrorKind::InvalidData,
            format!("not an answer from a supervisor master: {e}"),
        )
    })
}

/// The uid on the other end of a Unix stream.
pub fn peer_uid(stream: &UnixStream) -> std::io::Result<(u32, i32)> {
    let cred = getsockopt(stream, PeerCredentials)?;
    Ok((cred.uid(), cred.pid()))
}

/// Fails if another master serves `location` for us (ourselves: `pid`). A stale socket is left
/// to be replaced.
pub fn refuse_if_live(location: &Location, pid: u32) -> Result<()> {
    let path = location.for_master(pid);
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        if !meta.file_type().is_socket() {
            bail!(
                "the control socket path {} exists and is not a socket; remove it or set \
                 server.control_socket",
                path.display()
            );
        }
    }
    match probe(&path)? {
        None => Ok(()),
        Some(0) => bail!(
            "the control socket {} is already in use by another program; stop it or set \
             server.control_socket",
            path.display()
        ),
        Some(other) => bail!(
            "the control socket {} is already in use by a running supervisor master (pid \
             {other}); stop it first, or give this instance its own server.control_socket",
            path.display()
        ),
    }
}

/// One connection from a command.
struct Client {
    id: u64,
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    /// Handed to the master, waiting for its answer.
    asked: bool,
    /// Keep the connection after the answer, until the master exits (`stop`).
    hold: bool,
    /// The client went away (or sent too much): dropped without an answer.
    closed: bool,
    deadline: Instant,
}

/// The master's end: the listening socket and its clients. The socket file is removed on drop
/// (if it is still ours).
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file we made, so that we never remove another's.
    file_id: (u64, u64),
    uid: u32,
    clients: Vec<Client>,
    stop_waiters: Vec<UnixStream>,
    next_id: u64,
    /// Accepting rests until then (see `ACCEPT_BACKOFF`).
    accept_paused_until: Option<Instant>,
}

impl ControlServer {
    /// Creates the socket at `location` (for this master), replacing a stale one; the caller has
    /// checked with [`refuse_if_live`] that no master uses it.
    pub fn bind(location: &Location) -> Result<ControlServer> {
        let pid = std::process::id();
        remove_dead_masters_sockets(location);
        let path = location.for_master(pid);
        let (listener, file_id) = make_socket(&path)?;
        info!(path = %path.display(), "control socket created");
        Ok(ControlServer {
            listener,
            path,
            file_id,
            uid: nix::unistd::geteuid().as_raw(),
            clients: Vec::new(),
            stop_waiters: Vec::new(),
            next_id: 0,
            accept_paused_until: None,
        })
    }

    /// Whether the file at our path is still the socket we made.
    fn is_ours(&self) -> bool {
        std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.file_id)
    }

    /// After a failed binary upgrade: the new master may have put its socket at our path
    /// before it died (taking it with it). If the file there is not ours, a new socket is made
    /// there; clients already connected stay. Says whether one was made.
    pub fn restore(&mut self) -> Result<bool> {
        if self.is_ours() {
            return Ok(false);
        }
        let (listener, file_id) = make_socket(&self.path)?;
        self.listener = listener;
        self.file_id = file_id;
        Ok(true)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What to poll: the listener, then each client (reading, or writing its answer).
    pub fn poll_fds(&self) -> Vec<PollFd<'_>> {
        let listen = if self.accept_paused_until.is_some() {
            PollFlags::empty()
        } else {
            PollFlags::POLLIN
        };
        let mut fds = vec![PollFd::new(self.listener.as_fd(), listen)];
        for c in &self.clients {
            let flags = if c.asked {
                PollFlags::empty()
            } else if c.output.is_empty() {
                PollFlags::POLLIN
            } else {
                PollFlags::POLLOUT
            };
            fds.push(PollFd::new(c.stream.as_fd(), flags));
        }
        fds
    }

    /// Handles what `poll` reported (`ready`, in the order of [`poll_fds`]) and drops clients
    /// past their deadline; returns the requests now complete, for the master to answer with
    /// [`answer`](Self::answer).
    pub fn on_events(&mut self, ready: &[bool]) -> Vec<(u64, Request)> {
        let mut requests = Vec::new();
        let now = Instant::now();
        for (i, client) in self.clients.iter_mut().enumerate() {
            if ready.get(i + 1).copied().unwrap_or(false) {
                if client.output.is_empty() {
                    if let Some(r) = read_request(client) {
                        requests.push((client.id, r));
                    }
                } else {
                    flush(client);
                }
            }
        }
        let mut kept = Vec::with_capacity(self.clients.len());
        for c in self.clients.drain(..) {
            let done = !c.output.is_empty() && c.written == c.output.len();
            if done && c.hold && self.stop_waiters.len() < MAX_STOP_WAITERS {
                self.stop_waiters.push(c.stream);
            } else if done || c.closed {
                // Answered, or gone: closed here.
            } else if now >= c.deadline && !c.asked {
                debug!(client = c.id, "control client too slow; connection closed");
            } else {
                kept.push(c);
            }
        }
        self.clients = kept;
        if self.accept_paused_until.is_some_and(|t| now >= t) {
            self.accept_paused_until = None;
        }
        if ready.first().copied().unwrap_or(false) && self.accept_paused_until.is_none() {
            self.accept(now, &mut requests);
        }
        requests
    }

    /// Sends the master's `reply` to client `id`; `hold` keeps the connection until exit.
    pub fn answer(&mut self, id: u64, reply: &Reply, hold: bool) {
        let Some(c) = self.clients.iter_mut().find(|c| c.id == id) else {
            return;
        };
        c.asked = false;
        c.hold = hold;
        c.output = encode(reply);
        c.written = 0;
        flush(c);
        let done = c.written == c.output.len();
        if done {
            let i = self.clients.iter().position(|c| c.id == id).expect("found");
            let c = self.clients.remove(i);
            if c.hold && self.stop_waiters.len() < MAX_STOP_WAITERS {
                self.stop_waiters.push(c.stream);
            }
        }
    }

    /// Accepts what is queued; a new client's request, if already there, is read at once (into
    /// `requests`): a command writes it as soon as it is connected, and a request read cannot
    /// be taken for silence by [`make_room`](Self::make_room).
    fn accept(&mut self, now: Instant, requests: &mut Vec<(u64, Request)>) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and the like: the connection waits in the backlog meanwhile.
                    warn!(error = %e, "control socket: cannot accept a connection");
                    self.accept_paused_until = Some(now + ACCEPT_BACKOFF);
                    return;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let (uid, pid) = match peer_uid(&stream) {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "control socket: cannot identify the peer; refused");
                    continue;
                }
            };
            if uid != self.uid && uid != 0 {
                warn!(
                    peer.uid = uid,
                    peer.pid = pid,
                    "control socket: refused a client of another user"
                );
                let mut reply = Reply::err(format!(
                    "permission denied: uid {uid} may not use this control socket (only uid {} \
                     and root may)",
                    self.uid
                ));
                reply.denied = true;
                let _ = (&stream).write(&encode(&reply));
                continue;
            }
            if self.clients.len() >= MAX_CLIENTS && !self.make_room() {
                let _ = (&stream).write(&encode(&Reply::err(
                    "the master is busy with other control clients; try again",
                )));
                continue;
            }
            self.next_id += 1;
            let mut client = Client {
                id: self.next_id,
                stream,
                input: Vec::new(),
                output: Vec::new(),
                written: 0,
                asked: false,
                hold: false,
                closed: false,
                deadline: now + CLIENT_TIMEOUT,
            };
            if let Some(r) = read_request(&mut client) {
                requests.push((client.id, r));
            }
            if !client.closed {
                self.clients.push(client);
            }
        }
    }

    /// Closes the client that has been connected longest without sending a complete request;
    /// false if every client has asked (and is answered or being answered).
    fn make_room(&mut self) -> bool {
        // Oldest first: the list is in the order of acceptance.
        let Some(i) = self
            .clients
            .iter()
            .position(|c| !c.asked && c.output.is_empty())
        else {
            return false;
        };
        let c = self.clients.remove(i);
        debug!(
            client = c.id,
            bytes = c.input.len(),
            "control client sent no request; closed to make room for a new one"
        );
        true
    }
}

/// A new socket at `path`, mode 0600 (its directory made 0700 if missing), non-blocking; with
/// the file's device and inode.
fn make_socket(path: &Path) -> Result<(UnixListener, (u64, u64))> {
    let what = || format!("cannot create the control socket {}", path.display());
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .with_context(what)?;
    }
    // Bound in a private directory, made 0600, then renamed into place: nobody else can
    // reach it before its mode is right, whatever the umask.
    // An unpredictable name: in a shared directory nobody can take it first.
    let private = parent.join(format!(".sv{:08x}", fastrand::u32(..)));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .with_context(what)?;
    let made = (|| -> Result<(UnixListener, (u64, u64))> {
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))?;
        let temp = private.join("s");
        let listener = UnixListener::bind(&temp)?;
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&temp, path)?;
        let meta = std::fs::symlink_metadata(path)?;
        Ok((listener, (meta.dev(), meta.ino())))
    })();
    let _ = std::fs::remove_dir_all(&private);
    let (listener, file_id) = made.with_context(what)?;
    listener.set_nonblocking(true).with_context(what)?;
    Ok((listener, file_id))
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if self.is_ours() {
            if let Err(e) = std::fs::remove_file(&self.path) {
                warn!(path = %self.path.display(), error = %e, "cannot remove the control socket");
            }
        }
    }
}

fn encode(reply: &Reply) -> Vec<u8> {
    let mut line = serde_json::to_vec(reply).expect("a reply serializes");
    line.push(b'\n');
    line
}

/// Reads what is there; a complete line becomes a request, a bad one an error answer.
fn read_request(c: &mut Client) -> Option<Request> {
    let mut buf = [0u8; 1024];
    let eof = loop {
        match c.stream.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => {
                c.input.extend_from_slice(&buf[..n]);
                if c.input.len() > MAX_REQUEST_BYTES {
                    break false;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break false, // WouldBlock: more later; other errors: the deadline ends it
        }
    };
    let line = match c.input.iter().position(|&b| b == b'\n') {
        Some(end) => &c.input[..end],
        None if c.input.len() > MAX_REQUEST_BYTES => {
            reject(c, format!("request longer than {MAX_REQUEST_BYTES} bytes"));
            return None;
        }
        None if eof && !c.input.is_empty() => &c.input[..],
        None if eof => {
            c.closed = true;
            return None;
        }
        None => return None,
    };
    match serde_json::from_slice::<Envelope>(line) {
        Ok(e) if e.v == PROTOCOL_VERSION => {
            c.asked = true;
            Some(e.request)
        }
        Ok(e) => {
            reject(
                c,
                format!(
                    "protocol version {} is not supported (this master speaks {PROTOCOL_VERSION})",
                    e.v
                ),
            );
            None
        }
        Err(e) => {
            reject(c, format!("bad request: {e}"));
            None
        }
    }
}

fn reject(c: &mut Client, error: String) {
    debug!(client = c.id, error = %error, "control socket: bad request");
    c.output = encode(&Reply::err(error));
    c.written = 0;
    flush(c);
}

fn flush(c: &mut Client) {
    while c.written < c.output.len() {
        match c.stream.write(&c.output[c.written..]) {
            Ok(0) => break,
            Ok(n) => c.written += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(_) => {
                c.written = c.output.len(); // gone: nothing more to send
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(bind: &[&str]) -> Config {
        let mut c = Config::default();
        c.server.bind = bind.iter().map(|s| s.to_string()).collect();
        c.server.runtime_dir = "/base".into();
        c
    }

    #[test]
    fn the_default_name_follows_the_addresses() {
        let a = Location::of(&config(&["127.0.0.1:8000", "unix:/x.sock"]));
        let b = Location::of(&config(&["unix:/x.sock", "127.0.0.1:8000"]));
        let c = Location::of(&config(&["127.0.0.1:8001"]));
        assert_eq!(a, b, "order does not matter");
        assert_ne!(a, c);
        let Location::Fixed(p) = a else { panic!() };
        let name = p.file_name().unwrap().to_str().unwrap();
        assert!(p.starts_with("/base"), "{p:?}");
        assert!(
            name.starts_with("supervisor-") && name.ends_with(".sock"),
            "{name}"
        );
        // Stable across builds: a command from another version finds the same socket.
        assert_eq!(bind_hash(&["0.0.0.0:8000".to_string()]), 0x8901_d1b5_c5d1);
    }

    #[test]
    fn port_zero_adds_the_pid_and_an_explicit_path_wins() {
        let l = Location::of(&config(&["127.0.0.1:0"]));
        assert!(matches!(l, Location::PerPid { .. }));
        let p = l.for_master(42);
        assert!(p.to_str().unwrap().ends_with("-42.sock"), "{p:?}");
        let mut c = config(&["127.0.0.1:0"]);
        c.server.control_socket = "/x/c.sock".into();
        assert_eq!(Location::of(&c), Location::Fixed("/x/c.sock".into()));
        assert!(!has_port_zero("[::1]:8000") && has_port_zero("[::1]:0"));
        assert!(!has_port_zero("unix:/a:0"));
    }

    #[test]
    fn a_command_picks_the_one_live_master_of_a_port_0_name() {
        let dir = tempfile::tempdir().unwrap();
        let location = Location::PerPid {
            dir: dir.path().to_path_buf(),
            prefix: "supervisor-abc".into(),
        };
        assert!(location
            .find()
            .unwrap_err()
            .contains("no supervisor master"));
        let ours = location.for_master(std::process::id());
        for pid in [std::process::id(), 4_194_305] {
            std::fs::write(location.for_master(pid), b"").unwrap();
        }
        std::fs::write(dir.path().join("supervisor-abcd-1.sock"), b"").unwrap();
        assert_eq!(
            location.find().unwrap(),
            ours,
            "the dead one and others are ignored"
        );
        std::fs::write(location.for_master(1), b"").unwrap();
        let err = location.find().unwrap_err();
        assert!(
            err.contains("several masters") && err.contains("--socket"),
            "{err}"
        );
    }

    #[test]
    fn requests_are_one_json_line_with_a_version() {
        let e: Envelope = serde_json::from_str(r#"{"v":1,"cmd":"scale","workers":3}"#).unwrap();
        assert_eq!(e.request, Request::Scale { workers: 3 });
        let e: Envelope = serde_json::from_str(r#"{"v":1,"cmd":"stop"}"#).unwrap();
        assert_eq!(e.request, Request::Stop { fast: false });
        assert!(serde_json::from_str::<Envelope>(r#"{"v":1,"cmd":"explode"}"#).is_err());
    }

    #[test]
    fn the_socket_is_private_refuses_a_second_master_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let location = Location::Fixed(path.clone());
        // A stale file (nobody listening) is no obstacle.
        drop(UnixListener::bind(&path).unwrap());
        refuse_if_live(&location, 1).unwrap();
        // Whatever the umask (nextest runs each test in its own process).
        let umask = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let server = ControlServer::bind(&location);
        nix::sys::stat::umask(umask);
        let mut server = server.unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // A second master is told who has it: the ping is answered from another thread's view
        // of this loop, so serve it here.
        let probe = std::thread::spawn({
            let location = location.clone();
            move || refuse_if_live(&location, 1)
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !probe.is_finished() && Instant::now() < deadline {
            let ready = vec![true; server.clients.len() + 1];
            for (id, r) in server.on_events(&ready) {
                assert_eq!(r, Request::Ping);
                server.answer(id, &Reply::ok("pong"), false);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let err = probe.join().unwrap().unwrap_err().to_string();
        assert!(
            err.contains("already in use") && err.contains(&std::process::id().to_string()),
            "{err}"
        );
        drop(server);
        assert!(!path.exists());
    }
}
