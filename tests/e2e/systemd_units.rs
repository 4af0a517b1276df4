//! Running under systemd: the notify protocol (recorded on a datagram socket the test binds as
//! `NOTIFY_SOCKET`), the watchdog, what workers inherit, socket activation with
//! `systemd-socket-activate`, and the shipped unit files passing `systemd-analyze verify`.

use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::util::*;

const APP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps/stdlib_app.py");
const WAIT: Duration = Duration::from_secs(30);
const SYSTEMD_VARS: [&str; 6] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

/// The datagrams the master sends to its `NOTIFY_SOCKET`, in order.
struct Notifications {
    socket: UnixDatagram,
    seen: Vec<String>,
}

impl Notifications {
    fn bind(path: &Path) -> Notifications {
        Notifications::from(UnixDatagram::bind(path).unwrap())
    }

    /// Bound in the abstract namespace: `NOTIFY_SOCKET=@NAME`.
    fn bind_abstract(name: &str) -> Notifications {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name).unwrap();
        Notifications::from(UnixDatagram::bind_addr(&addr).unwrap())
    }

    fn from(socket: UnixDatagram) -> Notifications {
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Notifications {
            socket,
            seen: Vec::new(),
        }
    }

    /// Receives until a datagram matches `pred` (it is returned), bounded by `timeout`. Every
    /// datagram received is kept in `seen`.
    fn wait_for(&mut self, timeout: Duration, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(msg.clone());
                if pred(&msg) {
                    return msg;
                }
            }
        }
        panic!(
            "no notification {what} within {timeout:?}; got {:?}",
            self.seen
        );
    }

    /// Everything that arrived so far (without waiting for more).
    fn received_so_far(&mut self) -> &[String] {
        self.socket.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.socket.recv(&mut buf) {
            self.seen
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        self.socket.set_nonblocking(false).unwrap();
        &self.seen
    }
}

/// A process the test started (`supervisor start ...` or a wrapper that execs it), with its
/// stderr captured; killed when dropped.
struct Started {
    child: KillOnDrop,
    log: Log,
}

impl Started {
    fn spawn(cmd: &mut Command) -> Started {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the command");
        let log = Log::capture(child.stderr.take().unwrap());
        Started {
            child: KillOnDrop(child),
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.0.id()
    }

    fn signal(&self, sig: Signal) {
        nix::sys::signal::kill(Pid::from_raw(self.pid() as i32), sig).unwrap();
    }

    fn wait_log(&self, what: &str) -> String {
        self.log
            .wait_for(WAIT, |l| l.contains(what))
            .unwrap_or_else(|| panic!("{what:?} not logged:\n{}", self.log.text()))
    }

    fn count(&self, what: &str) -> usize {
        self.log.lines().iter().filter(|l| l.contains(what)).count()
    }

    fn wait_exit(&mut self) -> i32 {
        let child = &mut self.child.0;
        let status = eventually(WAIT, "the master to exit", || child.try_wait().unwrap());
        status.code().unwrap_or(-1)
    }

    /// Pids of serving workers, from `supervisor status --json`.
    fn serving_pids(&self) -> Vec<u32> {
        serving_pids_of(self.pid())
    }
}

/// The binary with a clean environment as far as its configuration and systemd go.
fn supervisor_cmd(dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    clean(&mut cmd, dir);
    cmd
}

fn clean(cmd: &mut Command, dir: &Path) {
    cmd.current_dir(dir);
    for var in [
        "PORT",
        "WORKERS",
        "LOG_LEVEL",
        "MAX_CONCURRENT_REQUESTS",
        "MAX_ACTIVE_INSTANCES",
    ]
    .into_iter()
    .chain(SYSTEMD_VARS)
    {
        cmd.env_remove(var);
    }
}

fn environ(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    raw.split(|&b| b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

fn monotonic_usec() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1_000
}

/// Files named `waiting.*` in `dir`: one per app process started (see `gated_app`).
fn waiting(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("waiting."))
        .count()
}

/// An app command whose processes announce themselves (a `waiting.PID` file in `$GATE_DIR`)
/// and then do not listen until `$GATE_DIR/open` exists: while the gate is closed, no worker
/// can report ready.
fn gated_app() -> Vec<String> {
    let script = format!(
        "touch \"$GATE_DIR/waiting.$$\"; \
         while [ ! -e \"$GATE_DIR/open\" ]; do sleep 0.02; done; \
         exec python3 {APP} --uds \"$1\""
    );
    ["sh", "-c", &script, "sh", "{socket}"]
        .map(String::from)
        .to_vec()
}

/// `RELOADING=1` carries, in the same datagram, `MONOTONIC_USEC=` of the reload: after `since`
/// (when the HUP was sent) and not in the future.
fn assert_reloading_since(datagram: &str, since: u64) {
    let usec: u64 = datagram
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in the same datagram: {datagram:?}"))
        .parse()
        .expect("MONOTONIC_USEC is a number");
    assert!(
        usec >= since && usec <= monotonic_usec(),
        "MONOTONIC_USEC={usec} is not CLOCK_MONOTONIC at the reload (HUP sent at {since})"
    );
}

#[test]
fn notify_sequence_across_start_reload_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut notes = Notifications::bind(&d.join("notify"));
    let config = write_file(
        d,
        "supervisor.toml",
        "[server]\nworkers = 2\nbind = [\"127.0.0.1:0\"]\n",
    );
    let mut cmd = supervisor_cmd(d);
    cmd.args(["start", "-c", config.to_str().unwrap()])
        .args(runtime_in(d))
        .arg("--")
        .args(gated_app())
        .env("NOTIFY_SOCKET", d.join("notify"))
        .env("GATE_DIR", d);
    let mut master = Started::spawn(&mut cmd);

