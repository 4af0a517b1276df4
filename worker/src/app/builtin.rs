//! The built-in app, served when no app is configured: a demo that makes a fresh install
//! useful, and the load and failure helpers that tests and benchmarks need.
//!
//! Routes: `GET /` (hello world), `POST /echo` (streams the body back), `GET /sleep?ms=N` (waits
//! without blocking), `GET /work?ms=N` (burns N ms of CPU time), `GET /healthz`, and the failure
//! helpers:
//!
//! - `GET /panic` and `GET /error`: a handler that panics, and one that fails (both 500).
//! - `GET /leak?kb=N`: allocates N KiB (at most 1 GiB per request, else 400), writes to every
//!   page so that it is really resident, and keeps it for the rest of the process's life: the
//!   memory growth that `worker.max_rss` recycles. Answers 200 with the total now held.
//! - `GET /block?ms=N` (N at most 10 minutes): blocks the worker's only thread, event loop
//!   included, for N ms, then answers 200. Nothing else in the worker runs meanwhile, the
//!   heartbeat included: this is a hung worker, for the master's hang detection to find.
//!
//! It owns only routing, the handlers and what they keep (`State`); limits, timeouts, panics and
//! the `X-Worker-Id` header are the request pipeline's job.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Limited;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE};
use hyper::http::request::Parts;
use hyper::{Method, Response, StatusCode};

use crate::http::client_body::{ClientBody, ClientBodyError};
use crate::http::context::WorkerContext;
use crate::http::response::{text, Body};

const HELLO: Bytes = Bytes::from_static(b"Hello, World!");
const OK: Bytes = Bytes::from_static(b"ok\n");
const WORKED: Bytes = Bytes::from_static(b"worked\n");
const ALLOW_GET: HeaderValue = HeaderValue::from_static("GET, HEAD");
const ALLOW_POST: HeaderValue = HeaderValue::from_static("POST");
const OCTET_STREAM: HeaderValue = HeaderValue::from_static("application/octet-stream");

/// Longest `/sleep` or `/work` accepted: long enough for any timeout or hang test, short enough
/// that a typo cannot park a request (and its permits) for days.
pub(crate) const MAX_MS: u64 = 10 * 60 * 1000;

/// Largest `/leak` in one request, in KiB (1 GiB): enough to cross any sensible `max_rss` in a
/// few requests, small enough that one typo does not take the host down.
pub(crate) const MAX_LEAK_KIB: u64 = 1024 * 1024;

/// What the app keeps for the life of the worker process.
#[derive(Default)]
pub(crate) struct State {
    /// Bytes allocated by `/leak` so far.
    leaked_bytes: AtomicU64,
    /// `/work` spins running on the blocking pool now.
    pub(crate) spinning: AtomicU64,
}

/// A handler that failed without panicking (`/error`).
#[derive(Debug, thiserror::Error)]
pub(crate) enum AppError {
    #[error("failure requested by GET /error")]
    Requested,
}

/// A handler's answer: most routes answer at once; the few that wait (`/sleep`, `/work`) hand
/// back a boxed future. Keeping the immediate case free of any future keeps the per-request
/// state small: hyper moves the service future around, and an `async fn` holding every
/// route's state was over 1.5 KiB on every request.
// `Now` is the common case and is returned by value: boxing it would cost an allocation per
// request, which is what this type exists to avoid.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Reply {
    Now(Response<Body>),
    Later(Pin<Box<dyn Future<Output = Response<Body>> + Send>>),
}

