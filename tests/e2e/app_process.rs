//! The user's app: one app process per worker behind the proxy (with the standard-library test
//! app in `tests/apps/stdlib_app.py`), its failures, its stop, forwarded headers, WebSocket.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::util::{
    alive, eventually, exchange, exchange_answered_early, fd_targets, get, run, try_get,
    KillOnDrop, Server,
};

const APP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps/stdlib_app.py");
const WAIT: Duration = Duration::from_secs(20);

/// `supervisor start -w N ... -- python3 stdlib_app.py --uds {socket} EXTRA...`.
fn start_app(workers: u32, settings: &[&str], extra: &[&str]) -> Server {
    let w = workers.to_string();
    let mut args = vec!["-w", w.as_str()];
    args.extend_from_slice(settings);
    args.extend_from_slice(&["--", "python3", APP, "--uds", "{socket}"]);
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// The pid the app reports in `GET /`, and the worker that proxied it.
fn app_pid(s: &Server) -> (u32, String) {
    let r = s.get("/");
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let pid = text.rsplit(' ').next().unwrap().parse().unwrap();
    (pid, r.header("x-worker-id").unwrap().to_string())
}

/// Children of `pid`, from /proc.
pub(crate) fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The app processes, from `status`: (app number, host pid, app pid).
pub(crate) fn app_processes(s: &Server) -> Vec<(u64, u32, u32)> {
    s.status()["apps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "serving")
        .map(|a| {
            (
                a["worker_id"].as_u64().unwrap(),
                a["pid"].as_u64().unwrap() as u32,
                a["app_pid"].as_u64().unwrap() as u32,
            )
        })
        .collect()
}

#[test]
fn app_processes_run_apart_and_any_worker_sends_them_requests() {
    let s = start_app(2, &["--set", "server.http_workers=2"], &[]);
    let workers = s.serving_pids();
    assert_eq!(workers.len(), 2, "two HTTP workers");
    for &w in &workers {
        assert!(children(w).is_empty(), "an HTTP worker runs no app");
    }
    // Each app process runs under a host of its own, which `status` names with it.
    let apps = eventually(WAIT, "two app processes with their pids", || {
        let apps = app_processes(&s);
        (apps.len() == 2 && apps.iter().all(|a| a.2 != 0)).then_some(apps)
    });
    for &(_, host, app) in &apps {
        assert_eq!(
            children(host),
            vec![app],
            "the host's only child is its app"
        );
    }
    // The master counts both kinds.
    let (code, out, err) = s.ctl(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["master"]["apps"], 2, "{out}");
    assert_eq!(status["master"]["workers"], 2, "{out}");
    // Requests reach both apps, through both workers.
    let mut seen = std::collections::BTreeSet::new();
    let mut through = std::collections::BTreeSet::new();
    eventually(WAIT, "both apps and both workers to answer", || {
        let (pid, worker) = app_pid(&s);
        assert!(
            apps.iter().any(|a| a.2 == pid),
            "answered by {pid}, not an app of ours"
        );
        seen.insert(pid);
        through.insert(worker);
        (seen.len() == 2 && through.len() == 2).then_some(())
    });
    // The app's output goes to the log, tagged with its app process's number.
    let line = s
        .log
        .wait_for(WAIT, |l| l.contains("stdlib_app worker 2 pid"))
        .expect("the app's output in the log");
    assert!(
        line.contains("app{app.id=2}"),
        "tagged with its app process: {line}"
    );
}

#[test]
fn large_bodies_stream_both_ways_in_bounded_memory() {
    let s = start_app(1, &["--set", "worker.max_body_bytes=200MiB"], &[]);
    let worker = s.serving_pids()[0];
    const MIB: usize = 1024 * 1024;
    let size = 100 * MIB;

    // Download.
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    c.write_all(b"GET /download?mb=100 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut r = BufReader::new(c);
    let length = read_head(&mut r);
    assert_eq!(length, Some(size));
    assert_eq!(drain_exact(&mut r, size), size);

    // Upload, echoed back while it is still being sent.
    let c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    let mut w = c.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        w.write_all(
            format!("POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n\r\n").as_bytes(),
        )
        .unwrap();
        let block = vec![b'y'; MIB];
        for _ in 0..100 {
            w.write_all(&block).unwrap();
        }
    });
    let mut r = BufReader::new(c);
    assert_eq!(read_head(&mut r), Some(size));
    assert_eq!(drain_exact(&mut r, size), size);
    sender.join().unwrap();

    // Upload one way: the app answers only once it has read everything, so while the socket
    // to the app is full nothing but its becoming writable again can move the body on.
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    c.write_all(
        format!("POST /consume HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let block = vec![b'z'; MIB];
    for _ in 0..100 {
        c.write_all(&block).unwrap();
    }
    let mut r = BufReader::new(c);
    let length = read_head(&mut r).expect("a Content-Length");
    let mut answer = vec![0; length];
    r.read_exact(&mut answer).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&answer),
        format!("read {size} bytes")
    );

    // The worker never held the bodies: its peak RSS stayed far below 100 MiB.
    let status = std::fs::read_to_string(format!("/proc/{worker}/status")).unwrap();
    let hwm_kib: usize = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(
        hwm_kib < 40 * 1024,
        "worker peak RSS {hwm_kib} KiB for 100 MiB each way"
    );
}

/// Reads a response head; returns its Content-Length.
fn read_head(r: &mut impl BufRead) -> Option<usize> {
    let mut length = None;
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            return length;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().ok();
            }
        }
    }
}

