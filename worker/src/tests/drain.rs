//! Graceful drain: in-flight requests finish, idle connections close, queued clients are served,
//! the listener closes, and the wait is bounded.

use std::time::Duration;

use tokio::time::Instant;

use super::client::{h2_get, H1, H2, IO_LIMIT};
use super::{eventually, start};
use crate::shm::scoreboard::SlotState;

#[tokio::test]
async fn drain_finishes_inflight_closes_idle_and_serves_the_queue() {
    let mut s = start(50, |c| {
        c.worker.max_connections = 2;
        c.worker.keepalive_timeout = Duration::from_secs(30);
    });

    let mut idle = H1::connect(s.addr).await;
    assert_eq!(idle.get("/").await.status, 200);

    let mut busy = H1::connect(s.addr).await;
    busy.send(b"GET /sleep?ms=400 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    eventually(Duration::from_secs(2), "the sleep in flight", || {
        s.inflight() == 1
    })
    .await;

    // At max_connections: this one waits in the kernel's accept queue, request already sent.
    let mut queued = H1::connect(s.addr).await;
    queued.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert!(queued.quiet_for(Duration::from_millis(100)).await);
    assert_eq!(s.connections(), 2);

    let started = Instant::now();
    let drain = s.drain(Duration::from_secs(5));

    // The idle keep-alive connection is not closed under its client (a request may be on its
    // way): its next request is answered, with `Connection: close`, and then it closes.
    assert!(idle.quiet_for(Duration::from_millis(100)).await);
    let r = idle.get("/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    let closed = idle.closed_within(Duration::from_secs(2)).await;
    assert!(closed < Duration::from_millis(300), "{closed:?}");

    // The request in flight completes, told that the connection closes after it.
    let r = busy.reply().await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    busy.closed_within(Duration::from_secs(2)).await;

    // The queued client is served rather than reset.
    let r = queued.reply().await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"Hello, World!");
    queued.closed_within(Duration::from_secs(2)).await;

    let summary = tokio::time::timeout(IO_LIMIT, drain)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(summary.remaining, 0);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(s.slot().state(), SlotState::Draining);
    assert_eq!(s.connections(), 0);
    s.assert_settles_to_zero().await;

    // The listener is closed: nobody accepts any more.
    assert!(tokio::net::TcpStream::connect(s.addr).await.is_err());
}

#[tokio::test]
async fn drain_sends_goaway_and_finishes_h2_streams() {
    let mut s = start(50, |_| {});
    let mut h2 = H2::connect(s.addr).await;
    assert_eq!(h2.send(h2_get("/")).await.0.status, 200);

    let mut sender = h2.sender.clone();
    let inflight = tokio::spawn(async move {
        let res = sender.send_request(h2_get("/sleep?ms=300")).await.unwrap();
        res.status()
    });
    eventually(Duration::from_secs(2), "the h2 sleep in flight", || {
        s.inflight() == 1
    })
    .await;

    let summary = s.drain(Duration::from_secs(5));
    let status = tokio::time::timeout(IO_LIMIT, inflight).await;
    assert_eq!(status.expect("h2 response in time").unwrap(), 200);
    // GOAWAY, then the connection ends once its last stream is done.
    tokio::time::timeout(Duration::from_secs(2), h2.conn)
        .await
        .expect("h2 connection closed by the server")
        .unwrap()
        .unwrap();
    assert_eq!(summary.await.unwrap().remaining, 0);
}

#[tokio::test]
async fn drain_gives_up_after_the_graceful_timeout() {
    let mut s = start(50, |_| {});
    let mut busy = H1::connect(s.addr).await;
    busy.send(b"GET /sleep?ms=5000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    eventually(Duration::from_secs(2), "the sleep in flight", || {
        s.inflight() == 1
    })
    .await;
    let started = Instant::now();
    let summary = s.drain(Duration::from_millis(300)).await.unwrap();
    let took = started.elapsed();
    assert_eq!(summary.remaining, 1);
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[tokio::test]
async fn drain_answers_a_request_whose_head_was_arriving_on_a_reused_connection() {
    let mut s = start(50, |c| c.worker.keepalive_timeout = Duration::from_secs(30));
    let mut c = H1::connect(s.addr).await;
    assert_eq!(c.get("/").await.status, 200);
    // The next request has started to arrive when the drain begins.
    c.send(b"GET / HTTP/1.1\r\nHost: t\r\n").await;
    // Nothing comes back meanwhile; this also lets the worker (same runtime) read those bytes.
    assert!(c.quiet_for(Duration::from_millis(50)).await);
    let drain = s.drain(Duration::from_secs(5));
    assert!(c.quiet_for(Duration::from_millis(100)).await, "not cut");
    c.send(b"\r\n").await;
    let r = c.reply().await.expect("the request on its way is answered");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    c.closed_within(Duration::from_secs(2)).await;
    let summary = tokio::time::timeout(IO_LIMIT, drain)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(summary.remaining, 0);
}
