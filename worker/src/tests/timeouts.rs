//! Request timeout (504), slow request heads (slowloris) and idle keep-alive connections.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::client::{get, H1};
use super::{start, ID};

#[tokio::test]
async fn request_timeout_answers_504_and_releases_the_permits() {
    let s = start(50, |c| {
        c.worker.request_timeout = Duration::from_millis(200)
    });
    let started = Instant::now();
    let r = get(s.addr, "/sleep?ms=5000").await;
    let took = started.elapsed();
    assert_eq!(r.status, 504);
    assert!(r.text().contains("worker.request_timeout"), "{}", r.text());
    assert!(r.text().contains("200ms"), "{}", r.text());
    assert_eq!(r.text().lines().count(), 1);
    assert_eq!(r.header("x-worker-id"), Some(ID.to_string().as_str()));
    assert!(took >= Duration::from_millis(200), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(s.slot().timeouts.load(Ordering::Relaxed), 1);
    s.assert_settles_to_zero().await;

    // A fast request on the same worker is not affected.
    assert_eq!(get(s.addr, "/sleep?ms=10").await.status, 200);
    assert_eq!(s.slot().timeouts.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn slow_head_is_cut_after_header_timeout_while_others_are_served() {
    let s = start(50, |c| {
        c.worker.header_timeout = Duration::from_millis(300);
        c.worker.keepalive_timeout = Duration::from_secs(30);
    });
    let mut slow = H1::connect(s.addr).await;
    let started = Instant::now();
    slow.send(b"GET / HTTP/1.1\r\nHost: t\r\n").await;

    // Meanwhile another client is served normally, several times.
    let mut other = H1::connect(s.addr).await;
    for _ in 0..3 {
        assert_eq!(other.get("/").await.status, 200);
    }

    // The slow client keeps trickling header bytes; that does not save it.
    let mut cut = false;
    for i in 0..30 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let line = format!("X-{i}: v\r\n");
        if tokio::io::AsyncWriteExt::write_all(&mut slow.stream, line.as_bytes())
            .await
            .is_err()
        {
            cut = true;
            break;
        }
        if started.elapsed() > Duration::from_millis(600) {
            break;
        }
    }
    if !cut {
        slow.closed_within(Duration::from_secs(2)).await;
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "cut too early: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    // The worker still serves. (Not on `other`: it has been idle for longer than
    // header_timeout by now, and any byte it sent would count as a late head.)
    assert_eq!(get(s.addr, "/").await.status, 200);
}

#[tokio::test]
async fn idle_keepalive_connection_is_closed_after_keepalive_timeout() {
    let s = start(50, |c| {
        c.worker.keepalive_timeout = Duration::from_millis(300);
        c.worker.header_timeout = Duration::from_secs(30);
    });
    let mut c = H1::connect(s.addr).await;

    // Requests closer together than the timeout keep the connection open well past it.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(700) {
        assert_eq!(c.get("/").await.status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    assert_eq!(c.get("/").await.status, 200);
    let idle = c.closed_within(Duration::from_secs(3)).await;
    assert!(
        idle >= Duration::from_millis(250),
        "closed too early: {idle:?}"
    );
    assert!(idle < Duration::from_secs(2), "{idle:?}");
    assert_eq!(s.connections(), 0);
}

#[tokio::test]
async fn silent_connection_is_closed_after_keepalive_timeout() {
    // A client that never sends a byte is bounded by the keep-alive timer alone.
    let s = start(50, |c| {
        c.worker.keepalive_timeout = Duration::from_millis(300);
        c.worker.header_timeout = Duration::from_secs(30);
    });
    let mut c = H1::connect(s.addr).await;
    let took = c.closed_within(Duration::from_secs(3)).await;
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[tokio::test]
async fn long_request_is_not_cut_by_keepalive_timeout() {
    let s = start(50, |c| {
        c.worker.keepalive_timeout = Duration::from_millis(200);
        c.worker.header_timeout = Duration::from_secs(30);
    });
    let mut c = H1::connect(s.addr).await;
    // Busy for longer than the keep-alive timeout: not idle, not closed.
    assert_eq!(c.get("/sleep?ms=500").await.status, 200);
    // And idle from the end of that request.
    let idle = c.closed_within(Duration::from_secs(3)).await;
    assert!(idle >= Duration::from_millis(150), "{idle:?}");
    assert!(idle < Duration::from_secs(2), "{idle:?}");
    drop(s);
}

#[tokio::test]
async fn slow_http2_preface_is_cut_after_header_timeout() {
    // While the connection's protocol is still unknown (the first 24 bytes may be HTTP/2's
    // preface), hyper's header timer is not running; the connection's own timer cuts it.
    let s = start(50, |c| {
        c.worker.header_timeout = Duration::from_millis(300);
        c.worker.keepalive_timeout = Duration::from_secs(30);
    });
    let mut slow = H1::connect(s.addr).await;
    let started = Instant::now();
    let mut cut = false;
    for b in b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r".iter() {
        let write = tokio::io::AsyncWriteExt::write_all(&mut slow.stream, &[*b]).await;
        if write.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if started.elapsed() > Duration::from_millis(600) {
            break;
        }
    }
    if !cut {
        slow.closed_within(Duration::from_secs(2)).await;
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "cut too early: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(get(s.addr, "/").await.status, 200);
}

#[tokio::test]
async fn a_stalled_request_body_is_cut_after_client_timeout_and_frees_its_permit() {
    // One host-wide permit: while the stalled request holds it, everyone else gets 503.
    let s = start(1, |c| {
        c.worker.client_timeout = Duration::from_millis(300);
    });
    let mut stalled = H1::connect(s.addr).await;
    stalled
        .send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789")
        .await;
    super::eventually(Duration::from_secs(3), "the upload admitted", || {
        s.inflight() == 1
    })
    .await;
    assert_eq!(get(s.addr, "/").await.status, 503, "the permit is held");
    // 90 bytes never come: past client_timeout the request ends and the connection is cut.
    s.assert_settles_to_zero().await;
    assert_eq!(get(s.addr, "/").await.status, 200);
    // Its connection is closed (at EOF, or reset for its unread input), not left open.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::io::AsyncReadExt::read_to_end(&mut stalled.stream, &mut rest),
    )
    .await;
    assert!(closed.is_ok(), "the stalled connection is still open");
}

#[tokio::test]
async fn a_client_that_reads_nothing_is_cut_after_client_timeout() {
    let s = start(1, |c| {
        c.worker.client_timeout = Duration::from_millis(300);
    });
    // A small receive window, and a body echoed back that is far larger than every buffer on
    // the way: the worker's writes block once they are full.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(s.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let body = vec![b'x'; 9 * 1024 * 1024];
    let upload = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let head = format!(
            "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        wr.write_all(head.as_bytes()).await?;
        // Stops when the worker cuts the connection (or, failing the test, never).
        wr.write_all(&body).await?;
        std::io::Result::Ok(wr)
    });
    super::eventually(Duration::from_secs(3), "the echo admitted", || {
        s.inflight() == 1
    })
    .await;
    // The client never reads: once the worker's writes have been blocked for client_timeout,
    // the connection is cut and the permit comes back.
    s.assert_settles_to_zero().await;
    assert_eq!(get(s.addr, "/").await.status, 200);
    let mut chunk = vec![0u8; 64 * 1024];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match tokio::io::AsyncReadExt::read(&mut rd, &mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection was not closed");
    let _ = tokio::time::timeout(Duration::from_secs(5), upload).await;
}
