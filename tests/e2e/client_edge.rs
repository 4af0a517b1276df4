//! The client edge: half-closed clients, minimum data rates, and the strict HTTP edge
//! (RFC 9110/9112), each against the built-in app and the standard-library app behind the
//! proxy.

use std::io::{BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::util::{assert_cut, eventually, exchange, read_response, Response, Server};

const WAIT: Duration = Duration::from_secs(20);

const APP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps/stdlib_app.py");

/// `supervisor start -w 1 SETTINGS... -- python3 stdlib_app.py --uds {socket}`.
fn start_app(settings: &[&str]) -> Server {
    let mut args = vec!["-w", "1"];
    args.extend_from_slice(settings);
    args.extend_from_slice(&["--", "python3", APP, "--uds", "{socket}"]);
    Server::start(&args)
}

/// The built-in app with one worker.
fn start_builtin(settings: &[&str]) -> Server {
    let mut args = vec!["-w", "1"];
    args.extend_from_slice(settings);
    Server::start(&args)
}

/// Sends `raw`, closes the sending side (`shutdown(SHUT_WR)`), and reads the response.
fn half_closed(addr: SocketAddr, raw: &[u8]) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(raw)?;
    s.shutdown(Shutdown::Write)?;
    read_response(&mut BufReader::new(s))
}

/// 200 requests, each sent and then half-closed: every one is answered.
fn all_half_closed_answered(s: &Server, path: &str) {
    let raw = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
    let mut lost = Vec::new();
    for i in 0..200 {
        match half_closed(s.addr, raw.as_bytes()) {
            Ok(r) if r.status == 200 => {}
            Ok(r) => lost.push(format!("#{i}: {} {}", r.status, r.text())),
            Err(e) => lost.push(format!("#{i}: {e}")),
        }
    }
    assert!(
        lost.is_empty(),
        "{} of 200 not answered; the first: {:?}",
        lost.len(),
        &lost[..lost.len().min(3)]
    );
}

