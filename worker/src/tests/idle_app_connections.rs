//! The idle connections to the app (`conn_pool`) against a real app on a Unix socket, written
//! here so that the test sees every connection it opens and every one that closes.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use hyper::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

use super::eventually;
use crate::app::conn_pool::{ConnPool, Exchange, Outgoing, Pooled};
use crate::config::Upstream;

/// An app that answers every request on a connection with `200 ok`, and closes the connection
/// after its first answer when `close_after_answer` (as uvicorn does after an exception).
struct App {
    dir: PathBuf,
    socket: PathBuf,
    opened: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

impl App {
    fn start(name: &str, close_after_answer: bool) -> App {
        let dir =
            std::env::temp_dir().join(format!("worker-conn-pool-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("app.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let opened = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (o, c) = (Arc::clone(&opened), Arc::clone(&closed));
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                o.fetch_add(1, Ordering::SeqCst);
                let c = Arc::clone(&c);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        // Requests without a body: each ends with an empty line.
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if conn.write_all(answer).await.is_err() {
                                break;
                            }
                            if close_after_answer {
                                drop(conn);
                                c.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                        }
                    }
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        App {
            dir,
            socket,
            opened,
            closed,
        }
    }

    fn target(&self) -> Arc<Upstream> {
        Arc::new(Upstream::Unix(self.socket.clone()))
    }

    fn opened(&self) -> usize {
        self.opened.load(Ordering::SeqCst)
    }

    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn get() -> Request<Outgoing> {
    Request::builder()
        .uri("/")
        .header("host", "app")
        .body(Either::Right(Full::new(Bytes::new())))
        .unwrap()
}

/// Sends a GET for `key` and reads its answer to the end: the connection it came on.
async fn answered(pool: &'static ConnPool, key: u64, app: &App) -> Pooled {
    let target = app.target();
    match pool.send(key, move || target, get()).await {
        Exchange::Answered(res, conn) => {
            assert_eq!(res.status(), 200);
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
            conn
        }
        Exchange::NotSent(_, e) => panic!("not sent: {e}"),
        Exchange::Failed(e) => panic!("failed: {e}"),
    }
}

fn pool(idle: Duration) -> &'static ConnPool {
    Box::leak(Box::new(ConnPool::new(idle)))
}

#[tokio::test]
async fn a_connection_given_back_is_reused_and_one_in_use_is_not() {
    let app = App::start("reuse", false);
    let pool = pool(Duration::from_secs(60));
    let first = answered(pool, 1, &app).await;
    // The first is still out (its response not given back): a second connection.
    let second = answered(pool, 1, &app).await;
    assert_eq!(app.opened(), 2);
    first.give_back();
    second.give_back();
    for _ in 0..5 {
        answered(pool, 1, &app).await.give_back();
    }
    assert_eq!(
        app.opened(),
        2,
        "the connections given back were used again"
    );
    // Another app process (key) never gets this one's connections.
    answered(pool, 2, &app).await.give_back();
    assert_eq!(app.opened(), 3);
}

#[tokio::test]
async fn a_connection_idle_past_the_idle_time_is_closed_and_not_used() {
    let app = App::start("idle", false);
    let pool = pool(Duration::from_millis(50));
    answered(pool, 1, &app).await.give_back();
    assert_eq!(app.opened(), 1);
    // Closed by the pool, with no request to trigger it.
    eventually(
        Duration::from_secs(5),
        "the pool to close the idle connection",
        || app.closed() == 1,
    )
    .await;
    answered(pool, 1, &app).await.give_back();
    assert_eq!(app.opened(), 2, "a new connection, not the expired one");
}

#[tokio::test]
async fn a_connection_the_app_closed_while_idle_is_not_used() {
    let app = App::start("closed", true);
    let pool = pool(Duration::from_secs(60));
    let conn = answered(pool, 1, &app).await;
    eventually(Duration::from_secs(5), "the app to close", || {
        app.closed() == 1
    })
    .await;
    conn.give_back();
    // The request goes out on a new connection, whatever its method.
    answered(pool, 1, &app).await.give_back();
    assert_eq!(app.opened(), 2);
}

#[tokio::test]
async fn a_request_that_could_not_connect_comes_back_unsent() {
    let pool = pool(Duration::from_secs(60));
    let dir = std::env::temp_dir().join(format!("worker-conn-pool-none-{}", std::process::id()));
    let target = Arc::new(Upstream::Unix(dir.join("nobody-listens.sock")));
    match pool.send(1, move || target, get()).await {
        Exchange::NotSent(req, e) => {
            assert_eq!(req.uri(), "/");
            let io = e.downcast_ref::<std::io::Error>().expect("an io error");
            assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
        }
        Exchange::Answered(..) => panic!("answered by nobody"),
        Exchange::Failed(e) => panic!("failed, not unsent: {e}"),
    }
}
