//! Test harness: runs the real `supervisor` binary in a temp dir, watches its log, and talks
//! HTTP/1.1 to it over real sockets. Every wait is bounded (`eventually`); nothing sleeps to
//! synchronise.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_supervisor");

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        // Back-off between polls, not synchronisation: the condition is re-checked each time.
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Lines a child wrote to stderr, shared with the thread that reads them.
#[derive(Clone, Default)]
pub struct Log(Arc<(Mutex<Vec<String>>, Condvar)>);

impl Log {
    pub fn capture(stream: impl Read + Send + 'static) -> Log {
        let log = Log::default();
        let inner = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                eprintln!("  | {line}");
                let (lines, cv) = &*inner.0;
                lines.lock().unwrap().push(line);
                cv.notify_all();
            }
        });
        log
    }

    pub fn lines(&self) -> Vec<String> {
        self.0 .0.lock().unwrap().clone()
    }

    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// Waits for a line matching `pred`, bounded by `timeout`.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (lines, cv) = &*self.0;
        let mut guard = lines.lock().unwrap();
        loop {
            if let Some(l) = guard.iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            guard = cv.wait_timeout(guard, left).unwrap().0;
        }
    }
}

/// The value of `key=` in a text log line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    Some(rest.split_whitespace().next().unwrap_or(rest))
}

pub struct Server {
    pub child: Child,
    pub log: Log,
    pub addr: SocketAddr,
    /// The master's working directory if the test made it, removed when the test ends.
    _dir: Option<tempfile::TempDir>,
    /// The master's runtime directory and control socket go here unless the test chose its
    /// own: never the default locations, which another master on this host (or another test)
    /// uses too. Removed when the test ends, with whatever a killed master left in it.
    _private: tempfile::TempDir,
    exited: Option<ExitStatus>,
}

impl Server {
    /// `supervisor start -b 127.0.0.1:0 ARGS...`, waiting until it logs "ready".
    pub fn start(args: &[&str]) -> Server {
        Server::spawn(&[&["-b", "127.0.0.1:0"], args].concat()).ready()
    }

    /// `supervisor start -b 127.0.0.1:0 ARGS...` with the environment variables `env` set (as a
    /// PaaS sets `LOG_LEVEL` or `WEB_CONCURRENCY`), waiting until it is ready.
    pub fn start_env(env: &[(&str, &str)], args: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let cwd = dir.path().to_path_buf();
        let args = [&["-b", "127.0.0.1:0"], args].concat();
        Server::launch_with(Path::new(BIN), &cwd, Some(dir), &args, false, env).ready()
    }

    /// `supervisor start ARGS...` (nothing added) in `cwd`, with the environment variables
    /// `env` set, waiting until it is ready.
    pub fn start_at_env(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::launch_with(Path::new(BIN), cwd, None, args, false, env).ready()
    }

    /// `supervisor start ARGS...` (nothing added) in `cwd`, a directory the test does not own
    /// (an example's), waiting until it logs "ready".
    pub fn start_at(cwd: &Path, args: &[&str]) -> Server {
        Server::launch(cwd, None, args).ready()
    }

    /// Waits until the master says it is ready (`master.ready` in its status), then takes its
    /// first TCP address from the same status.
    fn ready(mut self) -> Server {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut pause = Duration::from_millis(5);
        let master = loop {
            if let Some(m) = self.master_info().filter(|m| m["ready"] == true) {
                break m;
            }
            if let Ok(Some(exit)) = self.child.try_wait() {
                panic!("supervisor exited before it was ready: {exit}");
            }
            assert!(
                Instant::now() < deadline,
                "supervisor did not become ready in 20s"
            );
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        };
        self.addr = master["listen"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str()?.parse().ok())
            .next()
            .expect("a TCP listener");
        self.assert_private();
        self
    }

    /// The master's own part of `supervisor status --json` (`master`), if it answers.
    pub fn master_info(&self) -> Option<Value> {
        let (code, out, _) = self.ctl(&["status", "--json"]);
        if code != 0 {
            return None;
        }
        let status: Value = serde_json::from_str(&out).ok()?;
        status.get("master").cloned()
    }

