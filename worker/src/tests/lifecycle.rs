//! What the master needs from a worker to manage its life: the `M` byte at `max_requests`.

use std::time::Duration;

use super::client::{get, H1, IO_LIMIT};
use super::{eventually, start};
use crate::pipe;
use crate::scoreboard::SlotState;

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
