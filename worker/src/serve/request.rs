//! The path of one request through the worker, from hyper's service call to a response.
//!
//! Owns the order of the checks (health checks first, past the rest: see `health`; then the
//! client's rate in the host's table -> body size by
//! `Content-Length` -> worker limit -> host-wide limit, waiting in the queue if there is one ->
//! Redis: the client's rate and the cluster-wide cap), the description of each admitted request
//! in the scoreboard (so that the master can tell what a hung worker was doing), the request
//! timeout, turning a handler error or panic into a 500, the headers every one of our responses
//! carries (`X-Worker-Id`), and counting completed requests (asking the master for a
//! replacement at `worker.max_requests`). It must not know the app's routes (that is `app`) nor
//! anything about connections beyond the guard it is handed.

use std::any::Any;
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::net::IpAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::{pin, Pin};
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use hyper::body::{Body as _, Incoming};
use hyper::header::{HeaderValue, CONNECTION};
use hyper::http::request::Parts;
use hyper::{Request, Response, Version};
use tracing::{error, warn};

use crate::app::builtin;
use crate::config::OnRedisError;
use crate::http::activity::ActivityGuard;
use crate::http::response::{self, Body, X_WORKER_ID};
use crate::limits::admission::{Permits, Rejection};
use crate::limits::cluster::Verdict;
use crate::serve::client_rate::ClientRate;
use crate::serve::edge;
use crate::serve::health::Exempt;
use crate::serve::request_guard::{Admitted, Exchange, Guarded, InFlight, RequestGuard};
use crate::serve::state::Worker;
use crate::shm::ratelimit::Decision;

/// The future hyper gets for a request: the response itself when the app answered at once (most
/// requests), or the boxed wait of a route that waits, with its timeout and panic guard.
// `Ready` is the common case, held inline for the same reason as `builtin::Reply::Now`.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Handled {
    Ready(Option<Response<Guarded>>),
    Later(Pin<Box<dyn Future<Output = Response<Guarded>> + Send>>),
    /// A request to the app, which goes on if the client leaves (see `Exchange`).
    Proxied(Exchange),
}

impl Handled {
    fn now(res: Response<Guarded>) -> Handled {
        Handled::Ready(Some(res))
    }
}

impl Future for Handled {
    type Output = Result<Response<Guarded>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Handled::Ready(res) => Poll::Ready(Ok(res.take().expect("polled after completion"))),
            Handled::Later(fut) => fut.as_mut().poll(cx).map(Ok),
            Handled::Proxied(exchange) => Pin::new(exchange).poll(cx).map(Ok),
        }
    }
}

/// hyper's service function for every request of every connection.
pub(crate) fn handle(
    worker: &'static Worker,
    activity: ActivityGuard,
    peer: Option<IpAddr>,
    mut req: Request<Incoming>,
) -> Handled {
    let started = worker.timed.then(Instant::now);
    // Before anything (the access log, the limits) reads the request: see `edge`.
    let malformed = edge::check(&mut req).err();
    let http1 = req.version() < Version::HTTP_2;
    if !http1 {
        activity.set_http2();
    }
    let access = worker
        .access
        .get()
        .map(|log| log.entry(req.method(), req.uri(), req.version(), req.headers(), peer));
    let mut guard = RequestGuard {
        worker,
        http1,
        admitted: None,
        _health: None,
        rate: None,
        started,
        status: 0,
        bytes: 0,
        access,
        _activity: activity,
    };
    if let Some(res) = malformed {
        return Handled::now(finish(res.response(), guard));
    }
    // A load balancer's health check: past every limit below (see `health`).
    match worker.health.check(&req, &worker.slot().health_inflight) {
        Exempt::No => {}
        Exempt::Yes(permit) => {
            guard._health = Some(permit);
            return serve(worker, req, peer, guard);
        }
        Exempt::Over => return Handled::now(finish(health_over(), guard)),
    }

    let counted_in_redis = worker.cluster.as_ref().is_some_and(|c| c.has_rate());
    if let Some(limit) = worker.rate.as_ref().filter(|_| !counted_in_redis) {
        if let Err(refused) = rate_here(limit, &req, peer, &mut guard) {
            return Handled::now(rate_limited(limit, &refused, guard));
        }
    }

    if !http1 && req.headers().len() > worker.limits.max_headers {
        let body = format!(
            "more than {} request headers (worker.max_headers)\n",
            worker.limits.max_headers
        );
        let res = crate::http::response::text(
            hyper::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            bytes::Bytes::from(body),
        );
        return Handled::now(finish(res, guard));
    }

    // A declared length (Content-Length, on HTTP/1 and HTTP/2 alike) shows up as the lower
    // bound of the body's size hint; bodies without one are limited while they stream (`app`).
    if req.body().size_hint().lower() > worker.limits.max_body_bytes {
        return Handled::now(finish(worker.responses.too_large(), guard));
    }

    match worker.admission.admit() {
        Ok(permits) => admitted(&mut guard, &req, permits),
        Err(Some(why)) => return Handled::now(finish(refusal(worker, why), guard)),
        // Over a limit, with a queue: wait for the permits, then go on as below.
        Err(None) => {
            return Handled::Later(Box::pin(async move {
                match worker.admission.wait().await {
                    Ok(permits) => {
                        admitted(&mut guard, &req, permits);
                        let Ok(res) = proceed(worker, req, peer, guard).await;
                        res
                    }
                    Err(why) => finish(refusal(worker, why), guard),
                }
            }))
        }
    }
    proceed(worker, req, peer, guard)
}

