//! What the master needs from a worker to manage its life: the `M` byte at `max_requests` and
//! the description of the requests in flight.

use std::time::Duration;

use super::client::{get, h2_get, H1, H2, IO_LIMIT};
use super::{eventually, start};
use crate::pipe;
use crate::scoreboard::{monotonic_ms, SlotState};

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
    assert_eq!(s.pipe(), b"", "nothing before max_requests");

    assert_eq!(c.get("/").await.status, 200);
    let mut got = Vec::new();
    eventually(SETTLE, "a message on the pipe", || {
        got.extend(s.pipe());
        !got.is_empty()
    })
    .await;
    assert_eq!(got, [pipe::MAX_REQUESTS]);
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
    let before = monotonic_ms();
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
    // disconnect can clear it here).
    let mut gone = H1::connect(s.addr).await;
    gone.send(b"GET /sleep?ms=60000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    eventually(SETTLE, "the request described", || {
        s.in_flight() == ["GET /sleep?ms=60000"]
    })
    .await;
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
