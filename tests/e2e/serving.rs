use std::collections::HashSet;
use std::io::{BufReader, Write};
use std::time::Duration;

use crate::util::*;

#[test]
fn every_worker_serves_and_tags_its_responses() {
    let server = Server::start(&["-w", "3"]);
    let mut seen = HashSet::new();
    eventually(
        Duration::from_secs(20),
        "responses from all 3 workers",
        || {
            let r = server.get("/");
            assert_eq!(r.status, 200);
            assert_eq!(r.text(), "Hello, World!");
            seen.insert(r.header("x-worker-id").expect("X-Worker-Id").to_string());
            (seen.len() == 3).then_some(())
        },
    );
    let ids: HashSet<_> = ["1", "2", "3"].into_iter().map(String::from).collect();
    assert_eq!(seen, ids);
}

#[test]
fn shared_accept_mode_serves_too() {
    let server = Server::start(&["-w", "2", "--set", "server.accept=shared"]);
    assert_eq!(server.get("/healthz").status, 200);
    let st = server.status();
    assert_eq!(st["workers"].as_array().unwrap().len(), 2);
}

#[test]
fn echo_streams_the_body_back_on_a_keep_alive_connection() {
    let server = Server::start(&["-w", "1"]);
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    for i in 0..3 {
        let body = format!("payload number {i}");
        write!(
            s,
            "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let resp = read_response(&mut r).unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.text(), body);
    }
}

#[test]
fn serves_on_a_unix_socket_and_removes_it_on_stop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let bind = format!("unix:{}", path.display());
    let mut server = Server::spawn_in(dir, &["-b", &bind, "-w", "1"]);
    server
        .log
        .wait_for(Duration::from_secs(20), |l| l.contains(" ready workers="))
        .expect("ready");
    let mode = std::fs::metadata(&path).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o660
    );
    let resp = try_get_unix(&path, "/").unwrap();
    assert_eq!(resp.text(), "Hello, World!");
    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(20)).success());
    assert!(!path.exists(), "socket file left behind");
}