    // Start: both apps are up but held at the gate, so no worker has ACKed.
    eventually(WAIT, "both app processes at the gate", || {
        (waiting(d) == 2).then_some(())
    });
    // The HTTP workers wait for an app process too.
    notes.wait_for(WAIT, "STATUS= with no worker serving", |m| {
        m.starts_with("STATUS=serving 0/4 workers and app processes (2 + 2)")
    });
    assert!(
        !notes
            .received_so_far()
            .iter()
            .any(|m| m.contains("READY=1")),
        "READY=1 before any worker ACKed: {:?}",
        notes.seen
    );
    assert_eq!(master.count("worker ready"), 0);
    write_file(d, "open", "");
    notes.wait_for(WAIT, "READY=1", |m| m == "READY=1");
    // The master logs each ACK, then "ready", then notifies; the log reader may lag behind.
    master.wait_log(" ready workers=2 apps=2");
    assert_eq!(master.count("worker ready"), 4, "{}", master.log.text());
    notes.wait_for(WAIT, "STATUS= with both workers serving", |m| {
        m.starts_with("STATUS=serving 4/4 workers and app processes (2 + 2), 0 in flight")
    });
    let before = master.serving_pids();

    // Reload: RELOADING=1 with the time it began; READY=1 only once the replacements serve.
    std::fs::remove_file(d.join("open")).unwrap();
    let hup_at = monotonic_usec();
    master.signal(Signal::SIGHUP);
    let reloading = notes.wait_for(WAIT, "RELOADING=1", |m| m.contains("RELOADING=1"));
    assert_reloading_since(&reloading, hup_at);
    // Replacements start one at a time (worker.max_recycling = 1): the first is at the gate.
    eventually(WAIT, "a replacement app at the gate", || {
        (waiting(d) == 3).then_some(())
    });
    let after_reloading = notes.seen.len();
    assert!(
        !notes.received_so_far()[after_reloading..]
            .iter()
            .any(|m| m.contains("READY=1")),
        "READY=1 before the replacement workers ACKed: {:?}",
        notes.seen
    );
    write_file(d, "open", "");
    notes.wait_for(WAIT, "READY=1 after the reload", |m| m == "READY=1");
    master.wait_log("reload complete");
    // The replaced workers mark themselves draining as they get their TERM: poll.
    eventually(WAIT, "only replacement workers serving", || {
        let after = master.serving_pids();
        (after.len() == 2 && after.iter().all(|p| !before.contains(p))).then_some(())
    });

