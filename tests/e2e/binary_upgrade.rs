//! Binary upgrade (USR2): the master runs the binary now on disk as a new master with its
//! listeners, and drains once the new one is ready; or keeps serving when the new one fails.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::util::*;
use crate::worker_recycling::{client, Tally, PACE};

/// A master this test did not start as a child (the new master of an upgrade): stopped with
/// TERM when the test ends, then KILL if it is still there after a bound.
pub(crate) struct Adopted(pub(crate) u32);

impl Drop for Adopted {
    fn drop(&mut self) {
        let pid = Pid::from_raw(self.0 as i32);
        if kill(pid, Signal::SIGTERM).is_err() {
            return;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while alive(self.0) && std::time::Instant::now() < deadline {
            // Polling an exit we cannot wait for (not our child), bounded above.
            std::thread::sleep(Duration::from_millis(20));
        }
        if alive(self.0) {
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
}

fn serving(master: u32) -> Vec<u64> {
    serving_pids_of(master).into_iter().map(u64::from).collect()
}

fn exe_of(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// The pid in the "started the new master" line, for the `nth` upgrade (0-based).
pub(crate) fn new_master(server: &Server, nth: usize) -> u32 {
    eventually(Duration::from_secs(20), "the new master's pid", || {
        let lines = server.log.lines();
        let line = lines
            .iter()
            .filter(|l| l.contains("upgrade: started the new master"))
            .nth(nth)?;
        field(line, "pid")?.parse().ok()
    })
}

/// Copies the test binary into `dir` and starts it there with a config file.
pub(crate) fn start_copy(dir: tempfile::TempDir, conf: &str) -> (Server, std::path::PathBuf) {
    let bin = dir.path().join("supervisor");
    std::fs::copy(BIN, &bin).unwrap();
    let conf = write_file(dir.path(), "s.toml", conf);
    let server = Server::spawn_program(
        &bin,
        dir,
        &["-c", conf.to_str().unwrap(), "-b", "127.0.0.1:0"],
    )
    .wait_ready();
    (server, bin)
}

/// Replaces `bin` the way a package upgrade does: a new file renamed over it.
fn replace_binary(bin: &Path) {
    let next = bin.with_extension("new");
    std::fs::copy(BIN, &next).unwrap();
    std::fs::rename(&next, bin).unwrap();
}

/// Two clients (one keep-alive, one not) sending requests at `PACE` until `stop`, once 20 are
/// answered.
#[allow(clippy::type_complexity)]
fn load_until_stopped(
    server: &Server,
) -> (
    Arc<AtomicBool>,
    Arc<Tally>,
    [std::thread::JoinHandle<()>; 2],
) {
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let clients = [true, false].map(|keep_alive| {
        client(
            server.addr,
            keep_alive,
            u64::MAX,
            PACE,
            stop.clone(),
            tally.clone(),
        )
    });
    eventually(
        Duration::from_secs(10),
        "requests before the upgrade",
        || (tally.ok.load(Ordering::Relaxed) >= 20).then_some(()),
    );
    (stop, tally, clients)
}

#[test]
fn usr2_under_load_hands_over_to_the_binary_on_disk_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, bin) = start_copy(dir, "[server]\nworkers = 2\n");
    let old_master = server.pid();
    let old_workers = server.serving_pids();
    assert_eq!(old_workers.len(), 2);

    let (stop, tally, clients) = load_until_stopped(&server);

    replace_binary(&bin);
    assert!(exe_of(old_master).ends_with("(deleted)"));
    server.signal(Signal::SIGUSR2);
    let new = new_master(&server, 0);
    let _stop_new = Adopted(new);
    assert_ne!(new, old_master);

    // The old master drains its workers and exits cleanly once the new one is ready.
    let code = server.wait_exit(Duration::from_secs(30));
    assert!(code.success(), "old master: {code:?}");
    eventually(Duration::from_secs(10), "the old workers gone", || {
        old_workers.iter().all(|&p| !alive(p)).then_some(())
    });
    // The new master runs the file now on disk, with its own workers on the same port.
    assert_eq!(exe_of(new), bin.to_string_lossy());
    let workers = serving(new);
    assert_eq!(workers.len(), 2, "{workers:?}");
    assert!(workers.iter().all(|p| !old_workers.contains(&(*p as u32))));
    let served = tally.ok.load(Ordering::Relaxed);
    eventually(
        Duration::from_secs(10),
        "requests served by the new master",
        || (tally.ok.load(Ordering::Relaxed) >= served + 20).then_some(()),
    );
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(tally.failed.load(Ordering::Relaxed), 0, "failed requests");
    let requests: u64 = status_of(new)["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["requests"].as_u64().unwrap())
        .sum();
    assert!(requests >= 20, "the new workers served {requests}");
}

/// The app processes of master `pid` that serve: (host pid, app pid).
fn apps_of(master: u32) -> Vec<(u64, u64)> {
    status_of(master)["apps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "serving" && a["app_pid"].as_u64() > Some(1))
        .map(|a| (a["pid"].as_u64().unwrap(), a["app_pid"].as_u64().unwrap()))
        .collect()
}

#[test]
fn usr2_under_load_with_app_processes_replaces_them_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let app = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps/stdlib_app.py");
    let conf = format!(
        "[server]\nworkers = 2\nhttp_workers = 1\n[app]\ncommand = [\"python3\", {app:?}, \"--uds\", \"{{socket}}\"]\n"
    );
    let (mut server, _bin) = start_copy(dir, &conf);
    let old_master = server.pid();
    let old_apps = eventually(Duration::from_secs(10), "both app processes", || {
        let apps = apps_of(old_master);
        (apps.len() == 2).then_some(apps)
    });

    let (stop, tally, clients) = load_until_stopped(&server);
    server.signal(Signal::SIGUSR2);
    let new = new_master(&server, 0);
    let _stop_new = Adopted(new);
    // The old master drains its HTTP workers, then its app processes, and exits cleanly once
    // the new one is ready; its apps are gone with it.
    let code = server.wait_exit(Duration::from_secs(30));
    assert!(code.success(), "old master: {code:?}");
    eventually(
        Duration::from_secs(10),
        "the old app processes gone",
        || {
            old_apps
                .iter()
                .all(|&(host, app)| !alive(host as u32) && !alive(app as u32))
                .then_some(())
        },
    );
    let new_apps = apps_of(new);
    assert_eq!(new_apps.len(), 2, "{new_apps:?}");
    assert!(new_apps.iter().all(|a| !old_apps.contains(a)));
    let served = tally.ok.load(Ordering::Relaxed);
    eventually(
        Duration::from_secs(10),
        "requests served by the new master",
        || (tally.ok.load(Ordering::Relaxed) >= served + 20).then_some(()),
    );
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(tally.failed.load(Ordering::Relaxed), 0, "failed requests");
}

#[test]
fn a_failed_upgrade_leaves_the_old_master_serving_and_a_later_one_works() {
    let dir = tempfile::tempdir().unwrap();
    let conf_path = dir.path().join("s.toml");
    let (mut server, _bin) = start_copy(dir, "[server]\nworkers = 2\n");
    let workers = server.serving_pids();

    // The new master reads the config again: a broken one makes it exit before it is ready.
    std::fs::write(&conf_path, "[server]\nworkers = 2\nwokers = 3\n").unwrap();
    server.signal(Signal::SIGUSR2);
    let new = new_master(&server, 0);
    let _stop_new = Adopted(new);
    let line = server
        .log
        .wait_for(Duration::from_secs(20), |l| l.contains("upgrade failed"))
        .expect("the failed upgrade is logged");
    assert!(line.contains("exited with status 2"), "{line}");
    assert!(
        server.log.text().contains("wokers"),
        "the new master's own error is in the log"
    );
    eventually(
        Duration::from_secs(10),
        "the failed new master gone",
        || (!alive(new)).then_some(()),
    );
    // Still the same master and workers, serving.
    assert_eq!(server.get("/").status, 200);
    assert_eq!(server.serving_pids(), workers);
    assert!(server.child.try_wait().unwrap().is_none());

    // Fixed: the next USR2 goes through.
    std::fs::write(&conf_path, "[server]\nworkers = 2\n").unwrap();
    server.signal(Signal::SIGUSR2);
    let next = new_master(&server, 1);
    let _stop_next = Adopted(next);
    assert!(server.wait_exit(Duration::from_secs(30)).success());
    assert_eq!(serving(next).len(), 2);
    assert_eq!(get(server.addr, "/").status, 200);
}

#[test]
fn usr2_hands_the_metrics_socket_over() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, _bin) = start_copy(
        dir,
        "[server]\nworkers = 1\n[metrics]\nbind = \"127.0.0.1:0\"\n",
    );
    let serving_at = |nth: usize| -> std::net::SocketAddr {
        eventually(Duration::from_secs(20), "metrics serving", || {
            let lines = server.log.lines();
            let line = lines
                .iter()
                .filter(|l| l.contains("metrics: serving"))
                .nth(nth)?;
            field(line, "addr")?.parse().ok()
        })
    };
    let addr = serving_at(0);
    assert_eq!(get(addr, "/metrics").status, 200);
    server.signal(Signal::SIGUSR2);
    let new = new_master(&server, 0);
    let _stop_new = Adopted(new);
    // The new master serves the same socket (binding it again would fail: the old one has it)...
    assert_eq!(serving_at(1), addr);
    assert!(server.wait_exit(Duration::from_secs(30)).success());
    // ... and goes on serving it once the old one is gone.
    let r = get(addr, "/metrics");
    assert_eq!(r.status, 200);
    assert!(
        r.text().contains("supervisor_requests_total"),
        "{}",
        r.text()
    );
}

#[test]
fn a_failed_upgrade_gives_the_control_socket_and_pidfile_back_to_the_old_master() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let (sock, pidfile, good) = control_and_pidfile_config(&d);
    let (server, _bin) = start_copy(dir, &good);
    let ctl = |args: &[&str]| {
        run(
            &d,
            &[args, &["--socket", sock.to_str().unwrap()]].concat(),
            &[],
        )
    };
    assert_eq!(ctl(&["status"]).0, 0);
    // What a new master leaves when it dies right after taking both over: neither file.
    std::fs::remove_file(&sock).unwrap();
    std::fs::remove_file(&pidfile).unwrap();
    std::fs::write(d.join("s.toml"), format!("{good}wokers = 3\n")).unwrap();
    server.signal(Signal::SIGUSR2);
    let _stop_new = Adopted(new_master(&server, 0));
    server
        .log
        .wait_for(Duration::from_secs(20), |l| l.contains("upgrade failed"))
        .expect("the failed upgrade is logged");
    eventually(Duration::from_secs(10), "the control socket back", || {
        (ctl(&["status"]).0 == 0).then_some(())
    });
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap().trim(),
        server.pid().to_string()
    );
    assert!(server.log.text().contains("made again"));
    assert!(server.log.text().contains("written again"));
}