fn drain_exact(r: &mut impl Read, n: usize) -> usize {
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < n {
        let k = r.read(&mut buf[..(n - got).min(256 * 1024)]).unwrap();
        assert!(k > 0, "body ended after {got} of {n} bytes");
        got += k;
    }
    got
}

#[test]
fn a_small_response_that_breaks_off_is_a_502() {
    let s = start_app(1, &[], &[]);
    // Without the small-body read the client got the app's 200 and a connection cut after 10
    // bytes.
    let res = get(s.addr, "/truncated");
    let body = String::from_utf8_lossy(&res.body);
    assert_eq!(res.status, 502, "{body}");
    assert!(body.contains("broke off"), "{body}");
    // The app is still there and answers.
    assert_eq!(get(s.addr, "/").status, 200);
}

#[test]
fn killed_app_gives_502_then_is_restarted() {
    let s = start_app(1, &[], &[]);
    let (pid, _) = app_pid(&s);
    // A request in flight when the app dies gets 502.
    let addr = s.addr;
    let slow = std::thread::spawn(move || get(addr, "/sleep?ms=10000"));
    eventually(WAIT, "the slow request to reach the app", || {
        (s.status()["workers"][0]["inflight"] == 1).then_some(())
    });
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let r = slow.join().unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("the app did not answer"), "{}", r.text());
    // A new app process comes up and serves.
    let new = eventually(WAIT, "a restarted app to serve", || {
        try_get(s.addr, "/")
            .ok()
            .filter(|r| r.status == 200)
            .map(|r| r.text().rsplit(' ').next().unwrap().parse::<u32>().unwrap())
    });
    assert_ne!(new, pid);
    s.log
        .wait_for(WAIT, |l| l.contains("the app exited"))
        .expect("crash logged");
}

#[test]
fn a_new_app_process_gets_no_request_before_it_is_up() {
    // Each app waits for the gate to be open before it listens: its host is not ready before.
    let gate = tempfile::tempdir().unwrap();
    let open = gate.path().join("open");
    std::fs::write(&open, "").unwrap();
    let script = format!(
        "while [ ! -e '{}' ]; do sleep 0.02; done; exec python3 {APP} --uds \"$1\"",
        open.display()
    );
    let s = Server::start(&["-w", "1", "--", "sh", "-c", &script, "sh", "{socket}"]);
    std::fs::remove_file(&open).unwrap();
    s.signal(Signal::SIGTTIN);
    let booting = |s: &Server| {
        s.status()["apps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["worker_id"] == 2 && w["state"] == "booting")
    };
    eventually(WAIT, "app process 2 booting", || booting(&s).then_some(()));
    // No request goes to it before it is ready: each of these is answered by app process 1 at
    // once, none waits for app process 2's boot.
    for _ in 0..20 {
        let r = s.get("/");
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().starts_with("app 1 "), "{}", r.text());
    }
    assert!(booting(&s), "app process 2 became ready with its gate shut");
    // Once ready, it takes its share: while a request holds app process 1, the next goes to 2.
    std::fs::write(&open, "").unwrap();
    eventually(WAIT, "app process 2 serving", || {
        (app_processes(&s).len() == 2).then_some(())
    });
    let addr = s.addr;
    let busy = std::thread::spawn(move || get(addr, "/sleep?ms=2000"));
    eventually(WAIT, "a request served by app process 2", || {
        s.get("/").text().starts_with("app 2 ").then_some(())
    });
    assert_eq!(busy.join().unwrap().status, 200);
}

