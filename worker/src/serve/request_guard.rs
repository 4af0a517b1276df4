//! What a request holds until its response is sent, and what carries it there.
//!
//! Owns `RequestGuard` (the request's permits, its entry in the scoreboard, its counts and its
//! access-log line, all given back or written when it drops), `Guarded` (the body hyper sends:
//! the response's `response::Body` with the guard beside it, so that the permits live exactly
//! as long as the response) and `Exchange` (a request to the app, which outlives its client).
//! A request whose client leaves while the app still answers keeps its permits until the app is
//! done: `Exchange` finishes the wait for the answer, `Guarded::discard` reads the rest of the
//! app's body, each on a task of its own that only such a request pays for; it then counts as
//! 499.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use hyper::Response;
use tracing::{debug, info};

use crate::http::activity::ActivityGuard;
use crate::http::response::{Body, BoxError};
use crate::limits::admission::Permits;
use crate::limits::cluster::Lease;
use crate::protocol;
use crate::serve::access_log;
use crate::serve::state::Worker;
use crate::shm::ratelimit::Decision;
use crate::shm::scoreboard::{Slot, SlotState};

/// Everything one request holds while it is served. It travels inside the response body, so it
/// lives until hyper has finished sending the response or has given up on it (client gone); if
/// no response is produced (the connection dropped mid-handler), it dies with the handler. A
/// request to the app is the exception: whatever the client does, it lives until the app has
/// finished with the request (`Exchange`, `Guarded::discard`), and then counts as 499.
pub(crate) struct RequestGuard {
    pub(crate) worker: &'static Worker,
    /// HTTP/1.x: a draining worker ends the connection after this response.
    pub(crate) http1: bool,
    pub(crate) admitted: Option<Admitted>,
    /// A health check's place past the limits (`limits.health_paths`).
    pub(crate) _health: Option<crate::serve::health::HealthPermit>,
    /// What `limits.rate` said, for the response's `RateLimit` header.
    pub(crate) rate: Option<Decision>,
    /// When the request arrived, for its duration, when something shows it (metrics, access
    /// log): otherwise the clock is not read.
    pub(crate) started: Option<Instant>,
    /// The response's status once there is one (`finish`); 0 while there is none.
    pub(crate) status: u16,
    /// Body bytes handed to hyper so far (`response::Body` counts them).
    pub(crate) bytes: u64,
    /// The access log's view of the request, when `log.access` is on.
    pub(crate) access: Option<Box<access_log::Entry>>,
    pub(crate) _activity: ActivityGuard,
}

impl RequestGuard {
    /// The connection's activity, for the response body's part in it.
    pub(crate) fn activity(&self) -> &ActivityGuard {
        &self._activity
    }

    pub(crate) fn worker(&self) -> &'static Worker {
        self.worker
    }

    /// The client left before its response was sent: the request is logged and counted as
    /// 499 (nginx's "client closed request") when it ends, which is when the app is done.
    pub(crate) fn client_gone(&mut self) {
        debug!("the client left; its request is finished with the app before the permits go");
        self.status = crate::http::response::CLIENT_GONE;
        self.worker
            .admission
            .slot()
            .client_gone
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// What an admitted request holds until it is answered, fails or is abandoned: its permits and
/// its entry in the scoreboard's list of requests in flight.
pub(crate) struct Admitted {
    pub(crate) _described: Option<InFlight>,
    pub(crate) _permits: Permits<'static>,
    /// The cluster-wide permit, when `limits.cluster_max_concurrent_requests` is set and Redis
    /// answered.
    pub(crate) lease: Option<Lease>,
}

/// The request's `METHOD /path?query` entry in this worker's scoreboard record, cleared on drop.
/// `None` in `Admitted` when every entry is taken: the request is served, just not described.
pub(crate) struct InFlight {
    pub(crate) slot: &'static Slot,
    pub(crate) index: usize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.slot.end_request(self.index);
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        // `requests` counts every request that ended, whatever its status. The fields drop
        // right after this, releasing the permits.
        let done = self
            .worker
            .admission
            .slot()
            .requests
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        // Equality, not `>=`: the counter only grows, so this is true for exactly one request,
        // and never when `max_requests` is 0.
        if done == self.worker.prepare_at {
            tell_master(self.worker, done, protocol::MAX_REQUESTS_SOON);
        }
        if done == self.worker.max_requests {
            tell_master(self.worker, done, protocol::MAX_REQUESTS);
        }
        // A request that never got a response (the client left first) has no status to count
        // or log.
        if self.status != 0 {
            // The permits are not needed for the bookkeeping below.
            self.admitted = None;
            let took = self.started.map(|s| s.elapsed());
            self.worker
                .admission
                .slot()
                .record_response(self.status, took.map(|t| t.as_micros() as u64));
            if let (Some(entry), Some(log)) = (&self.access, self.worker.access.get()) {
                log.write(entry, self.status, self.bytes, took.unwrap_or_default());
            }
        }
    }
}