/// An admitted request: past the cluster (Redis: the client's rate and the cluster-wide cap),
/// if there is one, then served.
fn proceed(
    worker: &'static Worker,
    req: Request<Incoming>,
    peer: Option<IpAddr>,
    guard: RequestGuard,
) -> Handled {
    let Some(cluster) = &worker.cluster else {
        return serve(worker, req, peer, guard);
    };
    let limit = worker.rate.as_ref().filter(|_| cluster.has_rate());
    let client = limit.map(|l| l.client_key(req.headers(), peer));
    Handled::Later(Box::pin(async move {
        let mut guard = guard;
        match cluster.acquire(client.as_deref()).await {
            Verdict::Admitted(lease, decision) => {
                if let Some(a) = guard.admitted.as_mut() {
                    a.lease = lease;
                }
                guard.rate = decision;
            }
            Verdict::Limited(decision) => {
                if let Some(limit) = limit {
                    guard.admitted = None;
                    limit.count_refused();
                    return rate_limited(limit, &decision, guard);
                }
            }
            Verdict::Full => {
                cluster.full();
                guard.admitted = None;
                return finish(worker.responses.cluster_limit(cluster.cap), guard);
            }
            Verdict::Unavailable => {
                cluster.degraded();
                match cluster.policy {
                    OnRedisError::Closed => {
                        guard.admitted = None;
                        return finish(worker.responses.redis_unavailable(), guard);
                    }
                    // The host's own table stands in for Redis's.
                    OnRedisError::Local => {
                        if let Some(limit) = limit {
                            if let Err(refused) = rate_here(limit, &req, peer, &mut guard) {
                                guard.admitted = None;
                                return rate_limited(limit, &refused, guard);
                            }
                        }
                    }
                    OnRedisError::Open => {}
                }
            }
        }
        let Ok(res) = serve(worker, req, peer, guard).await;
        res
    }))
}

/// `limits.rate` counted in this host's table: the decision goes on the guard (for the
/// response's headers), or comes back as the refusal.
fn rate_here(
    limit: &ClientRate,
    req: &Request<Incoming>,
    peer: Option<IpAddr>,
    guard: &mut RequestGuard,
) -> Result<(), Decision> {
    let decision = limit.check(req.headers(), peer);
    if !decision.allowed {
        return Err(decision);
    }
    guard.rate = Some(decision);
    Ok(())
}

/// The 429 of a client over `limits.rate`, counted in the worker's record.
fn rate_limited(limit: &ClientRate, decision: &Decision, guard: RequestGuard) -> Response<Guarded> {
    guard
        .worker
        .admission
        .slot()
        .rate_limited
        .fetch_add(1, Ordering::Relaxed);
    finish(limit.refused(decision), guard)
}

/// What a health check gets when `health::MAX_IN_FLIGHT` are in flight in its worker already.
fn health_over() -> Response<Body> {
    crate::http::response::text(
        hyper::StatusCode::SERVICE_UNAVAILABLE,
        bytes::Bytes::from(format!(
            "more than {} health checks in flight in this worker (limits.health_paths)\n",
            crate::serve::health::MAX_IN_FLIGHT
        )),
    )
}

/// What a refused request gets.
fn refusal(worker: &'static Worker, why: Rejection) -> Response<Body> {
    let responses = &worker.responses;
    match why {
        Rejection::Worker => responses.worker_limit(),
        Rejection::Host => responses.host_limit(response::host_cap(worker.admission.board())),
        Rejection::QueueFull => responses.queue_full(),
        Rejection::QueueTimeout => responses.queue_timeout(),
    }
}

/// Records an admitted request: its permits, and its description in the scoreboard.
fn admitted(guard: &mut RequestGuard, req: &Request<Incoming>, permits: Permits<'static>) {
    let slot = guard.worker.admission.slot();
    // Borrowed straight from the request: nothing is allocated to describe it.
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path(), |pq| pq.as_str());
    let described = slot
        .begin_request(req.method().as_str(), target)
        .map(|index| InFlight { slot, index });
    guard.admitted = Some(Admitted {
        _described: described,
        _permits: permits,
        lease: None,
    });
}

