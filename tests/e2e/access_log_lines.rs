//! `log.access`: one line per answered request, combined format or JSON, on stderr or in a file
//! that USR1 reopens; nothing when it is off.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::util::*;

const WAIT: Duration = Duration::from_secs(20);

/// `GET path` with extra header lines, on a new connection.
fn get_with(addr: SocketAddr, path: &str, headers: &str) -> Response {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: t\r\n{headers}Connection: close\r\n\r\n").as_bytes(),
    )
    .unwrap()
}

/// One combined-format line, taken apart strictly.
#[derive(Debug, PartialEq)]
struct Combined {
    client: String,
    time: String,
    request: String,
    status: u16,
    bytes: u64,
    referer: String,
    agent: String,
    micros: u64,
}

/// `client - - [time] "request" status bytes "referer" "agent" micros`, or `None` for a line
/// that is not one (a log line).
fn combined(line: &str) -> Option<Combined> {
    let (client, rest) = line.split_once(" - - [")?;
    let (time, rest) = rest.split_once("] \"")?;
    let (request, rest) = rest.split_once("\" ")?;
    let (status, rest) = rest.split_once(' ')?;
    let (bytes, rest) = rest.split_once(" \"")?;
    let (referer, rest) = rest.split_once("\" \"")?;
    let (agent, micros) = rest.rsplit_once("\" ")?;
    Some(Combined {
        client: client.to_string(),
        time: time.to_string(),
        request: request.to_string(),
        status: status.parse().ok()?,
        bytes: bytes.parse().ok()?,
        referer: referer.to_string(),
        agent: agent.to_string(),
        micros: micros.parse().ok()?,
    })
}

fn access_lines(log: &Log) -> Vec<Combined> {
    log.lines().iter().filter_map(|l| combined(l)).collect()
}

/// Waits for `n` access lines on the server's stderr.
fn wait_lines(log: &Log, n: usize) -> Vec<Combined> {
    eventually(WAIT, &format!("{n} access lines"), || {
        let lines = access_lines(log);
        assert!(lines.len() <= n, "more lines than requests: {lines:#?}");
        (lines.len() == n).then_some(lines)
    })
}

/// `27/Nov/2026:06:00:00 +0000`.
fn assert_clf_time(t: &str) {
    let b = t.as_bytes();
    assert_eq!(t.len(), 26, "{t}");
    assert!(
        b[2] == b'/' && b[6] == b'/' && b[11] == b':' && t.ends_with(" +0000"),
        "{t}"
    );
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    assert!(months.contains(&&t[3..6]), "{t}");
}

#[test]
fn combined_lines_say_who_asked_what_and_what_they_got() {
    let s = Server::start(&[
        "-w",
        "2",
        "--set",
        "log.access=true",
        "--set",
        "limits.rate=1/min",
    ]);
    let ok = get_with(
        s.addr,
        "/?x=1",
        "User-Agent: tester/1.0\r\nReferer: http://example.test/from\r\n",
    );
    assert_eq!(ok.status, 200);
    // Through a trusted proxy (127.0.0.1 is trusted by default): the forwarded client.
    let missing = get_with(
        s.addr,
        "/missing",
        "X-Forwarded-For: 203.0.113.9\r\nUser-Agent: other agent\r\n",
    );
    assert_eq!(missing.status, 404);
    // The first client's budget (1) is spent: its refusal is logged too.
    let refused = get_with(s.addr, "/", "");
    assert_eq!(refused.status, 429);

    let mut lines = wait_lines(&s.log, 3);
    lines.sort_by_key(|l| l.status);
    for l in &lines {
        assert_clf_time(&l.time);
        assert!(l.micros > 0, "{l:?}");
    }
    let (a, b, c) = (&lines[0], &lines[1], &lines[2]);
    assert_eq!(
        (a.client.as_str(), a.request.as_str(), a.status, a.bytes),
        ("127.0.0.1", "GET /?x=1 HTTP/1.1", 200, ok.body.len() as u64)
    );
    assert_eq!(
        (a.referer.as_str(), a.agent.as_str()),
        ("http://example.test/from", "tester/1.0")
    );
    assert_eq!(
        (b.client.as_str(), b.request.as_str(), b.status, b.bytes),
        (
            "203.0.113.9",
            "GET /missing HTTP/1.1",
            404,
            missing.body.len() as u64
        )
    );
    assert_eq!((b.referer.as_str(), b.agent.as_str()), ("-", "other agent"));
    assert_eq!(
        (c.client.as_str(), c.status, c.bytes),
        ("127.0.0.1", 429, refused.body.len() as u64)
    );
}

#[test]
fn an_untrusted_peer_cannot_choose_its_logged_address() {
    let s = Server::start(&[
        "-w",
        "1",
        "--set",
        "log.access=true",
        "--set",
        "server.forwarded_allow_ips=[]",
    ]);
    get_with(
        s.addr,
        "/",
        "X-Forwarded-For: 203.0.113.9\r\nUser-Agent: a\"b\r\n",
    );
    let l = &wait_lines(&s.log, 1)[0];
    assert_eq!(l.client, "127.0.0.1");
    // A quote cannot end the field early.
    assert_eq!(l.agent, "a\\x22b");
}

