//! The control socket and its commands: `status`, `reload`, `stop`, `scale`, `upgrade`, and
//! `server.pidfile`.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::util::*;

const WAIT: Duration = Duration::from_secs(30);

/// `status --json` over the control socket.
fn status(server: &Server) -> Value {
    let (code, out, err) = server.ctl(&["status", "--json"]);
    assert_eq!(code, 0, "status failed: {err}");
    serde_json::from_str(&out).unwrap()
}

fn serving(status: &Value) -> usize {
    status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] == "serving")
        .count()
}

fn requests(status: &Value) -> u64 {
    status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["requests"].as_u64().unwrap())
        .sum()
}

#[test]
fn status_counts_match_the_requests_sent() {
    let server = Server::start(&["-w", "2", "--set", "worker.max_requests=0"]);
    const SENT: u64 = 37;
    for _ in 0..SENT {
        assert_eq!(server.get("/").status, 200);
    }
    // A worker counts a request as its response goes out; the last one may lag a moment.
    let s = eventually(WAIT, "status to count every request", || {
        let s = status(&server);
        (requests(&s) == SENT).then_some(s)
    });
    assert_eq!(s["master_pid"], server.pid());
    assert_eq!(s["master"]["workers"], 2);
    assert_eq!(serving(&s), 2);
    // The same numbers as reading the scoreboard directly.
    assert_eq!(requests(&server.status()), SENT);
    // Nothing counted that was not sent.
    assert_eq!(requests(&status(&server)), SENT);
}

#[test]
fn status_table_and_check_find_the_socket_from_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    // The default socket name, in a runtime directory of the test's own.
    let file = write_file(
        dir.path(),
        "sv.toml",
        &format!(
            "[server]\nbind = [\"127.0.0.1:0\", \"unix:{0}/http.sock\"]\nworkers = 2\n\
             runtime_dir = \"{0}\"\n",
            dir.path().display()
        ),
    );
    let file = file.to_str().unwrap();
    let (code, _, err) = run(dir.path(), &["check", "-c", file], &[]);
    assert_eq!(code, 0, "{err}");
    let announced = err
        .lines()
        .find_map(|l| l.strip_prefix("supervisor: control socket: "))
        .unwrap_or_else(|| panic!("check names the control socket: {err}"))
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    let server = Server::start_at(dir.path(), &["-c", file]);
    let socket = server.control_socket();
    assert_eq!(
        announced.replace("PID", &server.pid().to_string()),
        socket.to_str().unwrap(),
        "check names the socket the master uses"
    );
    eventually(WAIT, "2 serving workers", || {
        (serving(&status(&server)) == 2).then_some(())
    });
    // No --socket: found from the same configuration file.
    let (code, out, err) = run(dir.path(), &["status", "-c", file], &[]);
    assert_eq!(code, 0, "{err}");
    let header = out
        .lines()
        .find(|l| l.trim_start().starts_with("worker "))
        .unwrap_or_else(|| panic!("a table header: {out}"));
    for column in [
        "worker",
        "pid",
        "state",
        "requests",
        "inflight",
        "memory",
        "uptime",
        "app pid",
        "last recycle",
    ] {
        assert!(header.contains(column), "column {column:?} in {header:?}");
    }
    assert!(out.contains(&format!("master {}", server.pid())), "{out}");
    assert!(out.contains("limits: host-wide 50"), "{out}");
    let rows = out.lines().filter(|l| l.contains(" serving ")).count();
    assert_eq!(rows, 2, "{out}");
}

#[test]
fn reload_applies_a_valid_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let conf = |workers: u32| {
        format!(
            "[server]\nbind = \"127.0.0.1:0\"\nworkers = {workers}\ncontrol_socket = \"{}/c.sock\"\n",
            dir.path().display()
        )
    };
    let file = write_file(dir.path(), "sv.toml", &conf(2));
    let file = file.to_str().unwrap();
    let server = Server::start_at(dir.path(), &["-c", file]);
    let before = server.serving_pids();
    assert_eq!(before.len(), 2);
    write_file(dir.path(), "sv.toml", &conf(3));
    let (code, out, err) = run(dir.path(), &["reload", "-c", file], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("configuration reloaded"), "{out}");
    // One snapshot for every check: two could straddle a handover.
    let s = eventually(WAIT, "3 serving workers, all replaced", || {
        let s = status(&server);
        let replaced = s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["state"] == "serving")
            .all(|w| !before.contains(&(w["pid"].as_u64().unwrap() as u32)));
        (serving(&s) == 3 && replaced).then_some(s)
    });
    assert_eq!(s["master"]["workers"], 3);
    assert_eq!(s["master"]["reloads"], 1);
    assert!(
        s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["last_recycle"] == "reload"),
        "{s}"
    );
}