#[test]
fn half_closed_clients_are_answered_by_the_builtin_app() {
    let s = start_builtin(&[]);
    all_half_closed_answered(&s, "/");
    // One whose answer takes a while: still answered, and the connection then closes at
    // once (no keep-alive wait for a client that said it sends no more).
    for _ in 0..5 {
        let mut c = TcpStream::connect(s.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"GET /sleep?ms=200 HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut r = BufReader::new(c);
        assert_eq!(read_response(&mut r).unwrap().status, 200);
        let started = Instant::now();
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut r, &mut rest).unwrap();
        assert!(rest.is_empty());
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}

/// A client that resets its connection mid-request is gone: its request ends and its permit
/// comes back at once (with `request_timeout` 120 s, nothing else could end it).
#[test]
fn a_client_that_resets_mid_request_frees_its_permit() {
    let s = start_builtin(&["--set", "limits.max_concurrent_requests=1"]);
    let c = TcpStream::connect(s.addr).unwrap();
    (&c).write_all(b"GET /sleep?ms=60000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    wait_cap_held(&s);
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    eventually(WAIT, "the permit back", || {
        (s.status()["global_inflight"] == 0).then_some(())
    });
    assert_eq!(s.get("/").status, 200);
}

#[test]
fn half_closed_clients_are_answered_through_the_proxy() {
    let s = start_app(&[]);
    all_half_closed_answered(&s, "/");
}

/// The minimum rates in these tests: 100 bytes/s after 1 s for bodies, 1 MiB/s after 1 s for
/// responses, with the host-wide cap at 1 so that a held permit shows.
const RATES: [&str; 8] = [
    "--set",
    "worker.min_request_rate=100",
    "--set",
    "worker.min_rate_grace=1s",
    "--set",
    "limits.max_concurrent_requests=1",
    "--set",
    "worker.min_response_rate=1MiB/s",
];

/// Sends the head of `POST path` with a 1000-byte body, then the body a byte every 200 ms
/// (5 bytes/s, far below 100 bytes/s) until the server stops it or 60 bytes (12 s) have gone:
/// returns the response (or the error that ended it) and how long it took.
fn trickle(addr: SocketAddr, path: &str) -> (std::io::Result<Response>, Duration) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let started = Instant::now();
    s.write_all(
        format!("POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for _ in 0..60 {
            if w.write_all(b"x").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let res = read_response(&mut BufReader::new(s));
    let took = started.elapsed();
    // The writer ends at its next write once the connection is gone (or after its 60 bytes).
    drop(writer);
    (res, took)
}

/// Waits until a request holds the one permit, and checks that another is refused meanwhile.
fn wait_cap_held(s: &Server) {
    eventually(WAIT, "a request holding the cap", || {
        (s.status()["global_inflight"] == 1).then_some(())
    });
    assert_eq!(s.get("/").status, 503, "the cap is held");
}

#[test]
fn a_trickled_body_through_the_proxy_gets_408_and_frees_the_cap() {
    let s = start_app(&RATES);
    let addr = s.addr;
    let slow = std::thread::spawn(move || trickle(addr, "/consume"));
    wait_cap_held(&s);
    let (res, took) = slow.join().unwrap();
    let r = res.expect("an answer to the trickled body");
    assert_eq!(r.status, 408, "{}", r.text());
    assert!(r.text().contains("worker.min_request_rate"), "{}", r.text());
    // 1 s of grace, then the average (5 bytes/s) is far below 100 bytes/s.
    assert!(took < Duration::from_secs(4), "cut after {took:?}");
    // The permit came back: the next request is admitted.
    assert_eq!(s.get("/").status, 200);
}

#[test]
fn a_trickled_body_on_the_builtin_echo_is_cut_and_frees_the_cap() {
    let s = start_builtin(&RATES);
    let addr = s.addr;
    let slow = std::thread::spawn(move || trickle(addr, "/echo"));
    wait_cap_held(&s);
    // /echo has sent its 200 head already: the connection is cut mid-body.
    let (res, took) = slow.join().unwrap();
    assert_cut(res, "a body below worker.min_request_rate");
    assert!(took < Duration::from_secs(4), "cut after {took:?}");
    assert_eq!(s.get("/").status, 200);
}

/// `GET path`, then reads the response 16 KiB every 50 ms (320 KiB/s, below the tests' 1 MiB/s)
/// until the server cuts the connection or 20 s pass: how long until the cut, if there was one.
fn slow_read(addr: SocketAddr, path: &str) -> Option<Duration> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .unwrap();
    let mut buf = vec![0; 16 * 1024];
    while started.elapsed() < Duration::from_secs(20) {
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(0) | Err(_) => return Some(started.elapsed()),
            Ok(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    None
}

#[test]
fn a_slow_reader_of_a_large_response_is_cut_and_frees_the_cap() {
    let s = start_app(&RATES);
    let addr = s.addr;
    let slow = std::thread::spawn(move || slow_read(addr, "/download?mb=256"));
    wait_cap_held(&s);
    let took = slow.join().unwrap();
    let took = took.expect("the slow reader was not cut within 20 s");
    // 1 s of grace, then 320 KiB/s is below 1 MiB/s (client_timeout is 30 s). The cut is a
    // reset: the megabytes still in the kernel's buffers are not sent on at the client's pace.
    assert!(took < Duration::from_secs(4), "cut after {took:?}");
    assert!(
        s.log
            .text()
            .contains("slower than worker.min_response_rate"),
        "{}",
        s.log.text()
    );
    // The permit comes back once the app is done with the request: the rest of its 256 MiB is
    // read and discarded first (permits follow the app's work), which takes a moment.
    eventually(WAIT, "the permit back after the app's answer", || {
        (s.get("/").status == 200).then_some(())
    });
}

/// What the server answers to `raw` (sent whole, then the response read).
fn answer(s: &Server, raw: &str) -> (u16, String) {
    let r = exchange(s.addr, raw.as_bytes()).unwrap_or_else(|e| panic!("{raw:?}: {e}"));
    (r.status, r.text())
}

/// The malformed requests of RFC 9110/9112 that nginx refuses, and what each gets. `post` is a
/// route that reads a request body.
fn strict_edge_cases(post: &str) -> Vec<(String, u16)> {
    vec![
        // HTTP/1.1 without Host, and with two.
        ("GET / HTTP/1.1\r\nConnection: close\r\n\r\n".into(), 400),
        (
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n".into(),
            400,
        ),
        // HTTP/1.0 may leave Host out.
        ("GET / HTTP/1.0\r\n\r\n".into(), 200),
        // Nothing here tunnels.
        (
            "CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n".into(),
            405,
        ),
        // A transfer coding other than chunked alone.
        (
            format!(
                "POST {post} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\
                 Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            ),
            501,
        ),
        // A chunk size past 2^64: a 400, not a silent close.
        (
            format!(
                "POST {post} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\
                 Connection: close\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n"
            ),
            400,
        ),
        // A malformed chunk size.
        (
            format!(
                "POST {post} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\
                 Connection: close\r\n\r\nZZ\r\nhello\r\n0\r\n\r\n"
            ),
            400,
        ),
    ]
}

fn assert_strict(s: &Server, post: &str) {
    let mut wrong = Vec::new();
    for (raw, want) in strict_edge_cases(post) {
        match exchange(s.addr, raw.as_bytes()) {
            Ok(r) if r.status == want => {}
            Ok(r) => wrong.push(format!("{raw:?}: {} (want {want}) {}", r.status, r.text())),
            Err(e) => wrong.push(format!("{raw:?}: {e} (want {want})")),
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn the_builtin_app_has_a_strict_edge() {
    let s = start_builtin(&[]);
    assert_strict(&s, "/echo");
    // An absolute-form target is served (its authority is the host).
    let (status, text) = answer(
        &s,
        "GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n",
    );
    assert_eq!((status, text.as_str()), (200, "Hello, World!"));
}

#[test]
fn the_proxy_has_a_strict_edge() {
    let s = start_app(&[]);
    assert_strict(&s, "/consume");
    let headers = |raw: &str| -> serde_json::Value {
        let (status, text) = answer(&s, raw);
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    };
    // The absolute-form target's authority wins over Host, and is what the app sees.
    let h = headers(
        "GET http://a.example/headers HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(h["host"], "a.example", "{h}");
    // Header names with underscores never reach the app (which could fold them into their
    // dashed twins, past the forwarded headers the proxy sets).
    let h = headers(
        "GET /headers HTTP/1.1\r\nHost: t\r\nX_Forwarded_For: 6.6.6.6\r\nX-Real_IP: 6.6.6.6\r\n\
         Content_Length: 5\r\nX-Kept: 1\r\nConnection: close\r\n\r\n",
    );
    let text = h.to_string();
    assert!(!text.contains("6.6.6.6") && !text.contains('_'), "{h}");
    assert_eq!(h["x-kept"], "1", "{h}");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{h}");
}
