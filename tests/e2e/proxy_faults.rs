//! The proxy path under faults from either side: clients that leave while the app works on
//! their request, apps that close a pooled connection after an error, and upgraded connections
//! (WebSocket, h2c) against the worker's limits.

use std::io::{BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::util::{alive, eventually, field, read_response, try_get, Response, Server};

const APP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps/stdlib_app.py");
const APPS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps");
const WAIT: Duration = Duration::from_secs(30);

/// One worker in front of the standard-library app, with `settings` and the app's `extra`
/// options.
fn start_app(settings: &[&str], extra: &[&str]) -> Server {
    let mut args = vec!["-w", "1"];
    args.extend_from_slice(settings);
    args.extend_from_slice(&["--", "python3", APP, "--uds", "{socket}"]);
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// The one worker's record in `supervisor status`.
fn worker_record(s: &Server) -> serde_json::Value {
    s.workers_in("serving")
        .into_iter()
        .next()
        .expect("a serving worker")
}

/// Sends `raw` on `c` and reads one response.
fn ask(c: &mut BufReader<TcpStream>, raw: &[u8]) -> Response {
    c.get_mut().write_all(raw).unwrap();
    read_response(c).unwrap()
}

fn keepalive_client(s: &Server) -> BufReader<TcpStream> {
    let c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    BufReader::new(c)
}

/// How a client hangs up.
#[derive(Clone, Copy)]
enum Leave {
    /// With a reset (`SO_LINGER` 0): unmistakably gone.
    Reset,
    /// With a plain close (a FIN), which a server cannot tell from a half-close
    /// (`shutdown(SHUT_WR)`, allowed after a request): its request is served to the end.
    Close,
}

/// 20 clients in a row, each sending `GET /sleep?ms=..` and hanging up after 100 ms; returns
/// the worker's in-flight count seen while the first one was still in the app.
fn clients_leave(s: &Server, sleep_ms: u32, how: Leave) -> u64 {
    let mut inflight_seen = 0;
    for i in 0..20 {
        let mut c = TcpStream::connect(s.addr).unwrap();
        c.write_all(format!("GET /sleep?ms={sleep_ms} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .unwrap();
        c.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut buf = [0u8; 512];
        // Nothing comes in 100 ms (or a 503 from the host cap); either way the client leaves.
        let _ = c.read(&mut buf);
        if let Leave::Reset = how {
            socket2::SockRef::from(&c)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        }
        drop(c);
        if i == 0 {
            inflight_seen = worker_record(s)["inflight"].as_u64().unwrap();
        }
    }
    inflight_seen
}

#[test]
fn a_client_that_leaves_keeps_its_permits_until_the_app_is_done() {
    let s = start_app(
        &[
            "--set",
            "limits.max_concurrent_requests=5",
            "--set",
            "app.concurrency=1",
            "--set",
            "log.access=true",
        ],
        &[],
    );
    let inflight = clients_leave(&s, 5000, Leave::Reset);
    assert!(
        inflight >= 1,
        "the request its client left is still in flight while the app works on it"
    );
    // Every request ends once the app is done with the one it had.
    eventually(WAIT, "no request in flight", || {
        (worker_record(&s)["inflight"].as_u64() == Some(0)).then_some(())
    });
    let stats: serde_json::Value = serde_json::from_slice(&s.get("/stats").body).unwrap();
    assert_eq!(
        stats["max_concurrent_sleeps"], 1,
        "app.concurrency = 1 holds whatever the clients do"
    );
    // The four admitted behind the first waited for app.concurrency; their clients were gone
    // by their turn, so the app never saw them (a slow machine may let one more in).
    let sleeps = stats["sleeps"].as_u64().unwrap();
    assert!(
        sleeps <= 2,
        "the app ran {sleeps} requests of clients that had left"
    );
    let r = s.get("/");
    assert_eq!(r.status, 200, "{}", r.text());
    // A client that left is logged 499.
    s.log
        .wait_for(WAIT, |l| l.contains("GET /sleep?ms=5000 HTTP/1.1\" 499 "))
        .expect("an access log line with 499");
}

/// Sends `request`, reads the head of its 200, and hangs up while the body is still coming:
/// when it hung up.
fn leave_mid_response(s: &Server, request: &[u8]) -> Instant {
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    c.write_all(request).unwrap();
    let head = read_head(&mut c).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    drop(c);
    Instant::now()
}

/// Waits until the worker has no request in flight: how long after `since`.
fn settled_after(s: &Server, since: Instant) -> Duration {
    eventually(WAIT, "no request in flight", || {
        (worker_record(s)["inflight"].as_u64() == Some(0)).then_some(())
    });
    since.elapsed()
}

#[test]
fn a_client_that_leaves_mid_response_keeps_its_permits_until_the_app_has_sent_it() {
    let s = start_app(
        &[
            "--set",
            "log.access=true",
            "--set",
            "metrics.bind=127.0.0.1:0",
        ],
        &[],
    );
    // 30 bytes, one every 100 ms: 3 s of the app's work.
    let left = leave_mid_response(&s, b"GET /drip?n=30&ms=100 HTTP/1.1\r\nHost: t\r\n\r\n");
    // The worker reads the rest of the app's response; the request stays in flight meanwhile.
    let took = settled_after(&s, left);
    assert!(
        took >= Duration::from_millis(1500),
        "the permits went back {took:?} after the client left, while the app was still sending"
    );
    s.log
        .wait_for(WAIT, |l| {
            l.contains("GET /drip?n=30&ms=100 HTTP/1.1\" 499 ")
        })
        .expect("an access log line with 499");
    // And counted.
    let line = s
        .log
        .wait_for(WAIT, |l| l.contains("metrics: serving /metrics"))
        .expect("the metrics line");
    let metrics = field(&line, "addr").unwrap().parse().unwrap();
    eventually(WAIT, "the client counted as gone", || {
        let text = crate::util::get(metrics, "/metrics").text();
        text.lines()
            .any(|l| l == "supervisor_requests_client_gone_total 1")
            .then_some(())
    });
}

/// How many connections the stdlib app has accepted, asked on `c`.
fn app_connections(c: &mut BufReader<TcpStream>) -> u64 {
    let r = ask(c, b"GET /stats HTTP/1.1\r\nHost: t\r\n\r\n");
    serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["connections"]
        .as_u64()
        .unwrap()
}

/// The app's pid, from its answer to `GET /` ("app WORKER PID").
fn app_pid_of(r: &Response) -> u32 {
    r.text().rsplit(' ').next().unwrap().trim().parse().unwrap()
}

/// A client that hangs up while a streamed answer is still coming: the worker reads the rest
/// (the request in flight meanwhile), and the connection to the app, read to its end, goes
/// back to the pool and serves the next request, whole and correct.
#[test]
fn a_connection_whose_client_left_mid_response_serves_again_once_the_app_has_sent_it() {
    let s = start_app(&[], &[]);
    let mut c = keepalive_client(&s);
    let before = app_connections(&mut c);
    // 20 chunks, one every 50 ms: a second of the app's work, streamed.
    let left = leave_mid_response(&s, b"GET /drip?n=20&ms=50 HTTP/1.1\r\nHost: t\r\n\r\n");
    let took = settled_after(&s, left);
    assert!(
        took >= Duration::from_millis(500),
        "the request ended {took:?} after its client left, while the app was still sending"
    );
    for _ in 0..3 {
        let r = ask(&mut c, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().starts_with("app "), "{}", r.text());
    }
    assert_eq!(
        app_connections(&mut c),
        before,
        "the connection the abandoned answer came on was given back and used again"
    );
}

/// A client that hangs up while the app is still sending past `worker.request_timeout`: the
/// request ends at the timeout (its permits and app slot back then, not when the app would have
/// finished), and with `app.kill_on_timeout` the app process that was still sending is killed
/// and replaced.
#[test]
fn an_app_still_sending_to_a_client_that_left_is_cut_at_request_timeout_and_killed() {
    let s = start_app(
        &[
            "--set",
            "worker.request_timeout=1s",
            "--set",
            "app.kill_on_timeout=true",
        ],
        &[],
    );
    let pid = app_pid_of(&s.get("/"));
    // 100 chunks, one every 100 ms: 10 s of sending.
    let left = leave_mid_response(&s, b"GET /drip?n=100&ms=100 HTTP/1.1\r\nHost: t\r\n\r\n");
    let took = settled_after(&s, left);
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(6),
        "the request ended {took:?} after its client left: not at worker.request_timeout (1s)"
    );
    eventually(WAIT, "the app still sending to be killed", || {
        (!alive(pid)).then_some(())
    });
    let new = eventually(WAIT, "a new app process to answer", || {
        try_get(s.addr, "/")
            .ok()
            .filter(|r| r.status == 200)
            .map(|r| app_pid_of(&r))
    });
    assert_ne!(new, pid);
}

#[test]
fn clients_that_leave_do_not_fill_a_single_threaded_apps_backlog() {
    let s = start_app(
        &[
            "--set",
            "limits.max_concurrent_requests=5",
            "--set",
            "app.concurrency=1",
        ],
        &["--single-thread"],
    );
    // Closed, not reset: every admitted request goes to the app, the most it can be asked.
    clients_leave(&s, 1000, Leave::Close);
    eventually(WAIT, "no request in flight", || {
        (worker_record(&s)["inflight"].as_u64() == Some(0)).then_some(())
    });
    // The app's backlog holds no abandoned connections: the next request is served.
    let r = s.get("/");
    assert_eq!(r.status, 200, "{}", r.text());
    let stats: serde_json::Value = serde_json::from_slice(&s.get("/stats").body).unwrap();
    assert_eq!(stats["max_concurrent_sleeps"], 1);
}

/// `GET /boom` (a 500 after which the app closes the connection without saying so) then
/// `GET /`, `rounds` times on one client connection: the second is never a 502.
fn boom_then_ok(s: &Server, rounds: u32, ok_body: &str) {
    let mut c = keepalive_client(s);
    let mut failed = 0;
    for _ in 0..rounds {
        let r = ask(&mut c, b"GET /boom HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(r.status, 500, "{}", r.text());
        let r = ask(&mut c, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
        if r.status != 200 {
            failed += 1;
            eprintln!("GET / after /boom: {} {}", r.status, r.text());
        } else {
            assert!(r.text().starts_with(ok_body), "{}", r.text());
        }
    }
    assert_eq!(
        failed, 0,
        "requests failed after the app closed its connection"
    );
}

/// Requests one after another reuse one connection to the app, whether the app's answer was
/// small (read whole before it goes out) or streamed, with a length or chunked (given back
/// when its body has ended).
#[test]
fn one_connection_to_the_app_carries_requests_one_after_another() {
    let s = start_app(&[], &[]);
    let mut c = keepalive_client(&s);
    // The app's count includes its host's check that it listens, and this request's connection.
    let connections = |c: &mut BufReader<TcpStream>| {
        let r = ask(c, b"GET /stats HTTP/1.1\r\nHost: t\r\n\r\n");
        serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["connections"]
            .as_u64()
            .unwrap()
    };
    let before = connections(&mut c);
    for i in 0..40 {
        // Small (read whole), streamed with a length, streamed chunked.
        let path = ["/", "/download?mb=1", "/drip?n=3&ms=1"][i % 3];
        let r = ask(
            &mut c,
            format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
        );
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        if i % 3 == 1 {
            assert_eq!(r.body.len(), 1024 * 1024, "{path}");
        }
    }
    assert_eq!(
        connections(&mut c),
        before,
        "41 requests one after another on the connection to the app of the first"
    );
}

#[test]
fn a_connection_the_app_closed_after_an_error_is_retried_fresh() {
    let s = start_app(&[], &[]);
    boom_then_ok(&s, 200, "app ");
}

#[test]
fn uvicorn_closing_after_an_exception_costs_the_next_request_nothing() {
    let uvicorn = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/.venv/bin/uvicorn");
    assert!(
        std::path::Path::new(uvicorn).exists(),
        "{uvicorn} is missing: run tests/run, which installs tests/requirements.txt"
    );
    let s = Server::start(&[
        "-w",
        "1",
        "--",
        uvicorn,
        "--app-dir",
        APPS,
        "asgi_app:app",
        "--uds",
        "{socket}",
        "--log-level",
        "critical",
    ]);
    boom_then_ok(&s, 200, "ok");
}

#[test]
fn a_post_the_app_may_have_acted_on_is_never_sent_twice() {
    for settings in [&[][..], &["--set", "app.buffer_requests=true"][..]] {
        let s = start_app(settings, &[]);
        let mut c = keepalive_client(&s);
        // The app reads the body, counts the request and closes without an answer.
        let r = ask(
            &mut c,
            b"POST /count?close=1 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
        );
        assert_eq!(r.status, 502, "{settings:?}: {}", r.text());
        let r = s.get("/count");
        assert_eq!(r.text(), "1", "{settings:?}: the app saw the POST once");
        // Nor one without a body: a POST is not idempotent, whatever it carries.
        let mut c = keepalive_client(&s);
        let r = ask(
            &mut c,
            b"POST /count?close=1 HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(r.status, 502, "{settings:?}: {}", r.text());
        let r = s.get("/count");
        assert_eq!(
            r.text(),
            "2",
            "{settings:?}: the app saw the empty POST once"
        );
    }
}

/// A WebSocket handshake for `/ws`.
const WS_UPGRADE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

/// Reads a response head, byte by byte (nothing of what follows is consumed).
fn read_head(c: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match c.read(&mut b)? {
            0 => return Err(ErrorKind::UnexpectedEof.into()),
            _ => head.push(b[0]),
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

fn ws_echo(c: &mut TcpStream, message: &str) {
    let (mut w, mut r): (&TcpStream, &TcpStream) = (c, c);
    crate::util::ws_echo(&mut w, &mut r, message);
}

#[test]
fn websockets_count_as_connections_and_stay_within_max_connections() {
    let s = start_app(
        &[
            "--set",
            "worker.max_connections=20",
            "--set",
            "limits.max_concurrent_requests=5",
        ],
        &[],
    );
    let mut clients: Vec<Option<TcpStream>> = (0..300)
        .map(|_| {
            let mut c = TcpStream::connect(s.addr).unwrap();
            c.write_all(WS_UPGRADE).unwrap();
            c.set_nonblocking(true).unwrap();
            Some(c)
        })
        .collect();
    let mut state = vec![Ws::Waiting; clients.len()];
    eventually(WAIT, "20 WebSockets open", || {
        (sweep(&mut clients, &mut state) == 20).then_some(())
    });
    eventually(WAIT, "status counts the tunnels", || {
        (worker_record(&s)["connections"] == 20).then_some(())
    });
    // The open ones work; closing five lets five more in, and no more.
    let open: Vec<usize> = (0..clients.len())
        .filter(|&i| state[i] == Ws::Open)
        .take(5)
        .collect();
    for &i in &open {
        ws_echo(clients[i].as_mut().unwrap(), "hi");
        clients[i] = None;
        state[i] = Ws::Closed;
    }
    let upgraded = |state: &[Ws]| {
        state
            .iter()
            .filter(|s| **s != Ws::Waiting && **s != Ws::Refused)
            .count()
    };
    assert_eq!(upgraded(&state), 20);
    eventually(WAIT, "five more WebSockets open", || {
        (sweep(&mut clients, &mut state) == 20 && upgraded(&state) == 25).then_some(())
    });
    eventually(WAIT, "status shows 20 connections", || {
        (worker_record(&s)["connections"] == 20).then_some(())
    });
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Ws {
    Waiting,
    Open,
    /// 503: the upgrade request met the host-wide cap (a request like any other).
    Refused,
    Closed,
}

/// Reads the answer of every client that has one waiting (a 503 closes the client); never
/// more WebSockets open at once than `worker.max_connections` (20). Returns how many are open.
fn sweep(clients: &mut [Option<TcpStream>], state: &mut [Ws]) -> usize {
    for (client, st) in clients.iter_mut().zip(state.iter_mut()) {
        let Some(c) = client.as_mut().filter(|_| *st == Ws::Waiting) else {
            continue;
        };
        let mut b = [0u8; 1];
        match c.peek(&mut b) {
            Ok(n) if n > 0 => {
                c.set_nonblocking(false).unwrap();
                c.set_read_timeout(Some(WAIT)).unwrap();
                let head = read_head(c).unwrap();
                if head.starts_with("HTTP/1.1 503") {
                    *st = Ws::Refused;
                    *client = None;
                } else {
                    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
                    *st = Ws::Open;
                }
            }
            Ok(_) => panic!("connection closed without an answer"),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
    }
    let open = state.iter().filter(|s| **s == Ws::Open).count();
    assert!(open <= 20, "{open} WebSockets open at once");
    open
}

#[test]
fn an_idle_websocket_is_closed_after_app_upgrade_idle_timeout() {
    let s = start_app(&["--set", "app.upgrade_idle_timeout=1s"], &[]);
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    c.write_all(WS_UPGRADE).unwrap();
    let head = read_head(&mut c).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // Traffic keeps it open past the timeout.
    let started = Instant::now();
    let mut idle = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        std::thread::sleep(Duration::from_millis(200));
        ws_echo(&mut c, "still here");
        idle = Instant::now();
    }
    let mut b = [0u8; 16];
    let n = c.read(&mut b).unwrap_or(0);
    assert_eq!(n, 0, "the idle tunnel is closed");
    let took = idle.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "closed after {took:?} of silence"
    );
    eventually(WAIT, "the tunnel no longer counted", || {
        (worker_record(&s)["connections"] == 0).then_some(())
    });
}

#[test]
fn h2c_and_unlisted_upgrades_never_reach_the_app_as_upgrades() {
    let s = start_app(&[], &[]);
    for (upgrade, extra) in [
        ("h2c", "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"),
        ("foo/1", ""),
    ] {
        let raw = format!(
            "GET /headers HTTP/1.1\r\nHost: t\r\nUpgrade: {upgrade}\r\n\
             Connection: Upgrade, HTTP2-Settings\r\n{extra}Connection: close\r\n\r\n"
        );
        let r = crate::util::exchange(s.addr, raw.as_bytes()).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let h: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        for name in ["upgrade", "http2-settings"] {
            assert!(h.get(name).is_none(), "{upgrade}: the app saw {name}: {h}");
        }
        assert!(
            !h["connection"]
                .as_str()
                .unwrap_or("")
                .to_ascii_lowercase()
                .contains("upgrade"),
            "{upgrade}: {h}"
        );
    }
}

#[test]
fn a_stop_is_not_held_past_graceful_timeout_by_an_open_websocket() {
    let mut s = start_app(&["--set", "server.graceful_timeout=2s"], &[]);
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    c.write_all(WS_UPGRADE).unwrap();
    let head = read_head(&mut c).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    ws_echo(&mut c, "open");
    let stopping = Instant::now();
    s.signal(nix::sys::signal::Signal::SIGTERM);
    s.wait_exit(WAIT);
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(12), "stop took {took:?}");
    let mut b = [0u8; 16];
    assert_eq!(
        c.read(&mut b).unwrap_or(0),
        0,
        "the tunnel ended with the stop"
    );
}

/// The host-wide permits held right now.
fn held(s: &Server) -> u64 {
    s.status()["global_inflight"].as_u64().unwrap()
}

/// Permits come back when the app is done with the request: not while it still works on it
/// (a client that reset its connection), not later (a half-closed client, once answered), and
/// at once when the app dies (not at `worker.request_timeout`, an hour here).
#[test]
fn permits_come_back_when_the_app_is_done_not_before_and_not_after() {
    let s = start_app(
        &[
            "--set",
            "limits.max_concurrent_requests=5",
            "--set",
            "worker.request_timeout=1h",
        ],
        &[],
    );
    // A client that resets 100 ms into a 2 s request: held until the app answers.
    let c = TcpStream::connect(s.addr).unwrap();
    (&c).write_all(b"GET /sleep?ms=2000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let sent = Instant::now();
    eventually(WAIT, "the request to hold its permit", || {
        (held(&s) == 1).then_some(())
    });
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    eventually(
        Duration::from_secs(10),
        "the permit back once the app answered",
        || (held(&s) == 0).then_some(()),
    );
    assert!(
        sent.elapsed() >= Duration::from_millis(1900),
        "the permit came back {:?} after the request, before the app's 2 s were up",
        sent.elapsed()
    );

    // A client that half-closes after its request: answered, then nothing is held.
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    c.write_all(b"GET /sleep?ms=300 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let r = read_response(&mut BufReader::new(&c)).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    eventually(
        Duration::from_secs(10),
        "no permit held after the answer",
        || (held(&s) == 0).then_some(()),
    );

    // The app dies under a request whose client has gone: the permit comes back with the
    // app's death, an hour before worker.request_timeout.
    let app = eventually(WAIT, "the app process's pid", || {
        s.status()["apps"][0]["app_pid"].as_u64().filter(|&p| p > 1)
    });
    let c = TcpStream::connect(s.addr).unwrap();
    (&c).write_all(b"GET /sleep?ms=3600000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    eventually(WAIT, "the request to hold its permit", || {
        (held(&s) == 1).then_some(())
    });
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(app as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "the permit back when the app died",
        || (held(&s) == 0).then_some(()),
    );
}