#[test]
fn reload_with_a_bad_configuration_fails_loudly_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(
        dir.path(),
        "sv.toml",
        "[server]\nbind = \"127.0.0.1:0\"\nworkers = 2\n",
    );
    let file = file.to_str().unwrap();
    let server = Server::start_at(dir.path(), &["-c", file]);
    let before = server.serving_pids();
    write_file(
        dir.path(),
        "sv.toml",
        "[server]\nbind = \"127.0.0.1:0\"\nworkers = 0\n",
    );
    // The master re-reads its file and says why it refuses.
    let (code, _, err) = server.ctl(&["reload"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("sv.toml:3:") && err.contains("server.workers"),
        "{err}"
    );
    assert!(err.starts_with("supervisor: error: "), "{err}");
    // Found from the same file, the command sees the error itself.
    let (code, _, err) = run(dir.path(), &["reload", "-c", file], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("server.workers"), "{err}");
    // Still serving, with the same workers.
    assert_eq!(server.get("/").status, 200);
    assert_eq!(server.serving_pids(), before);
    assert_eq!(status(&server)["master"]["reloads"], 0);
}

#[test]
fn stop_returns_once_the_master_has_exited() {
    let mut server = Server::start(&["-w", "1"]);
    let socket = server.control_socket();
    let addr = server.addr;
    // A request in flight is finished first: the stop is graceful.
    let slow = std::thread::spawn(move || try_get(addr, "/sleep?ms=1500"));
    eventually(WAIT, "the slow request in flight", || {
        (server.status()["workers"][0]["inflight"] == 1).then_some(())
    });
    let (code, out, err) = server.ctl(&["stop"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("graceful stop") && out.contains("stopped"),
        "{out}"
    );
    assert!(!alive(server.pid()), "the master is gone when stop returns");
    assert_eq!(slow.join().unwrap().unwrap().status, 200);
    assert!(server.wait_exit(WAIT).success());
    assert!(!socket.exists(), "the control socket is removed");
}

#[test]
fn stop_fast_does_not_wait_for_requests() {
    let mut server = Server::start(&["-w", "1", "--set", "server.graceful_timeout=2m"]);
    let addr = server.addr;
    let slow = std::thread::spawn(move || try_get(addr, "/sleep?ms=100000"));
    eventually(WAIT, "the slow request in flight", || {
        (server.status()["workers"][0]["inflight"] == 1).then_some(())
    });
    let (code, out, err) = server.ctl(&["stop", "--fast"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("fast stop"), "{out}");
    assert!(!alive(server.pid()));
    assert_cut(slow.join().unwrap(), "a request in flight at a fast stop");
    assert!(server.log.text().contains("control: fast stop requested"));
    assert!(server.wait_exit(WAIT).success());
}

#[test]
fn scale_sets_the_number_of_workers() {
    let server = Server::start(&["-w", "2"]);
    let (code, out, err) = server.ctl(&["scale", "3"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("from 2 to 3 workers"), "{out}");
    eventually(WAIT, "3 serving workers", || {
        let s = status(&server);
        (serving(&s) == 3 && s["master"]["workers"] == 3).then_some(())
    });
    let (code, out, err) = server.ctl(&["scale", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("to 1 workers"), "{out}");
    eventually(WAIT, "1 worker left", || {
        let s = status(&server);
        (s["workers"].as_array().unwrap().len() == 1 && serving(&s) == 1).then_some(())
    });
    assert_eq!(server.get("/").status, 200);
    // 0 is refused before anything is sent.
    let (code, _, err) = server.ctl(&["scale", "0"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn scale_and_ttin_stay_within_the_redis_connection_budget() {
    // Cluster limits through a Redis that is not there (the start is degraded): 2 workers and
    // the master use the 3 connections allowed.
    let server = Server::start(&[
        "-w",
        "2",
        "--set",
        "redis.url=redis://127.0.0.1:1",
        "--set",
        "limits.cluster_max_concurrent_requests=10",
        "--set",
        "redis.max_connections=3",
    ]);
    let (code, _, err) = server.ctl(&["scale", "3"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot scale to 3 workers: redis.max_connections = 3 is fewer than the 3 workers plus the master need"),
        "{err}"
    );
    server.signal(Signal::SIGTTIN);
    server
        .log
        .wait_for(WAIT, |l| {
            l.contains("TTIN: not starting a worker more: redis.max_connections = 3")
        })
        .expect("the refused TTIN logged");
    let s = status(&server);
    assert_eq!(s["master"]["workers"], 2, "{s}");
    // Down is still allowed, and back up to the budget.
    let (code, _, err) = server.ctl(&["scale", "1"]);
    assert_eq!(code, 0, "{err}");
    server.signal(Signal::SIGTTIN);
    eventually(WAIT, "2 workers again", || {
        (status(&server)["master"]["workers"] == 2).then_some(())
    });
}

#[test]
fn upgrade_waits_for_the_outcome_and_the_control_socket_and_pidfile_move_over() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let (sock, pidfile, good) = control_and_pidfile_config(&d);
    let conf = write_file(&d, "sv.toml", &good);
    let mut server =
        Server::spawn_in(dir, &["-c", conf.to_str().unwrap(), "-b", "127.0.0.1:0"]).wait_ready();
    let old = server.pid();
    let ctl = |args: &[&str]| {
        run(
            &d,
            &[args, &["--socket", sock.to_str().unwrap()]].concat(),
            &[],
        )
    };
    let master_of = || {
        let (code, out, err) = ctl(&["status", "--json"]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<Value>(&out).unwrap()["master_pid"]
            .as_u64()
            .unwrap() as u32
    };

    // The new master reads the configuration again: a broken one makes it fail, the command
    // says so, and the old master keeps serving, with its socket and pidfile.
    std::fs::write(&conf, format!("{good}wokers = 2\n")).unwrap();
    let (code, out, err) = ctl(&["upgrade"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("upgrade failed"), "{err}");
    assert_eq!(master_of(), old);
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap().trim(),
        old.to_string()
    );
    assert_eq!(server.get("/").status, 200);

    std::fs::write(&conf, &good).unwrap();
    let (code, out, err) = ctl(&["upgrade"]);
    assert_eq!(code, 0, "{out}{err}");
    let new: u32 = out
        .lines()
        .find(|l| l.contains("took over"))
        .and_then(|l| l.strip_prefix("master "))
        .and_then(|l| l.split(':').next())
        .unwrap_or_else(|| panic!("no 'took over' line: {out}"))
        .parse()
        .unwrap();
    let _stop_new = crate::binary_upgrade::Adopted(new);
    assert_ne!(new, old);
    // Once the command returns, the new master answers on the same path and owns the pidfile;
    // the old one drains and exits cleanly, leaving both alone.
    assert_eq!(master_of(), new);
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap().trim(),
        new.to_string()
    );
    assert!(server.wait_exit(WAIT).success());
    assert_eq!(master_of(), new);
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap().trim(),
        new.to_string()
    );
    assert_eq!(get(server.addr, "/").status, 200);
}

#[test]
fn no_master_is_a_distinct_exit_code_naming_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nobody-here.sock");
    let (code, _, err) = run(
        dir.path(),
        &["status", "--socket", path.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 3, "{err}");
    assert!(err.contains(path.to_str().unwrap()), "{err}");
    // A stale socket file (its master died) is the same.
    drop(UnixListener::bind(&path).unwrap());
    let (code, _, err) = run(
        dir.path(),
        &["stop", "--socket", path.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 3, "{err}");
}

#[test]
fn the_socket_belongs_to_its_user_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.sock");
    let p = path.to_str().unwrap();
    let server = Server::start(&["-w", "1", "--set", &format!("server.control_socket={p}")]);
    assert_eq!(server.control_socket(), path);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: cannot run a client as another user; the rest is skipped");
        return;
    }
    let as_nobody = || {
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                BIN,
                "status",
                "--socket",
                p,
            ])
            .output()
            .expect("setpriv (util-linux)");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The file's mode (and its private directory) keep another user out.
    let (code, err) = as_nobody();
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("permission denied"), "{err}");
    // Made reachable, the master still refuses: it checks the peer's uid (SO_PEERCRED).
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (code, err) = as_nobody();
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("uid 65534 may not use this control socket"),
        "{err}"
    );
    assert!(server
        .log
        .wait_for(WAIT, |l| l.contains("refused a client of another user")
            && l.contains("peer.uid=65534"))
        .is_some());
    // We are still served.
    assert_eq!(status(&server)["master_pid"], server.pid());
}

#[test]
fn a_stuck_or_hostile_client_does_not_block_the_master() {
    let server = Server::start(&["-w", "1"]);
    let socket = server.control_socket();
    // One connects and says nothing; one sends far too much without a newline.
    let mut idle = UnixStream::connect(&socket).unwrap();
    let mut flood = UnixStream::connect(&socket).unwrap();
    let _ = flood.write_all(&vec![b'x'; 64 * 1024]);
    // Others are still served at once.
    assert_eq!(status(&server)["master_pid"], server.pid());
    assert_eq!(server.get("/").status, 200);
    // The flood gets an error answer; the silent one is cut off after its deadline.
    flood.set_read_timeout(Some(WAIT)).unwrap();
    let mut answer = String::new();
    let _ = flood.read_to_string(&mut answer);
    assert!(answer.contains("request longer than"), "{answer:?}");
    idle.set_read_timeout(Some(WAIT)).unwrap();
    let mut rest = Vec::new();
    let n = idle
        .read_to_end(&mut rest)
        .expect("closed by the master, not timed out");
    assert_eq!(n, 0);
    // Garbage gets an answer saying so.
    let mut bad = UnixStream::connect(&socket).unwrap();
    bad.write_all(b"{\"v\":1,\"cmd\":\"explode\"}\n").unwrap();
    bad.set_read_timeout(Some(WAIT)).unwrap();
    let mut answer = String::new();
    bad.read_to_string(&mut answer).unwrap();
    let reply: Value = serde_json::from_str(answer.trim()).unwrap();
    assert_eq!(reply["ok"], false);
    assert!(
        reply["error"].as_str().unwrap().contains("bad request"),
        "{reply}"
    );
}

#[test]
fn a_second_master_with_the_same_control_socket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.sock");
    let set = format!("server.control_socket={}", path.display());
    let first = Server::start(&["-w", "1", "--set", &set]);
    let (code, _, err) = run(
        dir.path(),
        &["start", "-b", "127.0.0.1:0", "-w", "1", "--set", &set],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(path.to_str().unwrap())
            && err.contains("already in use")
            && err.contains(&format!("pid {}", first.pid())),
        "{err}"
    );
    // The first keeps its socket.
    assert_eq!(status(&first)["master_pid"], first.pid());
    assert_eq!(first.get("/").status, 200);
}

#[test]
fn a_stale_control_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.sock");
    drop(UnixListener::bind(&path).unwrap()); // the file of a master that died
    assert!(path.exists());
    let server = Server::start(&[
        "-w",
        "1",
        "--set",
        &format!("server.control_socket={}", path.display()),
    ]);
    assert_eq!(status(&server)["master_pid"], server.pid());
}