/// An admitted request: to the app process or upstream, or to the built-in app.
fn serve(
    worker: &'static Worker,
    req: Request<Incoming>,
    peer: Option<IpAddr>,
    guard: RequestGuard,
) -> Handled {
    let (mut head, body) = req.into_parts();
    if let Some(proxy) = worker.proxy.get() {
        let client = guard.activity().connection();
        // Which app process took the request, for `app.kill_on_timeout` (only then).
        let ticket = proxy
            .kills_on_timeout()
            .then(|| std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)));
        let answer = proxy.forward(worker, &mut head, body, peer, client, ticket.clone());
        let answer = Box::pin(later(worker, head, answer, guard, ticket));
        return Handled::Proxied(Exchange::new(worker, answer));
    }
    match catch_unwind(AssertUnwindSafe(|| {
        builtin::call(worker, &worker.app, &head, body)
    })) {
        Ok(Ok(builtin::Reply::Now(res))) => Handled::now(finish(res, guard)),
        Ok(Ok(builtin::Reply::Later(wait))) => {
            Handled::Later(Box::pin(later(worker, head, wait, guard, None)))
        }
        Ok(Err(e)) => Handled::now(failed(&head, e, guard)),
        Err(panic) => Handled::now(panicked(&head, panic, guard)),
    }
}

/// The rest of a request whose handler waits: bounded by `worker.request_timeout` (504), and a
/// panic while it is polled is a 500 like one in `builtin::call`.
async fn later(
    worker: &'static Worker,
    head: Parts,
    wait: impl Future<Output = Response<Body>> + Send,
    mut guard: RequestGuard,
    ticket: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
) -> Response<Guarded> {
    let mut wait = pin!(wait);
    let caught = poll_fn(
        |cx| match catch_unwind(AssertUnwindSafe(|| wait.as_mut().poll(cx))) {
            Ok(Poll::Ready(res)) => Poll::Ready(Ok(res)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic)),
        },
    );
    match tokio::time::timeout(worker.limits.request_timeout, caught).await {
        Ok(Ok(res)) => finish(res, guard),
        Ok(Err(panic)) => panicked(&head, panic, guard),
        Err(_) => {
            guard.admitted = None;
            if let Some(proxy) = worker.proxy.get() {
                let ticket = ticket.map_or(0, |t| t.load(Ordering::Relaxed));
                proxy.timed_out(worker, ticket);
            }
            worker
                .admission
                .slot()
                .timeouts
                .fetch_add(1, Ordering::Relaxed);
            warn!(
                http.method = %head.method,
                url.path = head.uri.path(),
                "request exceeded worker.request_timeout; answered 504"
            );
            finish(worker.responses.timeout(), guard)
        }
    }
}

#[cold]
fn failed(head: &Parts, e: builtin::AppError, mut guard: RequestGuard) -> Response<Guarded> {
    guard.admitted = None;
    error!(
        http.method = %head.method,
        url.path = head.uri.path(),
        error = %e,
        "request handler failed; answered 500"
    );
    let res = guard.worker.responses.internal_error();
    finish(res, guard)
}

/// The text a panic was raised with (`panic!("...")` or a formatted `String`).
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-string panic payload)")
}

#[cold]
fn panicked(
    head: &Parts,
    panic: Box<dyn Any + Send>,
    mut guard: RequestGuard,
) -> Response<Guarded> {
    guard.admitted = None;
    let message = panic_message(&*panic);
    error!(
        http.method = %head.method,
        url.path = head.uri.path(),
        panic.message = message,
        "request handler panicked; answered 500"
    );
    let res = guard.worker.responses.internal_error();
    finish(res, guard)
}

/// Stamps the response with the worker id and hands it the request's guard.
fn finish(mut res: Response<Body>, mut guard: RequestGuard) -> Response<Guarded> {
    guard.status = res.status().as_u16();
    res.headers_mut()
        .insert(X_WORKER_ID, guard.worker.responses.worker_id().clone());
    if let (Some(decision), Some(limit)) = (&guard.rate, &guard.worker.rate) {
        limit.stamp(res.headers_mut(), decision);
    }
    // Draining: hyper closes an HTTP/1 connection after a response that says so, and the
    // client knows not to send another request on it (see `connection`).
    if guard.http1
        && guard.worker.draining.load(Ordering::Relaxed)
        && res.status() != hyper::StatusCode::SWITCHING_PROTOCOLS
    {
        res.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    // A response already complete in memory needs no more work: its permits go back now rather
    // than once it is sent, which a client that reads slowly, or an HTTP/2 client that grants
    // no flow-control window, could put off for as long as it likes. The guard stays with the
    // body for the counts and the access log.
    if res.body().is_complete() {
        guard.admitted = None;
    }
    res.map(|body| Guarded::new(body, guard))
}