#[test]
fn json_lines_parse_and_carry_every_field() {
    let mut s = Server::spawn(&[
        "-b",
        "127.0.0.1:0",
        "-w",
        "1",
        "--set",
        "log.access=true",
        "--set",
        "log.format=json",
    ]);
    // The log is JSON: find the address and readiness in it.
    let message =
        |l: &str, m: &str| serde_json::from_str::<Value>(l).is_ok_and(|v| v["message"] == m);
    let listening = s
        .log
        .wait_for(WAIT, |l| message(l, "listening"))
        .expect("a listening line");
    let listening: Value = serde_json::from_str(&listening).unwrap();
    s.addr = listening["addr"].as_str().unwrap().parse().unwrap();
    s.log
        .wait_for(WAIT, |l| message(l, "ready"))
        .expect("ready");
    let r = get_with(s.addr, "/healthz", "User-Agent: json-test\r\n");
    assert_eq!(r.status, 200);
    let line = s
        .log
        .wait_for(WAIT, |l| l.contains("\"duration_us\""))
        .expect("a JSON access line");
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/healthz");
    assert_eq!(v["protocol"], "HTTP/1.1");
    assert_eq!(v["status"], 200);
    assert_eq!(v["bytes"], r.body.len() as u64);
    assert_eq!(v["client"], "127.0.0.1");
    assert_eq!(v["user_agent"], "json-test");
    assert_eq!(v["referer"], Value::Null);
    assert_eq!(v["worker"], 1);
    assert!(v["duration_us"].as_u64().unwrap() > 0);
    let time = v["time"].as_str().unwrap();
    assert!(time.ends_with('Z') && time.len() == 24, "{time}");
    // Every other line on stderr is JSON too.
    for l in s.log.lines() {
        serde_json::from_str::<Value>(&l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
    }
}

fn file_lines(path: &Path) -> Vec<Combined> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| combined(l).unwrap_or_else(|| panic!("not an access line: {l:?}")))
        .collect()
}

fn wait_file_lines(path: &Path, n: usize) -> Vec<Combined> {
    eventually(WAIT, &format!("{n} lines in {}", path.display()), || {
        let lines = file_lines(path);
        assert!(lines.len() <= n, "{lines:#?}");
        (lines.len() == n).then_some(lines)
    })
}

#[test]
fn the_access_file_is_reopened_on_usr1() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("access.log");
    let rotated = dir.path().join("access.log.1");
    let s = Server::start(&[
        "-w",
        "2",
        "--set",
        "log.access=true",
        "--set",
        &format!("log.access_file={}", file.display()),
    ]);
    for path in ["/a", "/b"] {
        s.get(path);
    }
    wait_file_lines(&file, 2);
    std::fs::rename(&file, &rotated).unwrap();
    // Until USR1, lines still go to the renamed file.
    s.get("/c");
    let old = wait_file_lines(&rotated, 3);
    assert!(old[2].request.starts_with("GET /c "), "{old:?}");
    s.signal(Signal::SIGUSR1);
    eventually(WAIT, "both workers to reopen the access log", || {
        let n = s
            .log
            .lines()
            .iter()
            .filter(|l| l.contains("SIGUSR1: access log reopened"))
            .count();
        (n == 2).then_some(())
    });
    for path in ["/d", "/e"] {
        s.get(path);
    }
    let new = wait_file_lines(&file, 2);
    assert!(new[0].request.starts_with("GET /d ") || new[1].request.starts_with("GET /d "));
    assert_eq!(
        file_lines(&rotated).len(),
        3,
        "nothing more in the old file"
    );
    assert!(access_lines(&s.log).is_empty(), "the file, not stderr");
}

#[test]
fn a_bad_access_file_is_a_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(
        dir.path(),
        &[
            "start",
            "-b",
            "127.0.0.1:0",
            "--set",
            "log.access=true",
            "--set",
            "log.access_file=/nonexistent/dir/access.log",
        ],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot open access log /nonexistent/dir/access.log"),
        "{err}"
    );
}

#[test]
fn no_access_lines_when_it_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("access.log");
    let s = Server::start(&[
        "-w",
        "1",
        "--set",
        &format!("log.access_file={}", file.display()),
    ]);
    for _ in 0..3 {
        assert_eq!(s.get("/").status, 200);
    }
    // The requests are done (counted when their response is), which is also when a line
    // would have been written.
    eventually(WAIT, "3 requests counted", || {
        let n: u64 = s.status()["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["requests"].as_u64().unwrap())
            .sum();
        (n == 3).then_some(())
    });
    assert!(
        !file.exists(),
        "access_file opened though log.access is off"
    );
    assert!(access_lines(&s.log).is_empty(), "{}", s.log.text());
}

#[test]
fn a_reload_to_an_unopenable_access_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_file(dir.path(), "supervisor.toml", "[log]\naccess = true\n");
    let config = config.to_str().unwrap().to_string();
    let s = Server::spawn_in(dir, &["-b", "127.0.0.1:0", "-w", "1", "-c", &config]).wait_ready();
    let before = s.serving_pids();
    std::fs::write(
        &config,
        "[log]\naccess = true\naccess_file = \"/nonexistent/dir/access.log\"\n",
    )
    .unwrap();
    s.signal(Signal::SIGHUP);
    let why = s.refused_reload(1);
    assert!(
        why.contains("cannot open access log /nonexistent/dir/access.log"),
        "{why}"
    );
    // Still serving, with the same worker and the access log on stderr.
    assert_eq!(s.get("/healthz").status, 200);
    assert_eq!(s.serving_pids(), before);
    let lines = wait_lines(&s.log, 1);
    assert!(lines[0].request.starts_with("GET /healthz "), "{lines:?}");
}