#[test]
fn a_clients_broken_or_stalled_body_is_the_clients_fault_not_a_502() {
    let s = start_app(1, &["--set", "worker.client_timeout=300ms"], &[]);
    let ask = |raw: &[u8]| {
        let r = exchange(s.addr, raw).expect("a response");
        (r.status, r.text())
    };
    // A body that stops short of its Content-Length: 408 once client_timeout passes.
    let (status, text) =
        ask(b"POST /consume HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nabc");
    assert_eq!(status, 408, "{text}");
    assert!(text.contains("worker.client_timeout"), "{text}");
    // A malformed chunked body: 400.
    let (status, text) =
        ask(b"POST /consume HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n");
    assert_eq!(status, 400, "{text}");
    // Neither is logged as the app's failure, and the app still serves.
    assert_eq!(s.get("/").status, 200);
    assert!(
        !s.log.text().contains("the app did not answer"),
        "{}",
        s.log.text()
    );
}

#[test]
fn headers_that_would_make_the_two_sides_read_a_message_differently() {
    let s = start_app(1, &[], &[]);
    // The app's response with both lengths was read as chunked: its Content-Length does not
    // reach the client, which gets the 2 bytes whole.
    let r = s.get("/both-lengths");
    assert_eq!((r.status, r.text()), (200, "ok".to_string()));
    assert_ne!(r.header("content-length"), Some("50"));
    // Two Host headers: 400, before the app sees anything.
    let r = exchange(
        s.addr,
        b"GET /headers HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    // Connection cannot name Host away.
    let r = exchange(
        s.addr,
        b"GET /headers HTTP/1.1\r\nHost: h.example\r\nConnection: close, Host\r\n\r\n",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("\"host\": \"h.example\""), "{}", r.text());
}

#[test]
fn app_ignoring_term_is_killed_after_the_grace_period() {
    let mut s = start_app(
        1,
        &["--set", "server.graceful_timeout=1s"],
        &["--ignore-term"],
    );
    let (pid, _) = app_pid(&s);
    s.signal(Signal::SIGTERM);
    let status = s.wait_exit(WAIT);
    assert!(status.success(), "{status:?}");
    assert!(!alive(pid), "app {pid} outlived the master");
    s.log
        .wait_for(WAIT, |l| l.contains("did not exit after SIGTERM"))
        .expect("the kill is logged");
}

#[test]
fn no_app_survives_a_killed_master() {
    let mut s = start_app(2, &[], &[]);
    let apps: Vec<u32> = eventually(WAIT, "both app processes up", || {
        let apps: Vec<u32> = app_processes(&s).iter().map(|a| a.2).collect();
        (apps.len() == 2 && !apps.contains(&0)).then_some(apps)
    });
    s.signal(Signal::SIGKILL);
    s.wait_exit(WAIT);
    eventually(WAIT, "every app process to be gone", || {
        apps.iter().all(|&p| !alive(p)).then_some(())
    });
}

#[test]
fn forwarded_headers_are_replaced_unless_the_peer_is_trusted() {
    let spoof = b"GET /headers HTTP/1.1\r\nHost: example.test\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nConnection: close\r\n\r\n";

    // Default: loopback is trusted, so a proxy in front of us on this host is believed.
    let s = start_app(1, &[], &[]);
    let r = exchange(s.addr, spoof).unwrap();
    let h: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(h["x-forwarded-for"], "6.6.6.6, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["x-forwarded-host"], "example.test");
    // The client's hop-by-hop `Connection: close` is not passed on.
    assert!(h.get("connection").is_none(), "{h}");
    drop(s);

    // Nobody trusted: the client's claims are replaced by what the worker saw.
    let s = start_app(1, &["--set", "server.forwarded_allow_ips=[]"], &[]);
    let r = exchange(s.addr, spoof).unwrap();
    let h: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["host"], "example.test");
}

#[test]
fn websocket_echo_through_the_proxy() {
    let mut s = start_app(1, &["--set", "server.graceful_timeout=20s"], &[]);
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    c.write_all(
        b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    let mut accept = None;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some(v) = line.strip_prefix("sec-websocket-accept:") {
            accept = Some(v.trim().to_string());
        }
    }
    assert_eq!(accept.as_deref(), Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    let mut ws_echo = |message: &str| crate::util::ws_echo(&mut c, &mut r, message);
    ws_echo("hello");
    ws_echo("through the worker");

    // A graceful stop leaves open tunnels their grace period: the WebSocket still works after
    // the worker started draining, and once it closes the stop completes.
    s.signal(Signal::SIGTERM);
    s.log
        .wait_for(WAIT, |l| l.contains("stopped accepting"))
        .expect("the worker drains");
    ws_echo("while draining");
    assert!(
        !s.log.text().contains("drain complete"),
        "the drain must wait for the open WebSocket"
    );
    c.write_all(&[0x88, 0x80, 0, 0, 0, 0]).unwrap();
    c.shutdown(std::net::Shutdown::Both).unwrap();
    s.wait_exit(WAIT);
    s.log
        .wait_for(WAIT, |l| l.contains("drain complete"))
        .expect("the drain waited for the tunnel and then completed");
}

#[test]
fn leaking_app_is_recycled_by_max_rss_without_failed_requests() {
    let s = start_app(
        1,
        &[
            "--set",
            "worker.max_rss=80MiB",
            "--set",
            "worker.rss_interval=100ms",
            "--set",
            "worker.rss_samples=2",
        ],
        &[],
    );
    let (first, _) = app_pid(&s);
    // Leak 20 MiB per request until the worker (with its app) is replaced; every request in
    // the meantime must succeed.
    let mut leaked = 0;
    let new = eventually(Duration::from_secs(60), "a new app after recycling", || {
        let r = s.get("/leak?mb=20");
        assert_eq!(
            r.status,
            200,
            "request failed during recycling: {}",
            r.text()
        );
        leaked += 20;
        let (pid, _) = app_pid(&s);
        (pid != first).then_some(pid)
    });
    assert!(leaked >= 60, "recycled after {leaked} MiB");
    assert_ne!(new, first);
    eventually(WAIT, "the leaking app to be stopped", || {
        (!alive(first)).then_some(())
    });
    s.log
        .wait_for(WAIT, |l| l.contains("max_rss"))
        .expect("recycle reason logged");
}

#[test]
fn app_that_never_comes_up_fails_the_start_with_its_output() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(
        dir.path(),
        &[
            "start",
            "-b",
            "127.0.0.1:0",
            "-w",
            "1",
            "--",
            "python3",
            APP,
            "--uds",
            "{socket}",
            "--fail-start",
        ],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("the app did not come up"), "{err}");
    assert!(
        err.contains("cannot start: configuration missing (on purpose)"),
        "the app's own last words are in the error: {err}"
    );
}

#[test]
fn app_command_without_a_place_to_listen_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(
        dir.path(),
        &["start", "-b", "127.0.0.1:0", "--", "python3", APP],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("{socket}"), "{err}");
}