#[test]
fn the_pidfile_holds_the_master_pid_until_it_exits() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("run").join("sv.pid");
    std::fs::create_dir(pidfile.parent().unwrap()).unwrap();
    // Left by a master that died: replaced.
    std::fs::write(&pidfile, "4194305\n").unwrap();
    let set = format!("server.pidfile={}", pidfile.display());
    let mut server = Server::start(&["-w", "1", "--set", &set]);
    let read = |p: &Path| std::fs::read_to_string(p).unwrap().trim().to_string();
    assert_eq!(read(&pidfile), server.pid().to_string());
    // Another master with the same pidfile is refused while this one runs.
    let (code, _, err) = run(
        dir.path(),
        &["start", "-b", "127.0.0.1:0", "-w", "1", "--set", &set],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(pidfile.to_str().unwrap())
            && err.contains(&format!("running supervisor master (pid {})", server.pid())),
        "{err}"
    );
    assert_eq!(read(&pidfile), server.pid().to_string(), "left alone");
    let (code, _, err) = server.ctl(&["stop"]);
    assert_eq!(code, 0, "{err}");
    assert!(server.wait_exit(WAIT).success());
    assert!(!pidfile.exists(), "removed at exit");
    // Nothing else left in its directory (the temporary file was renamed).
    assert_eq!(
        std::fs::read_dir(pidfile.parent().unwrap())
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn check_prints_the_control_socket_path() {
    let dir = tempfile::tempdir().unwrap();
    let path_of = |args: &[&str]| {
        let (code, _, err) = run(dir.path(), &[&["check"], args].concat(), &[]);
        assert_eq!(code, 0, "{err}");
        err.lines()
            .find_map(|l| l.strip_prefix("supervisor: control socket: "))
            .unwrap_or_else(|| panic!("no control socket line: {err}"))
            .to_string()
    };
    assert_eq!(
        path_of(&["--set", "server.control_socket=/x/y.sock"]),
        "/x/y.sock"
    );
    let a = path_of(&["-b", "127.0.0.1:8123", "--set", "server.runtime_dir=/base"]);
    assert!(
        a.starts_with("/base/supervisor-") && a.ends_with(".sock"),
        "{a}"
    );
    assert_eq!(
        a,
        path_of(&["-b", "127.0.0.1:8123", "--set", "server.runtime_dir=/base"])
    );
    assert_ne!(
        a,
        path_of(&["-b", "127.0.0.1:8124", "--set", "server.runtime_dir=/base"])
    );
    assert!(path_of(&["-b", "127.0.0.1:0"]).contains("-PID.sock"));
}