    // An invalid configuration: ready again at once, the reason in STATUS=.
    write_file(d, "supervisor.toml", "[server]\nworkers = \"many\"\n");
    master.signal(Signal::SIGHUP);
    let failed = notes.wait_for(WAIT, "READY=1 with the failed reload", |m| {
        m.starts_with("READY=1\nSTATUS=")
    });
    assert!(failed.contains("reload failed"), "{failed:?}");
    assert!(
        failed.contains("workers"),
        "the reason is not given: {failed:?}"
    );
    let reloads = notes
        .seen
        .iter()
        .filter(|m| m.contains("RELOADING=1"))
        .count();
    assert_eq!(reloads, 2, "{:?}", notes.seen);

    // Stop.
    master.signal(Signal::SIGTERM);
    notes.wait_for(WAIT, "STOPPING=1", |m| m.starts_with("STOPPING=1"));
    assert_eq!(master.wait_exit(), 0);
    eprintln!("notifications: {:#?}", notes.received_so_far());
}

#[test]
fn a_reload_whose_workers_cannot_boot_gets_ready_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut notes = Notifications::bind(&d.join("notify"));
    let config = |extra: &str| {
        format!(
            "[server]\nworkers = 1\nbind = [\"127.0.0.1:0\"]\n\
             [app]\ncommand = [\"python3\", \"{APP}\", \"--uds\", \"{{socket}}\"{extra}]\n"
        )
    };
    let path = write_file(d, "supervisor.toml", &config(""));
    let mut cmd = supervisor_cmd(d);
    cmd.args(["start", "-c", path.to_str().unwrap()])
        .args(runtime_in(d))
        .env("NOTIFY_SOCKET", d.join("notify"));
    let master = Started::spawn(&mut cmd);
    notes.wait_for(WAIT, "READY=1", |m| m == "READY=1");
    let addr = field(&master.wait_log("listening addr="), "addr")
        .unwrap()
        .parse()
        .unwrap();
    let serving = master.serving_pids();

    // The new configuration is valid, but its app exits at once: the replacement never ACKs.
    write_file(d, "supervisor.toml", &config(", \"--fail-start\""));
    master.signal(Signal::SIGHUP);
    notes.wait_for(WAIT, "RELOADING=1", |m| m.starts_with("RELOADING=1"));
    let stalled = notes.wait_for(WAIT, "READY=1 for the stalled reload", |m| {
        m.starts_with("READY=1\n")
    });
    assert!(
        stalled.contains("STATUS=reload incomplete") && stalled.contains("failed to boot"),
        "{stalled:?}"
    );
    assert_eq!(get(addr, "/").status, 200, "the old worker stops serving");
    assert_eq!(master.serving_pids(), serving);

    // A good configuration again: the reload completes and the failure leaves the status.
    write_file(d, "supervisor.toml", &config(""));
    master.signal(Signal::SIGHUP);
    let reloads_before = notes.seen.len();
    notes.wait_for(WAIT, "READY=1 after the good reload", |m| m == "READY=1");
    assert!(notes.seen[reloads_before..]
        .iter()
        .any(|m| m.starts_with("RELOADING=1")));
    notes.wait_for(WAIT, "STATUS= without the failure", |m| {
        m.starts_with("STATUS=serving 2/2 workers") && !m.contains("failed")
    });
}