#[test]
fn upstream_mode_proxies_to_a_server_started_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("up.sock");
    let (app, at) = spawn_upstream(&["--uds", sock.to_str().unwrap()]);
    assert_eq!(at, format!("unix:{}", sock.display()));
    let upstream = format!("app.upstream={at}");
    let s = Server::start(&["-w", "1", "--set", &upstream]);
    let r = s.get("/");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), format!("app ? {}", app.0.id()));
    drop(app);
    let r = s.get("/");
    assert_eq!(r.status, 502, "upstream gone: {}", r.text());
}

/// uvicorn from `tests/.venv`, which `tests/run` installs.
fn uvicorn() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/.venv/bin/uvicorn");
    assert!(
        std::path::Path::new(path).exists(),
        "{path} is missing: run tests/run, which installs tests/requirements.txt into tests/.venv"
    );
    path.to_string()
}

/// `supervisor start -w 1 SETTINGS... -- uvicorn asgi_app:app --uds {socket}` (the ASGI test
/// app under uvicorn, with no option of its own), with the environment variables `env`.
fn start_asgi(env: &[(&str, &str)], settings: &[&str]) -> Server {
    let uvicorn = uvicorn();
    let apps = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps");
    let app = [
        &uvicorn,
        "--app-dir",
        apps,
        "asgi_app:app",
        "--uds",
        "{socket}",
    ];
    let args = [&["-w", "1"][..], settings, &["--"], &app].concat();
    Server::start_env(env, &args)
}

