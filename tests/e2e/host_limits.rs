use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::util::*;

fn global_inflight(server: &Server) -> u64 {
    server.status()["global_inflight"].as_u64().unwrap()
}

/// Starts `n` `/sleep` requests in threads and waits until the host holds `n` permits.
fn hold_permits(
    server: &Server,
    n: u64,
    ms: u64,
) -> Vec<std::thread::JoinHandle<std::io::Result<Response>>> {
    let addr = server.addr;
    let handles = (0..n)
        .map(|_| std::thread::spawn(move || try_get(addr, &format!("/sleep?ms={ms}"))))
        .collect();
    eventually(Duration::from_secs(20), "permits to be held", || {
        (global_inflight(server) == n).then_some(())
    });
    handles
}

#[test]
fn host_wide_cap_rejects_exactly_the_excess_with_503() {
    let server = Server::start(&["-w", "2", "--set", "limits.max_concurrent_requests=4"]);
    let held = hold_permits(&server, 4, 3000);
    // With all 4 permits taken, each further request must be turned away at once.
    let started = Instant::now();
    let extra: Vec<_> = (0..6)
        .map(|_| {
            let addr = server.addr;
            std::thread::spawn(move || get(addr, "/sleep?ms=3000"))
        })
        .collect();
    let rejected: Vec<Response> = extra.into_iter().map(|h| h.join().unwrap()).collect();
    for r in &rejected {
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.header("retry-after"), Some("1"));
        assert!(
            r.text().contains("limits.max_concurrent_requests"),
            "{}",
            r.text()
        );
        assert_eq!(r.text().lines().count(), 1);
        assert!(r.header("x-worker-id").is_some());
    }
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "503s must be fast"
    );
    for h in held {
        assert_eq!(h.join().unwrap().unwrap().status, 200);
    }
    let st = server.status();
    assert_eq!(st["global_rejected"], 6);
    assert_eq!(st["global_inflight"], 0);
}

