//! A reload whose new workers cannot start: `supervisor reload` says so (exit 1, the reason),
//! the master logs it, and the old workers keep serving with the previous configuration.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::util::{eventually, try_get, write_file, Server};

const APP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps/stdlib_app.py");
const WAIT: Duration = Duration::from_secs(30);

fn config(dir: &std::path::Path, command: &str) -> String {
    format!(
        "[server]\nworkers = 2\ncontrol_socket = {:?}\nruntime_dir = {:?}\n[app]\ncommand = {command}\n",
        dir.join("ctl.sock").to_str().unwrap(),
        dir.to_str().unwrap(),
    )
}

#[test]
fn a_reload_whose_workers_cannot_start_fails_and_the_old_workers_keep_serving() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let good = format!("[\"python3\", {APP:?}, \"--uds\", \"{{socket}}\"]");
    write_file(&path, "supervisor.toml", &config(&path, &good));
    let s = Server::spawn_in(dir, &["-b", "127.0.0.1:0"]).wait_ready();
    let before = s.serving_pids();
    assert_eq!(before.len(), 2);

    // Requests all along: every one must be a 200 (bounded in time and count).
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, addr) = (stop.clone(), s.addr);
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let until = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < until && ok < 100_000 {
                match try_get(addr, "/") {
                    Ok(r) if r.status == 200 => ok += 1,
                    other => failed.push(format!("{:?}", other.map(|r| r.status))),
                }
            }
            (ok, failed)
        })
    };

    // An app that exits at once: no new worker can start.
    let broken = "[\"python3\", \"-c\", \"import sys; sys.exit(3)\", \"{socket}\"]";
    write_file(&path, "supervisor.toml", &config(&path, broken));
    let (code, out, err) = s.ctl(&["reload"]);
    assert_eq!(code, 1, "reload reports the failure:\n{out}\n{err}");
    assert!(
        err.contains("the new workers cannot start") && err.contains("old workers keep serving"),
        "{err}"
    );
    let why = s.refused_reload(1);
    assert!(why.contains("the new workers cannot start"), "{why}");
    s.log
        .wait_for(WAIT, |l| {
            l.contains("reload failed: the new workers cannot start")
        })
        .expect("the master logs it");
    assert_eq!(s.serving_pids(), before, "the old workers serve on");
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.join().unwrap();
    assert!(ok > 0);
    assert!(
        failed.is_empty(),
        "{} requests failed: {failed:?}",
        failed.len()
    );

    // The master is back on the previous configuration: a worker that dies now comes back
    // (killed after the load stopped: a kill -9 resets its connections).
    let victim = before[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually(
        WAIT,
        "the killed worker to be replaced by a working one",
        || {
            let now = s.serving_pids();
            (now.len() == 2 && !now.contains(&victim)).then_some(())
        },
    );

    // A good configuration reloads as usual.
    write_file(&path, "supervisor.toml", &config(&path, &good));
    let (code, out, err) = s.ctl(&["reload"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("configuration reloaded"), "{out}");
    assert_eq!(s.get("/").status, 200);
}

/// `supervisor status` says whether the master is still starting, and how many reloads it
/// refused and why, until one is applied.
#[test]
fn status_says_starting_until_ready_and_keeps_why_a_reload_was_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    // The app listens only after 4 s: the master stays starting meanwhile.
    let slow = format!(
        "[\"python3\", {APP:?}, \"--uds\", \"{{socket}}\", \"--ready-delay-ms\", \"4000\"]"
    );
    write_file(&path, "supervisor.toml", &config(&path, &slow));
    let s = Server::spawn_in(dir, &["-b", "127.0.0.1:0"]);
    let starting = eventually(WAIT, "the master to answer", || s.master_info());
    assert_eq!(starting["ready"], false, "{starting}");
    let (code, text, err) = s.ctl(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("(starting)"), "{text}");
    let s = s.wait_ready();
    let (_, text, _) = s.ctl(&["status"]);
    assert!(!text.contains("(starting)"), "{text}");
    assert!(!text.contains("reloads refused"), "{text}");

    write_file(&path, "supervisor.toml", "[server]\nwokers = 2\n");
    let (code, _, _) = s.ctl(&["reload"]);
    assert_eq!(code, 1);
    assert!(s.refused_reload(1).contains("wokers"));
    let (_, text, _) = s.ctl(&["status"]);
    assert!(text.contains("reloads refused 1  last: "), "{text}");

    let good = format!("[\"python3\", {APP:?}, \"--uds\", \"{{socket}}\"]");
    write_file(&path, "supervisor.toml", &config(&path, &good));
    let (code, out, err) = s.ctl(&["reload"]);
    assert_eq!(code, 0, "{out}\n{err}");
    s.reloaded(1);
    let m = s.master_info().unwrap();
    assert_eq!(m["reload_failures"], 1, "{m}");
    assert_eq!(
        m["last_reload_error"], "",
        "cleared by the reload applied: {m}"
    );
    assert_eq!(m["ready"], true, "{m}");
}
