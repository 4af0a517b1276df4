//! systemd's notification protocol (`sd_notify(3)`) for the master: `READY=1`, `RELOADING=1`,
//! `STOPPING=1`, `STATUS=`, `WATCHDOG=1` and `MAINPID=` datagrams to `$NOTIFY_SOCKET`.
//!
//! It owns the socket, the watchdog schedule and the rate limit on `STATUS=`; *when* to say
//! what is the master's business (`master/systemd.rs`). Nothing here is ever fatal: without
//! `$NOTIFY_SOCKET` every call does nothing, and a failed send is logged (once as a warning,
//! then at debug) and forgotten.
//!
//! Hand-written (a few lines over `UnixDatagram`) rather than the `sd-notify` crate: its 0.5
//! connects to `$NOTIFY_SOCKET` as a file path even when it starts with `@`, which systemd
//! uses for sockets in the abstract namespace; here `@` is honoured.
//!
//! The master never removes these variables from its own environment: a binary upgrade
//! re-executes the master, and the new one must find `$NOTIFY_SOCKET` too. Workers get an
//! environment without them (see `spawn`).

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
pub const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
pub const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// `STATUS=` is sent when it changes, but not more often than this.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

struct Target {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// `$NOTIFY_SOCKET` as given, for messages.
    name: String,
}

