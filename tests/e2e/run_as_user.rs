//! `server.user` / `server.group`: the master binds as root (a port below 1024 here), then its
//! workers and their apps run unprivileged.
//!
//! Most of these need root (CI runs the suite as root); without it they say so on stderr and
//! return early, as skipped.

use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::util::{alive, eventually, run, write_file, Server, BIN};

const APP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps/stdlib_app.py");
const WAIT: Duration = Duration::from_secs(20);
/// `nobody` and `nogroup` on Debian.
const NOBODY: u32 = 65534;

fn skipped_without_root(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!(
            "SKIPPED {test}: needs root to switch users (running as uid {})",
            nix::unistd::geteuid()
        );
    }
    !root
}

/// A directory that `nobody` can pass through and read (a temporary directory is private, and
/// the checkout may be under a private home), with a copy of the test app in it.
fn shared_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let app = dir.path().join("stdlib_app.py");
    std::fs::copy(APP, &app).unwrap();
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o644)).unwrap();
    dir
}

/// Real, effective, saved and filesystem uids; the same gids; supplementary groups.
fn ids(pid: u32) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> Vec<u32> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"));
        line[name.len()..]
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect()
    };
    (field("Uid:"), field("Gid:"), field("Groups:"))
}

/// `supervisor start -b 127.0.0.1:PORT ARGS...` on a free port below 1024 (only root may bind
/// one), waiting until it is ready. A port that another program takes between the probe and
/// the bind makes supervisor exit ("already in use"): then the next one is tried.
fn start_on_privileged_port(args: &[&str]) -> Server {
    let first = 600 + std::process::id() % 400;
    for port in (0..40).map(|i| 600 + (first - 600 + i * 7) % 400) {
        if TcpListener::bind(("127.0.0.1", port as u16)).is_err() {
            continue;
        }
        let bind = format!("127.0.0.1:{port}");
        let mut s = Server::spawn(&[&["-b", bind.as_str()], args].concat());
        let line = s.log.wait_for(WAIT, |l| {
            l.contains(" ready workers=") || l.contains("already in use")
        });
        match line {
            Some(l) if l.contains(" ready workers=") => {
                s.addr = bind.parse().unwrap();
                return s;
            }
            Some(_) => {
                s.wait_exit(WAIT);
            }
            None => panic!("supervisor did not become ready on {bind}"),
        }
    }
    panic!("no free loopback port in 600..1000");
}

#[test]
fn workers_and_apps_run_as_the_user_while_the_master_stays_root() {
    if skipped_without_root("workers_and_apps_run_as_the_user_while_the_master_stays_root") {
        return;
    }
    let dir = shared_dir();
    let runtime = dir.path().to_str().unwrap();
    let app = dir.path().join("stdlib_app.py");
    let s = start_on_privileged_port(&[
        "-w",
        "2",
        "--set",
        "server.user=nobody",
        "--set",
        &format!("server.group={NOBODY}"),
        "--set",
        &format!("server.runtime_dir={runtime}"),
        "--",
        "python3",
        app.to_str().unwrap(),
        "--uds",
        "{socket}",
    ]);
    assert!(s.addr.port() < 1024);
    let said = s.log.wait_for(WAIT, |l| l.contains("run as server.user"));
    let said = said.expect("the master says who workers run as");
    assert!(said.contains("user=nobody uid=65534 gid=65534"), "{said}");
    let r = s.get("/");
    assert_eq!(r.status, 200, "{}", r.text());

    let (uid, _, _) = ids(s.pid());
    assert_eq!(uid, [0, 0, 0, 0], "the master stays root");
    let workers = s.workers_in("serving");
    assert!(!workers.is_empty());
    let apps: Vec<_> = s.status()["apps"].as_array().unwrap().clone();
    assert_eq!(apps.len(), 2);
    let mut all = Vec::new();
    for w in &workers {
        all.push(("worker", w["pid"].as_u64().unwrap() as u32));
    }
    for a in &apps {
        all.push(("app host", a["pid"].as_u64().unwrap() as u32));
        all.push(("app", a["app_pid"].as_u64().expect("an app pid") as u32));
    }
    {
        for (what, pid) in all {
            let (uid, gid, groups) = ids(pid);
            assert_eq!(uid, [NOBODY; 4], "{what} {pid}'s uids");
            assert_eq!(gid, [NOBODY; 4], "{what} {pid}'s gids");
            assert!(
                groups.contains(&NOBODY) && !groups.contains(&0),
                "{what} {pid} keeps root's groups: {groups:?}"
            );
        }
    }
    // The apps' sockets are in a directory of the user's own, inside the master's.
    let apps = dir.path().join(format!("supervisor-{}/apps", s.pid()));
    let meta = std::fs::metadata(&apps).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (NOBODY, 0o700));
    let sockets = std::fs::read_dir(&apps).unwrap().count();
    assert_eq!(sockets, 2, "one socket per app in {}", apps.display());
}

