//! Size limits (413, 431), concurrency limits (503 from the worker and the host-wide cap), the
//! connection limit, and that every permit comes back whatever happened to the request.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::client::{get, Reply, H1};
use super::{eventually, start, ID};
use crate::config::ByteSize;

#[tokio::test]
async fn content_length_over_the_limit_is_413() {
    let s = start(50, |c| c.worker.max_body_bytes = ByteSize(1024));
    let mut c = H1::connect(s.addr).await;
    c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1025\r\n\r\n")
        .await;
    let r = c.reply().await.unwrap();
    assert_eq!(r.status, 413);
    assert!(r.text().contains("worker.max_body_bytes"), "{}", r.text());
    assert!(r.text().contains("1KiB"), "{}", r.text());
    assert_eq!(r.header("x-worker-id"), Some(ID.to_string().as_str()));
    // Refused before admission: no permit was taken, none is left behind.
    s.assert_settles_to_zero().await;

    // At the limit is fine.
    let mut c = H1::connect(s.addr).await;
    let mut req = b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1024\r\n\r\n".to_vec();
    req.extend(std::iter::repeat_n(b'x', 1024));
    c.send(&req).await;
    let r = c.reply().await.unwrap();
    assert_eq!((r.status, r.body.len()), (200, 1024));
}

#[tokio::test]
async fn unannounced_body_over_the_limit_is_cut_off() {
    let s = start(50, |c| c.worker.max_body_bytes = ByteSize(1024));
    let mut c = H1::connect(s.addr).await;
    c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await;
    let chunk = format!("400\r\n{}\r\n", "y".repeat(1024));
    c.send(chunk.as_bytes()).await;
    c.send(chunk.as_bytes()).await;
    // The echo started streaming, so the only way to abort is to end the response early:
    // the reply never completes.
    let err = c.reply().await.expect_err("response must be aborted");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
        ),
        "aborted by the server, not left hanging: {err}"
    );
    s.assert_settles_to_zero().await;
}

#[tokio::test]
async fn oversize_head_and_too_many_headers_are_431() {
    let s = start(50, |c| {
        c.worker.max_header_bytes = ByteSize(16 * 1024);
        c.worker.max_headers = 20;
    });
    let mut c = H1::connect(s.addr).await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(17 * 1024)
    );
    c.send(big.as_bytes()).await;
    assert_eq!(c.reply().await.unwrap().status, 431);

    let mut c = H1::connect(s.addr).await;
    let mut many = String::from("GET / HTTP/1.1\r\nHost: t\r\n");
    for i in 0..25 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    c.send(many.as_bytes()).await;
    assert_eq!(c.reply().await.unwrap().status, 431);

    // Under both limits: fine.
    assert_eq!(get(s.addr, "/").await.status, 200);
}

/// Fires `n` concurrent `GET path` requests, each on its own connection.
async fn concurrent(addr: std::net::SocketAddr, path: &'static str, n: usize) -> Vec<Reply> {
    let tasks: Vec<_> = (0..n).map(|_| tokio::spawn(get(addr, path))).collect();
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    replies
}

fn assert_503(r: &Reply, names: &str) {
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(r.header("x-worker-id"), Some(ID.to_string().as_str()));
    assert_eq!(r.text().lines().count(), 1, "one line: {:?}", r.text());
    assert!(
        r.text().contains(names),
        "{:?} should name {names}",
        r.text()
    );
}

#[tokio::test]
async fn host_wide_cap_rejects_exactly_the_excess() {
    let s = start(3, |_| {});
    let replies = concurrent(s.addr, "/sleep?ms=600", 5).await;
    let rejected: Vec<_> = replies.iter().filter(|r| r.status == 503).collect();
    let served = replies.iter().filter(|r| r.status == 200).count();
    assert_eq!((served, rejected.len()), (3, 2), "{replies:?}");
    for r in rejected {
        assert_503(r, "limits.max_concurrent_requests");
        assert!(r.text().contains("host-wide limit of 3 "), "{}", r.text());
    }
    assert_eq!(s.view.header().global_rejected.load(Ordering::Relaxed), 2);
    assert_eq!(s.slot().rejected_local.load(Ordering::Relaxed), 0);
    s.assert_settles_to_zero().await;
}

#[tokio::test]
async fn worker_limit_rejects_with_503() {
    let s = start(50, |c| c.worker.max_concurrent = 2);
    let replies = concurrent(s.addr, "/sleep?ms=600", 3).await;
    let rejected: Vec<_> = replies.iter().filter(|r| r.status == 503).collect();
    assert_eq!(rejected.len(), 1, "{replies:?}");
    assert_503(rejected[0], "worker.max_concurrent");
    assert!(rejected[0].text().contains("worker limit of 2 "));
    assert_eq!(s.slot().rejected_local.load(Ordering::Relaxed), 1);
    // Refused locally, so the host-wide cap was never consulted.
    assert_eq!(s.view.header().global_rejected.load(Ordering::Relaxed), 0);
    s.assert_settles_to_zero().await;
}

#[tokio::test]
async fn a_full_worker_leaves_new_connections_queued() {
    let s = start(50, |c| c.worker.max_connections = 1);
    let mut first = H1::connect(s.addr).await;
    assert_eq!(first.get("/").await.status, 200);

    // The kernel completes the handshake, but the worker does not accept: no permit.
    let mut second = H1::connect(s.addr).await;
    second.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert!(second.quiet_for(Duration::from_millis(200)).await);
    assert_eq!(s.connections(), 1);

    drop(first);
    let r = second.reply().await.unwrap();
    assert_eq!(r.status, 200, "served once the first connection closed");
    assert_eq!(s.connections(), 1);
}

#[tokio::test]
async fn every_permit_comes_back_after_mixed_outcomes() {
    let s = start(10, |c| {
        c.worker.request_timeout = Duration::from_millis(300)
    });

    assert_eq!(get(s.addr, "/").await.status, 200);
    assert_eq!(get(s.addr, "/error").await.status, 500);
    assert_eq!(get(s.addr, "/panic").await.status, 500);
    assert_eq!(get(s.addr, "/sleep?ms=5000").await.status, 504);

    // A client that disconnects mid-request (a reset: a plain close is a half-close, which is
    // answered).
    let mut gone = H1::connect(s.addr).await;
    gone.send(b"GET /sleep?ms=5000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    eventually(Duration::from_secs(2), "the request in flight", || {
        s.inflight() == 1 && s.global_inflight() == 1
    })
    .await;
    socket2::SockRef::from(&gone.stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(gone);

    s.assert_settles_to_zero().await;
    eventually(Duration::from_secs(2), "all connections closed", || {
        s.connections() == 0
    })
    .await;
    assert_eq!(s.slot().requests.load(Ordering::Relaxed), 5);
    assert_eq!(s.slot().timeouts.load(Ordering::Relaxed), 1);
}
