//! What the master needs from a worker to manage its life: the `m` and `M` bytes near and at
//! `max_requests`, the
//! description of the requests in flight, and the app helpers that make a worker grow (`/leak`)
//! or hang (`/block`).

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::client::{get, h2_get, H1, H2, IO_LIMIT};
use super::{eventually, start, ID};
use crate::protocol;
use crate::shm::scoreboard::{coarse_monotonic_ms, monotonic_ms, Slot, SlotState};

const SETTLE: Duration = Duration::from_secs(2);

#[tokio::test]
async fn max_requests_sends_m_once_after_exactly_that_many_requests() {
    let s = start(50, |c| c.worker.max_requests = 5);
    // Whatever their status, and on any connection, completed requests count.
    let mut c = H1::connect(s.addr).await;
    assert_eq!(c.get("/").await.status, 200);
    assert_eq!(c.get("/nope").await.status, 404);
    assert_eq!(c.get("/error").await.status, 500);
    assert_eq!(get(s.addr, "/healthz").await.status, 200);
    eventually(SETTLE, "4 requests completed", || s.requests() == 4).await;
    // Well ahead of the limit (`protocol::prepare_at`), the master is asked to prepare.
    assert_eq!(protocol::prepare_at(5, true), 1);
    assert_eq!(
        s.pipe(),
        [protocol::MAX_REQUESTS_SOON],
        "m, and only m, before max_requests"
    );

    assert_eq!(c.get("/").await.status, 200);
    let mut got = Vec::new();
    eventually(SETTLE, "a message on the pipe", || {
        got.extend(s.pipe());
        !got.is_empty()
    })
    .await;
    assert_eq!(got, [protocol::MAX_REQUESTS]);
    assert_eq!(s.requests(), 5, "sent when the 5th request completed");

    // The worker keeps serving normally until the master drains it, and asks only once.
    for _ in 0..10 {
        assert_eq!(c.get("/").await.status, 200);
    }
    eventually(SETTLE, "15 requests completed", || s.requests() == 15).await;
    assert_eq!(s.pipe(), b"", "M is sent once");
}

#[tokio::test]
async fn max_requests_reached_while_draining_sends_nothing() {
    let mut s = start(50, |c| c.worker.max_requests = 3);
    assert_eq!(get(s.addr, "/").await.status, 200);
    assert_eq!(get(s.addr, "/").await.status, 200);
    eventually(SETTLE, "2 requests completed", || s.requests() == 2).await;
    assert_eq!(
        s.pipe(),
        [protocol::MAX_REQUESTS_SOON],
        "prepared after the first"
    );
    let mut busy = H1::connect(s.addr).await;
    busy.send(b"GET /sleep?ms=500 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    eventually(SETTLE, "the sleep in flight", || s.inflight() == 1).await;

    let drain = s.drain(Duration::from_secs(5));
    eventually(SETTLE, "draining", || {
        s.slot().state() == SlotState::Draining
    })
    .await;
    assert_eq!(s.inflight(), 1, "the third request is still in flight");
    assert_eq!(busy.reply().await.unwrap().status, 200);
    let summary = tokio::time::timeout(IO_LIMIT, drain)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(summary.remaining, 0);
    assert_eq!(s.requests(), 3);
    assert_eq!(
        s.pipe(),
        b"",
        "a draining worker does not ask to be replaced"
    );
}

#[tokio::test]
async fn max_requests_zero_never_sends_m() {
    let s = start(50, |c| c.worker.max_requests = 0);
    let mut c = H1::connect(s.addr).await;
    for _ in 0..5 {
        assert_eq!(c.get("/").await.status, 200);
    }
    eventually(SETTLE, "5 requests completed", || s.requests() == 5).await;
    assert_eq!(s.pipe(), b"");
}

#[tokio::test]
async fn requests_in_flight_are_described_until_they_end() {
    let s = start(50, |_| {});

    // Two at once, over HTTP/1.1 and HTTP/2, each named with its method, path and query.
    // Stamped with the coarse clock, which is never ahead of the fine one.
    let before = coarse_monotonic_ms();
    let mut h1 = H1::connect(s.addr).await;
    h1.send(b"GET /sleep?ms=400&tag=h1 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    let mut h2 = H2::connect(s.addr).await;
    let h2_reply = tokio::spawn(async move { h2.send(h2_get("/sleep?ms=400&tag=h2")).await });
    eventually(SETTLE, "both requests described", || {
        s.in_flight() == ["GET /sleep?ms=400&tag=h1", "GET /sleep?ms=400&tag=h2"]
    })
    .await;
    for (started, _) in s.slot().requests_in_flight() {
        assert!(started >= before && started <= monotonic_ms());
    }
    assert_eq!(h1.reply().await.unwrap().status, 200);
    assert_eq!(h2_reply.await.unwrap().0.status, 200);
    eventually(SETTLE, "descriptions cleared after success", || {
        s.in_flight().is_empty()
    })
    .await;

    // A client that disconnects mid-request (the request timeout is 120 s: only the
    // disconnect can clear it here). An abortive close (a reset): a plain close only says the
    // client sends no more, which is allowed mid-request (half-close), and is answered.
    let mut gone = H1::connect(s.addr).await;
    gone.send(b"GET /sleep?ms=60000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    eventually(SETTLE, "the request described", || {
        s.in_flight() == ["GET /sleep?ms=60000"]
    })
    .await;
    socket2::SockRef::from(&gone.stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(gone);
    eventually(SETTLE, "description cleared after a disconnect", || {
        s.in_flight().is_empty()
    })
    .await;

    // Errors and panics end their requests too; requests refused before admission are never
    // described.
    let mut c = H1::connect(s.addr).await;
    assert_eq!(c.get("/error").await.status, 500);
    assert_eq!(c.get("/panic").await.status, 500);
    c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999\r\n\r\n")
        .await;
    assert_eq!(c.reply().await.unwrap().status, 413);
    assert!(s.in_flight().is_empty(), "{:?}", s.in_flight());
    s.assert_settles_to_zero().await;
}

#[tokio::test]
async fn a_timed_out_request_is_no_longer_described() {
    let s = start(50, |c| {
        c.worker.request_timeout = Duration::from_millis(300)
    });
    let mut c = H1::connect(s.addr).await;
    c.send(b"GET /sleep?ms=60000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    eventually(SETTLE, "the request described", || {
        s.in_flight() == ["GET /sleep?ms=60000"]
    })
    .await;
    let r = c.reply().await.unwrap();
    assert_eq!(r.status, 504);
    eventually(SETTLE, "description cleared after the 504", || {
        s.in_flight().is_empty()
    })
    .await;
    // The connection is still usable, and the next request gets an entry of its own.
    assert_eq!(c.get("/").await.status, 200);
    assert!(s.in_flight().is_empty());
}

/// This process's resident memory, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/self/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn leak_keeps_resident_memory_for_the_life_of_the_process() {
    let s = start(50, |_| {});
    let mut c = H1::connect(s.addr).await;
    for path in [
        "/leak",
        "/leak?kb=",
        "/leak?kb=1x",
        "/leak?kb=-1",
        "/leak?kb=1048577",
    ] {
        let r = c.get(path).await;
        assert_eq!(r.status, 400, "{path}");
        assert!(r.text().contains("kb"), "{path}: {}", r.text());
        assert_eq!(r.text().lines().count(), 1, "one-line reason");
        assert_eq!(r.header("x-worker-id"), Some(ID.to_string().as_str()));
    }

    // Large enough that whatever the other tests of this process allocate or free meanwhile is
    // noise.
    const KIB: u64 = 128 * 1024;
    let before = rss_kib();
    let r = c.get(&format!("/leak?kb={KIB}")).await;
    let after = rss_kib();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.text(),
        format!("leaked {KIB} KiB; holding {KIB} KiB in total\n")
    );
    assert_eq!(r.header("x-worker-id"), Some(ID.to_string().as_str()));
    let grown = after.saturating_sub(before);
    assert!(
        (KIB - 16 * 1024..=KIB + 64 * 1024).contains(&grown),
        "RSS grew by {grown} KiB for a leak of {KIB} KiB ({before} -> {after})"
    );

    // Still held after the request is over, and the total adds up.
    let r = c.get("/leak?kb=1024").await;
    assert_eq!(
        r.text(),
        format!("leaked 1024 KiB; holding {} KiB in total\n", KIB + 1024)
    );
    let later = rss_kib();
    assert!(
        later >= before + KIB - 16 * 1024,
        "RSS fell back to {later} KiB"
    );
}

