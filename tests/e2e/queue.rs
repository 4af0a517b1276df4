//! `limits.queue`: requests over a limit wait their turn instead of getting 503 at once, in
//! order, within `limits.queue_timeout`; a full queue is a 503.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::util::*;

const WAIT: Duration = Duration::from_secs(20);

fn sum(s: &Server, field: &str) -> u64 {
    s.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w[field].as_u64().unwrap())
        .sum()
}

/// `GET path` in a thread; the thread returns the status and when the answer came.
fn send(s: &Server, path: &str) -> JoinHandle<(u16, Instant)> {
    let (addr, path) = (s.addr, path.to_string());
    std::thread::spawn(move || (get(addr, &path).status, Instant::now()))
}

#[test]
fn over_the_worker_limit_requests_wait_their_turn_in_order() {
    let s = Server::start(&[
        "-w",
        "1",
        "--set",
        "worker.max_concurrent=1",
        "--set",
        "limits.queue=3",
        "--set",
        "limits.queue_timeout=30s",
    ]);
    // One request holds the worker's only permit.
    let holder = send(&s, "/sleep?ms=500");
    eventually(WAIT, "the first request in flight", || {
        (sum(&s, "inflight") == 1).then_some(())
    });
    // Three more queue up, each in the queue before the next is sent.
    let mut queued = Vec::new();
    for n in 1..=3 {
        queued.push(send(&s, "/sleep?ms=50"));
        eventually(WAIT, "the request to be queued", || {
            (sum(&s, "queued") == n).then_some(())
        });
    }
    // The queue is full: the next one is refused at once.
    let started = Instant::now();
    let full = s.get("/");
    assert_eq!(full.status, 503, "{}", full.text());
    assert!(full.text().contains("limits.queue"), "{}", full.text());
    assert_eq!(full.header("retry-after"), Some("1"));
    assert!(started.elapsed() < Duration::from_millis(400));

    let (status, held_until) = holder.join().unwrap();
    assert_eq!(status, 200);
    // Every queued request is served, one after the other, in the order it came.
    let done: Vec<(u16, Instant)> = queued.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(done.iter().all(|(status, _)| *status == 200), "{done:?}");
    assert!(done[0].1 > held_until);
    assert!(
        done.windows(2).all(|w| w[0].1 < w[1].1),
        "served out of order"
    );
    assert_eq!(sum(&s, "queued"), 0);
    assert_eq!(sum(&s, "queue_full"), 1);
    assert_eq!(sum(&s, "rejected_local"), 0);
}

#[test]
fn a_request_that_waits_past_queue_timeout_gets_503() {
    let s = Server::start(&[
        "-w",
        "1",
        "--set",
        "worker.max_concurrent=1",
        "--set",
        "limits.queue=5",
        "--set",
        "limits.queue_timeout=300ms",
    ]);
    let holder = send(&s, "/sleep?ms=3000");
    eventually(WAIT, "the first request in flight", || {
        (sum(&s, "inflight") == 1).then_some(())
    });
    let started = Instant::now();
    let late = s.get("/");
    let waited = started.elapsed();
    assert_eq!(late.status, 503, "{}", late.text());
    assert!(
        late.text().contains("limits.queue_timeout"),
        "{}",
        late.text()
    );
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(2500),
        "answered after {waited:?}"
    );
    assert_eq!(sum(&s, "queue_timeouts"), 1);
    assert_eq!(holder.join().unwrap().0, 200);
}

#[test]
fn over_the_host_wide_cap_a_request_waits_for_another_workers_permit() {
    let s = Server::start(&[
        "-w",
        "2",
        "--set",
        "limits.max_concurrent_requests=1",
        "--set",
        "limits.queue=20",
        "--set",
        "limits.queue_timeout=5s",
    ]);
    let per_worker = |field: &str| -> Vec<u64> {
        let st = s.status();
        let mut w: Vec<(u64, u64)> = st["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| (w["worker_id"].as_u64().unwrap(), w[field].as_u64().unwrap()))
            .collect();
        w.sort_unstable();
        w.into_iter().map(|(_, v)| v).collect()
    };
    // One worker holds the host's only permit.
    let mut sent = vec![send(&s, "/sleep?ms=1500")];
    let holder = eventually(WAIT, "the first request in flight", || {
        per_worker("inflight").iter().position(|&n| n == 1)
    });
    // Requests until one waits in the other worker, which nobody there will wake: only the
    // host-wide count, which the holder's worker changes, can let it through.
    eventually(WAIT, "a request queued in the other worker", || {
        if per_worker("queued")[1 - holder] > 0 {
            return Some(());
        }
        sent.push(send(&s, "/sleep?ms=10"));
        std::thread::sleep(Duration::from_millis(20));
        None
    });
    for h in sent {
        assert_eq!(h.join().unwrap().0, 200);
    }
    let st = s.status();
    assert_eq!(st["global_rejected"], 0);
    assert_eq!(st["global_inflight"], 0);
    assert_eq!(sum(&s, "queue_timeouts"), 0);
}