/// Changing ids clears the parent-death signal the worker got at its spawn: it must be set
/// again, or a `kill -9` of the master would leave the workers to notice on their own, a second
/// later, through their parent check (which says "master is gone").
#[test]
fn unprivileged_workers_and_apps_still_die_with_the_master() {
    if skipped_without_root("unprivileged_workers_and_apps_still_die_with_the_master") {
        return;
    }
    let dir = shared_dir();
    let app = dir.path().join("stdlib_app.py");
    let runtime = format!("server.runtime_dir={}", dir.path().display());
    let mut s = Server::start(&[
        "-w",
        "2",
        "--set",
        "server.user=nobody",
        "--set",
        &runtime,
        "--",
        "python3",
        app.to_str().unwrap(),
        "--uds",
        "{socket}",
    ]);
    let mut pids = Vec::new();
    for w in s.workers_in("serving") {
        pids.push(w["pid"].as_u64().unwrap() as u32);
    }
    let apps = eventually(WAIT, "both app processes up", || {
        let apps: Vec<serde_json::Value> = s.status()["apps"].as_array().unwrap().clone();
        (apps.len() == 2 && apps.iter().all(|a| a["app_pid"].as_u64() > Some(1))).then_some(apps)
    });
    for a in &apps {
        pids.push(a["pid"].as_u64().unwrap() as u32);
        pids.push(a["app_pid"].as_u64().unwrap() as u32);
    }
    assert!(pids.len() >= 5, "{pids:?}");
    assert_eq!(ids(pids[0]).0, [NOBODY; 4]);
    s.child.kill().unwrap(); // SIGKILL
    s.wait_exit(WAIT);
    eventually(WAIT, "every worker and app gone", || {
        pids.iter().all(|&p| !alive(p)).then_some(())
    });
    let log = s.log.text();
    assert!(
        !log.contains("master is gone"),
        "a worker outlived its master until its parent check:\n{log}"
    );
}

#[test]
fn an_unknown_user_or_group_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    for (setting, named) in [
        ("server.user=no-such-user-here", "server.user"),
        ("server.group=no-such-group-here", "server.group"),
    ] {
        let mut args = vec!["--set", setting];
        if setting.starts_with("server.group") {
            args.extend(["--set", "server.user=root"]);
        }
        for command in ["check", "start"] {
            let (code, _, err) = run(dir.path(), &[&[command][..], &args].concat(), &[]);
            assert_eq!(code, 2, "{command} {args:?}");
            let value = setting.split_once('=').unwrap().1;
            assert!(err.contains(named) && err.contains(value), "{err}");
        }
    }
    let (code, _, err) = run(dir.path(), &["check", "--set", "server.group=root"], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("server.group") && err.contains("needs server.user"),
        "{err}"
    );
}

/// This binary at a path `nobody` can reach.
fn reachable_binary(dir: &Path) -> PathBuf {
    let copy = dir.join("supervisor");
    if std::fs::hard_link(BIN, &copy).is_err() {
        std::fs::copy(BIN, &copy).unwrap();
    }
    copy
}

#[test]
fn a_user_needs_a_master_started_as_root() {
    let dir = shared_dir();
    let mut cmd;
    let user = if nix::unistd::geteuid().is_root() {
        // Started as nobody, asked to run workers as daemon.
        cmd = Command::new(reachable_binary(dir.path()));
        // std also clears the supplementary groups when it sets the uid as root.
        cmd.uid(NOBODY).gid(NOBODY);
        "daemon"
    } else {
        cmd = Command::new(BIN);
        if nix::unistd::getuid().as_raw() == NOBODY {
            "daemon"
        } else {
            "nobody"
        }
    };
    let set = format!("server.user={user}");
    let child = cmd
        .current_dir(dir.path())
        .args(["start", "-b", "127.0.0.1:0", "--set", &set])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = crate::util::KillOnDrop(child);
    let status = eventually(WAIT, "supervisor to refuse", || child.0.try_wait().unwrap());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("server.user = \"{user}\""))
            && err.contains("needs supervisor to start as root"),
        "{err}"
    );
}

/// A master that already runs as `server.user` has nothing to drop, and must not try
/// (`setgroups` would fail without root).
#[test]
fn a_master_already_running_as_the_user_just_starts() {
    if skipped_without_root("a_master_already_running_as_the_user_just_starts") {
        return;
    }
    let dir = shared_dir();
    let runtime = dir.path().join("run");
    std::fs::create_dir(&runtime).unwrap();
    std::os::unix::fs::chown(&runtime, Some(NOBODY), Some(NOBODY)).unwrap();
    let set_runtime = format!("server.runtime_dir={}", runtime.display());
    let mut cmd = Command::new(reachable_binary(dir.path()));
    cmd.uid(NOBODY).gid(NOBODY);
    let child = cmd
        .current_dir(dir.path())
        .args(["start", "-b", "127.0.0.1:0", "-w", "1"])
        .args(["--set", "server.user=nobody", "--set", &set_runtime])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = crate::util::KillOnDrop(child);
    let stderr = child.0.stderr.take().unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            eprintln!("  | {line}");
            sink.lock().unwrap().push(line);
        }
    });
    let ready = eventually(WAIT, "the worker ready", || {
        assert!(child.0.try_wait().unwrap().is_none(), "supervisor exited");
        let lines = lines.lock().unwrap();
        lines.iter().find(|l| l.contains("worker ready")).cloned()
    });
    let pid: u32 = crate::util::field(&ready, "pid").unwrap().parse().unwrap();
    assert_eq!(ids(pid).0, [NOBODY; 4]);
    assert_eq!(ids(child.0.id()).0, [NOBODY; 4]);
}