#[test]
fn while_the_new_master_is_not_ready_reload_scale_and_more_usr2_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let gate = d.join("gate");
    std::fs::create_dir(&gate).unwrap();
    std::fs::write(gate.join("open"), "").unwrap();
    // Each app waits for the gate to be open before it listens: its worker is not ready before.
    let app = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps/stdlib_app.py");
    let script = format!(
        "while [ ! -e '{}/open' ]; do sleep 0.02; done; exec python3 {app} --uds \"$1\"",
        gate.display()
    );
    let sock = d.join("ctl.sock");
    let conf = format!(
        "[server]\nworkers = 1\ncontrol_socket = {:?}\n[app]\ncommand = [\"sh\", \"-c\", {:?}, \"sh\", \"{{socket}}\"]\n",
        sock.to_str().unwrap(),
        script
    );
    let (mut server, _bin) = start_copy(dir, &conf);
    let ctl = |args: &[&str]| {
        run(
            &d,
            &[args, &["--socket", sock.to_str().unwrap()]].concat(),
            &[],
        )
    };

    std::fs::remove_file(gate.join("open")).unwrap();
    server.signal(Signal::SIGUSR2);
    let new = new_master(&server, 0);
    let _stop_new = Adopted(new);
    // The new master's worker has started (and waits for its app) before anything is asked.
    eventually(Duration::from_secs(20), "the new master's worker", || {
        (!crate::app_process::children(new).is_empty()).then_some(())
    });

    let (code, _, err) = ctl(&["reload"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("upgrade is under way"), "{err}");
    let (code, _, err) = ctl(&["scale", "2"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("upgrade is under way"), "{err}");
    server.signal(Signal::SIGUSR2);
    server
        .log
        .wait_for(Duration::from_secs(10), |l| l.contains("already under way"))
        .expect("a second USR2 is refused");
    kill(Pid::from_raw(new as i32), Signal::SIGUSR2).unwrap();
    server
        .log
        .wait_for(Duration::from_secs(10), |l| {
            l.contains("is the new master of an upgrade") && l.contains("not ready yet")
        })
        .expect("USR2 to the new master before it is ready is refused");
    // The old master serves all along.
    assert_eq!(server.get("/").status, 200);

    std::fs::write(gate.join("open"), "").unwrap();
    assert!(server.wait_exit(Duration::from_secs(30)).success());
    assert_eq!(serving(new).len(), 1);
    assert_eq!(
        server
            .log
            .lines()
            .iter()
            .filter(|l| l.contains("upgrade: started the new master"))
            .count(),
        1,
        "only one new master"
    );
}

#[test]
fn a_failed_upgrade_leaves_the_unix_socket_files_to_the_old_master() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let bin = d.join("supervisor");
    std::fs::copy(BIN, &bin).unwrap();
    let conf = write_file(&d, "s.toml", "[server]\nworkers = 1\n");
    let unix = d.join("app.sock");
    let unix_bind = format!("unix:{}", unix.display());
    let mut server = Server::spawn_program(
        &bin,
        dir,
        &[
            "-c",
            conf.to_str().unwrap(),
            "-b",
            "127.0.0.1:0",
            "-b",
            &unix_bind,
        ],
    )
    .wait_ready();
    assert_eq!(try_get_unix(&unix, "/").unwrap().status, 200);
    // The new master takes the sockets over, then fails before it is ready (its app exits at
    // once, so its worker never boots and it gives up): it must not remove the socket file,
    // which the old master goes on serving.
    std::fs::write(
        &conf,
        "[server]\nworkers = 1\n[app]\ncommand = [\"sh\", \"-c\", \"exit 3\", \"{socket}\"]\n",
    )
    .unwrap();
    server.signal(Signal::SIGUSR2);
    let new = new_master(&server, 0);
    let _stop_new = Adopted(new);
    server
        .log
        .wait_for(Duration::from_secs(20), |l| l.contains("upgrade failed"))
        .expect("the failed upgrade is logged");
    eventually(
        Duration::from_secs(10),
        "the failed new master gone",
        || (!alive(new)).then_some(()),
    );
    assert_eq!(try_get_unix(&unix, "/").unwrap().status, 200);
    // And a successful upgrade leaves it to the new master, which removes it when it stops.
    std::fs::write(&conf, "[server]\nworkers = 1\n").unwrap();
    server.signal(Signal::SIGUSR2);
    let next = new_master(&server, 1);
    let stop_next = Adopted(next);
    assert!(server.wait_exit(Duration::from_secs(30)).success());
    assert_eq!(try_get_unix(&unix, "/").unwrap().status, 200);
    drop(stop_next);
    eventually(Duration::from_secs(10), "the socket file removed", || {
        (!unix.exists()).then_some(())
    });
}
