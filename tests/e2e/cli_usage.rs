use std::net::TcpListener;

use crate::util::*;

#[test]
fn check_prints_the_resolved_config_with_precedence() {
    let dir = tempfile::tempdir().unwrap();
    write_file(
        dir.path(),
        "supervisor.toml",
        "[server]\nworkers = 3\nbacklog = 100\n[limits]\nmax_concurrent_requests = 7\n",
    );
    let (code, out, _) = run(
        dir.path(),
        &["check", "--set", "server.backlog=200"],
        &[("MAX_CONCURRENT_REQUESTS", "9"), ("WORKERS", "5")],
    );
    assert_eq!(code, 0);
    assert!(out.contains("backlog = 200"), "--set beats the file: {out}");
    assert!(
        out.contains("max_concurrent_requests = 9"),
        "env beats the file: {out}"
    );
    assert!(out.contains("workers = 5"), "env beats the file: {out}");
}

#[test]
fn bad_config_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "bad.toml", "[server]\nwokers = 3\n");
    let (code, _, err) = run(dir.path(), &["start", "-c", file.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("wokers") && err.contains("server.workers"),
        "{err}"
    );
    assert!(err.contains("bad.toml:2:"), "{err}");

    let (code, _, err) = run(
        dir.path(),
        &["check", "--set", "worker.max_connections=lots"],
        &[],
    );
    assert_eq!(code, 2);
    assert!(err.contains("worker.max_connections"), "{err}");

    let (code, _, err) = run(
        dir.path(),
        &["start", "-b", "127.0.0.1:0"],
        &[("WORKERS", "many")],
    );
    assert_eq!(code, 2);
    assert!(err.contains("WORKERS"), "{err}");
}

#[test]
fn address_in_use_by_another_program_exits_1() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(dir.path(), &["start", "-b", &addr, "-w", "1"], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&addr) && err.contains("already in use"),
        "{err}"
    );
}

#[test]
fn a_second_supervisor_on_the_same_port_is_refused() {
    let first = Server::start(&["-w", "1"]);
    let addr = first.addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(dir.path(), &["start", "-b", &addr, "-w", "1"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("already in use"), "{err}");
    // The first one still has all the traffic.
    assert_eq!(first.get("/").status, 200);
    assert_eq!(first.workers_in("serving").len(), 1);
}

#[test]
fn bad_app_settings_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    for (set, expect) in [
        ("app.upstream=ftp://x:1", "must start with http:// or unix:"),
        (
            "app.command=[\"app\",\"--port\",\"8000\"]",
            "{socket} or {port}",
        ),
        (
            "server.forwarded_allow_ips=[\"10.0.0.0/40\"]",
            "10.0.0.0/40",
        ),
        ("app.ready_timeout=0s", "app.ready_timeout"),
    ] {
        let (code, _, err) = run(dir.path(), &["check", "--set", set], &[]);
        assert_eq!(code, 2, "{set}: {err}");
        assert!(err.contains(expect), "{set}: {err}");
    }
    // An app command and an upstream cannot both be the app, from whichever sources.
    let both = dir.path().join("both.toml");
    std::fs::write(
        &both,
        "[app]\ncommand = [\"app\", \"--uds\", \"{socket}\"]\nupstream = \"http://127.0.0.1:9\"\n",
    )
    .unwrap();
    let (code, _, err) = run(dir.path(), &["check", "-c", both.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("keep one"), "{err}");
    let (code, _, err) = run(
        dir.path(),
        &[
            "start",
            "-b",
            "127.0.0.1:0",
            "--set",
            "app.upstream=http://127.0.0.1:9",
            "--",
            "app",
            "--uds",
            "{socket}",
        ],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("keep one"), "{err}");
}