/// The master's line to systemd.
pub struct Notifier {
    target: Option<Target>,
    /// Half of `WATCHDOG_USEC`: how often `WATCHDOG=1` is sent.
    watchdog: Option<Duration>,
    next_watchdog: Instant,
    /// The last `STATUS=` sent, and when.
    status: String,
    status_sent: Option<Instant>,
    /// A `STATUS=` that changed within `STATUS_INTERVAL` of the last one, sent once it passes.
    status_pending: Option<String>,
    warned: bool,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID`.
    pub fn from_env() -> Notifier {
        let var = |name| std::env::var(name).ok().filter(|v| !v.is_empty());
        Notifier::new(
            var(NOTIFY_SOCKET).as_deref(),
            var(WATCHDOG_USEC).as_deref(),
            var(WATCHDOG_PID).as_deref(),
        )
    }

    fn new(socket: Option<&str>, watchdog_usec: Option<&str>, watchdog_pid: Option<&str>) -> Self {
        let target = socket.and_then(|name| match connect(name) {
            Ok(t) => Some(t),
            Err(e) => {
                warn!("{NOTIFY_SOCKET}={name:?}: {e}; systemd will not be notified");
                None
            }
        });
        let watchdog = match (target.is_some(), watchdog_usec) {
            (true, Some(usec)) => watchdog_interval(usec, watchdog_pid),
            _ => None,
        };
        if let Some(w) = watchdog {
            debug!(every = ?w, "systemd watchdog enabled");
        }
        Notifier {
            target,
            watchdog,
            next_watchdog: Instant::now(),
            status: String::new(),
            status_sent: None,
            status_pending: None,
            warned: false,
        }
    }

    /// Whether there is a service manager to talk to at all.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Startup (or a reload) is finished: every worker serves.
    pub fn ready(&mut self) {
        self.send("READY=1");
    }

    /// A reload begins. systemd wants the time it began on `CLOCK_MONOTONIC` in the same
    /// message, to tell this reload from an older one.
    pub fn reloading(&mut self) {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    /// A reload that changed nothing (the new configuration is invalid): ready again at once,
    /// saying why in the status.
    pub fn reload_failed(&mut self, status: &str) {
        self.send_with_status("READY=1", status);
    }

    pub fn stopping(&mut self, status: &str) {
        self.send_with_status("STOPPING=1", status);
    }

    /// `head` and a `STATUS=` in one message; the status counts as sent.
    fn send_with_status(&mut self, head: &str, status: &str) {
        let status = one_line(status);
        self.send(&format!("{head}\nSTATUS={status}"));
        self.status = status;
        self.status_sent = Some(Instant::now());
        self.status_pending = None;
    }

    /// `MAINPID=` after a binary upgrade, with `READY=1` in the same message: were a reload
    /// under way in systemd's eyes, it ends with the handover (the new master serves the
    /// configuration it read).
    pub fn main_pid(&mut self, pid: u32) {
        self.send(&format!("MAINPID={pid}\nREADY=1"));
    }

    /// Sets `STATUS=`: sent now if it changed and the last one is old enough, else once it is.
    pub fn status(&mut self, status: &str, now: Instant) {
        let status = one_line(status);
        if status == self.status {
            self.status_pending = None;
            return;
        }
        if self
            .status_sent
            .is_some_and(|t| now.saturating_duration_since(t) < STATUS_INTERVAL)
        {
            self.status_pending = Some(status);
            return;
        }
        self.send(&format!("STATUS={status}"));
        self.status = status;
        self.status_sent = Some(now);
        self.status_pending = None;
    }

    /// Sends what is due: a pending `STATUS=`, a `WATCHDOG=1`.
    pub fn tick(&mut self, now: Instant) {
        if let Some(s) = self.status_pending.take() {
            self.status(&s, now);
        }
        if let Some(every) = self.watchdog {
            if now >= self.next_watchdog {
                self.send("WATCHDOG=1");
                self.next_watchdog = now + every;
            }
        }
    }

    /// How long the caller may sleep before `tick` has something to send.
    pub fn next_due(&self, now: Instant) -> Option<Duration> {
        let watchdog = self
            .watchdog
            .map(|_| self.next_watchdog.saturating_duration_since(now));
        let status = self.status_pending.as_ref().and_then(|_| {
            self.status_sent
                .map(|t| (t + STATUS_INTERVAL).saturating_duration_since(now))
        });
        match (watchdog, status) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn send(&mut self, msg: &str) {
        let Some(t) = &self.target else { return };
        match t.socket.send_to_addr(msg.as_bytes(), &t.addr) {
            Ok(_) => debug!(to = %t.name, "systemd notified: {}", msg.replace('\n', " ")),
            Err(e) if !self.warned => {
                self.warned = true;
                warn!(
                    "cannot notify systemd on {}: {e} (further failures are logged at debug)",
                    t.name
                );
            }
            Err(e) => debug!("cannot notify systemd on {}: {e}", t.name),
        }
    }
}

fn connect(name: &str) -> io::Result<Target> {
    let addr = if let Some(abstract_name) = name.strip_prefix('@') {
        SocketAddr::from_abstract_name(abstract_name.as_bytes())?
    } else if name.starts_with('/') {
        SocketAddr::from_pathname(name)?
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an absolute path or an abstract socket name (@...)",
        ));
    };
    let socket = UnixDatagram::unbound()?;
    // A service manager that does not read (its queue is full) must not stall the master's
    // loop: the message is dropped and logged instead.
    socket.set_nonblocking(true)?;
    Ok(Target {
        socket,
        addr,
        name: name.to_string(),
    })
}

/// Half of `WATCHDOG_USEC`, as `sd_watchdog_enabled(3)` advises; `None` if the watchdog is for
/// another process (`WATCHDOG_PID`) or the value is not a positive number.
fn watchdog_interval(usec: &str, pid: Option<&str>) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            debug!("{WATCHDOG_PID}={pid} is another process; no watchdog pings");
            return None;
        }
    }
    match usec.parse::<u64>() {
        Ok(0) => None,
        Ok(us) => Some(Duration::from_micros(us) / 2),
        Err(_) => {
            warn!("{WATCHDOG_USEC}={usec:?} is not a number of microseconds; no watchdog pings");
            None
        }
    }
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares `MONOTONIC_USEC` with.
/// (nix's `time` feature comes with the `worker` crate, which uses the same clock.)
fn monotonic_usec() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available on Linux");
    ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1_000
}

/// A status is one line: a newline would start another assignment in the datagram.
fn one_line(s: &str) -> String {
    s.split('\n').map(str::trim).collect::<Vec<_>>().join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn abstract_socket_names_are_honoured() {
        let name = format!("supervisor-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut n = Notifier::new(Some(&format!("@{name}")), None, None);
        assert!(n.enabled());
        n.ready();
        assert_eq!(receive(&sock), "READY=1");
        n.main_pid(4242);
        assert_eq!(receive(&sock), "MAINPID=4242\nREADY=1");
        n.reloading();
        let msg = receive(&sock);
        let usec: u64 = msg
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .unwrap_or_else(|| panic!("{msg:?}"))
            .parse()
            .unwrap();
        assert!(usec > 0 && usec <= monotonic_usec());
    }

    #[test]
    fn status_is_rate_limited_and_watchdog_follows_its_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_nonblocking(true).unwrap();
        let mut n = Notifier::new(path.to_str(), Some("2000000"), None);
        assert_eq!(n.watchdog, Some(Duration::from_secs(1)));
        let t0 = Instant::now();
        n.status("a", t0);
        n.status("b", t0 + Duration::from_millis(100));
        assert_eq!(
            n.next_due(t0 + Duration::from_millis(100)),
            Some(Duration::ZERO), // the watchdog's first ping is due at once
        );
        n.tick(t0 + Duration::from_millis(1100));
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(len) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..len]).into_owned());
        }
        assert_eq!(got, ["STATUS=a", "STATUS=b", "WATCHDOG=1"]);

        let other = Notifier::new(path.to_str(), Some("2000000"), Some("1"));
        assert_eq!(other.watchdog, None, "WATCHDOG_PID names another process");
        let none = Notifier::new(None, Some("2000000"), None);
        assert!(!none.enabled());
        assert_eq!(none.watchdog, None);
    }

    #[test]
    fn a_manager_that_does_not_read_never_blocks_the_sender() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let _unread = UnixDatagram::bind(&path).unwrap();
        let mut n = Notifier::new(path.to_str(), None, None);
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Far more than the receive queue holds (net.unix.max_dgram_qlen, 10 by default).
            for _ in 0..1000 {
                n.ready();
            }
            done.send(n.warned).unwrap();
        });
        let warned = finished
            .recv_timeout(Duration::from_secs(10))
            .expect("sending to a full queue blocked");
        assert!(warned, "the dropped messages were not reported");
    }

    #[test]
    fn a_relative_socket_path_disables_notification() {
        assert!(!Notifier::new(Some("relative/path"), None, None).enabled());
    }
}
