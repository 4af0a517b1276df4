use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::util::*;

#[test]
fn term_lets_in_flight_requests_finish_then_exits_0() {
    let mut server = Server::start(&["-w", "2"]);
    let addr = server.addr;
    let req = std::thread::spawn(move || get(addr, "/sleep?ms=1500"));
    eventually(Duration::from_secs(10), "the request in flight", || {
        (server.status()["global_inflight"] == 1).then_some(())
    });
    let workers = server.serving_pids();
    server.signal(Signal::SIGTERM);
    let resp = req.join().unwrap();
    assert_eq!(resp.status, 200, "in-flight request cut by a graceful stop");
    let status = server.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0));
    for pid in workers {
        assert!(!alive(pid), "worker {pid} outlived the master");
    }
    // New connections are refused once stopped.
    assert!(try_get(addr, "/").is_err());
}

#[test]
fn quit_stops_fast_even_with_requests_in_flight() {
    let mut server = Server::start(&["-w", "1"]);
    let addr = server.addr;
    let req = std::thread::spawn(move || try_get(addr, "/sleep?ms=60000"));
    eventually(Duration::from_secs(10), "the request in flight", || {
        (server.status()["global_inflight"] == 1).then_some(())
    });
    server.signal(Signal::SIGQUIT);
    assert_eq!(server.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert_cut(
        req.join().unwrap(),
        "the request in flight on a QUIT worker",
    );
}

#[test]
fn a_killed_worker_is_respawned_and_service_goes_on() {
    let server = Server::start(&["-w", "2"]);
    let before = server.workers_in("serving");
    let victim = before[0]["pid"].as_u64().unwrap() as u32;
    let victim_id = before[0]["worker_id"].clone();
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    let replacement = eventually(Duration::from_secs(20), "a replacement worker", || {
        server
            .workers_in("serving")
            .into_iter()
            .find(|w| w["worker_id"] == victim_id && w["pid"].as_u64().unwrap() as u32 != victim)
    });
    assert_eq!(replacement["generation"], 1);
    assert_eq!(server.workers_in("serving").len(), 2);
    let line = server
        .log
        .wait_for(Duration::from_secs(5), |l| l.contains("worker died"))
        .expect("the death is logged");
    assert!(line.contains("not sent by supervisor"), "{line}");
    for _ in 0..20 {
        assert_eq!(server.get("/").status, 200);
    }
}

#[test]
fn killing_the_master_takes_every_worker_down_within_2s() {
    let mut server = Server::start(&["-w", "3"]);
    let workers = server.serving_pids();
    assert_eq!(workers.len(), 3);
    server.child.kill().unwrap(); // SIGKILL: no chance to clean up
    server.wait_exit(Duration::from_secs(5));
    eventually(Duration::from_secs(2), "every worker gone", || {
        workers.iter().all(|&p| !alive(p)).then_some(())
    });
}

#[test]
fn ttin_and_ttou_change_the_worker_count() {
    let server = Server::start(&["-w", "2"]);
    server.signal(Signal::SIGTTIN);
    eventually(Duration::from_secs(20), "3 serving workers", || {
        (server.serving_pids().len() == 3).then_some(())
    });
    // One at a time: the kernel merges a standard signal sent twice before it is handled.
    server.signal(Signal::SIGTTOU);
    eventually(Duration::from_secs(20), "2 workers left", || {
        (server.status()["workers"].as_array().unwrap().len() == 2).then_some(())
    });
    server.signal(Signal::SIGTTOU);
    eventually(Duration::from_secs(20), "1 worker left", || {
        (server.status()["workers"].as_array().unwrap().len() == 1).then_some(())
    });
    server.signal(Signal::SIGTTOU); // never below one
    assert!(server
        .log
        .wait_for(Duration::from_secs(10), |l| l
            .contains("already at one worker"))
        .is_some());
    // The removed workers' sockets left the reuseport group: no connection lands on a socket
    // nobody accepts on (each would hang until the client gives up).
    for _ in 0..30 {
        assert_eq!(server.get("/").status, 200);
    }
}

#[test]
fn workers_that_cannot_start_stop_the_master_with_one_clear_error() {
    let mut server = Server::start(&["-w", "1"]);
    // Exhaust the master's file descriptors: every respawn then fails to create its pipe.
    let master = server.pid() as libc::pid_t;
    let open_fds = std::fs::read_dir(format!("/proc/{master}/fd"))
        .unwrap()
        .count() as u64;
    let limit = libc::rlimit {
        rlim_cur: open_fds,
        rlim_max: open_fds,
    };
    // SAFETY: prlimit with a valid pid and a pointer to a live rlimit; old value not requested.
    let rc = unsafe { libc::prlimit(master, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let worker = server.serving_pids()[0];
    kill(Pid::from_raw(worker as i32), Signal::SIGKILL).unwrap();
    let status = server.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1));
    // The reader of its stderr may lag behind the exit: wait for the lines, bounded.
    for line in ["giving up", "cannot start worker"] {
        let seen = server
            .log
            .wait_for(Duration::from_secs(10), |l| l.contains(line));
        assert!(seen.is_some(), "{line:?} not in:\n{}", server.log.text());
    }
}

#[test]
fn workers_inherit_only_their_own_fds() {
    // An fd the master inherited without close-on-exec, as from a careless parent process.
    let (stray_read, _stray_write) = nix::unistd::pipe().unwrap();
    let inode = nix::sys::stat::fstat(&stray_read).unwrap().st_ino;
    let server = Server::start(&["-w", "1"]);
    let master_fds: Vec<String> = fd_links(server.pid());
    assert!(
        master_fds.contains(&format!("pipe:[{inode}]")),
        "the test's stray fd should reach the master: {master_fds:?}"
    );
    let worker = server.serving_pids()[0];
    let fds = fd_links(worker);
    assert!(
        !fds.contains(&format!("pipe:[{inode}]")),
        "a stray fd leaked into the worker: {fds:?}"
    );
    assert!(
        !fds.iter().any(|l| l.contains("memfd:")),
        "the scoreboard is mapped, its fd need not stay open: {fds:?}"
    );
}

fn fd_links(pid: u32) -> Vec<String> {
    fd_targets(pid).into_iter().map(|(_, t)| t).collect()
}

#[test]
fn usr1_and_usr2_during_a_workers_boot_do_not_kill_it() {
    let server = Server::spawn(&["-b", "127.0.0.1:0", "-w", "1"]);
    // The worker, once it runs its own program (after the exec), early in its boot: before it
    // has its own signal handlers, the default action of both would kill it.
    let booting = eventually(Duration::from_secs(20), "a booting worker", || {
        let pid = *crate::app_process::children(server.pid()).first()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let mut args = cmdline.split(|&b| b == 0);
        (args.nth(1) == Some(b"worker".as_slice())).then_some(pid)
    });
    // What the master sends a worker: USR1 to reopen logs, USR2 to release a held one.
    kill(Pid::from_raw(booting as i32), Signal::SIGUSR1).unwrap();
    kill(Pid::from_raw(booting as i32), Signal::SIGUSR2).unwrap();
    let server = server.wait_ready();
    assert_eq!(
        server.serving_pids(),
        vec![booting],
        "the same worker serves"
    );
    assert_eq!(server.get("/").status, 200);
    assert!(
        !server.log.text().contains("killed by signal"),
        "{}",
        server.log.text()
    );
}

#[test]
fn ctrl_c_to_the_process_group_is_a_clean_fast_stop() {
    let mut server = Server::start_in_own_group(&["-w", "3"]);
    // What a terminal's Ctrl-C does: SIGINT to every process of the foreground group, the
    // workers included, at once.
    kill(Pid::from_raw(-(server.pid() as i32)), Signal::SIGINT).unwrap();
    assert!(server.wait_exit(Duration::from_secs(20)).success());
    let log = server.log.text();
    assert!(log.contains("fast stop"), "{log}");
    assert!(!log.contains("worker died"), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
}
