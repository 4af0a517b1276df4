//! Idle HTTP/1.1 connections to the app, kept for the next request to the same app process (or
//! upstream) and driven by hyper's client connection API.
//!
//! Why not hyper-util's pooled client (used before): it keys its pool by the request URI's
//! scheme and authority, so every request had its URI rebuilt with an authority naming the app
//! process, formatted as a string and parsed back; and a response whose body was still to be
//! read when its head arrived (every response: the head and the body come apart) spawned a task
//! of its own only to wait for the connection to become idle again and put it back. That was a
//! string, a parse, a pool lookup by string and a task per request on the one CPU the app needs.
//! Here a connection is looked up by a number (the app process's ticket, see
//! `pool::AppLease::ticket`; 0 for `app.upstream`) and goes back by the code that read its
//! response to the end, with no task in between.
//!
//! A connection is reused last in, first out, so the fewest stay open, and only while idle for
//! less than the idle time given (shorter than app servers' own keep-alive timeouts, so the
//! worker never sends into a connection the app is closing). A connection that the app closed
//! while idle gives its request back unsent (`Exchange::NotSent`), whatever its method.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tracing::debug;

use crate::app::appconn::AppStream;
use crate::config::Upstream;
use crate::http::client_body::{BoxError, ClientBody};
use crate::shm::scoreboard::coarse_monotonic_ms;

/// A request's body on its way to the app: streamed from the client, or whole (none, read
/// whole by `app.buffer_requests`, or kept to be sent again).
pub(crate) type Outgoing = Either<ClientBody<Limited<Incoming>>, Full<Bytes>>;

/// The idle connections of one HTTP worker, by app process.
pub(crate) struct ConnPool {
    idle: Mutex<HashMap<u64, Vec<Idle>>>,
    /// How long a connection may stay idle and still be used.
    idle_ms: u64,
    /// Whether the task that closes the connections idle for too long runs (started with the
    /// first connection given back, on the worker's runtime).
    sweeping: AtomicBool,
}

struct Idle {
    sender: SendRequest<Outgoing>,
    /// When it was given back (coarse ms).
    since_ms: u64,
}

/// A connection taken from the pool or made for a request: given back with `give_back` once the
/// response has been read to its end; dropped otherwise (hyper then closes it).
pub(crate) struct Pooled {
    sender: SendRequest<Outgoing>,
    key: u64,
    home: &'static ConnPool,
}

/// How sending a request to the app ended.
pub(crate) enum Exchange {
    /// The response's head, and the connection that carries its body.
    Answered(Response<Incoming>, Pooled),
    /// The request never left (the connect failed, or the connection closed first): it can go
    /// elsewhere whatever its method and body.
    NotSent(Box<Request<Outgoing>>, BoxError),
    /// It was sent, or may have been, and no response came.
    Failed(BoxError),
}

impl ConnPool {
    pub(crate) fn new(idle: Duration) -> ConnPool {
        ConnPool {
            idle: Mutex::new(HashMap::new()),
            idle_ms: u64::try_from(idle.as_millis()).unwrap_or(u64::MAX),
            sweeping: AtomicBool::new(false),
        }
    }

    /// Sends `req` on an idle connection to `key`, or on a new one to the target `target` gives
    /// (called only to connect).
    pub(crate) async fn send(
        &'static self,
        key: u64,
        target: impl FnOnce() -> Arc<Upstream>,
        req: Request<Outgoing>,
    ) -> Exchange {
        let mut req = req;
        while let Some(mut conn) = self.checkout(key).await {
            match conn.sender.try_send_request(req).await {
                Ok(res) => return Exchange::Answered(res, conn),
                Err(mut e) => match e.take_message() {
                    // Closed between the checkout and the send: the next one.
                    Some(unsent) => req = unsent,
                    None => return Exchange::Failed(Box::new(e.into_error())),
                },
            }
        }
        let mut conn = match self.connect(key, &target()).await {
            Ok(conn) => conn,
            Err(e) => return Exchange::NotSent(Box::new(req), e),
        };
        match conn.sender.try_send_request(req).await {
            Ok(res) => Exchange::Answered(res, conn),
            Err(mut e) => match e.take_message() {
                Some(unsent) => Exchange::NotSent(Box::new(unsent), Box::new(e.into_error())),
                None => Exchange::Failed(Box::new(e.into_error())),
            },
        }
    }

    /// The most recently used idle connection to `key` that is still open and was idle for
    /// less than the idle time; older and closed ones on the way are dropped.
    async fn checkout(&'static self, key: u64) -> Option<Pooled> {
        loop {
            let idle = {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                let conns = idle.get_mut(&key)?;
                let now = coarse_monotonic_ms();
                conns.retain(|c| !c.sender.is_closed() && !self.expired(c, now));
                conns.pop()?
            };
            let mut sender = idle.sender;
            // Given back the moment its response ended: hyper's connection task may not have
            // asked for the next request yet.
            // Bounded all the same: one that never gets there is not waited for.
            if !sender.is_ready() {
                let wait = Duration::from_millis(self.idle_ms);
                if !matches!(tokio::time::timeout(wait, sender.ready()).await, Ok(Ok(()))) {
                    continue;
                }
            }
            return Some(Pooled {
                sender,
                key,
                home: self,
            });
        }
    }

    /// A new connection to `target`, its connection task running on the worker's runtime (the
    /// task also carries an upgraded connection over to `hyper::upgrade::on`).
    async fn connect(&'static self, key: u64, target: &Upstream) -> Result<Pooled, BoxError> {
        let stream = AppStream::connect(target).await?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake::<_, Outgoing>(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, "connection to the app ended with an error");
            }
        });
        Ok(Pooled {
            sender,
            key,
            home: self,
        })
    }

    fn expired(&self, idle: &Idle, now_ms: u64) -> bool {
        now_ms.saturating_sub(idle.since_ms) >= self.idle_ms
    }

    /// Closes the connections idle for too long or closed by the app, and forgets the app
    /// processes left without any.
    fn sweep(&self) {
        let now = coarse_monotonic_ms();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|_, conns| {
            conns.retain(|c| !c.sender.is_closed() && !self.expired(c, now));
            !conns.is_empty()
        });
    }

    fn start_sweeping(&'static self) {
        if self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let every = Duration::from_millis(self.idle_ms.max(1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                self.sweep();
            }
        });
    }
}

impl Pooled {
    /// Back to the pool, the response having been read to its end; a connection the app
    /// closed (or is closing) is dropped.
    pub(crate) fn give_back(self) {
        if self.sender.is_closed() {
            return;
        }
        let home = self.home;
        home.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(self.key)
            .or_default()
            .push(Idle {
                sender: self.sender,
                since_ms: coarse_monotonic_ms(),
            });
        home.start_sweeping();
    }
}