/// Routes one request. `head` is borrowed so that the pipeline can still name the request in
/// its logs if this panics, fails or times out.
pub(crate) fn call(
    worker: &'static WorkerContext,
    state: &'static State,
    head: &Parts,
    body: Incoming,
) -> Result<Reply, AppError> {
    let is_get = head.method == Method::GET || head.method == Method::HEAD;
    let res = match head.uri.path() {
        "/" if is_get => text(StatusCode::OK, HELLO),
        "/healthz" if is_get => text(StatusCode::OK, OK),
        "/echo" if head.method == Method::POST => {
            let content_type = head
                .headers
                .get(CONTENT_TYPE)
                .cloned()
                .unwrap_or(OCTET_STREAM);
            let limit = usize::try_from(worker.limits.max_body_bytes).unwrap_or(usize::MAX);
            let mut body = ClientBody::new(Limited::new(body, limit), worker.limits.body_timing());
            // The answer waits for the body's first frame: a body malformed (a bad chunk size)
            // or stalled from the start gets its 400 or 408 instead of a cut connection.
            return Ok(Reply::Later(Box::pin(async move {
                if let Err(e) = body.first_frame().await {
                    return client_body_failed(&e);
                }
                let mut res = Response::new(Body::stream(body));
                res.headers_mut().insert(CONTENT_TYPE, content_type);
                res
            })));
        }
        "/sleep" if is_get => match millis(head) {
            Ok(d) => {
                return Ok(Reply::Later(Box::pin(async move {
                    tokio::time::sleep(d).await;
                    text(StatusCode::OK, Bytes::from_static(b"slept\n"))
                })))
            }
            Err(reason) => bad_request(reason),
        },
        "/work" if is_get => match millis(head) {
            // `inline=1`: on the event loop, which it blocks meanwhile, as a synchronous app
            // holds its only thread (the balance benchmark's slow request).
            Ok(d) if query_param(head, "inline=").is_some_and(|v| v == "1") => {
                spin(d, &AtomicBool::new(false));
                text(StatusCode::OK, WORKED)
            }
            Ok(d) => return Ok(Reply::Later(Box::pin(work_off_loop(state, d)))),
            Err(reason) => bad_request(reason),
        },
        "/block" if is_get => match millis(head) {
            Ok(d) => {
                // Deliberately blocks the thread, and with it the event loop: see the module doc.
                std::thread::sleep(d);
                text(StatusCode::OK, Bytes::from_static(b"blocked\n"))
            }
            Err(reason) => bad_request(reason),
        },
        "/leak" if is_get => match kibibytes(head) {
            Ok(kib) => leak(state, kib),
            Err(reason) => bad_request(reason),
        },
        "/panic" if is_get => panic!("panic requested by GET /panic"),
        "/error" if is_get => return Err(AppError::Requested),
        "/echo" => not_allowed(ALLOW_POST),
        "/" | "/healthz" | "/sleep" | "/work" | "/block" | "/leak" | "/panic" | "/error" => {
            not_allowed(ALLOW_GET)
        }
        _ => text(
            StatusCode::NOT_FOUND,
            Bytes::from_static(
                b"not found; routes: GET /, POST /echo, GET /sleep?ms=N, GET /work?ms=N, GET /healthz\n",
            ),
        ),
    };
    Ok(Reply::Now(res))
}

/// The answer to a request body that failed before the response began: 408 if the client
/// stalled, 400 if it broke off or was malformed (past `max_body_bytes`: 413). The connection
/// closes after it: the rest of the body cannot be found in what is left.
#[cold]
fn client_body_failed(e: &ClientBodyError) -> Response<Body> {
    let status = match e {
        ClientBodyError::Stalled(_) => StatusCode::REQUEST_TIMEOUT,
        ClientBodyError::Broken(cause) if cause.is::<http_body_util::LengthLimitError>() => {
            StatusCode::PAYLOAD_TOO_LARGE
        }
        ClientBodyError::Broken(_) => StatusCode::BAD_REQUEST,
    };
    let mut res = text(status, Bytes::from(format!("{e}\n")));
    res.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    res
}

fn not_allowed(allow: HeaderValue) -> Response<Body> {
    let mut res = text(
        StatusCode::METHOD_NOT_ALLOWED,
        Bytes::from_static(b"method not allowed\n"),
    );
    res.headers_mut().insert(ALLOW, allow);
    res
}