#[test]
fn oversize_head_gets_431_and_oversize_body_413() {
    let server = Server::start(&[
        "-w",
        "1",
        "--set",
        "worker.max_header_bytes=8KiB",
        "--set",
        "worker.max_body_bytes=1KiB",
    ]);
    let big = "a".repeat(20 * 1024);
    let r = exchange(
        server.addr,
        format!("GET / HTTP/1.1\r\nHost: t\r\nX-Big: {big}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 431);

    let body = "b".repeat(2048);
    let r = exchange(
        server.addr,
        format!("POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 413);
    assert!(r.text().contains("worker.max_body_bytes"), "{}", r.text());

    // Within the limits, the same requests succeed.
    let body = "c".repeat(1000);
    let r = exchange(
        server.addr,
        format!("POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), body);
}

#[test]
fn slowloris_is_cut_off_while_others_are_served() {
    let server = Server::start(&["-w", "1", "--set", "worker.header_timeout=1s"]);
    let mut slow = TcpStream::connect(server.addr).unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n").unwrap();
    let opened = Instant::now();
    // The single worker keeps serving others while the slow client dawdles.
    for _ in 0..5 {
        assert_eq!(server.get("/").status, 200);
    }
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf); // EOF or reset: either way the server hung up
    let waited = opened.elapsed();
    assert!(
        waited < Duration::from_secs(8),
        "cut off after {waited:?}, not ~1s"
    );
    assert!(
        waited >= Duration::from_millis(900),
        "cut off too early: {waited:?}"
    );
    // Whatever was sent back (a 408 or nothing), it was not a normal response.
    assert!(!String::from_utf8_lossy(&buf).contains("Hello, World!"));
}

#[test]
fn every_counter_returns_to_zero_after_success_error_panic_disconnect_and_timeout() {
    let server = Server::start(&["-w", "2", "--set", "worker.request_timeout=500ms"]);
    assert_eq!(server.get("/").status, 200);
    assert_eq!(server.get("/error").status, 500);
    assert_eq!(server.get("/panic").status, 500);
    let r = server.get("/sleep?ms=5000");
    assert_eq!(r.status, 504);
    assert!(r.text().contains("worker.request_timeout"), "{}", r.text());
    // A client that goes away mid-request.
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(b"GET /sleep?ms=20000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the abandoned request in flight",
        || (global_inflight(&server) == 1).then_some(()),
    );
    drop(s);
    eventually(Duration::from_secs(10), "all counters back to 0", || {
        let st = server.status();
        let workers = st["workers"].as_array().unwrap();
        let zero = st["global_inflight"] == 0
            && workers
                .iter()
                .all(|w| w["inflight"] == 0 && w["held_global"] == 0);
        zero.then_some(())
    });
    // Still serving normally afterwards.
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn workers_killed_holding_permits_give_the_capacity_back() {
    let server = Server::start(&["-w", "2", "--set", "limits.max_concurrent_requests=4"]);
    let held = hold_permits(&server, 4, 60_000);
    let holders: Vec<u32> = server
        .workers_in("serving")
        .iter()
        .filter(|w| w["held_global"].as_u64().unwrap() > 0)
        .map(|w| w["pid"].as_u64().unwrap() as u32)
        .collect();
    assert!(!holders.is_empty());
    for pid in &holders {
        kill(Pid::from_raw(*pid as i32), Signal::SIGKILL).unwrap();
    }
    for h in held {
        assert_cut(
            h.join().unwrap(),
            "the killed worker's requests cannot complete",
        );
    }
    eventually(
        Duration::from_secs(20),
        "replacements serving and permits returned",
        || {
            let st = server.status();
            let workers = st["workers"].as_array().unwrap().clone();
            let replaced = workers.len() == 2
                && workers.iter().all(|w| {
                    w["state"] == "serving"
                        && !holders.contains(&(w["pid"].as_u64().unwrap() as u32))
                });
            (replaced && st["global_inflight"] == 0).then_some(())
        },
    );
    // The full cap is admitted again.
    let again = hold_permits(&server, 4, 500);
    for h in again {
        assert_eq!(h.join().unwrap().unwrap().status, 200);
    }
    assert!(server.log.text().contains("returned host-wide permits"));
}

/// A request refused before its body is read (413 here; a 503 for a POST is the same) must
/// still reach the client: closing a socket with unread input makes the kernel send a reset,
/// which can destroy the response before the client reads it.
#[test]
fn a_refused_upload_still_gets_its_answer_while_the_body_is_arriving() {
    let server = Server::start(&["-w", "1", "--set", "worker.max_body_bytes=1KiB"]);
    for _ in 0..5 {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 262144\r\n\r\n")
            .unwrap();
        // The body keeps coming after the server has answered and closed.
        let chunk = [b'x'; 16384];
        for _ in 0..16 {
            if s.write_all(&chunk).is_err() {
                break;
            }
        }
        let resp = read_response(&mut std::io::BufReader::new(s));
        let resp = resp.expect("the 413 was lost to a connection reset");
        assert_eq!(resp.status, 413);
    }
}

/// A load balancer's probe (`limits.health_paths`) is answered while the host's cap refuses
/// every other request, and while its client is over its rate; other methods on the path are
/// not probes.
#[test]
fn a_health_check_is_answered_while_the_cap_and_the_rate_refuse_the_rest() {
    let s = Server::start(&[
        "-w",
        "1",
        "--set",
        "limits.max_concurrent_requests=1",
        "--set",
        "limits.rate=1/min",
    ]);
    // The client's one request a minute, held so that the cap is full too.
    let held = hold_permits(&s, 1, 3000);
    assert_eq!(s.get("/").status, 429, "over its rate");
    for _ in 0..3 {
        let r = s.get("/healthz");
        assert_eq!((r.status, r.text().as_str()), (200, "ok\n"), "the probe");
    }
    let other = s.get("/health?full=1");
    assert_eq!(
        other.status, 404,
        "another health path, with a query, reaches the app"
    );
    let post = exchange(
        s.addr,
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    .unwrap();
    assert_eq!(post.status, 429, "a POST is no probe");
    for h in held {
        assert_eq!(h.join().unwrap().unwrap().status, 200);
    }
    // With the key emptied, the probe is limited like any request.
    let s = Server::start(&[
        "-w",
        "1",
        "--set",
        "limits.rate=1/min",
        "--set",
        "limits.health_paths=[]",
    ]);
    assert_eq!(s.get("/healthz").status, 200);
    assert_eq!(s.get("/healthz").status, 429);
}

/// Past the limits, at most 8 probes are in flight per worker: the paths are no way around
/// them.
#[test]
fn health_checks_past_the_limits_are_bounded_per_worker() {
    let s = Server::start(&[
        "-w",
        "1",
        "--set",
        "limits.max_concurrent_requests=1",
        "--set",
        r#"limits.health_paths=["/sleep"]"#,
    ]);
    let addr = s.addr;
    // Nine at once, each for 3 s: eight pass the cap of 1, the ninth is refused.
    let probes: Vec<_> = (0..9)
        .map(|_| std::thread::spawn(move || get(addr, "/sleep?ms=3000")))
        .collect();
    let answers: Vec<Response> = probes.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = answers.iter().filter(|r| r.status == 200).count();
    let refused: Vec<_> = answers.iter().filter(|r| r.status == 503).collect();
    assert_eq!((ok, refused.len()), (8, 1), "8 answered, 1 refused");
    assert!(
        refused[0].text().contains("health checks in flight"),
        "{}",
        refused[0].text()
    );
    // Their places came back.
    assert_eq!(s.get("/sleep?ms=1").status, 200);
}