#[tokio::test]
async fn block_stops_the_event_loop_and_the_heartbeat() {
    const BLOCK_MS: u64 = 2000;
    let s = start(50, |_| {});
    let slot: &'static Slot = s.worker.admission.slot();
    let beat = crate::process::spawn_heartbeat(slot);
    let age = move || monotonic_ms().saturating_sub(slot.heartbeat_ms.load(Ordering::Relaxed));
    assert!(age() < 1500, "beating before the block");

    // The worker's thread is this test's thread: while it is blocked, only another thread can
    // watch, the way the master does.
    let addr = s.addr;
    let watcher = std::thread::spawn(move || {
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        let request =
            format!("GET /block?ms={BLOCK_MS} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).unwrap();
        let started = std::time::Instant::now();
        let (mut reply, mut buf) = (Vec::new(), [0u8; 1024]);
        let (mut max_age, mut described) = (0, false);
        loop {
            max_age = max_age.max(age());
            described |= slot
                .requests_in_flight()
                .iter()
                .any(|(_, t)| *t == format!("GET /block?ms={BLOCK_MS}"));
            match tcp.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => reply.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("reading the reply: {e}"),
            }
            assert!(started.elapsed() < Duration::from_secs(20), "no reply");
        }
        (
            String::from_utf8(reply).unwrap(),
            started.elapsed(),
            max_age,
            described,
        )
    });
    eventually(Duration::from_secs(30), "the watcher is done", || {
        watcher.is_finished()
    })
    .await;
    let (reply, took, max_age, described) = watcher.join().unwrap();

    assert!(reply.starts_with("HTTP/1.1 200 "), "{reply}");
    assert!(
        reply
            .to_lowercase()
            .contains(&format!("\r\nx-worker-id: {ID}\r\n")),
        "{reply}"
    );
    assert!(reply.ends_with("\r\n\r\nblocked\n"), "{reply}");
    assert!(took >= Duration::from_millis(BLOCK_MS), "{took:?}");
    // The heartbeat is stamped every second; only a blocked loop lets it age this much.
    assert!(
        max_age >= BLOCK_MS - 200,
        "heartbeat aged at most {max_age} ms during a {BLOCK_MS} ms block"
    );
    assert!(described, "the blocked request was described in the record");
    // And it resumes once the loop is free again.
    eventually(Duration::from_secs(3), "the heartbeat resumes", || {
        age() < 1500
    })
    .await;
    assert!(s.in_flight().is_empty());
    beat.abort();

    let r = get(s.addr, "/block?ms=600001").await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("ms"), "{}", r.text());
}
