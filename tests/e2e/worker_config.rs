//! How workers get their configuration: over an inherited sealed memfd, so that its size is not
//! bounded by exec's limits and nothing of it (a Redis password) shows in `/proc/PID/environ`.

use std::time::Duration;

use crate::app_process::children;
use crate::util::{eventually, write_file, Server};

const APP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps/stdlib_app.py");

#[test]
fn a_configuration_larger_than_exec_can_pass_starts_and_serves() {
    // 20,000 trusted networks: about 300 KB of JSON, past exec's 128 KiB for one string.
    let ips: Vec<String> = (0..20_000)
        .map(|i| format!("\"10.{}.{}.0/24\"", i / 256, i % 256))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    write_file(
        dir.path(),
        "supervisor.toml",
        &format!(
            "[server]\nworkers = 2\nforwarded_allow_ips = [{}]\ncontrol_socket = {:?}\n",
            ips.join(", "),
            dir.path().join("ctl.sock").to_str().unwrap()
        ),
    );
    let s = Server::spawn_in(dir, &["-b", "127.0.0.1:0"]).wait_ready();
    assert_eq!(s.serving_pids().len(), 2);
    assert_eq!(s.get("/").status, 200);
}

#[test]
fn the_redis_password_is_in_no_environment_or_command_line() {
    let dir = tempfile::tempdir().unwrap();
    write_file(
        dir.path(),
        "supervisor.toml",
        &format!(
            "[server]\nworkers = 2\ncontrol_socket = {:?}\nruntime_dir = {:?}\n\
             [redis]\nurl = \"redis://:secretpw@127.0.0.1:1\"\n",
            dir.path().join("ctl.sock").to_str().unwrap(),
            dir.path().to_str().unwrap(),
        ),
    );
    // Redis is down (nothing on port 1): the workers serve, degraded.
    let s = Server::spawn_in(
        dir,
        &[
            "-b",
            "127.0.0.1:0",
            "--",
            "python3",
            APP,
            "--uds",
            "{socket}",
        ],
    )
    .wait_ready();
    assert_eq!(s.get("/").status, 200);
    let workers = s.serving_pids();
    assert_eq!(workers.len(), 2);
    // The app hosts and their apps.
    let apps: Vec<u32> = eventually(Duration::from_secs(20), "both app processes", || {
        let hosts: Vec<u32> = s.status()["apps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["pid"].as_u64().unwrap() as u32)
            .collect();
        let apps: Vec<u32> = hosts.iter().flat_map(|&h| children(h)).collect();
        (apps.len() == 2).then(|| [hosts, apps].concat())
    });
    for pid in [s.pid()].iter().chain(&workers).chain(&apps) {
        for what in ["environ", "cmdline"] {
            let text = std::fs::read(format!("/proc/{pid}/{what}")).unwrap();
            assert!(
                !String::from_utf8_lossy(&text).contains("secretpw"),
                "/proc/{pid}/{what} shows the password"
            );
        }
    }
}
