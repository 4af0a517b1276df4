//! systemd socket activation (`sd_listen_fds(3)`): the listening sockets systemd (or
//! `systemd-socket-activate`) opened for us, passed as fds 3, 4, ... with `LISTEN_FDS`,
//! `LISTEN_PID` and optionally `LISTEN_FDNAMES` in the environment.
//!
//! It only finds and checks the sockets; `Listeners::adopt` keeps them. Each must be a
//! listening stream socket (TCP or Unix): anything else is a start-up error naming the fd,
//! never a worker that fails later.

use std::os::fd::RawFd;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use socket2::{Domain, Socket};
use tracing::debug;

use crate::listeners::{Activated, BindAddr};

pub const LISTEN_PID: &str = "LISTEN_PID";
pub const LISTEN_FDS: &str = "LISTEN_FDS";
pub const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// The first fd passed (`SD_LISTEN_FDS_START`).
const FIRST_FD: RawFd = 3;

/// The sockets passed to this process, or `None` if it was not socket-activated
/// (`LISTEN_PID` absent or naming another process, no `LISTEN_FDS`).
pub fn from_env() -> Result<Option<Vec<Activated>>> {
    let var = |name| std::env::var(name).ok().filter(|v| !v.is_empty());
    let Some(pid) = var(LISTEN_PID) else {
        return Ok(None);
    };
    let pid: u32 = pid
        .parse()
        .with_context(|| format!("socket activation: {LISTEN_PID}={pid:?} is not a pid"))?;
    if pid != std::process::id() {
        debug!("{LISTEN_PID}={pid} is another process; binding server.bind as usual");
        return Ok(None);
    }
    let Some(count) = var(LISTEN_FDS) else {
        return Ok(None);
    };
    let count: RawFd = count
        .parse()
        .ok()
        .filter(|&n: &RawFd| (0..=4096).contains(&n))
        .with_context(|| {
            format!("socket activation: {LISTEN_FDS}={count:?} is not a number of fds")
        })?;
    if count == 0 {
        return Ok(None);
    }
    // Names are optional; "unknown" is what systemd says when it has none.
    let names: Vec<String> = var(LISTEN_FDNAMES)
        .map(|n| n.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    let mut sockets = Vec::with_capacity(count as usize);
    for (i, fd) in (FIRST_FD..FIRST_FD + count).enumerate() {
        let socket =
            crate::listeners::inherited_listener(fd, &format!("socket activation ({LISTEN_FDS})"))?;
        let name = names.get(i).filter(|n| *n != "unknown").cloned();
        let addr = address_of(&socket, fd)?;
        sockets.push(Activated {
            socket,
            addr,
            fd,
            name,
        });
    }
    Ok(Some(sockets))
}

fn address_of(socket: &Socket, fd: RawFd) -> Result<BindAddr> {
    let what = format!("socket activation ({LISTEN_FDS})");
    let domain = socket
        .domain()
        .with_context(|| format!("{what}: cannot inspect fd {fd}"))?;
    let local = socket
        .local_addr()
        .with_context(|| format!("{what}: cannot read the address of fd {fd}"))?;
    if domain == Domain::IPV4 || domain == Domain::IPV6 {
        let sa = local
            .as_socket()
            .with_context(|| format!("{what}: fd {fd} has no TCP address"))?;
        return Ok(BindAddr::Tcp(sa));
    }
    if domain == Domain::UNIX {
        if let Some(path) = local.as_pathname() {
            return Ok(BindAddr::Unix(path.to_path_buf()));
        }
        if let Some(name) = local.as_abstract_namespace() {
            let name = String::from_utf8_lossy(name);
            return Ok(BindAddr::Unix(PathBuf::from(format!("@{name}"))));
        }
        return Ok(BindAddr::Unix(PathBuf::from("(unnamed)")));
    }
    bail!("{what}: fd {fd} is neither a TCP nor a Unix socket ({domain:?})")
}
