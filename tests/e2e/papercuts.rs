//! Operations papercuts: output to a reader that went away, `status` saying which master it
//! reached, and clients that connect and say nothing (control socket, metrics) holding up
//! everyone else.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

const WAIT: Duration = Duration::from_secs(20);

/// A pipe whose reading end is already closed: every write to it fails with EPIPE, as when
/// the reader of `supervisor status | head -1` has gone.
fn closed_pipe() -> OwnedFd {
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    write
}

/// `supervisor ARGS...` with standard output (and, with `stderr_too`, standard error) into a
/// closed pipe; its exit code and what it wrote on standard error otherwise.
fn run_into_closed_pipe(args: &[&str], stderr_too: bool) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir.path())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(closed_pipe()));
    if stderr_too {
        cmd.stderr(Stdio::from(closed_pipe()));
    } else {
        cmd.stderr(Stdio::piped());
    }
    let child = KillOnDrop(cmd.spawn().unwrap());
    let mut child = child;
    let err = child.0.stderr.take().map(|mut e| {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut e, &mut s).ok();
        s
    });
    let status = eventually(WAIT, "the command to exit", || child.0.try_wait().unwrap());
    let err = err.unwrap_or_default();
    eprintln!("{args:?} (stderr closed too: {stderr_too}): {status:?}\n{err}");
    (status.code(), err)
}

#[track_caller]
fn assert_quiet(args: &[&str], want: i32) {
    for stderr_too in [false, true] {
        let (code, err) = run_into_closed_pipe(args, stderr_too);
        assert_eq!(
            code,
            Some(want),
            "{args:?} into a closed pipe (stderr too: {stderr_too}): {err}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn output_to_a_closed_pipe_is_dropped_and_the_exit_code_is_the_commands() {
    let server = Server::start(&["-w", "1"]);
    let socket = server.control_socket();
    let socket = socket.to_str().unwrap();
    let pid = server.pid().to_string();
    assert_quiet(&["status", "--socket", socket], 0);
    assert_quiet(&["status", "--json", "--socket", socket], 0);
    assert_quiet(&["status", "--pid", &pid], 0);
    assert_quiet(&["scale", "1", "--socket", socket], 0);
    assert_quiet(&["check", "-b", "127.0.0.1:0"], 0);
    assert_quiet(&["check", "--set", "server.workers=many"], 2);
    assert_quiet(&["status", "--socket", "/nonexistent/x.sock"], 3);
    assert_quiet(&["completions", "bash"], 0);
    assert_quiet(&["--help"], 0);
    assert_quiet(&["--version"], 0);
    // A stop whose output nobody reads still waits for the master to be gone.
    let (code, err) = run_into_closed_pipe(&["stop", "--socket", socket], false);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        !alive(server.pid()),
        "stop returned before the master exited"
    );
}

#[test]
fn status_says_which_master_answered_and_where_it_listens() {
    let dir = tempfile::tempdir().unwrap();
    let unix = dir.path().join("http.sock");
    let unix = format!("unix:{}", unix.display());
    let server = Server::start(&["-w", "1", "-b", &unix, "--set", "metrics.bind=127.0.0.1:0"]);
    let socket = server.control_socket();
    let (code, out, err) = server.ctl(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let master = &status["master"];
    assert_eq!(status["master_pid"], server.pid());
    let listen: Vec<&str> = master["listen"]
        .as_array()
        .unwrap_or_else(|| panic!("no listen addresses: {out}"))
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        listen,
        [server.addr.to_string(), unix.clone()],
        "as bound, the port 0 resolved"
    );
    assert_eq!(master["control_socket"], socket.to_str().unwrap());
    let metrics = master["metrics"].as_str().unwrap();
    assert!(
        metrics.starts_with("127.0.0.1:") && !metrics.ends_with(":0"),
        "{metrics}"
    );

    let (code, out, err) = server.ctl(&["status"]);
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("listening on "))
        .unwrap_or_else(|| panic!("no listening line: {out}"));
    assert!(
        line.contains(&format!("{}, {unix}", server.addr))
            && line.contains(&format!("control socket {}", socket.display()))
            && line.contains(&format!("metrics {metrics}")),
        "{line}"
    );
}

#[test]
fn silent_control_clients_do_not_lock_the_commands_out() {
    let server = Server::start(&["-w", "1"]);
    let socket = server.control_socket();
    // More connections that never send a request than the master serves at once.
    let silent: Vec<UnixStream> = (0..20)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    for _ in 0..3 {
        let asked = Instant::now();
        let (code, out, err) = server.ctl(&["status"]);
        assert_eq!(code, 0, "status beside silent clients: {err}");
        assert!(out.contains(&format!("master {}", server.pid())), "{out}");
        // Well under the silent clients' 5 s deadline: they were not waited out.
        assert!(
            asked.elapsed() < Duration::from_secs(4),
            "status took {:?}",
            asked.elapsed()
        );
    }
    drop(silent);
}

#[test]
fn accept_failures_at_the_fd_limit_are_logged_rarely_and_counted() {
    let server = Server::start(&["-w", "1"]);
    let worker = server.serving_pids()[0];
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit with a valid pid, reading the limit into a live rlimit.
    let rc = unsafe {
        libc::prlimit(
            worker as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut old,
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    // The soft limit only: it can be raised again without privileges.
    let set_limit = |n: u64| {
        let limit = libc::rlimit {
            rlim_cur: n,
            rlim_max: old.rlim_max,
        };
        // SAFETY: prlimit with a valid pid and a pointer to a live rlimit; old value not
        // requested.
        let rc = unsafe {
            libc::prlimit(
                worker as libc::pid_t,
                libc::RLIMIT_NOFILE,
                &limit,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    };
    // Room for one more fd: one client is accepted, the others make every accept fail with
    // EMFILE (the worker pauses 100 ms after each failure).
    let open = fd_targets(worker).len() as u64;
    set_limit(open + 1);
    let clients: Vec<std::net::TcpStream> = (0..20)
        .map(|_| std::net::TcpStream::connect(server.addr).unwrap())
        .collect();
    let errors = |s: &serde_json::Value| s["workers"][0]["accept_errors"].as_u64().unwrap_or(0);
    eventually(WAIT, "25 failed accepts", || {
        (errors(&server.status()) >= 25).then_some(())
    });
    let lines = server
        .log
        .lines()
        .into_iter()
        .filter(|l| l.contains("accept failed"))
        .count();
    assert!(
        (1..=2).contains(&lines),
        "{lines} lines for 25 failures:\n{}",
        server.log.text()
    );
    // Room again: the queued clients are accepted, and the log says how many failures it did
    // not show.
    set_limit(old.rlim_cur);
    let line = server
        .log
        .wait_for(WAIT, |l| l.contains("accepting again"))
        .expect("a line once accepting works again");
    let unlogged: u64 = field(&line, "accept.failures_unlogged")
        .unwrap()
        .parse()
        .unwrap();
    assert!(unlogged >= 20, "{line}");
    assert_eq!(server.get("/").status, 200);
    drop(clients);
}
