//! Test clients: a raw HTTP/1.1 client over TCP (so tests control every byte and can see exactly
//! when the server closes), and an h2c prior-knowledge client on hyper.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Longest a client waits for any single read or write: a broken feature fails a test instead
/// of hanging it.
pub(crate) const IO_LIMIT: Duration = Duration::from_secs(5);

/// One parsed HTTP/1.x response.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Reply {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("utf-8 body")
    }
}

/// A raw HTTP/1.1 connection.
pub(crate) struct H1<S = TcpStream> {
    pub(crate) stream: S,
    buf: Vec<u8>,
}

impl H1<TcpStream> {
    pub(crate) async fn connect(addr: SocketAddr) -> H1 {
        let tcp = tokio::time::timeout(IO_LIMIT, TcpStream::connect(addr)).await;
        H1::new(tcp.expect("connect timed out").expect("connect"))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> H1<S> {
    pub(crate) fn new(stream: S) -> H1<S> {
        H1 {
            stream,
            buf: Vec::new(),
        }
    }

    pub(crate) async fn send(&mut self, raw: &[u8]) {
        tokio::time::timeout(IO_LIMIT, self.stream.write_all(raw))
            .await
            .expect("send timed out")
            .expect("send");
    }

    /// Sends `GET path` on this connection and reads the reply.
    pub(crate) async fn get(&mut self, path: &str) -> Reply {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
            .await;
        self.reply().await.expect("reply")
    }

    /// More bytes from the server; `Ok(0)` at EOF.
    async fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(IO_LIMIT, self.stream.read(&mut chunk))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no response"))??;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    async fn need(&mut self, n: usize) -> io::Result<()> {
        while self.buf.len() < n {
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    async fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8(self.buf[..i].to_vec()).expect("utf-8 line");
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Reads one complete response; an error if the connection ends before it is complete.
    pub(crate) async fn reply(&mut self) -> io::Result<Reply> {
        let status_line = self.line().await?;
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = self.line().await?;
            if line.is_empty() {
                break;
            }
            let (n, v) = line.split_once(':').expect("header line");
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
        let mut reply = Reply {
            status,
            headers,
            body: Vec::new(),
        };
        if let Some(len) = reply.header("content-length") {
            let len: usize = len.parse().expect("content-length");
            self.need(len).await?;
            reply.body = self.buf.drain(..len).collect();
        } else if reply.header("transfer-encoding") == Some("chunked") {
            loop {
                let size = usize::from_str_radix(self.line().await?.trim(), 16).expect("chunk");
                self.need(size + 2).await?;
                reply.body.extend(self.buf.drain(..size));
                self.buf.drain(..2);
                if size == 0 {
                    break;
                }
            }
        }
        Ok(reply)
    }

    /// Reads one chunk of a chunked body (after `reply_head`-style manual reading).
    pub(crate) async fn chunk(&mut self) -> io::Result<Vec<u8>> {
        let size = usize::from_str_radix(self.line().await?.trim(), 16).expect("chunk size");
        self.need(size + 2).await?;
        let data = self.buf.drain(..size).collect();
        self.buf.drain(..2);
        Ok(data)
    }

    /// Reads a response head only (status and headers), leaving the body unread.
    pub(crate) async fn head(&mut self) -> io::Result<(u16, Vec<(String, String)>)> {
        let status_line = self.line().await?;
        let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut headers = Vec::new();
        loop {
            let line = self.line().await?;
            if line.is_empty() {
                return Ok((status, headers));
            }
            let (n, v) = line.split_once(':').unwrap();
            headers.push((n.trim().to_lowercase(), v.trim().to_string()));
        }
    }

    /// Waits (at most `limit`) for the server to close the connection, ignoring nothing: any
    /// byte received first is a test failure. Returns how long it took.
    pub(crate) async fn closed_within(&mut self, limit: Duration) -> Duration {
        let start = Instant::now();
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(limit, self.stream.read(&mut chunk)).await {
            Ok(Ok(0)) => start.elapsed(),
            // A reset is a close too (the server may close with unread input).
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => start.elapsed(),
            Ok(Ok(n)) => panic!(
                "expected close, got {:?}",
                String::from_utf8_lossy(&chunk[..n])
            ),
            Ok(Err(e)) => panic!("expected close, got error {e}"),
            Err(_) => panic!("connection still open after {limit:?}"),
        }
    }

    /// True if nothing arrives and the connection stays open for `d`.
    pub(crate) async fn quiet_for(&mut self, d: Duration) -> bool {
        let mut chunk = [0u8; 1];
        tokio::time::timeout(d, self.stream.read(&mut chunk))
            .await
            .is_err()
    }
}

/// One-shot `GET path` on a fresh connection.
pub(crate) async fn get(addr: SocketAddr, path: &str) -> Reply {
    H1::connect(addr).await.get(path).await
}

/// An HTTP/2 (prior knowledge, cleartext) connection.
pub(crate) struct H2 {
    pub(crate) sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    pub(crate) conn: tokio::task::JoinHandle<hyper::Result<()>>,
}

impl H2 {
    pub(crate) async fn connect(addr: SocketAddr) -> H2 {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("h2 handshake");
        H2 {
            sender,
            conn: tokio::spawn(conn),
        }
    }

    /// Sends a request and collects the whole response.
    pub(crate) async fn send(
        &mut self,
        req: hyper::Request<Full<Bytes>>,
    ) -> (hyper::http::response::Parts, Bytes) {
        let exchange = async {
            self.sender.ready().await.expect("h2 ready");
            let res = self.sender.send_request(req).await.expect("h2 response");
            let (parts, body) = res.into_parts();
            (parts, body.collect().await.expect("h2 body").to_bytes())
        };
        tokio::time::timeout(IO_LIMIT, exchange)
            .await
            .expect("h2 exchange timed out")
    }
}

pub(crate) fn h2_get(path: &str) -> hyper::Request<Full<Bytes>> {
    hyper::Request::get(format!("http://test{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}
