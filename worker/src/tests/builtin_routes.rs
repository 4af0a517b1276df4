//! The built-in app's routes, the headers on every response, panics and errors, h2c, and a
//! Unix listener.

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::client::{get, h2_get, H1, H2};
use super::{build, eventually, start, Built, ID, SLOT};

fn worker_id() -> String {
    ID.to_string()
}

#[tokio::test]
async fn hello_world_is_exact_and_names_the_worker() {
    let s = start(50, |_| {});
    let r = get(s.addr, "/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"Hello, World!");
    assert_eq!(r.header("content-length"), Some("13"));
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    assert_eq!(r.header("x-worker-id"), Some(worker_id().as_str()));
    s.assert_settles_to_zero().await;
    assert_eq!(s.slot().requests.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn routes_methods_and_bad_parameters() {
    let s = start(50, |_| {});
    let mut c = H1::connect(s.addr).await;

    let r = c.get("/healthz").await;
    assert_eq!((r.status, r.text()), (200, "ok\n"));

    let r = c.get("/nope").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-worker-id"), Some(worker_id().as_str()));

    c.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
        .await;
    let r = c.reply().await.unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    assert_eq!(r.header("x-worker-id"), Some(worker_id().as_str()));

    let r = c.get("/echo").await;
    assert_eq!((r.status, r.header("allow")), (405, Some("POST")));

    for path in ["/sleep", "/sleep?ms=abc", "/work?ms=-1", "/sleep?ms=600001"] {
        let r = c.get(path).await;
        assert_eq!(r.status, 400, "{path}");
        assert!(r.text().contains("ms"), "{path}: {}", r.text());
        assert_eq!(r.text().lines().count(), 1, "one-line reason");
        assert_eq!(r.header("x-worker-id"), Some(worker_id().as_str()));
    }

    let r = c.get("/sleep?x=1&ms=20").await;
    assert_eq!(r.status, 200);
    let r = c.get("/work?ms=5").await;
    assert_eq!(r.status, 200);

    // HEAD gets the headers of GET and no body (the connection stays usable afterwards).
    c.send(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n").await;
    let (status, headers) = c.head().await.unwrap();
    assert_eq!(status, 200);
    assert!(headers
        .iter()
        .any(|(n, v)| n == "content-length" && v == "13"));
    assert_eq!(c.get("/").await.body, b"Hello, World!");
}

#[tokio::test]
async fn echo_returns_the_body() {
    let s = start(50, |_| {});
    let mut c = H1::connect(s.addr).await;
    c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Type: text/x-test\r\nContent-Length: 11\r\n\r\nhello there")
        .await;
    let r = c.reply().await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello there");
    assert_eq!(r.header("content-type"), Some("text/x-test"));
    assert_eq!(r.header("x-worker-id"), Some(worker_id().as_str()));
}

#[tokio::test]
async fn echo_streams_instead_of_buffering() {
    let s = start(50, |_| {});
    let mut c = H1::connect(s.addr).await;
    c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        .await;
    // The first chunk comes back while the request body is still open: nothing is buffered
    // until the end.
    let (status, headers) = c.head().await.unwrap();
    assert_eq!(status, 200);
    assert!(headers.iter().any(|(n, _)| n == "x-worker-id"));
    assert_eq!(c.chunk().await.unwrap(), b"first");
    assert_eq!(s.inflight(), 1, "the permit is held while the body streams");

    c.send(b"6\r\nsecond\r\n0\r\n\r\n").await;
    assert_eq!(c.chunk().await.unwrap(), b"second");
    assert_eq!(c.chunk().await.unwrap(), b"");
    s.assert_settles_to_zero().await;
}

#[tokio::test]
async fn panic_and_error_become_500_and_the_worker_keeps_serving() {
    let s = start(50, |_| {});
    let mut c = H1::connect(s.addr).await;
    for path in ["/panic", "/error"] {
        let r = c.get(path).await;
        assert_eq!(r.status, 500, "{path}");
        assert_eq!(r.header("x-worker-id"), Some(worker_id().as_str()));
    }
    // Same connection, same process: still serving.
    assert_eq!(c.get("/").await.status, 200);
    s.assert_settles_to_zero().await;
    assert_eq!(s.slot().requests.load(Ordering::Relaxed), 3);
}

#[tokio::test]
async fn h2c_prior_knowledge() {
    let s = start(50, |_| {});
    let mut h2 = H2::connect(s.addr).await;
    let (head, body) = h2.send(h2_get("/")).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.version, hyper::Version::HTTP_2);
    assert_eq!(&body[..], b"Hello, World!");
    assert_eq!(head.headers["x-worker-id"], worker_id().as_str());

    let req = hyper::Request::post("http://test/echo")
        .body(Full::new(Bytes::from_static(b"over h2")))
        .unwrap();
    let (head, body) = h2.send(req).await;
    assert_eq!((head.status.as_u16(), &body[..]), (200, &b"over h2"[..]));
    s.assert_settles_to_zero().await;
}

#[tokio::test]
async fn serves_on_an_inherited_unix_socket() {
    let dir = std::env::temp_dir().join(format!("worker-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("unix.sock");
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let Built {
        view,
        server: _server,
        ..
    } = build(OwnedFd::from(listener), 50, |_| {});

    let stream = tokio::net::UnixStream::connect(&path).await.unwrap();
    let mut c = H1::new(stream);
    let r = c.get("/").await;
    assert_eq!((r.status, &r.body[..]), (200, &b"Hello, World!"[..]));
    eventually(Duration::from_secs(1), "request counted", || {
        view.slot(SLOT).requests.load(Ordering::Relaxed) == 1
    })
    .await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn refuses_sockets_that_are_not_listening_streams() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _g = rt.enter();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    assert!(crate::listener::Listener::from_fd(OwnedFd::from(udp), 16).is_err());
    let unbound = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let err = crate::listener::Listener::from_fd(OwnedFd::from(unbound), 16).unwrap_err();
    assert!(err.to_string().contains("not listening"), "{err}");
}

#[test]
fn a_bound_socket_that_is_not_listening_yet_is_made_to_listen() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _g = rt.enter();
    let bound = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    bound
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
    let addr = bound.local_addr().unwrap().as_socket().unwrap();
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "nothing listens yet"
    );
    let _l = crate::listener::Listener::from_fd(OwnedFd::from(bound), 16).unwrap();
    std::net::TcpStream::connect(addr).expect("listening once wrapped");
}

#[tokio::test]
async fn work_spins_off_the_event_loop_and_stops_with_its_request() {
    let s = start(50, |c| {
        c.worker.request_timeout = Duration::from_millis(300)
    });
    let mut slow = H1::connect(s.addr).await;
    slow.send(b"GET /work?ms=60000 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await;
    let spinning = || s.worker.app.spinning.load(Ordering::Relaxed);
    eventually(Duration::from_secs(5), "the spin to start", || {
        spinning() == 1
    })
    .await;
    // The loop is free while the spin runs: another request is answered meanwhile.
    let r = get(s.addr, "/").await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"Hello, World!"[..]));
    assert_eq!(spinning(), 1, "the spin outlived the fast request");
    // Past request_timeout the request gets 504, and its spin stops rather than burning
    // the remaining minute for nobody.
    let r = slow.reply().await.unwrap();
    assert_eq!(r.status, 504);
    eventually(Duration::from_secs(5), "the spin to stop", || {
        spinning() == 0
    })
    .await;
    s.assert_settles_to_zero().await;

    // `inline=1` spins on the event loop itself, and answers all the same.
    let r = get(s.addr, "/work?ms=5&inline=1").await;
    assert_eq!((r.status, r.text()), (200, "worked\n"));
}

#[tokio::test]
async fn h2_requests_with_more_than_max_headers_get_431() {
    let s = start(50, |c| c.worker.max_headers = 20);
    let mut h2 = H2::connect(s.addr).await;
    let mut req = h2_get("/");
    for i in 0..25 {
        req.headers_mut().insert(
            hyper::header::HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
            hyper::header::HeaderValue::from_static("a"),
        );
    }
    let (head, body) = h2.send(req).await;
    assert_eq!(head.status, 431, "{body:?}");
    assert!(String::from_utf8_lossy(&body).contains("worker.max_headers"));
    // Within the limit: served.
    let (head, _) = h2.send(h2_get("/")).await;
    assert_eq!(head.status, 200);
    s.assert_settles_to_zero().await;
}

/// An HTTP/2 connection whose streams get no flow-control window: response heads come, bodies
/// never can. The connection's task is returned to watch it end.
async fn h2_granting_no_window(
    addr: std::net::SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(0)
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    (sender, tokio::spawn(conn))
}

#[tokio::test]
async fn an_h2_client_that_grants_no_window_does_not_hold_a_permit() {
    // One host-wide permit. The client's streams get no flow-control window: a response's
    // head goes out, its body never can.
    let s = start(1, |_| {});
    let (mut sender, _conn) = h2_granting_no_window(s.addr).await;
    let mut heads = Vec::new();
    for _ in 0..3 {
        let res = tokio::time::timeout(Duration::from_secs(5), sender.send_request(h2_get("/")))
            .await
            .expect("a response head")
            .unwrap();
        assert_eq!(res.status(), 200);
        heads.push(res); // bodies left unread, and unsendable
    }
    // Their permits are back: another client is served.
    s.assert_settles_to_zero().await;
    assert_eq!(get(s.addr, "/").await.status, 200);
}

#[tokio::test]
async fn an_h2_client_that_grants_a_streamed_response_no_window_is_cut_off() {
    // `/echo` streams: its permit is held until the body is sent, which a client that grants
    // no flow-control window never lets happen. Past client_timeout the connection is cut.
    let s = start(1, |c| {
        c.worker.client_timeout = Duration::from_millis(300);
        c.worker.keepalive_timeout = Duration::from_millis(300);
    });
    let (mut sender, conn) = h2_granting_no_window(s.addr).await;
    let req = hyper::Request::post("http://test/echo")
        .body(Full::new(Bytes::from_static(b"stuck")))
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
        .await
        .expect("a response head")
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        get(s.addr, "/").await.status,
        503,
        "the echo holds the permit"
    );
    s.assert_settles_to_zero().await;
    assert_eq!(get(s.addr, "/").await.status, 200);
    // The connection itself was closed.
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "the stuck connection is still open");
}
