//! The master's runtime directory (its apps' sockets): owned through a lock held for the
//! master's life, so that another master sharing the base directory (another pid namespace: a
//! container sharing `/tmp`) never removes a live one's, and gone masters' are still swept.

use std::fs::File;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};

use crate::util::{eventually, Server};

const APP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps/stdlib_app.py");
const WAIT: Duration = Duration::from_secs(20);

fn start_app_in(base: &std::path::Path) -> Server {
    let set = format!("server.runtime_dir={}", base.display());
    Server::start(&[
        "-w", "1", "--set", &set, "--", "python3", APP, "--uds", "{socket}",
    ])
}

#[test]
fn a_directory_whose_lock_is_held_is_never_swept_whatever_its_pid() {
    let base = tempfile::tempdir().unwrap();
    // A live master of another pid namespace: its pid means nothing here (no process has pid
    // 2^22 + 1, above pid_max), but it holds its lock.
    let other = base.path().join("supervisor-4194305");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("app-1-1.sock"), b"").unwrap();
    let _held = Flock::lock(
        File::create(other.join(".lock")).unwrap(),
        FlockArg::LockExclusiveNonblock,
    )
    .unwrap();
    // A master that is gone (kill -9) and whose pid a live process has now (pid 1 always
    // lives): its lock is free.
    let gone = base.path().join("supervisor-1");
    std::fs::create_dir(&gone).unwrap();
    std::fs::write(gone.join(".lock"), b"").unwrap();
    std::fs::write(gone.join("app-1-1.sock"), b"").unwrap();

    let first = start_app_in(base.path());
    let second = start_app_in(base.path());
    assert!(
        other.join("app-1-1.sock").exists(),
        "a directory whose lock is held stays, with its sockets"
    );
    assert!(!gone.exists(), "a directory whose lock is free is removed");
    for s in [&first, &second] {
        let own = base.path().join(format!("supervisor-{}", s.pid()));
        assert!(own.join(".lock").exists(), "{}", own.display());
        assert_eq!(s.get("/").status, 200);
    }
    // A master that exits removes its own directory; the other's stays.
    let first_dir = base.path().join(format!("supervisor-{}", first.pid()));
    let mut first = first;
    first.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(first.wait_exit(WAIT).success());
    eventually(WAIT, "the stopped master's directory to go", || {
        (!first_dir.exists()).then_some(())
    });
    assert!(other.exists());
    assert_eq!(second.get("/").status, 200);
}

#[test]
fn an_app_whose_socket_is_removed_is_restarted_and_serves_again() {
    let base = tempfile::tempdir().unwrap();
    let s = start_app_in(base.path());
    assert_eq!(s.get("/").status, 200);
    let dir = base.path().join(format!("supervisor-{}", s.pid()));
    let sockets: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    assert_eq!(sockets.len(), 1, "{sockets:?}");
    // What another master's sweep, or a tmp cleaner, did before the lock.
    std::fs::remove_file(&sockets[0]).unwrap();
    // Pooled connections still reach the app; new ones cannot. Three requests at once need
    // more than the one pooled connection, so the worker connects again.
    let addr = s.addr;
    eventually(
        WAIT,
        "requests to be answered 200 by a restarted app",
        || {
            let three: Vec<_> = (0..3)
                .map(|_| std::thread::spawn(move || crate::util::try_get(addr, "/sleep?ms=100")))
                .collect();
            let all_ok = three
                .into_iter()
                .all(|t| t.join().unwrap().is_ok_and(|r| r.status == 200));
            (all_ok && s.log.text().contains("restarting it")).then_some(())
        },
    );
    let line = s
        .log
        .wait_for(WAIT, |l| l.contains("the app cannot be reached"))
        .unwrap();
    assert!(
        line.contains(&format!("its socket {} is gone", sockets[0].display())),
        "{line}"
    );
    assert!(
        sockets[0].exists(),
        "the restarted app made its socket again"
    );
}

/// The value of an unlabelled series in a metrics scrape.
fn metric(addr: std::net::SocketAddr, name: &str) -> Option<u64> {
    let text = crate::util::get(addr, "/metrics").text();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
}

#[test]
fn an_app_that_answers_only_502s_shows_unhealthy_in_status_and_metrics() {
    // An upstream that is down: every request is a 502.
    let s = Server::start(&[
        "-w",
        "1",
        "--set",
        "app.upstream=http://127.0.0.1:1",
        "--set",
        "metrics.bind=127.0.0.1:0",
    ]);
    let line = s
        .log
        .wait_for(WAIT, |l| l.contains("metrics: serving /metrics"))
        .expect("the metrics line");
    let m: std::net::SocketAddr = crate::util::field(&line, "addr").unwrap().parse().unwrap();
    let healthy = |s: &Server| s.status()["workers"][0]["app_healthy"].as_bool();
    assert_eq!(healthy(&s), Some(true), "healthy until it fails");
    assert_eq!(metric(m, "supervisor_apps_unhealthy"), Some(0));
    for _ in 0..3 {
        assert_eq!(s.get("/").status, 502);
    }
    assert_eq!(healthy(&s), Some(false), "{}", s.status());
    assert_eq!(s.status()["workers"][0]["app_502_streak"], 3);
    assert_eq!(metric(m, "supervisor_apps_unhealthy"), Some(1));
    let (code, out, _) = s.ctl(&["status"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("app unhealthy (answers only 502s) behind worker 1 (3 in a row)"),
        "{out}"
    );
}

#[test]
fn an_app_that_answers_is_healthy() {
    let base = tempfile::tempdir().unwrap();
    let s = start_app_in(base.path());
    for _ in 0..3 {
        assert_eq!(s.get("/").status, 200);
    }
    assert_eq!(s.status()["workers"][0]["app_healthy"], true);
    assert_eq!(s.status()["workers"][0]["app_502_streak"], 0);
}

#[test]
fn an_upgrade_leaves_the_old_masters_directory_to_it_until_it_exits() {
    let base = tempfile::tempdir().unwrap();
    let conf = format!(
        "[server]\nworkers = 1\nruntime_dir = {:?}\n[app]\ncommand = [\"python3\", {APP:?}, \
         \"--uds\", \"{{socket}}\"]\n",
        base.path().to_str().unwrap()
    );
    let (mut old, _bin) = crate::binary_upgrade::start_copy(tempfile::tempdir().unwrap(), &conf);
    let old_dir = base.path().join(format!("supervisor-{}", old.pid()));
    assert!(old_dir.join(".lock").exists());
    old.signal(nix::sys::signal::Signal::SIGUSR2);
    let new = crate::binary_upgrade::new_master(&old, 0);
    let _stop_new = crate::binary_upgrade::Adopted(new);
    let new_dir = base.path().join(format!("supervisor-{new}"));
    eventually(WAIT, "the new master's directory", || {
        new_dir.join(".lock").exists().then_some(())
    });
    // The new master swept the base at its start: the old master's directory, locked, stayed.
    assert!(
        old_dir.exists(),
        "the old master's directory stays while it runs"
    );
    assert!(old.wait_exit(WAIT).success());
    assert!(
        !old_dir.exists(),
        "the old master removes its directory at exit"
    );
    assert!(new_dir.join(".lock").exists());
    assert_eq!(crate::util::get(old.addr, "/").status, 200);
}