#[test]
fn a_runtime_directory_the_user_cannot_reach_stops_the_start() {
    if skipped_without_root("a_runtime_directory_the_user_cannot_reach_stops_the_start") {
        return;
    }
    let private = tempfile::tempdir().unwrap();
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let runtime = format!("server.runtime_dir={}", private.path().display());
    let (code, _, err) = run(
        private.path(),
        &[
            "start",
            "-b",
            "127.0.0.1:0",
            "--set",
            "server.user=nobody",
            "--set",
            &runtime,
        ],
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot reach the runtime directory")
            && err.contains(&private.path().display().to_string()),
        "{err}"
    );
}

#[test]
fn a_reload_cannot_change_the_user() {
    if skipped_without_root("a_reload_cannot_change_the_user") {
        return;
    }
    let dir = shared_dir();
    let config = write_file(
        dir.path(),
        "supervisor.toml",
        &format!(
            "[server]\nworkers = 1\nuser = \"nobody\"\nruntime_dir = \"{}\"\n",
            dir.path().display()
        ),
    );
    let s = Server::start(&["-c", config.to_str().unwrap()]);
    let worker = s.serving_pids()[0];
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("\"nobody\"", "\"daemon\""),
    )
    .unwrap();
    s.signal(Signal::SIGHUP);
    let why = s.refused_reload(1);
    assert!(why.contains("takes a restart"), "{why}");
    assert_eq!(s.serving_pids(), [worker], "the worker is kept");
    assert_eq!(ids(worker).0, [NOBODY; 4]);
}

/// With `log.file`, workers reopen the file by its path on USR1, as the user: the master gives
/// it the file, the first one and the one after a rotation.
#[test]
fn workers_reopen_the_log_file_as_the_user_after_a_rotation() {
    if skipped_without_root("workers_reopen_the_log_file_as_the_user_after_a_rotation") {
        return;
    }
    let dir = shared_dir();
    let log = dir.path().join("supervisor.log");
    let set_log = format!("log.file={}", log.display());
    let runtime = format!("server.runtime_dir={}", dir.path().display());
    let s = Server::spawn(&[
        "-b",
        "127.0.0.1:0",
        "-w",
        "1",
        "--set",
        "server.user=nobody",
        "--set",
        &set_log,
        "--set",
        &runtime,
    ]);
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
    eventually(WAIT, "ready, in the log file", || {
        read(&log).contains(" ready workers=").then_some(())
    });
    assert_eq!(std::fs::metadata(&log).unwrap().uid(), NOBODY);

    let rotated = dir.path().join("supervisor.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    s.signal(Signal::SIGUSR1);
    eventually(WAIT, "the worker to reopen the new file", || {
        read(&log)
            .contains("SIGUSR1: log file reopened")
            .then_some(())
    });
    assert_eq!(std::fs::metadata(&log).unwrap().uid(), NOBODY);
    let all = read(&rotated) + &read(&log);
    assert!(!all.contains("cannot reopen"), "{all}");
}

#[test]
fn workers_write_the_access_log_as_the_user_and_after_a_rotation() {
    if skipped_without_root("workers_write_the_access_log_as_the_user_and_after_a_rotation") {
        return;
    }
    // The directory is root's (0755): the workers, as nobody, could not create a file in it.
    let dir = shared_dir();
    let access = dir.path().join("access.log");
    let set_access = format!("log.access_file={}", access.display());
    let runtime = format!("server.runtime_dir={}", dir.path().display());
    let s = Server::start(&[
        "-w",
        "1",
        "--set",
        "server.user=nobody",
        "--set",
        "log.access=true",
        "--set",
        &set_access,
        "--set",
        &runtime,
    ]);
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
    assert_eq!(s.get("/").status, 200);
    eventually(WAIT, "the request in the access log", || {
        read(&access)
            .contains("\"GET / HTTP/1.1\" 200")
            .then_some(())
    });
    assert_eq!(std::fs::metadata(&access).unwrap().uid(), NOBODY);

    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&access, &rotated).unwrap();
    s.signal(Signal::SIGUSR1);
    // The master creates the new file for the user; a request after the worker has reopened it
    // lands there (polled: the worker reopens on its own time).
    eventually(WAIT, "a request in the new access log", || {
        assert_eq!(s.get("/healthz").status, 200);
        read(&access).contains("GET /healthz").then_some(())
    });
    assert_eq!(std::fs::metadata(&access).unwrap().uid(), NOBODY);
    assert!(
        !s.log.text().contains("cannot open the access log"),
        "{}",
        s.log.text()
    );
}