/// This worker nears or has reached `worker.max_requests` completed requests: it tells the
/// master (which prepares, then switches to, a replacement) and keeps serving until the master
/// drains it. A worker already draining is on its way out and says nothing.
#[cold]
fn tell_master(worker: &'static Worker, done: u64, message: u8) {
    if worker.admission.slot().state() == SlotState::Draining {
        debug!(
            requests.total = done,
            "near or at worker.max_requests while draining; not asking for a replacement"
        );
        return;
    }
    if message == protocol::MAX_REQUESTS {
        info!(
            requests.total = done,
            "reached worker.max_requests; the replacement takes over once ready"
        );
    } else {
        debug!(
            requests.total = done,
            "nearing worker.max_requests; asking the master to prepare a replacement"
        );
    }
    if let Err(e) = worker.master.send(message) {
        debug!(error = %e, "cannot tell the master about worker.max_requests");
    }
}

/// The body hyper sends: the response's body, with the request's guard beside it until hyper
/// is done with the body (fully sent, or the client went away).
pub(crate) struct Guarded {
    body: Body,
    /// Dropped when hyper is done with the body: that is what releases the request's permits.
    guard: Option<RequestGuard>,
    /// A streamed body handed hyper a frame and has not been asked for the next one yet (see
    /// `activity::Activity::unclaimed`).
    out: bool,
}

impl Guarded {
    pub(crate) fn new(body: Body, guard: RequestGuard) -> Guarded {
        Guarded {
            body,
            guard: Some(guard),
            out: false,
        }
    }

    /// Notes a streamed frame handed out (`true`) or the next one asked for (`false`).
    fn frame_out(&mut self, out: bool) {
        if self.out != out {
            self.out = out;
            if let Some(guard) = &self.guard {
                guard.activity().frame_out(out);
            }
        }
    }

    /// The response of a request whose client left (see `discard`).
    pub(crate) fn discard(mut self) -> impl Future<Output = ()> + Send {
        let body = std::mem::replace(&mut self.body, Body::empty());
        let guard = self.guard.take();
        async move {
            if let Some(guard) = guard {
                discard(body, guard).await;
            }
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.frame_out(false);
        // hyper gave up on the app's response before its end: the client is gone. The app is
        // still sending it, so the rest is read (and discarded) before the permits go back.
        if !self.body.is_unfinished_app_body() {
            return;
        }
        if let (Some(guard), Ok(runtime)) =
            (self.guard.take(), tokio::runtime::Handle::try_current())
        {
            let body = std::mem::replace(&mut self.body, Body::empty());
            // A draining worker waits for it (up to `server.graceful_timeout`).
            let hold = guard.worker().drain_watch.get().map(|tx| tx.subscribe());
            // What is spawned has no `Drop` of its own: a runtime that is shutting down
            // drops it unpolled without spawning again.
            runtime.spawn(async move {
                discard(body, guard).await;
                drop(hold);
            });
        }
    }
}

/// The response of a request whose client left: the request is counted and logged as 499, and
/// the rest of the app's response is read and discarded, within `worker.request_timeout` (past
/// it, `app.kill_on_timeout` applies), so that the request keeps its permits (the guard's, and
/// the app slot in `body`) until the app has finished with it.
async fn discard(mut body: Body, mut guard: RequestGuard) {
    guard.client_gone();
    let worker = guard.worker();
    if let Err(ticket) = body.discard_app_body(worker.limits.request_timeout).await {
        tracing::warn!(
            "the app was still sending the response of a client that left after \
             worker.request_timeout; connection to the app dropped"
        );
        if let Some(proxy) = worker.proxy.get() {
            proxy.timed_out(worker, ticket);
        }
    }
}

impl hyper::body::Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        this.frame_out(false);
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(frame))), Some(guard)) = (&polled, this.guard.as_mut()) {
            if let Some(data) = frame.data_ref() {
                guard.bytes += data.len() as u64;
            }
        }
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            // Done (or failed): release the permits now rather than whenever hyper drops us.
            this.guard = None;
        } else if matches!(polled, Poll::Ready(Some(Ok(_)))) && !this.body.is_complete() {
            this.frame_out(true);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A proxied request's answer, which outlives its client: dropped before it completes (hyper
/// drops it when the client leaves), the rest runs on in a task of its own with the request's
/// permits, until the app has answered; the answer is then discarded (see `Guarded::discard`).
/// Only a request whose client leaves pays for the task.
pub(crate) struct Exchange {
    answer: Option<Pin<Box<dyn Future<Output = Response<Guarded>> + Send>>>,
    worker: &'static Worker,
}

impl Exchange {
    pub(crate) fn new(
        worker: &'static Worker,
        answer: Pin<Box<dyn Future<Output = Response<Guarded>> + Send>>,
    ) -> Exchange {
        Exchange {
            answer: Some(answer),
            worker,
        }
    }
}

impl Future for Exchange {
    type Output = Response<Guarded>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Response<Guarded>> {
        let this = self.get_mut();
        let answer = this.answer.as_mut().expect("polled after completion");
        let res = std::task::ready!(answer.as_mut().poll(cx));
        this.answer = None;
        Poll::Ready(res)
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let Some(rest) = self.answer.take() else {
            return;
        };
        // Outside a runtime (it is shutting down) there is nothing left to finish it on.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // A draining worker waits for it (up to `server.graceful_timeout`) like for a
            // connection: its permits are the app's work.
            let hold = self.worker.drain_watch.get().map(|tx| tx.subscribe());
            runtime.spawn(async move {
                rest.await.into_body().discard().await;
                drop(hold);
            });
        }
    }
}