#[test]
fn watchdog_pings_repeat_and_workers_see_no_systemd_variables() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // This time in the abstract namespace, as systemd itself may give it.
    let name = format!("supervisor-test-notify-{}", std::process::id());
    let mut notes = Notifications::bind_abstract(&name);
    let mut cmd = supervisor_cmd(d);
    cmd.args(["start", "-w", "2", "-b", "127.0.0.1:0"])
        .args(runtime_in(d))
        .env("NOTIFY_SOCKET", format!("@{name}"))
        .env("WATCHDOG_USEC", "300000")
        // Activation meant for another process: ignored by the master, hidden from workers.
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "other");
    let master = Started::spawn(&mut cmd);
    // Read as they come: the kernel queues only a few datagrams (net.unix.max_dgram_qlen), and
    // the master drops what does not fit rather than wait.
    notes.wait_for(WAIT, "READY=1", |m| m == "READY=1");
    master.wait_log(" ready workers=2");
    for i in 0..3 {
        notes.wait_for(WAIT, &format!("WATCHDOG=1 number {}", i + 1), |m| {
            m == "WATCHDOG=1"
        });
    }
    assert!(master.log.text().contains("listening addr=127.0.0.1:"));

    let master_env = environ(master.pid());
    assert!(
        master_env.iter().any(|v| v.starts_with("NOTIFY_SOCKET=")),
        "the master keeps NOTIFY_SOCKET (an upgraded master needs it): {master_env:?}"
    );
    let workers = master.serving_pids();
    assert_eq!(workers.len(), 2);
    for pid in workers {
        let env = environ(pid);
        assert!(
            env.iter()
                .any(|v| v.starts_with("SUPERVISOR_") || v.starts_with("PATH=")),
            "worker {pid}'s environment not read: {env:?}"
        );
        for var in SYSTEMD_VARS {
            assert!(
                !env.iter().any(|v| v.starts_with(&format!("{var}="))),
                "worker {pid} inherited {var}: {env:?}"
            );
        }
    }
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn socket_activation_adopts_the_passed_socket_instead_of_binding() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let not_bound = d.join("server-bind.sock");
    let config = write_file(
        d,
        "supervisor.toml",
        &format!(
            "[server]\nworkers = 2\nbind = [\"unix:{}\"]\n",
            not_bound.display()
        ),
    );
    let activated_unix = d.join("activated.sock");
    let mut cmd = Command::new("systemd-socket-activate");
    clean(&mut cmd, d);
    cmd.arg("-l")
        .arg(format!("127.0.0.1:{port}"))
        .arg("-l")
        .arg(&activated_unix)
        .arg("--fdname=web:local")
        .args([BIN, "start", "-c", config.to_str().unwrap()])
        .args(runtime_in(d));
    let mut master = Started::spawn(&mut cmd);
    master.wait_log("Listening on");
    // systemd-socket-activate starts the program on the first connection.
    let mut first = TcpStream::connect(("127.0.0.1", port)).unwrap();
    master.wait_log(" ready workers=2");
    first
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .unwrap();
    first.set_read_timeout(Some(WAIT)).unwrap();
    let resp = read_response(&mut BufReader::new(first)).unwrap();
    assert_eq!(resp.status, 200);

    let adopted = master.wait_log("adopted a socket from systemd");
    assert!(
        adopted.contains(&format!("addr=127.0.0.1:{port}")),
        "{adopted}"
    );
    assert!(adopted.contains("name=\"web\""), "{adopted}");
    let listening = master.wait_log("listening addr=");
    assert!(listening.contains("accept=shared"), "{listening}");
    assert!(
        !not_bound.exists(),
        "server.bind was bound although the master was socket-activated"
    );
    let on_unix = master.wait_log(&format!("addr=unix:{}", activated_unix.display()));
    assert!(
        on_unix.contains("adopted") && on_unix.contains("name=\"local\""),
        "{on_unix}"
    );
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..10 {
        assert_eq!(get(addr, "/").status, 200);
        assert_eq!(try_get_unix(&activated_unix, "/").unwrap().status, 200);
    }

    // A reload that changes server.bind keeps the activated socket.
    let other = d.join("other.sock");
    write_file(
        d,
        "supervisor.toml",
        &format!(
            "[server]\nworkers = 2\nbind = [\"unix:{}\"]\n",
            other.display()
        ),
    );
    master.signal(Signal::SIGHUP);
    master.wait_log("do not apply under socket activation");
    master.wait_log("configuration reloaded");
    assert!(
        !other.exists(),
        "a reload bound server.bind under socket activation"
    );
    for _ in 0..10 {
        assert_eq!(get(addr, "/").status, 200);
    }
    master.signal(Signal::SIGTERM);
    assert_eq!(master.wait_exit(), 0);
    // The socket file belongs to whoever made the socket (the .socket unit), not to us.
    assert!(
        activated_unix.exists(),
        "the master removed systemd's socket file"
    );
}