#[test]
fn real_uvicorn_app_behind_every_worker() {
    let uvicorn = uvicorn();
    let bench = concat!(env!("CARGO_MANIFEST_DIR"), "/bench");
    let s = Server::start(&[
        "-w",
        "2",
        "--",
        &uvicorn,
        "--app-dir",
        bench,
        "app:app",
        "--uds",
        "{socket}",
        "--log-level",
        "warning",
    ]);
    let mut workers = std::collections::BTreeSet::new();
    eventually(WAIT, "both workers to answer through uvicorn", || {
        let r = s.get("/");
        assert_eq!((r.status, r.text().as_str()), (200, "Hello, World!"));
        workers.insert(r.header("x-worker-id").unwrap().to_string());
        (workers.len() == 2).then_some(())
    });
    let r = s.get("/sleep?ms=5");
    assert_eq!(r.status, 200);
}

/// What a PaaS sets (`LOG_LEVEL=warning`) quiets supervisor, not the app: an exception the app
/// logs is one record, traceback and all, at error level, and the app's info lines stay.
#[test]
fn an_app_exception_is_one_error_record_whole_under_log_level_warning() {
    let s = start_asgi(&[("LOG_LEVEL", "warning")], &["--set", "log.format=json"]);
    assert_eq!(s.get("/boom").status, 500);
    let line = s
        .log
        .wait_for(WAIT, |l| l.contains("boom (on purpose)"))
        .expect("the app's exception in the log");
    let record: Value = serde_json::from_str(&line).expect("a JSON record");
    assert_eq!(record["level"], "ERROR", "{line}");
    assert_eq!(record["span"]["app.id"], 1, "{line}");
    let message = record["message"].as_str().expect("a message");
    assert!(
        message.starts_with(
            "ERROR:    Exception in ASGI application\nTraceback (most recent call last):\n"
        ),
        "the line that announced it, then the traceback: {message}"
    );
    assert!(message.contains("\n  File \""), "its frames: {message}");
    assert!(
        message.ends_with("\nRuntimeError: boom (on purpose)"),
        "through the exception line: {message}"
    );
    // Once: no other record holds a piece of it.
    let lines = s.log.lines();
    let pieces = lines.iter().filter(|l| l.contains("Traceback")).count();
    assert_eq!(pieces, 1, "{lines:#?}");
    // The app's own info lines are kept (uvicorn's access line, on its other stream)...
    s.log
        .wait_for(WAIT, |l| {
            l.contains("GET /boom HTTP/1.1") && l.contains(r#""level":"INFO""#)
        })
        .expect("uvicorn's access line, at info");
    // ...and supervisor's are not (LOG_LEVEL=warning).
    let own_info: Vec<_> = s
        .log
        .lines()
        .into_iter()
        .filter(|l| l.contains(r#""level":"INFO""#) && !l.contains(r#""app.pid""#))
        .collect();
    assert!(own_info.is_empty(), "{own_info:#?}");
}

/// A JSON line of the app's stays an object in a JSON log, at the level it gives; `app_level`
/// drops the app's lines below it.
#[test]
fn an_app_json_line_is_an_object_at_its_level_and_app_level_filters() {
    let s = start_app(
        1,
        &["--set", "log.format=json", "--set", "log.app_level=warning"],
        &[],
    );
    assert_eq!(s.get("/say").text(), "said");
    let line = s
        .log
        .wait_for(WAIT, |l| l.contains("from the app"))
        .expect("the app's JSON line in the log");
    let record: Value = serde_json::from_str(&line).expect("a JSON record");
    assert_eq!(record["level"], "WARN", "{line}");
    assert_eq!(record["app_log"]["n"], 7, "an object, not a string: {line}");
    assert_eq!(record["app_log"]["msg"], "from the app", "{line}");
    assert_eq!(record["stream"], "stdout", "{line}");
    // The app's info lines (its start line, "said it") are below log.app_level: a request
    // after them flushes whatever was pending, and neither is there.
    assert_eq!(s.get("/say").text(), "said");
    eventually(WAIT, "the second JSON line", || {
        (s.log
            .lines()
            .iter()
            .filter(|l| l.contains("from the app"))
            .count()
            == 2)
            .then_some(())
    });
    let lines = s.log.lines();
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("said it") || l.contains("stdlib_app worker")),
        "{lines:#?}"
    );
}

#[test]
fn stuck_request_kills_the_app_when_asked() {
    let s = start_app(
        1,
        &[
            "--set",
            "worker.request_timeout=1s",
            "--set",
            "app.kill_on_timeout=true",
        ],
        &[],
    );
    let (pid, _) = app_pid(&s);
    let r = s.get("/sleep?ms=30000");
    assert_eq!(r.status, 504, "{}", r.text());
    eventually(WAIT, "the stuck app to be killed", || {
        (!alive(pid)).then_some(())
    });
    let new = eventually(WAIT, "a new app to serve", || {
        try_get(s.addr, "/")
            .ok()
            .filter(|r| r.status == 200)
            .map(|r| r.text().rsplit(' ').next().unwrap().parse::<u32>().unwrap())
    });
    assert_ne!(new, pid);
    s.log
        .wait_for(WAIT, |l| l.contains("app.kill_on_timeout"))
        .expect("the kill is logged");
}

#[test]
fn body_limit_holds_for_streamed_and_buffered_bodies() {
    // 64 KiB chunks of a chunked body, 1 MiB in all, against a 256 KiB limit.
    let chunked = || {
        let mut raw = b"POST /consume HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
        for _ in 0..16 {
            raw.extend_from_slice(b"10000\r\n");
            raw.extend(std::iter::repeat_n(b'z', 0x10000));
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"0\r\n\r\n");
        raw
    };
    for buffered in ["false", "true"] {
        let setting = format!("app.buffer_requests={buffered}");
        let s = start_app(
            1,
            &["--set", "worker.max_body_bytes=256KiB", "--set", &setting],
            &[],
        );
        // Within the limit: the app reads it all.
        let small = b"POST /consume HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        let r = exchange(s.addr, small).unwrap();
        assert_eq!(
            (r.status, r.text()),
            (200, "read 5 bytes".to_string()),
            "buffered={buffered}"
        );
        // Past it, with no Content-Length to refuse it up front: 413, not a truncated upload.
        let r = exchange_answered_early(s.addr, &chunked()).unwrap();
        assert_eq!(r.status, 413, "buffered={buffered}: {}", r.text());
        assert!(r.text().contains("worker.max_body_bytes"), "{}", r.text());
    }
}

#[test]
fn app_concurrency_bounds_requests_in_flight_to_the_app() {
    for (limit, parallel) in [(1u64, 6), (0, 6)] {
        let setting = format!("app.concurrency={limit}");
        let s = start_app(1, &["--set", &setting], &[]);
        let addr = s.addr;
        let clients: Vec<_> = (0..parallel)
            .map(|_| std::thread::spawn(move || get(addr, "/sleep?ms=300").status))
            .collect();
        for c in clients {
            assert_eq!(c.join().unwrap(), 200, "app.concurrency={limit}");
        }
        let stats: serde_json::Value = serde_json::from_slice(&s.get("/stats").body).unwrap();
        let most = stats["max_concurrent_sleeps"].as_u64().unwrap();
        if limit == 1 {
            assert_eq!(
                most, 1,
                "the app never saw more than app.concurrency at once"
            );
        } else {
            // Without the bound the same load reaches the app in parallel (this is what makes
            // the first case a real check).
            assert!(most > 1, "unbounded: the app saw {most} at once");
        }
    }
}

#[test]
fn crash_looping_app_gets_fast_503s_and_backoff_not_a_spin() {
    let s = start_app(1, &[], &["--die-after-ms", "200"]);
    // After a few quick deaths the worker stops making clients wait for the app.
    let r = eventually(WAIT, "a fast 503 from the crash-looping app", || {
        try_get(s.addr, "/").ok().filter(|r| r.status == 503)
    });
    assert!(r.text().contains("keeps failing"), "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    let line = s
        .log
        .wait_for(WAIT, |l| {
            l.contains("requests get 503 until it is up again")
        })
        .unwrap();
    assert!(line.contains("ERROR"), "{line}");
    // Backoff, not a spin: restarts double their delay (0.1, 0.2, 0.4, 0.8 s ...).
    let started = std::time::Instant::now();
    let restarts = |s: &Server| s.status()["apps"][0]["app_restarts"].as_u64().unwrap();
    let before = restarts(&s);
    eventually(Duration::from_secs(30), "two more restarts", || {
        (restarts(&s) >= before + 2).then_some(())
    });
    // Once failing (>= 3 failures), the next backoff alone is >= 0.8 s, plus a run of 0.2 s;
    // without backoff two restarts of this app take about 0.7 s.
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "two restarts in {:?}: no backoff",
        started.elapsed()
    );
    // The transition is logged once, not per restart or per request.
    let count = s
        .log
        .lines()
        .iter()
        .filter(|l| l.contains("requests get 503 until it is up again"))
        .count();
    assert_eq!(count, 1);
}

#[test]
fn apps_that_only_do_tcp_get_a_loopback_port() {
    let s = Server::start(&["-w", "2", "--", "python3", APP, "--port", "{port}"]);
    let line = s
        .log
        .wait_for(WAIT, |l| l.contains("listening on 127.0.0.1:"))
        .expect("the app says where it listens");
    assert!(line.contains("stdlib_app worker"), "{line}");
    let mut pids = std::collections::BTreeSet::new();
    eventually(WAIT, "both apps to answer over TCP", || {
        let (pid, _) = app_pid(&s);
        pids.insert(pid);
        (pids.len() == 2).then_some(())
    });
    // The app's view: the client is the original one, forwarded by the worker.
    let h: serde_json::Value = serde_json::from_slice(&s.get("/headers").body).unwrap();
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
}

#[test]
fn tcp_upstream_is_proxied() {
    let (app, at) = spawn_upstream(&["--port", "0"]);
    let upstream = format!("app.upstream=http://{at}");
    let s = Server::start(&["-w", "1", "--set", &upstream]);
    let r = s.get("/");
    assert_eq!((r.status, r.text()), (200, format!("app ? {}", app.0.id())));
}

/// Starts the test app by itself (an upstream the supervisor does not start) and returns it
/// with where it listens, from its first line of output (so `--port 0` needs no port guess).
fn spawn_upstream(args: &[&str]) -> (KillOnDrop, String) {
    let mut child = std::process::Command::new("python3")
        .arg(APP)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let app = KillOnDrop(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(WAIT)
        .expect("the upstream says where it listens");
    let at = line
        .trim()
        .rsplit(' ')
        .next()
        .expect("listening on ADDRESS")
        .to_string();
    (app, at)
}

#[test]
fn the_app_inherits_none_of_the_workers_descriptors() {
    let s = start_app(1, &[], &[]);
    let (app, _) = app_pid(&s);
    let worker = s.serving_pids()[0];
    let host = app_processes(&s)[0].1;
    // Neither the HTTP worker's (its listener) nor its host's (pipe, scoreboard).
    let worker_fds: std::collections::BTreeSet<String> = fd_targets(worker)
        .into_iter()
        .chain(fd_targets(host))
        .map(|(_, t)| t)
        .collect();
    assert!(
        worker_fds.iter().any(|t| t.starts_with("socket:")),
        "the worker holds its listener: {worker_fds:?}"
    );
    let leaked: Vec<_> = fd_targets(app)
        .into_iter()
        .filter(|(fd, t)| *fd > 2 && worker_fds.contains(t))
        .collect();
    assert!(
        leaked.is_empty(),
        "the app holds the worker's listener, pipe or scoreboard: {leaked:?}"
    );
}

#[test]
fn an_upstream_that_is_down_gets_502s_without_a_log_line_each() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("nobody.sock");
    let upstream = format!("app.upstream=unix:{}", gone.display());
    let s = Server::start(&["-w", "1", "--set", &upstream]);
    for _ in 0..50 {
        let r = s.get("/");
        assert_eq!(r.status, 502);
        assert!(r.text().contains("the app did not answer"), "{}", r.text());
    }
    let logged = s
        .log
        .lines()
        .iter()
        .filter(|l| l.contains("the app did not answer"))
        .count();
    assert!(
        (1..50).contains(&logged),
        "{logged} log lines for 50 failed requests"
    );
}

#[test]
fn a_stop_while_the_app_starts_is_not_held_up_by_it() {
    let mut s = Server::spawn(&[
        "-b",
        "127.0.0.1:0",
        "-w",
        "1",
        "--",
        "python3",
        APP,
        "--uds",
        "{socket}",
        "--ready-delay-ms",
        "60000",
    ]);
    let line = s
        .log
        .wait_for(WAIT, |l| l.contains("app started"))
        .expect("the app is starting");
    let app: u32 = crate::util::field(&line, "app.pid")
        .unwrap()
        .parse()
        .unwrap();
    s.signal(Signal::SIGTERM);
    // Not after the app's minute of boot, nor after graceful_timeout (30 s): now.
    let status = s.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    eventually(WAIT, "the half-started app to be gone", || {
        (!alive(app)).then_some(())
    });
}

/// `app.cwd` through a `current -> release` symlink, as deployments switch releases: the app
/// runs in the release the link named when it started, and a reload after the switch runs the
/// new one.
#[test]
fn app_cwd_follows_a_switched_release_symlink_at_reload() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("release-1"), dir.path().join("release-2"));
    std::fs::create_dir(&one).unwrap();
    std::fs::create_dir(&two).unwrap();
    let current = dir.path().join("current");
    std::os::unix::fs::symlink(&one, &current).unwrap();
    let cwd = format!("app.cwd={}", current.display());
    let s = start_app(1, &["--set", &cwd], &[]);
    let here = |s: &Server| s.get("/cwd").text();
    assert!(here(&s).ends_with("/release-1"), "{}", here(&s));
    // The switch: a new link renamed over the old one, atomically.
    let next = dir.path().join("current.new");
    std::os::unix::fs::symlink(&two, &next).unwrap();
    std::fs::rename(&next, &current).unwrap();
    assert!(
        here(&s).ends_with("/release-1"),
        "a running app stays where it started"
    );
    s.signal(Signal::SIGHUP);
    s.reloaded(1);
    eventually(WAIT, "the reloaded app in the new release", || {
        (0..3)
            .all(|_| here(&s).ends_with("/release-2"))
            .then_some(())
    });
    // A directory that is not there is a configuration error.
    let gone = format!("app.cwd={}", dir.path().join("nowhere").display());
    let (code, _, err) = run(dir.path(), &["check", "--set", &gone], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("app.cwd"), "{err}");
}

/// uvicorn behind supervisor, with no setting of its own, sees the real client and scheme:
/// its app process, on a private socket, gets FORWARDED_ALLOW_IPS=*; what it believes is what
/// supervisor forwarded (a trusted peer's X-Forwarded-For and -Proto here; an untrusted
/// client's are replaced, see `forwarded_headers_*`).
#[test]
fn uvicorn_sees_the_real_client_and_scheme_with_no_setting() {
    let s = start_asgi(&[], &[]);
    let direct = s.get("/whoami");
    assert_eq!(direct.text(), "127.0.0.1 http", "the peer itself");
    // Behind a TLS-terminating balancer on this host (a trusted peer: loopback).
    let behind = exchange(
        s.addr,
        b"GET /whoami HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9\r\n\
          X-Forwarded-Proto: https\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert_eq!(behind.text(), "203.0.113.9 https");
}