    /// Waits until the master has refused `n` reloads since start
    /// (`master.reload_failures`): why it refused the last.
    pub fn refused_reload(&self, n: u64) -> String {
        eventually(Duration::from_secs(30), "a refused reload", || {
            let m = self.master_info()?;
            (m["reload_failures"].as_u64()? >= n).then(|| {
                m["last_reload_error"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
        })
    }

    /// Waits until the master has applied `n` reloads since start (`master.reloads`).
    pub fn reloaded(&self, n: u64) {
        eventually(Duration::from_secs(30), "a reload applied", || {
            (self.master_info()?["reloads"].as_u64()? >= n).then_some(())
        })
    }

    /// The guard behind `_private`: a test master uses no default port, control socket or
    /// runtime directory, so that the suite passes beside a master serving on the defaults,
    /// and leaves nothing in the default locations even when it is killed.
    fn assert_private(&self) {
        for line in self.log.lines().iter().filter(|l| l.contains("listening")) {
            let addr = field(line, "addr").unwrap_or_default();
            assert!(
                !addr.ends_with(":8000"),
                "a test master listens on the default port: {line}"
            );
        }
        let socket = self.control_socket();
        let shared = shared_locations();
        assert!(
            !socket
                .parent()
                .is_some_and(|p| shared.iter().any(|s| s == p)),
            "a test master made its control socket in a shared directory: {}",
            socket.display()
        );
        for base in &shared {
            let runtime = base.join(format!("supervisor-{}", self.pid()));
            assert!(
                !runtime.exists(),
                "a test master made its runtime directory in a shared directory: {}",
                runtime.display()
            );
        }
    }

    /// Starts `supervisor start ARGS...` without waiting for anything.
    pub fn spawn(args: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        Server::spawn_in(dir, args)
    }

    pub fn spawn_in(dir: tempfile::TempDir, args: &[&str]) -> Server {
        let path = dir.path().to_path_buf();
        Server::launch(&path, Some(dir), args)
    }

    /// Like `spawn_in`, with another copy of the binary (an upgrade test replaces it on disk).
    pub fn spawn_program(program: &Path, dir: tempfile::TempDir, args: &[&str]) -> Server {
        let path = dir.path().to_path_buf();
        Server::launch_program(program, &path, Some(dir), args)
    }

    /// Like `start`, in a process group of its own (which its workers join), for signals to the
    /// whole group, as a terminal's Ctrl-C sends them.
    pub fn start_in_own_group(args: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let args = [&["-b", "127.0.0.1:0"], args].concat();
        Server::launch_with(Path::new(BIN), &path, Some(dir), &args, true, &[]).ready()
    }

    /// Waits until it logs "ready".
    pub fn wait_ready(self) -> Server {
        self.ready()
    }

    fn launch(cwd: &Path, dir: Option<tempfile::TempDir>, args: &[&str]) -> Server {
        Server::launch_program(Path::new(BIN), cwd, dir, args)
    }

    fn launch_program(
        program: &Path,
        cwd: &Path,
        dir: Option<tempfile::TempDir>,
        args: &[&str],
    ) -> Server {
        Server::launch_with(program, cwd, dir, args, false, &[])
    }

    fn launch_with(
        program: &Path,
        cwd: &Path,
        dir: Option<tempfile::TempDir>,
        args: &[&str],
        own_group: bool,
        env: &[(&str, &str)],
    ) -> Server {
        let private = private_dir();
        let mut cmd = supervisor_at(program, cwd);
        cmd.envs(env.iter().copied());
        if own_group {
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        // The runtime directory's base when no server.runtime_dir is set.
        cmd.env("RUNTIME_DIRECTORY", private.path());
        cmd.arg("start");
        if !chooses_its_locations(cwd, args) {
            // The control socket's too (see `_private`).
            cmd.arg("--set").arg(format!(
                "server.runtime_dir={}",
                private.path().to_str().unwrap()
            ));
        }
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run supervisor");
        let log = Log::capture(child.stderr.take().unwrap());
        Server {
            child,
            log,
            addr: "0.0.0.0:0".parse().unwrap(),
            _dir: dir,
            _private: private,
            exited: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid() as i32), sig).expect("signal the master");
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(s) = self.exited {
            return s;
        }
        let child = &mut self.child;
        let s = eventually(timeout, "the master to exit", || child.try_wait().unwrap());
        self.exited = Some(s);
        s
    }

    /// `supervisor status --pid PID --json`.
    pub fn status(&self) -> Value {
        status_of(self.pid())
    }

    /// The master's control socket: in the private runtime directory when the test left it to
    /// the harness (found there whatever the log's level and format), else from the master's
    /// "control socket created" log line.
    pub fn control_socket(&self) -> PathBuf {
        let name = |p: &PathBuf| {
            let n = p.file_name()?.to_str()?.to_string();
            (n.starts_with("supervisor-") && n.ends_with(&format!("-{}.sock", self.pid())))
                .then_some(())
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let found = std::fs::read_dir(self._private.path())
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .find(|p| name(p).is_some());
            if let Some(path) = found {
                return path;
            }
            if self
                .log
                .lines()
                .iter()
                .any(|l| l.contains("control socket created"))
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let line = self
            .log
            .wait_for(Duration::from_secs(10), |l| {
                l.contains("control socket created")
            })
            .expect("the master announces its control socket");
        PathBuf::from(field(&line, "path").expect("a path= field"))
    }

    /// `supervisor ARGS... --socket SOCKET` (a control command for this master) to completion.
    pub fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let socket = self.control_socket();
        let args = [args, &["--socket", socket.to_str().unwrap()]].concat();
        run(&std::env::temp_dir(), &args, &[])
    }

    /// Pids of the serving workers.
    pub fn serving_pids(&self) -> Vec<u32> {
        self.workers_in("serving")
            .iter()
            .map(|w| w["pid"].as_u64().unwrap() as u32)
            .collect()
    }

    /// Records of workers in a given state.
    pub fn workers_in(&self, state: &str) -> Vec<Value> {
        self.status()["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["state"] == state)
            .cloned()
            .collect()
    }

    pub fn get(&self, path: &str) -> Response {
        get(self.addr, path)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.exited.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            // SIGKILL to the master; its workers follow through PR_SET_PDEATHSIG.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `raw` on a new connection and reads one response (the server closes or the length
/// says where it ends). Errors (reset, EOF before a response) come back as `Err`.
pub fn exchange(addr: SocketAddr, raw: &[u8]) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(raw)?;
    read_response(&mut BufReader::new(s))
}

/// `exchange` for a request the server may answer before it has all of it (a 413 for a body
/// past the limit): the server then closes, and a write that fails on that close is no
/// failure; the answer is read all the same.
pub fn exchange_answered_early(addr: SocketAddr, raw: &[u8]) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    if let Err(e) = s.write_all(raw) {
        use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
        if !matches!(e.kind(), BrokenPipe | ConnectionReset) {
            return Err(e);
        }
    }
    read_response(&mut BufReader::new(s))
}

pub fn try_get(addr: SocketAddr, path: &str) -> std::io::Result<Response> {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

/// `GET path` over a Unix socket, closing the connection after the response.
pub fn try_get_unix(path: &Path, target: &str) -> std::io::Result<Response> {
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(
        format!("GET {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    read_response(&mut BufReader::new(s))
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    try_get(addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// Reads one HTTP/1.1 response: head, then a Content-Length or chunked body.
pub fn read_response(r: &mut impl BufRead) -> std::io::Result<Response> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        ));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(&format!("bad status line {line:?}")))?;
    let mut headers = HashMap::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').ok_or_else(|| bad("bad header"))?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let mut body = Vec::new();
    if let Some(len) = headers.get("content-length") {
        let len: usize = len.parse().map_err(|_| bad("bad length"))?;
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    } else if headers
        .get("transfer-encoding")
        .is_some_and(|t| t.contains("chunked"))
    {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let n = usize::from_str_radix(line.trim(), 16).map_err(|_| bad("bad chunk"))?;
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// A directory of the test's own for a master's runtime directory and control socket; 0711, so
/// that `server.user` can pass through it to the runtime directory.
pub fn private_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().prefix("sv-run").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    dir
}

/// `--set server.runtime_dir=DIR`, for a master started without the harness's `Server`.
pub fn runtime_in(dir: &Path) -> [String; 2] {
    [
        "--set".to_string(),
        format!("server.runtime_dir={}", dir.to_str().unwrap()),
    ]
}

/// Where masters put their control sockets and runtime directories by default.
fn shared_locations() -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from("/run/supervisor"), std::env::temp_dir()];
    dirs.extend(std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from));
    dirs
}

/// Whether a start with `args` in `cwd` names its own runtime directory or control socket, in
/// the arguments or in its configuration file.
fn chooses_its_locations(cwd: &Path, args: &[&str]) -> bool {
    let names = |text: &str| text.contains("runtime_dir") || text.contains("control_socket");
    if args.iter().any(|a| names(a)) {
        return true;
    }
    let file = args
        .windows(2)
        .find(|w| w[0] == "-c" || w[0] == "--config")
        .map_or_else(|| cwd.join("supervisor.toml"), |w| cwd.join(w[1]));
    std::fs::read_to_string(file).is_ok_and(|t| names(&t))
}

/// The binary, run in `dir`, without the environment variables it reads (the test runner's
/// own environment must not leak into a test's configuration).
fn supervisor(dir: &Path) -> Command {
    supervisor_at(Path::new(BIN), dir)
}

fn supervisor_at(program: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(dir);
    for var in [
        "PORT",
        "WEB_CONCURRENCY",
        "WORKERS",
        "LOG_LEVEL",
        "MAX_CONCURRENT_REQUESTS",
        "MAX_ACTIVE_INSTANCES",
        "REDIS_URL",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// `supervisor ARGS...` to completion (for `check` and failing starts), with a bound.
pub fn run(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = supervisor(dir);
    // A start's runtime directory, unless it sets server.runtime_dir.
    let private = private_dir();
    cmd.env("RUNTIME_DIRECTORY", private.path());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    // Killed if it outlives the bound (a start that should have failed and did not).
    let mut child = KillOnDrop(child);
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).ok();
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).ok();
        s
    });
    let status = eventually(Duration::from_secs(30), "supervisor to exit", || {
        child.0.try_wait().unwrap()
    });
    let (o, e) = (out_t.join().unwrap(), err_t.join().unwrap());
    eprintln!("stdout:\n{o}\nstderr:\n{e}");
    (status.code().unwrap_or(-1), o, e)
}

pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X"))
        }
        Err(_) => false,
    }
}

