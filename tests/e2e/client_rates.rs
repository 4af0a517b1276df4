//! `limits.rate`: one budget per client across every worker of the host, the 429 and its
//! headers, who the client is, and a table whose memory does not grow with the clients.

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::util::*;

/// `GET /` on a new connection, with extra header lines.
fn get_with(addr: SocketAddr, headers: &str) -> Response {
    exchange(
        addr,
        format!("GET / HTTP/1.1\r\nHost: t\r\n{headers}Connection: close\r\n\r\n").as_bytes(),
    )
    .unwrap()
}

#[test]
fn one_budget_per_client_across_every_worker() {
    // 5 at once, then one every 12 s: nothing refills while the test runs.
    let s = Server::start(&["-w", "4", "--set", "limits.rate=5/min"]);
    let started = Instant::now();
    let answers: Vec<Response> = (0..40).map(|_| get_with(s.addr, "")).collect();
    let elapsed = started.elapsed();
    let passed: Vec<&Response> = answers.iter().filter(|r| r.status == 200).collect();
    let refill = (elapsed.as_secs() / 12) as usize;
    assert!(
        (5..=5 + refill).contains(&passed.len()),
        "{} of 40 passed in {elapsed:?}",
        passed.len()
    );
    // The requests went to several workers, which shared the one budget.
    let mut workers: Vec<&str> = answers
        .iter()
        .filter_map(|r| r.header("x-worker-id"))
        .collect();
    workers.sort_unstable();
    workers.dedup();
    assert!(workers.len() > 1, "all requests went to worker {workers:?}");
    // Every other answer is a 429 that says when to come back and why.
    for r in answers.iter().filter(|r| r.status != 200) {
        assert_eq!(r.status, 429, "{}", r.text());
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=12).contains(&retry), "Retry-After {retry}");
        assert!(r.text().contains("limits.rate"), "{}", r.text());
        assert_eq!(r.header("ratelimit-policy"), Some("\"client\";q=5;w=60"));
        assert!(
            r.header("ratelimit")
                .unwrap()
                .starts_with("\"client\";r=0;t="),
            "{:?}",
            r.header("ratelimit")
        );
    }
    // The first answer counts down from the budget.
    assert!(
        answers[0]
            .header("ratelimit")
            .unwrap()
            .starts_with("\"client\";r=4;t="),
        "{:?}",
        answers[0].header("ratelimit")
    );
    let rate = &s.status()["rate_limit"];
    assert_eq!(rate["limited"], 40 - passed.len() as u64, "{rate}");
    assert_eq!(rate["tracked"], 1, "{rate}");
}

#[test]
fn clients_are_told_apart_by_the_configured_header_or_trusted_forwarding() {
    let s = Server::start(&[
        "-w",
        "2",
        "--set",
        "limits.rate=2/min",
        "--set",
        "limits.key=header:X-Api-Key",
    ]);
    assert_eq!(passed(&s, "X-Api-Key: alice\r\n"), 2);
    assert_eq!(passed(&s, "X-Api-Key: bob\r\n"), 2);
    // Without the header, the address is the client.
    assert_eq!(passed(&s, ""), 2);

    // By address: the test's peer is loopback, trusted by default, so X-Forwarded-For names
    // the client...
    let s = Server::start(&["-w", "2", "--set", "limits.rate=2/min"]);
    assert_eq!(passed(&s, "X-Forwarded-For: 198.51.100.1\r\n"), 2);
    assert_eq!(passed(&s, "X-Forwarded-For: 198.51.100.2\r\n"), 2);
    // ... but not from a peer that is not trusted: then every request is the peer's.
    let s = Server::start(&[
        "-w",
        "2",
        "--set",
        "limits.rate=2/min",
        "--set",
        "server.forwarded_allow_ips=[]",
    ]);
    assert_eq!(passed(&s, "X-Forwarded-For: 198.51.100.1\r\n"), 2);
    assert_eq!(passed(&s, "X-Forwarded-For: 198.51.100.2\r\n"), 0);
}

/// How many of 5 `GET /` with these header lines pass.
fn passed(s: &Server, headers: &str) -> usize {
    (0..5)
        .filter(|_| get_with(s.addr, headers).status == 200)
        .count()
}

/// Memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn many_distinct_clients_keep_memory_flat_and_the_limited_client_limited() {
    const CLIENTS: usize = 50_000;
    let s = Server::start(&[
        "-w",
        "1",
        "--set",
        "limits.rate=1/h",
        "--set",
        "limits.burst=3",
        "--set",
        "limits.key=header:X-Api-Key",
        "--set",
        "limits.max_active_instances=64",
    ]);
    let worker = s.serving_pids()[0];
    let conn = TcpStream::connect(s.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    let mut send = |key: &str| {
        w.write_all(format!("GET / HTTP/1.1\r\nHost: t\r\nX-Api-Key: {key}\r\n\r\n").as_bytes())
            .unwrap();
        read_response(&mut r).unwrap().status
    };
    // One client spends its budget.
    let spent: Vec<u16> = (0..4).map(|_| send("heavy")).collect();
    assert_eq!(spent, [200, 200, 200, 429]);
    let before = rss_kib(worker);
    for i in 0..CLIENTS {
        assert_eq!(send(&format!("client-{i}")), 200, "client {i}");
        // The limited client stays limited however many others come and go: of all the
        // clients in its group, it is the one furthest from a full budget, so never the one
        // forgotten.
        if i % 1000 == 0 {
            assert_eq!(send("heavy"), 429, "after {i} other clients");
        }
    }
    let grown = rss_kib(worker).saturating_sub(before);
    assert!(
        grown < 2048,
        "worker grew {grown} KiB for {CLIENTS} clients"
    );
    let rate = &s.status()["rate_limit"];
    assert_eq!(rate["capacity"], 64, "{rate}");
    // Full: every place holds a client seen within idle_ttl, and no more.
    assert_eq!(rate["tracked"], 64, "{rate}");
    // Each new client pushed one out, except the rare one whose 24-bit fingerprint matched a
    // client already in its group (about one in 10^6 arrivals: 0.05 in this test), which shares
    // that client's place.
    assert!(
        rate["evictions"].as_u64().unwrap() + 5 >= (CLIENTS - 64) as u64,
        "{rate}"
    );
}

#[test]
fn a_bad_rate_is_a_config_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(
        dir.path(),
        &["check", "--set", "limits.rate=100/fortnight"],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("limits.rate"), "{err}");
    assert!(err.contains("fortnight"), "{err}");
}