/// `supervisor start` with `fd` as fd 3 and `LISTEN_PID`/`LISTEN_FDS` saying systemd passed
/// it; returns the exit code and stderr.
fn start_with_fd3(dir: &Path, fd: RawFd) -> (i32, String) {
    let err_path = dir.join("stderr");
    let err = std::fs::File::create(&err_path).unwrap();
    let not_bound = dir.join("server-bind.sock");
    let mut cmd = Command::new("sh");
    clean(&mut cmd, dir);
    // `$$` is the shell's pid, which `exec` hands to supervisor: LISTEN_PID names it.
    cmd.args([
        "-c",
        "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" start -w 1 -b \"unix:$1\" --set \"$2\"",
        BIN,
        not_bound.to_str().unwrap(),
        &runtime_in(dir)[1],
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(err);
    // SAFETY: dup2 and fcntl are async-signal-safe; they run in the child between fork and
    // exec, on an fd the parent keeps open until the child is spawned.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would leave close-on-exec set: clear it instead.
            let rc = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if rc == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = KillOnDrop(cmd.spawn().unwrap());
    let status = eventually(WAIT, "supervisor to exit", || child.0.try_wait().unwrap());
    assert!(!not_bound.exists(), "server.bind was bound");
    (
        status.code().unwrap_or(-1),
        std::fs::read_to_string(err_path).unwrap(),
    )
}

#[test]
fn socket_activation_refuses_fds_that_are_not_listening_stream_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = std::fs::File::create(d.join("plain-file")).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let connected = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let cases: [(&str, RawFd, &str); 3] = [
        ("a file", file.as_raw_fd(), "fd 3 is not a socket"),
        (
            "a connected TCP socket",
            connected.as_raw_fd(),
            "not listening",
        ),
        ("a UDP socket", udp.as_raw_fd(), "datagram socket"),
    ];
    for (what, fd, expected) in cases {
        let (code, stderr) = start_with_fd3(d, fd);
        assert_eq!(code, 1, "{what}: exit code; stderr:\n{stderr}");
        assert!(
            stderr.contains(expected) && stderr.contains("LISTEN_FDS"),
            "{what}: the error does not say {expected:?}:\n{stderr}"
        );
        // Refused at start-up, not by each worker in turn.
        assert!(
            !stderr.contains("starting workers="),
            "{what}: workers were started:\n{stderr}"
        );
    }
}

/// `systemd-analyze verify` on the two units in `dir`: fails with its output unless it
/// succeeds and says nothing.
fn verify(dir: &Path) {
    // --man=no: verify would otherwise run man(1) for Documentation=, and the pages are not
    // installed where the test runs.
    let (out, err) = (dir.join("verify.out"), dir.join("verify.err"));
    let child = Command::new("systemd-analyze")
        .args([
            "verify",
            "--man=no",
            "supervisor-rs.service",
            "supervisor-rs.socket",
        ])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("systemd-analyze (Debian package systemd; tests/run installs it)");
    let mut child = KillOnDrop(child);
    let status = eventually(WAIT, "systemd-analyze to finish", || {
        child.0.try_wait().unwrap()
    });
    let text = std::fs::read_to_string(&out).unwrap() + &std::fs::read_to_string(&err).unwrap();
    assert!(
        status.success() && text.trim().is_empty(),
        "systemd-analyze verify in {} ({status}):\n{text}",
        dir.display()
    );
}

/// The units from dist/ in a temp dir, ExecStart pointing at the binary under test (verify
/// checks that the program exists); `uncomment` enables the commented-out settings too.
fn units(uncomment: bool) -> (tempfile::TempDir, String) {
    let dist = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("dist");
    let dir = tempfile::tempdir().unwrap();
    let exec = "ExecStart=/usr/bin/supervisor ";
    let mut service = std::fs::read_to_string(dist.join("supervisor-rs.service")).unwrap();
    assert!(
        service.contains(exec),
        "ExecStart changed; update this test"
    );
    service = service.replace(exec, &format!("ExecStart={BIN} "));
    let mut socket = std::fs::read_to_string(dist.join("supervisor-rs.socket")).unwrap();
    if uncomment {
        // "#Key=value" lines are settings offered in comments.
        let enable = |text: &str| {
            text.lines()
                .map(|l| match l.strip_prefix('#') {
                    Some(rest)
                        if rest.starts_with(|c: char| c.is_ascii_uppercase())
                            && rest
                                .split_whitespace()
                                .next()
                                .is_some_and(|w| w.contains('=')) =>
                    {
                        rest.to_string()
                    }
                    _ => l.to_string(),
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let (s, k) = (enable(&service), enable(&socket));
        assert!(s.contains("\nWatchdogSec=") && k.contains("\nListenStream=/"));
        (service, socket) = (s, k);
    }
    write_file(dir.path(), "supervisor-rs.service", &service);
    write_file(dir.path(), "supervisor-rs.socket", &socket);
    (dir, service)
}

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    let (dir, service) = units(false);
    // The stop timeout leaves the graceful drain (server.graceful_timeout, 30s by default)
    // time to finish before systemd kills what is left.
    let stop: u64 = service
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.strip_suffix('s'))
        .and_then(|v| v.parse().ok())
        .expect("TimeoutStopSec=Ns");
    assert!(
        stop > 30,
        "TimeoutStopSec={stop}s is not above graceful_timeout"
    );
    verify(dir.path());
    // The settings the units offer in comments are valid too.
    let (dir, _) = units(true);
    verify(dir.path());
}

#[test]
fn an_upgrade_moves_mainpid_to_the_new_master_and_the_old_one_does_not_say_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut notes = Notifications::bind(&d.join("notify"));
    let mut cmd = supervisor_cmd(d);
    cmd.args(["start", "-w", "2", "-b", "127.0.0.1:0"])
        .args(runtime_in(d))
        .env("NOTIFY_SOCKET", d.join("notify"))
        .env("WATCHDOG_USEC", "60000000")
        // (systemd names the main process; any pid shows whether the new master inherits it)
        .env("WATCHDOG_PID", "1");
    let mut master = Started::spawn(&mut cmd);
    notes.wait_for(WAIT, "READY=1", |m| m == "READY=1");
    master.signal(Signal::SIGUSR2);
    let line = master.wait_log("upgrade: started the new master");
    let new: u32 = field(&line, "pid").unwrap().parse().unwrap();
    let _stop_new = crate::binary_upgrade::Adopted(new);
    let msg = notes.wait_for(WAIT, "MAINPID=", |m| m.starts_with("MAINPID="));
    // With READY=1: a reload systemd thought under way ends with the handover.
    assert_eq!(msg, format!("MAINPID={new}\nREADY=1"));
    assert_eq!(master.wait_exit(), 0);
    let old = master.pid();
    // No STOPPING=1 after the handover: systemd would stop the service.
    let after: Vec<String> = notes
        .received_so_far()
        .iter()
        .skip_while(|m| !m.starts_with("MAINPID="))
        .cloned()
        .collect();
    assert!(
        !after.iter().any(|m| m.contains("STOPPING=1")),
        "after the handover: {after:?}"
    );
    // The new master keeps NOTIFY_SOCKET, and pings the watchdog itself: no WATCHDOG_PID
    // naming another process.
    let env = environ(new);
    assert!(
        env.iter().any(|v| v.starts_with("NOTIFY_SOCKET=")),
        "{env:?}"
    );
    assert!(
        !env.iter().any(|v| v.starts_with("WATCHDOG_PID=")),
        "{env:?}"
    );
    // The handover variable goes no further than the new master.
    let workers = serving_pids_of(new);
    assert_eq!(workers.len(), 2, "{workers:?}");
    for w in workers {
        let env = environ(w);
        assert!(
            !env.iter().any(|v| v.starts_with("SUPERVISOR_UPGRADE=")),
            "{env:?}"
        );
    }
    assert!(!alive(old));
}