/// Asserts that a request failed because its connection was cut (closed or reset), not because
/// the client's own read timeout ran out while the server still held it.
#[track_caller]
pub fn assert_cut(result: std::io::Result<Response>, what: &str) {
    match result {
        Ok(r) => panic!("{what}: got a response ({})", r.status),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{what}: the client timed out instead ({e})"
        ),
    }
}

/// What `pid`'s open fds point to, by fd number.
pub fn fd_targets(pid: u32) -> Vec<(u32, String)> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((fd, target.to_string_lossy().into_owned()))
        })
        .collect()
}

/// A process this test started, killed (and reaped) when the guard goes, even if the test
/// fails first.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A one-worker configuration with its control socket and pidfile in `dir`: their paths, and
/// the TOML.
pub fn control_and_pidfile_config(dir: &Path) -> (PathBuf, PathBuf, String) {
    let sock = dir.join("ctl.sock");
    let pidfile = dir.join("sv.pid");
    let toml = format!(
        "[server]\nworkers = 1\ncontrol_socket = {:?}\npidfile = {:?}\n",
        sock.to_str().unwrap(),
        pidfile.to_str().unwrap()
    );
    (sock, pidfile, toml)
}

/// `supervisor status --pid MASTER --json`, for any master (one the test did not start itself:
/// the new master of an upgrade, one started through a wrapper).
pub fn status_of(master: u32) -> Value {
    let out = Command::new(BIN)
        .args(["status", "--json", "--pid", &master.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "status of {master} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Pids of the serving workers of master `master`.
pub fn serving_pids_of(master: u32) -> Vec<u32> {
    status_of(master)["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] == "serving")
        .map(|w| w["pid"].as_u64().unwrap() as u32)
        .collect()
}

/// Sends `message` as a masked WebSocket text frame (as clients send) on `w` and checks that
/// the same text comes back on `r` (the test apps' `/ws` echoes).
pub fn ws_echo(w: &mut impl Write, r: &mut impl Read, message: &str) {
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | message.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(message.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    w.write_all(&frame).unwrap();
    let mut head = [0u8; 2];
    r.read_exact(&mut head).unwrap();
    assert_eq!(head[0], 0x81);
    let mut data = vec![0u8; head[1] as usize];
    r.read_exact(&mut data).unwrap();
    assert_eq!(data, message.as_bytes());
}