/// Allocates `kib` KiB, makes it resident and keeps it until the process exits.
fn leak(state: &State, kib: u64) -> Response<Body> {
    let bytes = kib * 1024;
    let mut block = Vec::<u8>::new();
    // A refusal from the allocator is an answer, not an abort of the worker. (With overcommit
    // it rarely refuses; touching the pages below is what may wake the OOM killer, which is the
    // point of the exercise.)
    if block.try_reserve_exact(bytes as usize).is_err() {
        return text(
            StatusCode::INSUFFICIENT_STORAGE,
            Bytes::from_static(b"cannot allocate that much memory\n"),
        );
    }
    // Every byte written, so every page is resident. Not zeros: zeroing fresh memory may be
    // turned into an untouched `calloc`-style allocation that costs no RSS at all.
    block.resize(bytes as usize, 0xa5);
    block.leak();
    let total = state.leaked_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
    text(
        StatusCode::OK,
        Bytes::from(format!(
            "leaked {kib} KiB; holding {} KiB in total\n",
            total / 1024
        )),
    )
}

/// The `kb` query parameter of `/leak`, or the one-line reason for a 400.
fn kibibytes(head: &Parts) -> Result<u64, &'static str> {
    let Some(value) = query_param(head, "kb=") else {
        return Err("missing query parameter kb (KiB, 0 to 1048576)\n");
    };
    match value.parse::<u64>() {
        Ok(kib) if kib <= MAX_LEAK_KIB => Ok(kib),
        Ok(_) => Err("query parameter kb must be at most 1048576 (1 GiB)\n"),
        Err(_) => Err("query parameter kb must be a whole number of KiB, 0 to 1048576\n"),
    }
}

/// The value of the first `name=value` pair of the query (`name` includes the `=`).
fn query_param<'a>(head: &'a Parts, name: &str) -> Option<&'a str> {
    head.uri
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix(name))
}

/// The `ms` query parameter, or the one-line reason for a 400.
fn millis(head: &Parts) -> Result<Duration, &'static str> {
    let value = query_param(head, "ms=");
    let Some(value) = value else {
        return Err("missing query parameter ms (milliseconds, 0 to 600000)\n");
    };
    match value.parse::<u64>() {
        Ok(ms) if ms <= MAX_MS => Ok(Duration::from_millis(ms)),
        Ok(_) => Err("query parameter ms must be at most 600000 (10 minutes)\n"),
        Err(_) => Err("query parameter ms must be a whole number of milliseconds, 0 to 600000\n"),
    }
}

fn bad_request(reason: &'static str) -> Response<Body> {
    text(
        StatusCode::BAD_REQUEST,
        Bytes::from_static(reason.as_bytes()),
    )
}

/// `/work` without `inline=1`: the spin runs on the runtime's blocking pool, so that the event
/// loop keeps accepting, answering and rejecting meanwhile, as it does in front of an app
/// process. If the request is dropped (timed out with 504, client gone, worker stopping), the
/// spin stops at its next check instead of burning the rest of its time for nobody.
async fn work_off_loop(state: &'static State, d: Duration) -> Response<Body> {
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let flag = Arc::clone(&stop.0);
    let spinning: &'static AtomicU64 = &state.spinning;
    let task = tokio::task::spawn_blocking(move || {
        spinning.fetch_add(1, Ordering::Relaxed);
        spin(d, &flag);
        spinning.fetch_sub(1, Ordering::Relaxed);
    });
    match task.await {
        Ok(()) => text(StatusCode::OK, WORKED),
        // The spin cannot panic; the pool refuses work only while the runtime shuts down.
        Err(_) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            Bytes::from_static(b"worker is stopping\n"),
        ),
    }
}

/// Spins until this thread has used `d` of CPU time, not until `d` has passed on the wall
/// clock: a fixed amount of work, so that workers sharing a CPU do not each finish "10 ms of
/// work" in 10 ms. Returns early once `stop` is set.
fn spin(d: Duration, stop: &AtomicBool) {
    let start = thread_cpu_time();
    while thread_cpu_time().saturating_sub(start) < d && !stop.load(Ordering::Relaxed) {
        std::hint::spin_loop();
    }
}

/// CPU time this thread has used so far.
fn thread_cpu_time() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}
